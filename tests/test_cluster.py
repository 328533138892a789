"""Studies beyond one machine (issue 19): run shards and `cartlab results merge`, and
`cartlab ablate --launcher submitit-local` (submitit's LocalExecutor: the jobs a Slurm study
submits, as local processes, offline).

1. A study launched as jobs trains every run as a separate job, and its merged database holds
   the same runs and rows as the same study run with `--launcher local` (notebooks).
2. A job killed mid-run (SIGKILL: ablate resubmits it; USR2, submitit's preemption signal: the
   job requeues itself) resumes from its newest checkpoint, bit-identically.
3. Merging is idempotent, a resumed run's newer shard advances its row, and a conflicting row
   is refused in one line with the database left as it was.

Run: pytest tests/test_cluster.py
"""
from __future__ import annotations

import math
import os
import signal
import sqlite3
import sys
from pathlib import Path

import pytest
import yaml

from cartlab.results.db import TABLES, ResultsDB
from cartlab.results.merge import merge
from conftest import db_rows

WALL_CLOCK = {"runs": ("created_at", "updated_at", "finished_at", "hardware_json", "software_json", "config_json"),
              "train_log": ("tokens_per_s", "mfu", "memory_mb", "forward_cost"), "artifacts": ("created_at", "path"),
              "downstream": ("created_at",)}
"""Columns that differ between two trainings of one run by when, where and how fast they ran
(config_json holds the operational results_db/out_dir; its identity part is compared separately)."""


def dump(db: Path) -> dict[str, list[tuple]]:
    """Every table's rows, sorted: the whole content of a results database."""
    return {t: sorted(db_rows(db, f"SELECT * FROM {t}"), key=repr) for t in TABLES}


def content(db: Path) -> dict[str, list[dict]]:
    """Every table's rows without the wall-clock columns, for comparing two trainings."""
    out = {}
    for table in TABLES:
        con = sqlite3.connect(db)
        cur = con.execute(f"SELECT * FROM {table}")
        names = [d[0] for d in cur.description]
        rows = [{k: v for k, v in zip(names, r) if k not in WALL_CLOCK.get(table, ())} for r in cur.fetchall()]
        if table == "runs":
            for row, raw in zip(rows, con.execute("SELECT config_json FROM runs")):
                row["identity"] = yaml.safe_load(raw[0])["identity"]
        con.close()
        out[table] = sorted(rows, key=repr)
    return out


# -- 3. merging ---------------------------------------------------------------------------------------------------
def make_shard(path: Path, run_id: str, steps: int, status: str = "completed", stamp: str = "2026-01-01T00:00:00+00:00",
               tps: float = 100.0) -> Path:
    db = ResultsDB(path)
    db.upsert_run(run_id, name=run_id, seed=1, status=status, step=steps, config_json={"identity": {"seed": 1}})
    db.log_train(run_id, [{"step": s, "loss": 5.0 - s / 10, "tokens_per_s": tps} for s in range(1, steps + 1)])
    db.log_eval(run_id, steps, {"iteration": {"loss": 4.0, "ppl": math.exp(4.0)}})
    db.log_probes(run_id, [{"probe": "depth", "step": steps, "x": 2, "metric": "loss", "value": 3.5}])
    db.conn.execute("UPDATE runs SET updated_at = ?, created_at = ?", (stamp, "2026-01-01T00:00:00+00:00"))
    db.close()
    return path


def test_merging_twice_adds_nothing(tmp_path):
    shards = [make_shard(tmp_path / f"s{i}.db", f"run-{i}", steps=4) for i in (1, 2)]
    into = tmp_path / "study.db"
    first = merge(shards, into)
    assert [sum(m.added.values()) for m in first] == [1 + 4 + 1 + 1] * 2  # runs, train_log, eval_log, probes
    once = dump(into)
    assert {r[0] for r in once["runs"]} == {"run-1", "run-2"}
    assert once["train_log"] == sorted(db_rows(shards[0], "SELECT * FROM train_log")
                                       + db_rows(shards[1], "SELECT * FROM train_log"), key=repr)
    again = merge(shards, into)
    assert [sum(m.added.values()) for m in again] == [0, 0]
    assert dump(into) == once


