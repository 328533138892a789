"""`cartlab ablate STUDY --list`: each run's state, read from a fabricated results database,
lock and checkpoint folder (nothing is trained).

Guards: completed (with its final validation losses), running (a live process holds the run's
lock, `cartlab.filelock` as the trainer takes it), interrupted (a running or interrupted row and
no live holder, or a checkpoint and no row), failed and diverged (with the row's message), and
pending; the database is read read-only (its bytes unchanged), and a missing one lists every run
pending and creates nothing.
Run: pytest tests/test_ablate_list.py
"""
from __future__ import annotations

from pathlib import Path

import pytest

from cartlab.ablate import STATES, run_lock, run_states, study_runs
from cartlab.cli import main
from cartlab.filelock import file_lock
from cartlab.results.db import ResultsDB


@pytest.fixture
def study(tmp_path):
    """cpu-demo's runs (at least 7), their database and out dir under tmp_path."""
    db, out = tmp_path / "r.db", tmp_path / "runs"
    overrides = [f"results_db={db}", f"out_dir={out}"]
    _, runs = study_runs("cpu-demo", overrides)
    assert len(runs) >= 7
    return db, overrides, runs


def _fabricate(db_path, runs) -> None:
    """runs[0] completed, [1] and [2] rows left `running`, [3] a checkpoint and no row,
    [4] failed, [5] diverged, the others nothing."""
    db = ResultsDB(db_path)
    done, live, killed, _, failed, diverged = runs[:6]
    db.upsert_run(done.run_id, status="completed", step=done.config.steps)
    db.log_eval(done.run_id, done.config.steps, {"iteration": {"loss": 2.5, "ppl": 12.2}})
    for r in (live, killed):
        db.upsert_run(r.run_id, status="running", step=100)
        db.log_train(r.run_id, [{"step": 120, "loss": 3.0}])
    db.upsert_run(failed.run_id, status="running")
    db.set_status(failed.run_id, "failed", "RuntimeError: out of memory")
    db.upsert_run(diverged.run_id, status="running")
    db.set_status(diverged.run_id, "diverged", "loss nan at step 7", step=6)
    db.close()
    ckpt = Path(runs[3].config.out_dir) / runs[3].run_id / "checkpoints" / "step_00000040"
    ckpt.mkdir(parents=True)
    for name in ("state.pt", "model.safetensors"):  # what makes a folder a complete checkpoint
        (ckpt / name).write_bytes(b"")


def test_each_state_from_rows_locks_and_checkpoints(study):
    db, _, runs = study
    _fabricate(db, runs)
    before = db.read_bytes()
    with file_lock(run_lock(runs[1])):  # a live trainer of runs[1] (this process: flock is per open file)
        states = run_states(runs)
    assert [states[r.run_id][0] for r in runs] == ["completed", "running", "interrupted", "interrupted",
                                                   "failed", "diverged"] + ["pending"] * (len(runs) - 6)
    assert states[runs[1].run_id][1] == states[runs[2].run_id][1] == f"step 120/{runs[1].config.steps}"
    assert "step_00000040" in states[runs[3].run_id][1] and "no database row" in states[runs[3].run_id][1]
    assert states[runs[4].run_id][1] == "RuntimeError: out of memory"
    assert states[runs[5].run_id][1] == "loss nan at step 7"
    assert run_states(runs)[runs[1].run_id][0] == "interrupted"  # the holder let go (died): not running
    assert db.read_bytes() == before and not db.with_name(db.name + "-wal").exists()


def test_list_prints_one_line_per_run_with_its_state(study, capsys):
    db, overrides, runs = study
    _fabricate(db, runs)
    assert main(["ablate", "cpu-demo", "--list", *overrides]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(runs)
    assert [ln.split()[0] for ln in lines] == ["completed", "interrupted", "interrupted", "interrupted",
                                               "failed", "diverged"] + ["pending"] * (len(runs) - 6)
    assert lines[0].endswith("val iteration 2.500") and runs[0].run_id in lines[0]
    assert all(ln.split()[0] in STATES for ln in lines)
    columns = {ln.index(r.label) for ln, r in zip(lines, runs)}
    assert len(columns) == 1  # labels line up whatever the state's length


def test_a_missing_database_lists_every_run_pending_and_creates_nothing(study, tmp_path, capsys):
    db, overrides, runs = study
    assert main(["ablate", "cpu-demo", "--list", *overrides]) == 0
    assert all(ln.startswith("pending ") for ln in capsys.readouterr().out.splitlines())
    assert list(tmp_path.iterdir()) == []
