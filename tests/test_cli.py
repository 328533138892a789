"""The command line as a user meets it: fast help, a version, what `cartlab train` prints.

    pytest tests/test_cli.py
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from cartlab import __version__, cli

PROBE = """
import sys
from cartlab.cli import main
code = main(sys.argv[1:])
heavy = sorted(m for m in ("torch", "pandas", "numpy", "lm_eval", "transformers") if m in sys.modules)
print("IMPORTED:" + ",".join(heavy))
sys.exit(code)
"""


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120)


def test_help_and_version_import_no_torch():
    for args in (("--help",), ("--version",)):
        proc = _run(*args)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip().endswith("IMPORTED:"), proc.stdout[-300:]
    assert f"cartlab {__version__}" in _run("--version").stdout


def test_help_lists_every_command_and_a_wrong_command_is_one_line():
    out = _run("--help").stdout
    for name, (_, summary) in cli.COMMANDS.items():
        assert name in out and summary.split()[0] in out
    proc = _run("trian")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "invalid choice: 'trian'" in proc.stderr


def test_each_command_builds_its_own_parser():
    """Every command's module registers under its name (a typo in COMMANDS would only show when
    that command is run)."""
    for name in cli.COMMANDS:
        parser = cli.build_parser(name)
        sub = next(a for a in parser._actions if a.dest == "command")
        real = sub.choices[name]
        assert real.add_help and real.description, name  # the module's parser, not the listing's stub


@pytest.mark.slow
def test_quiet_is_the_one_progress_switch():
    for name in ("train", "ablate", "data", "demo"):
        help_text = subprocess.run([sys.executable, "-m", "cartlab.cli", name, *(("build",) if name == "data" else ()),
                                    "--help"], capture_output=True, text=True, timeout=120).stdout
        assert "--quiet" in help_text and "--no-progress" not in help_text, name


@pytest.mark.slow
def test_train_prints_validation_at_each_eval_and_a_closing_summary(tiny_data, tmp_path, capsys):
    from train_helpers import TINY_MODEL

    args = ["train", "--preset", "smoke", f"model.vocab_size={TINY_MODEL['vocab_size']}", "model.d_model=32",
            f"data.dir={tiny_data}", "steps=8", "eval_every=4", "eval_batches=2", "seq_len=32", "batch_size=4",
            f"results_db={tmp_path / 'r.db'}", f"out_dir={tmp_path / 'runs'}", "device=cpu"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    evals = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in evals] == ["step 4", "step 8"]
    assert all(" | val " in line and "(ppl " in line for line in evals)
    assert "completed at step 8" in out
    assert "checkpoint: " in out and "step_00000008" in out
    assert "next: cartlab eval " in out and "cartlab report " in out


def test_ablate_watches_the_steps_of_running_runs(tmp_path):
    """`cartlab ablate` shows progress inside each run by reading the newest logged step of the
    runs being trained (in notebook kernels) from the results database, read-only."""
    from cartlab.ablate import StepWatcher
    from cartlab.results.db import ResultsDB

    path = tmp_path / "r.db"
    seen = []
    watcher = StepWatcher(path, seen.append, interval=0.01)
    watcher.active = {"a", "b"}
    assert watcher.steps() == {}  # no database yet: nothing to show, no error
    db = ResultsDB(path)
    for rid in ("a", "b", "c"):
        db.upsert_run(rid)
    db.log_train("a", [{"step": s, "loss": 1.0} for s in (10, 20, 30)])
    db.log_train("c", [{"step": 50, "loss": 1.0}])
    assert watcher.steps() == {"a": 30}  # only the active runs; b has logged nothing yet
    with watcher:
        db.log_train("b", [{"step": 5, "loss": 1.0}])
        import time

        deadline = time.time() + 10
        while not any(s.get("b") == 5 for s in seen) and time.time() < deadline:
            time.sleep(0.01)
    db.close()
    assert any(s == {"a": 30, "b": 5} for s in seen)


def test_train_bar_names_each_phase(tiny_data, tmp_path, monkeypatch):
    """The training bar says what the run is doing: train, each eval, the final eval, each
    post-training measure (depth profile), the final checkpoint, then how the run ended."""
    import cartlab.train.loop as loop
    from train_helpers import tiny_config

    shown = []

    class Recording(loop.tqdm):
        def set_description_str(self, desc=None, refresh=True):
            shown.append(desc.split(" [", 1)[1].rstrip("]"))
            super().set_description_str(desc, refresh)

    monkeypatch.setattr(loop, "tqdm", Recording)
    loop.train(tiny_config(tiny_data, tmp_path, steps=8, eval_every=4, checkpoint_every=8,
                           measures=["depth_profile"]))
    assert shown == ["train", "eval", "train", "final eval", "depth profile", "checkpoint", "completed"]


def test_demo_trains_two_runs_at_once_when_two_cores_are_free():
    from cartlab.demo import choose_workers

    assert choose_workers(2, 0.0) == (2, "2 of 2 cores free, load 0.0")
    assert choose_workers(2, 0.3)[0] == 2  # an idle machine's background noise
    assert choose_workers(2, 0.7) == (1, "1 of 2 cores free, load 0.7")
    assert choose_workers(2, 3.5) == (1, "0 of 2 cores free, load 3.5")
    assert choose_workers(8, 5.8) == (2, "2 of 8 cores free, load 5.8")
    assert choose_workers(1, 0.0) == (1, "1 CPU core")
    assert choose_workers(None, None) == (1, "1 CPU core")
    assert choose_workers(4, None) == (2, "4 of 4 cores free")  # load unknown (Windows): taken as idle


def test_demo_says_how_many_runs_it_trains_at_once_and_leaves_out_ablates_next_line(tmp_path, monkeypatch, capsys):
    import cartlab.ablate
    import cartlab.demo
    import cartlab.report

    calls = {}
    monkeypatch.setattr(cartlab.ablate, "ablate", lambda study, overrides, **kw: calls.update(kw) or [])
    monkeypatch.setattr(cartlab.report, "render", lambda *a: tmp_path / "index.html")
    monkeypatch.setattr(cartlab.demo, "load_average", lambda: 0.1)
    monkeypatch.setattr(cartlab.demo.os, "cpu_count", lambda: 2)
    assert cli.main(["demo", "--db", str(tmp_path / "r.db"), "--quiet"]) == 0
    assert calls["workers"] == 2 and calls["next_hint"] is False
    assert capsys.readouterr().out.splitlines()[0] == "cartlab: training 2 runs at once (2 of 2 cores free, load 0.1)"
    assert cli.main(["demo", "--db", str(tmp_path / "r.db"), "--quiet", "--workers", "1"]) == 0
    assert calls["workers"] == 1
    assert "training 1 run at a time (--workers 1)" in capsys.readouterr().out


def test_ablate_ends_with_the_report_line_unless_told_not_to(tmp_path):
    """A study with every run completed and drawn trains nothing; its last line points at the
    report, which `cartlab demo` (rendering it itself) leaves out."""
    from cartlab.ablate import ablate, notebook_of, study_runs
    from cartlab.results.db import ResultsDB

    db_path = tmp_path / "r.db"
    name, runs = study_runs("cpu-demo", [f"results_db={db_path}"])
    db = ResultsDB(db_path)
    for r in runs:
        db.upsert_run(r.run_id, status="completed")
        notebook_of(r, name, tmp_path).parent.mkdir(parents=True, exist_ok=True)
        notebook_of(r, name, tmp_path).write_text("{}")
    db.close()
    for hint in (True, False):
        lines = []
        ablate("cpu-demo", [f"results_db={db_path}"], reports_dir=tmp_path, progress=False, log=lines.append,
               next_hint=hint)
        assert lines[-1].startswith("cartlab: next: cartlab report cpu-demo --db ") is hint, lines