def test_a_conflicting_row_is_refused_in_one_line_and_changes_nothing(tmp_path):
    into = tmp_path / "study.db"
    merge([make_shard(tmp_path / "a.db", "run-1", steps=4)], into)
    before = dump(into)
    other = make_shard(tmp_path / "b.db", "run-1", steps=4)  # the same run trained again elsewhere ...
    con = sqlite3.connect(other)
    con.execute("UPDATE train_log SET loss = 9.5 WHERE step = 3")  # ... with one different loss
    con.commit()
    con.close()
    fresh = make_shard(tmp_path / "c.db", "run-2", steps=2)  # merged first in the same call: rolled back too
    file_before = into.read_bytes()
    with pytest.raises(ValueError) as err:
        merge([fresh, other], into)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{other}: conflicting row in train_log {{'run_id': 'run-1', 'step': 3}}: loss=9.5 "
                              f"in the shard but 4.7 in {into}"), message
    assert message.endswith("nothing merged"), message
    assert dump(into) == before  # all or nothing: not even the fresh shard's run-2
    assert into.read_bytes() == file_before
    assert not into.with_name(into.name + "-wal").exists() and not into.with_name(into.name + "-shm").exists()


def test_a_resumed_run_advances_and_an_older_shard_is_skipped(tmp_path):
    into = tmp_path / "study.db"
    early = make_shard(tmp_path / "early.db", "run-1", steps=3, status="running", tps=50.0)
    merge([early], into)
    # resumed later: completed, more steps, its steps re-logged with other timings
    late = make_shard(tmp_path / "late.db", "run-1", steps=6, stamp="2026-01-02T00:00:00+00:00")
    [done] = merge([late], into)
    assert done.advanced == ["run-1"]
    assert db_rows(into, "SELECT status, step FROM runs") == [("completed", 6)]
    assert dump(into)["train_log"] == dump(late)["train_log"]
    assert dump(into)["eval_log"] == dump(late)["eval_log"]  # the running shard's eval at step 3 is gone
    snapshot = dump(into)
    [old] = merge([early], into)  # the early snapshot again: the database's row is newer
    assert old.older == ["run-1"] and sum(old.added.values()) == 0
    assert dump(into) == snapshot
    # a row that differs outside what a run advances is a conflict even when newer
    other = make_shard(tmp_path / "other.db", "run-1", steps=6, stamp="2026-01-03T00:00:00+00:00")
    sqlite3.connect(other).execute("UPDATE runs SET seed = 2").connection.commit()
    with pytest.raises(ValueError, match=r"conflicting row in runs \{'run_id': 'run-1'\}: seed=2 in the shard but 1"):
        merge([other], into)
    assert dump(into) == snapshot


