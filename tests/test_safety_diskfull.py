"""A full disk is said as such, in one line naming the path, and leaves nothing behind: a
checkpoint that cannot be written ends the run with `no space left on <checkpoints> (checkpoint
of about N MB)` and no partial folder (earlier checkpoints intact); a merge that cannot be written
names the database, leaves an existing one as it was with its WAL truncated (not grown by the
failed transaction), and a new one not created at all.

The disk fills for real where it can without a tmpfs: a subprocess with a file size limit
(`ulimit -f`, SIGXFSZ ignored, so writes fail with EFBIG as they fail with ENOSPC on a full
disk: torch's writer says `unexpected pos`, safetensors and Python an OS error, SQLite a disk
I/O error), and SQLite's own SQLITE_FULL by pinning `PRAGMA max_page_count`. The bad-input
corpus (tests/test_bad_inputs.py) runs the same cases through the command line.
Run: pytest tests/test_safety_diskfull.py
"""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
from contextlib import closing
from pathlib import Path

import pytest

from cartlab.results.db import ResultsDB

pytestmark = pytest.mark.usefixtures("one_thread")

LIMITED = textwrap.dedent("""
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing us
    def limit(n):
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
""")


def _run(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LIMITED + textwrap.dedent(script)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300, env={"CARTLAB_DEBUG": "", "PATH": "/usr/bin:/bin",
                                                          "OMP_NUM_THREADS": "1"})


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_checkpoint_that_does_not_fit_is_one_line_and_leaves_no_partial_folder(tmp_path):
    proc = _run(f"""
        import json, torch
        from pathlib import Path
        from cartlab.model import CARTConfig, build_model
        from cartlab.train.checkpoint import save
        model = build_model(CARTConfig.tiny())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
        opt.step()
        ckpts = Path({str(tmp_path / 'ckpts')!r})
        first, _ = save(ckpts, 1, model, opt, {{"step": 1}}, {{"model": model.config.to_dict()}}, keep=5)
        weights = (first / "model.safetensors").stat().st_size
        out = {{}}
        for step, n in ((2, weights // 2), (3, weights + 4096)):  # the weights' write fails; then state.pt's
            limit(n)
            try:
                save(ckpts, step, model, opt, {{"step": step}}, {{"model": model.config.to_dict()}}, keep=5)
                out[step] = "saved"
            except OSError as err:
                out[step] = [type(err).__name__, str(err), repr(err.__cause__)]
            limit(resource.RLIM_INFINITY if resource.getrlimit(resource.RLIMIT_FSIZE)[1] == resource.RLIM_INFINITY
                  else resource.getrlimit(resource.RLIMIT_FSIZE)[1])
        print(json.dumps(out))
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    ckpts = tmp_path / "ckpts"
    for step, cause in (("2", "File too large"), ("3", "unexpected pos")):
        name, text, raised_from = out[step]
        assert name == "NoSpace" and text.startswith(f"no space left on {ckpts} (checkpoint of about "), out
        assert text.endswith(" MB)") and "\n" not in text and cause in raised_from, out
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000001"]  # no .tmp_step_* folder, no step 2 or 3
    from cartlab.checkpoint import build

    build(ckpts / "step_00000001")  # the earlier checkpoint is whole


def test_a_run_whose_checkpoint_hits_a_full_disk_is_recorded_failed(tmp_path, tiny_data, monkeypatch):
    import torch

    from cartlab.train import TrainConfig, train
    from cartlab.train.checkpoint import NoSpace

    real, calls = torch.save, []

    def full_on_the_second(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:
            Path(f).write_bytes(b"PK\x03\x04" + b"\0" * 4092)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 3910")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_on_the_second)
    db = tmp_path / "runs" / "results.db"
    cfg = TrainConfig.from_preset("smoke", [f"data.dir={tiny_data}", "model.vocab_size=512", "steps=3",
                                            "eval_every=3", "checkpoint_every=1", "eval_batches=1", "quiet=true",
                                            f"results_db={db}", f"out_dir={tmp_path / 'runs'}"])
    with pytest.raises(NoSpace, match=r"^no space left on .*/checkpoints \(checkpoint of about \d+ MB\)$"):
        train(cfg)
    run_dir = next(p for p in (tmp_path / "runs").iterdir() if p.is_dir() and not p.name.endswith(".locks"))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000001"]
    status, message = sqlite3.connect(db).execute("SELECT status, message FROM runs").fetchone()
    assert status == "failed" and "no space left on" in message


def _shard(path: Path, run_id: str, steps: int) -> Path:
    """A results database holding one completed run with `steps` train_log rows."""
    with closing(ResultsDB(path)) as db:
        db.upsert_run(run_id, name=run_id, status="completed", step=steps)
        db.log_train(run_id, [{"step": s, "loss": 1.0 / s, "lr": 1e-3, "hyper_weights": "x" * 40}
                              for s in range(1, steps + 1)])
    return path


MERGE = """
    from cartlab.cli import main
    limit({limit})
    sys.exit(main(["results", "merge", {shard!r}, "--db", {target!r}]))
"""


def test_a_merge_into_an_existing_database_that_does_not_fit_leaves_it_as_it_was(tmp_path):
    shard = _shard(tmp_path / "shard.db", "big", 4000)
    target = _shard(tmp_path / "study.db", "small", 3)
    before = target.read_bytes()
    reader = sqlite3.connect(target)  # another process has the study open: closing the merge's
    reader.execute("SELECT count(*) FROM runs").fetchone()  # connection does not delete the WAL
    try:
        proc = _run(MERGE.format(limit=64 * 1024, shard=str(shard), target=str(target)), tmp_path)
        err = proc.stderr.strip()
        assert proc.returncode == 2 and len(err.splitlines()) == 1, err
        assert err.startswith(f"cartlab: error: {target}: the disk refused a write"), err
        assert "nothing merged, the database is as it was" in err, err
        assert target.read_bytes() == before
        wal = target.with_name(target.name + "-wal")
        assert not wal.exists() or wal.stat().st_size == 0, "the failed transaction's WAL keeps the disk full"
        assert reader.execute("SELECT run_id FROM runs").fetchall() == [("small",)]
    finally:
        reader.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard.db", "study.db"]


def test_a_merge_into_a_new_database_that_does_not_fit_creates_nothing(tmp_path):
    shard = _shard(tmp_path / "shard.db", "big", 4000)
    target = tmp_path / "study.db"
    proc = _run(MERGE.format(limit=96 * 1024, shard=str(shard), target=str(target)), tmp_path)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err
    assert f"{target}: " in err and "nothing merged, nothing created" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard.db"]


def test_sqlite_full_is_one_line_naming_the_database(tmp_path, monkeypatch):
    """SQLite's own SQLITE_FULL, at the creation of a database and in a merge into one."""
    from cartlab.results import merge

    real = ResultsDB._connect

    def full(self):
        conn = real(self)
        conn.execute("PRAGMA max_page_count = 1")
        return conn

    with monkeypatch.context() as mp:
        mp.setattr(ResultsDB, "_connect", full)
        with pytest.raises(ValueError, match=r"new\.db: no space left on the disk to write this results database "
                                             r"\(SQLite says: database or disk is full\)"):
            ResultsDB(tmp_path / "new.db")
    assert list(tmp_path.iterdir()) == []

    shard = _shard(tmp_path / "shard.db", "big", 500)
    target = _shard(tmp_path / "study.db", "small", 3)
    before = _files(tmp_path)
    real_merge = merge._merge_one

    def pinned(source, into, c):
        c.execute(f"PRAGMA max_page_count = {c.execute('PRAGMA page_count').fetchone()[0]}")
        return real_merge(source, into, c)

    monkeypatch.setattr(merge, "_merge_one", pinned)
    with pytest.raises(ValueError, match=r"study\.db: no space left on the disk to merge 1 shard\(s\) of about 1 MB "
                                         r"into this results database \(SQLite says: database or disk is full\)"):
        merge.merge([shard], target)
    assert _files(tmp_path) == before
