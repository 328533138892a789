"""Shared pytest fixtures. Run the whole suite with `pytest` from the repository root."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest


def once_per_session(tmp_path_factory, name: str, make):
    """`make(folder)` -> a JSON-able result, made once per test session: under pytest-xdist the
    workers share a folder beside their own temporary folders, and a file lock, so the first
    worker to ask makes it and the others read what it wrote (xdist's documented recipe)."""
    import json
    import os
    import tempfile

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return make(tmp_path_factory.mktemp(name))
    from filelock import FileLock  # a dependency of torch

    shared = tmp_path_factory.getbasetemp().parent  # this session's, shared by its workers
    with FileLock(str(shared / f"{name}.lock")):
        done = shared / f"{name}.json"
        if done.is_file():
            return json.loads(done.read_text())
        result = make(Path(tempfile.mkdtemp(prefix=f"{name}-", dir=shared)))  # a fresh folder if one failed before
        done.write_text(json.dumps(result))
        return result


def pytest_configure(config):
    """Under pytest-xdist (`-n 2 --dist loadfile`, as pyproject sets it) a worker computes on one
    intra-op thread (two workers share the 2 cores; a second thread each would only contend), and
    so do the processes its tests start, unless OMP_NUM_THREADS says otherwise."""
    import os

    if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one intra-op thread: on 2 (shared) cores a second one only adds
    synchronisation, ~100x slower under load for (32 x 32) matmuls. A module opts in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def need(module: str, why: str = ""):
    """Import `module` (an optional extra's package), or skip saying what is missing. In CI (CI set)
    every extra is installed (`.[all]`), so a missing one fails there instead of skipping."""
    import importlib
    import os

    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=why or f"{module} is not installed (pip install -e '.[all]')")


@pytest.fixture
def hf_offline(monkeypatch):
    """Hugging Face libraries (datasets, hub, transformers) stay offline: a test that would
    download anything fails instead. `pytestmark = pytest.mark.usefixtures("hf_offline")`."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def paper_dir(repo) -> Path:
    return repo / "data" / "paper"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, repo) -> Path:
    """A test-sized embedded corpus (tests/fixtures/data/tiny_embedded.yaml, vocab 512), built
    once per session into a temporary data root."""
    import os

    from cartlab.data.build import build
    from cartlab.data.recipe import load_recipe

    root = tmp_path_factory.mktemp("data_root")
    out = root / "built" / "tiny-embedded"
    old = os.environ.get("CARTLAB_DATA_DIR")
    os.environ["CARTLAB_DATA_DIR"] = str(root)
    try:
        build(load_recipe(repo / "tests" / "fixtures" / "data" / "tiny_embedded.yaml"), out, progress=False,
              log=lambda s: None)
    finally:
        if old is None:
            os.environ.pop("CARTLAB_DATA_DIR")
        else:
            os.environ["CARTLAB_DATA_DIR"] = old
    return out


OFFLINE_CLI = """
import socket, sys
def refuse(*args, **kwargs):
    raise OSError("network access attempted during an offline test")
socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = refuse
from cartlab.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_offline_cli(*args: str, data_root: Path, hash_seed: str = "0", timeout: int = 600):
    """`cartlab ARGS` in a fresh process with sockets refused and the hubs set offline, under its
    own data root: what a user on a machine without the internet runs."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "CARTLAB_DATA_DIR": str(data_root), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONHASHSEED": hash_seed}
    return subprocess.run([sys.executable, "-c", OFFLINE_CLI, *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_data):
    """A tiny CART trained once per session (`train_helpers.tiny_config`: 12 steps, an evaluation
    and a checkpoint every 4, on the tiny corpus): run_id, db, out (its out_dir), run_dir,
    checkpoint (the newest) and config. Shared by every test that needs "a trained checkpoint":
    read it, or copy it before changing anything (`shutil.copytree`, `shutil.copy` of the db)."""
    from types import SimpleNamespace

    from cartlab.checkpoint import latest
    from cartlab.train import train
    from train_helpers import tiny_config

    out = tmp_path_factory.mktemp("tiny_run")
    cfg = tiny_config(tiny_data, out)
    run_id = train(cfg)
    return SimpleNamespace(run_id=run_id, db=out / "results.db", out=out, run_dir=out / run_id,
                           checkpoint=latest(out / run_id / "checkpoints"), config=cfg)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """`cartlab train --preset smoke` as on a fresh clone, offline: no corpus and no tokenizer cache
    in its data root, so it builds the shipped `embedded` recipe on first use, then trains CART."""
    from types import SimpleNamespace

    def layout(root) -> SimpleNamespace:
        root = Path(root)
        return SimpleNamespace(data_root=root / "data", db=root / "results.db", out=root / "runs")

    def make(root: Path) -> str:
        run = layout(root)
        proc = run_offline_cli("train", "--preset", "smoke", "--quiet", f"results_db={run.db}", f"out_dir={run.out}",
                               data_root=run.data_root)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "building the embedded corpus" in proc.stderr
        return str(root)

    return layout(once_per_session(tmp_path_factory, "fresh_clone", make))


def copy_db(src: Path, dst: Path) -> None:
    """A consistent copy of a results database (SQLite's backup: committed WAL pages included)."""
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)
    a.close()
    b.close()