def test_cli_merge_reports_and_refuses(tmp_path, capsys):
    from cartlab import cli

    shard, into = make_shard(tmp_path / "s.db", "run-1", steps=2), tmp_path / "study.db"
    assert cli.main(["results", "merge", str(shard), "--db", str(into)]) == 0
    assert f"cartlab: merged {shard}: 5 rows added (runs 1, train_log 2, eval_log 1, probes 1)" in capsys.readouterr().out
    assert cli.main(["results", "merge", str(shard), "--db", str(into)]) == 0
    assert f"{shard}: 0 rows added" in capsys.readouterr().out
    sqlite3.connect(shard).execute("UPDATE eval_log SET loss = 1.0").connection.commit()
    assert cli.main(["results", "merge", str(shard), "--db", str(into)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "conflicting row in eval_log" in err


def test_slurm_resources_are_validated(tmp_path):
    from cartlab.config import ConfigError
    from cartlab.studies import Study

    spec = {"name": "x", "preset": "smoke", "runs": [{"label": "a"}]}
    assert Study.from_dict(spec).slurm.gpus_per_run == 1
    with pytest.raises(ConfigError, match=r"^slurm.time_min=0 is not allowed: must be > 0$"):
        Study.from_dict({**spec, "slurm": {"time_min": 0}})
    with pytest.raises(ConfigError, match=r"^slurm.gpu is not a field"):
        Study.from_dict({**spec, "slurm": {"gpu": 2}})
    # a study written without cluster resources is written back without them, and with them, with them
    assert "slurm" not in Study.from_dict(spec).to_dict()
    assert Study.from_dict({**spec, "slurm": {"partition": "gpu"}}).to_dict()["slurm"]["partition"] == "gpu"


# -- 1. and 2. jobs -----------------------------------------------------------------------------------------------
def write_study(root: Path, tiny_data: Path, name: str, seeds: list[int]) -> Path:
    from train_helpers import TINY_MODEL

    model = {f"model.{k}": v for k, v in TINY_MODEL.items() if k != "kind"}
    spec = {"name": name, "preset": "smoke", "seeds": seeds, "slurm": {"gpus_per_run": 0, "time_min": 30},
            "set": {**model, "data.dir": str(tiny_data), "steps": 12, "seq_len": 32, "batch_size": 4,
                    "eval_every": 4, "eval_batches": 2, "eval_batch_size": 2, "log_every": 1, "checkpoint_every": 4,
                    "keep_checkpoints": 2, "out_dir": str(root / "runs"), "device": "cpu"},
            "runs": [{"label": "baseline"}]}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def local_study(tmp_path_factory, tiny_data):
    """The two-seed study trained the usual way (`--launcher local`: train_variant notebooks)."""
    from cartlab.ablate import ablate

    root = tmp_path_factory.mktemp("local")
    study, db = write_study(root, tiny_data, "tiny", [1, 2]), root / "results.db"
    outcomes = ablate(str(study), [f"results_db={db}"], reports_dir=root / "reports", progress=False,
                      log=lambda s: None)
    assert [o.ok for o in outcomes] == [True, True], [o.error for o in outcomes]
    return db


@pytest.mark.slow
def test_jobs_train_each_run_separately_and_merge_like_local(local_study, tmp_path, tiny_data):
    from cartlab.ablate import ablate
    from cartlab.cluster import shard_of

    study, db, lines = write_study(tmp_path, tiny_data, "tiny", [1, 2]), tmp_path / "results.db", []
    outcomes = ablate(str(study), [f"results_db={db}"], reports_dir=tmp_path / "reports", progress=False,
                      log=lines.append, launcher="submitit-local", jobs={"poll": 0.2})
    assert [o.ok for o in outcomes] == [True, True], [o.error for o in outcomes]
    jobs = {o.notebook.parent.name for o in outcomes}  # each run's log sits in its own job's folder
    assert len(jobs) == 2 and all(o.notebook.parent.parent == tmp_path / "reports" / "tiny" / "jobs" for o in outcomes)
    for o in outcomes:  # each job wrote its own shard, holding only its run
        assert db_rows(shard_of(o.run), "SELECT run_id, status FROM runs") == [(o.run.run_id, "completed")]
    assert content(db) == content(local_study)
    # a second ablate finds every run completed: no job, nothing merged twice
    before = dump(db)
    assert ablate(str(study), [f"results_db={db}"], reports_dir=tmp_path / "reports", progress=False,
                  log=lines.append, launcher="submitit-local") == []
    assert dump(db) == before


def signalling_job(signum: int, at_step: int, marker: Path):
    """A TrainJob that sends itself `signum` when update `at_step` begins, the first time only
    (the marker file says it happened): a job killed, or preempted, mid-run."""
    from cartlab.cluster import TrainJob

    class SignallingJob(TrainJob):
        def __call__(self):
            import cartlab.train.loop as loop

            real = loop.lr_at

            def lr_at(step, cfg):
                if step == at_step and not marker.exists():
                    marker.touch()
                    os.kill(os.getpid(), signum)
                return real(step, cfg)

            loop.lr_at = lr_at
            return super().__call__()

    return SignallingJob


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGUSR2], ids=["killed-resubmitted", "preempted-requeued"])
def test_a_job_stopped_mid_run_resumes_bit_identically(local_study, tmp_path, tiny_data, signum, capsys):
    import cloudpickle

    from cartlab.ablate import ablate
    from cartlab.cluster import job_config

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the job process cannot import this test
    marker = tmp_path / "signalled"
    job = signalling_job(signum, 6, marker)
    study, db, lines = write_study(tmp_path, tiny_data, "tiny", [1]), tmp_path / "results.db", []
    outcomes = ablate(str(study), [f"results_db={db}"], reports_dir=tmp_path / "reports", progress=False,
                      log=lines.append, launcher="submitit-local",
                      jobs={"poll": 0.2, "submit": lambda ex, run: ex.submit(job(job_config(run)))})
    assert marker.exists() and [o.ok for o in outcomes] == [True], [o.error for o in outcomes]
    printed = capsys.readouterr().out  # the per-run lines, as the progress bar writes them
    assert printed.count("resubmitted") == (1 if signum == signal.SIGKILL else 0), printed
    [run_id] = [o.run.run_id for o in outcomes]
    job_log = outcomes[0].notebook.with_suffix(".err").read_text()  # the job that finished the run
    assert f"resuming {run_id} from step 4" in job_log, job_log[-2000:]
    log = db_rows(db, f"SELECT step, loss, grad_norm, lr FROM train_log WHERE run_id = '{run_id}' ORDER BY step")
    reference = db_rows(local_study, f"SELECT step, loss, grad_norm, lr FROM train_log WHERE run_id = '{run_id}' "
                                     f"ORDER BY step")
    assert [r[0] for r in log] == list(range(1, 13))  # every step once
    assert log == reference  # bit for bit
    assert (db_rows(db, f"SELECT step, split, loss FROM eval_log WHERE run_id = '{run_id}' ORDER BY step, split")
            == db_rows(local_study, f"SELECT step, split, loss FROM eval_log WHERE run_id = '{run_id}' "
                                    f"ORDER BY step, split"))
    assert db_rows(db, "SELECT status FROM runs") == [("completed",)]