def db_rows(db: Path, sql: str) -> list[tuple]:
    """The rows of one SQL query on a results database."""
    con = sqlite3.connect(db)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def _completed_runs(db: Path) -> int:
    try:
        return db_rows(db, "SELECT count(*) FROM runs WHERE status = 'completed'")[0][0]
    except sqlite3.OperationalError:  # the file exists a moment before its tables do
        return 0


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory, tiny_data):
    """A five-run study of tiny models (2-seed baseline, stored- and effective-matched Dense, one
    ablation) trained by `cartlab ablate`, which is SIGKILLed after its first completed run and
    then re-run with two workers. Returns the paths and what was observed in between. Trained
    once per session: tests/test_notebooks.py checks the kill and the report, and
    tests/test_report_browser.py opens the report in a browser."""

    def make(root: Path) -> dict:
        import os
        import signal
        import subprocess
        import sys
        import time

        import yaml

        from train_helpers import TINY_MODEL

        model = {f"model.{k}": v for k, v in TINY_MODEL.items() if k != "kind"}
        spec = {
            "name": "tiny", "preset": "smoke", "seeds": [1],
            "set": {**model, "data.dir": str(tiny_data), "steps": 24, "seq_len": 32, "batch_size": 4,
                    "eval_every": 8, "eval_batches": 2, "eval_batch_size": 2, "log_every": 4, "checkpoint_every": 8,
                    "out_dir": str(root / "runs"), "device": "cpu"},
            "runs": [{"label": "baseline", "seeds": [1, 2]}, {"label": "dense-stored", "set": {"dense_match": "stored"}},
                     {"label": "dense-effective", "set": {"dense_match": "effective"}},
                     {"label": "no_lti", "hooks": ["no_lti"]}],
        }
        study = root / "tiny.yaml"
        study.write_text(yaml.safe_dump(spec))
        db, reports = root / "results.db", root / "reports"
        cmd = [sys.executable, "-m", "cartlab.cli", "ablate", str(study), "--db", str(db), "--reports-dir", str(reports),
               "--quiet"]
        # SIGKILLed, the first ablate cannot remove its kernel's connection file: keep it out of /tmp
        env = {**os.environ, "TMPDIR": str(root / "tmp")}
        (root / "tmp").mkdir(exist_ok=True)

        first_log = root / "first_ablate.log"  # a file, not a pipe nobody reads: a chatty run cannot stall on it
        with first_log.open("wb") as log:
            proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if db.exists() and _completed_runs(db) >= 1:
                break
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the ablate process and its notebook kernel, mid-study
        proc.wait()
        assert db.exists() and _completed_runs(db) >= 1, \
            f"the first ablate completed no run before it was killed:\n{first_log.read_text()[-3000:]}"
        after_kill = dict(db_rows(db, "SELECT run_id, status FROM runs"))
        executed = {p.name: p.stat().st_mtime_ns for p in (reports / "tiny" / "runs").glob("*.ipynb")}

        rerun = subprocess.run(cmd + ["--workers", "2"], env=env, capture_output=True, text=True, timeout=600)
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        return {"study": str(study), "db": str(db), "reports": str(reports), "after_kill": after_kill,
                "executed": executed, "rerun_log": rerun.stdout + rerun.stderr}

    made = once_per_session(tmp_path_factory, "study", make)
    return {**made, **{k: Path(made[k]) for k in ("study", "db", "reports")}}


@pytest.fixture(scope="session")
def tiny_report(tmp_path_factory, tiny_study) -> Path:
    """The tiny study's report, rendered once per session into its reports folder: the path of its
    index.html. tests/test_notebooks.py checks what it holds; tests/test_report_browser.py opens
    its pages (read it, never render into that folder again)."""
    from cartlab.report import render

    def make(_) -> str:
        return str(render(str(tiny_study["study"]), tiny_study["db"], tiny_study["reports"], log=lambda s: None))

    return Path(once_per_session(tmp_path_factory, "report", make))
