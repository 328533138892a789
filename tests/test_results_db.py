"""The results database: schema versioning, run rows, idempotent logging, and the paper's
published tables imported into the same schema the analyses read, and storage standing alone
(no training, analysis or model code loaded).
Run: pytest tests/test_results_db.py
"""
import sqlite3
import subprocess
import sys

import pytest

from cartlab import results
from cartlab.analysis import schema
from cartlab.analysis.published import import_published, load_published
from cartlab.results.db import SCHEMA_VERSION, ResultsDB


def test_schema_version_and_newer_database_refused(tmp_path):
    db = ResultsDB(tmp_path / "r.db")
    assert db.schema_version == SCHEMA_VERSION
    assert db.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    db.close()
    with pytest.raises(ValueError, match=rf"r.db: schema_version={SCHEMA_VERSION + 1} is newer than this cartlab"):
        ResultsDB(tmp_path / "r.db")


def test_runs_and_logs_are_idempotent(tmp_path):
    db = ResultsDB(tmp_path / "r.db")
    db.upsert_run("a", model="cart", d_model=64, status="running", config_json={"x": 1})
    with pytest.raises(ValueError, match=r"status='done' is not allowed; choose one of \['running'"):
        db.upsert_run("a", status="done")
    with pytest.raises(ValueError, match=r"unknown runs column\(s\) \['colour'\]"):
        db.upsert_run("a", colour="red")
    db.log_train("a", [{"step": s, "loss": 5.0 - s} for s in (1, 2, 3)])
    db.log_train("a", [{"step": 3, "loss": 1.5}])  # a re-logged step replaces, never duplicates
    db.log_eval("a", 3, {"wiki": {"loss": 3.0, "ppl": 20.1}})
    db.truncate_after("a", 2)
    log = results.train_log(tmp_path / "r.db")
    assert log.step.tolist() == [1, 2] and results.eval_log(tmp_path / "r.db").empty
    db.set_status("a", "completed", step=2)
    run = results.runs(tmp_path / "r.db").iloc[0]
    assert run.status == "completed" and run.finished_at and run.step == 2
    with pytest.raises(sqlite3.IntegrityError):  # logs belong to a run
        db.log_train("ghost", [{"step": 1, "loss": 1.0}])


def test_published_numbers_import_into_the_same_schema(tmp_path):
    path = tmp_path / "r.db"
    n = import_published(path)
    assert import_published(path) == n  # idempotent
    runs = results.runs(path)
    pub = load_published()
    assert len(runs) == n == len(pub.runs) and set(runs.status) == {"published"} and set(runs.source) == {"published"}
    schema.validate(runs[list(schema.RUNS_COLUMNS)], "runs")
    ev, tl = results.eval_log(path), results.train_log(path)
    assert len(ev) == len(pub.eval_log) and len(tl) == len(pub.train_log)
    # Table 7's d=1024, R=6 Stage-2 Wikipedia perplexity survives the round trip.
    stage2 = runs[(runs.stage == "stage2") & (runs.model == "cart") & (runs.d_model == 1024) & (runs.n_loops == 6)
                  & (runs.prelude_layers == 6)]
    wiki = ev[ev.run_id.isin(stage2.run_id) & (ev.split == "wiki")]
    assert wiki.ppl.round(2).tolist() == [20.35]
    assert results.runs(path, source="local").empty


STORAGE_ALONE = """
import json, sqlite3, sys
from cartlab import results
from cartlab.results.db import MIGRATIONS, ResultsDB
db = ResultsDB(sys.argv[1] + "/new.db")  # storage works without the layers above it
db.upsert_run("r", model="cart", d_model=64, status="completed")
db.close()
above = sorted(m for m in sys.modules if m.startswith(("cartlab.train", "cartlab.analysis", "cartlab.model")))
assert not above, above
old = sqlite3.connect(sys.argv[1] + "/old.db")  # schema 1, one local run with a stored training config
old.executescript(MIGRATIONS[1])
old.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
old.execute("INSERT INTO meta VALUES ('schema_version', '1')")
old.execute("INSERT INTO runs (run_id, name, status, config_json, created_at, updated_at) "
            "VALUES ('x', 'x', 'completed', ?, 't0', 't0')", (json.dumps({"train": {"steps": 2}}),))
old.commit()
old.close()
try:
    results.runs(sys.argv[1] + "/old.db")
except ValueError as err:
    print(err)
"""


def test_storage_imports_nothing_above_it_and_never_guesses_a_variant(tmp_path):
    """`cartlab.results` works without training, analysis or model code loaded; a schema-1 run
    whose variant needs its training config rebuilt is refused, not given a column hash, when
    the training layer (which registers the rebuilder) was never imported."""
    proc = subprocess.run([sys.executable, "-c", STORAGE_ALONE, str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == ("run 'x': its variant must be rebuilt from its stored training config (a database "
                                   "of schema 1), which needs the training layer: import cartlab.train before "
                                   "opening it (`cartlab train`, `ablate` and `report` do)")


def test_a_new_database_appears_only_whole(tmp_path, monkeypatch):
    """While one process gives a new database its schema, another that opens the path sees no file
    or a whole results database, never an empty SQLite file (four trainers starting at once into
    one new database used to refuse each other that way)."""
    target = tmp_path / "results.db"
    seen = []
    real = ResultsDB._migrate

    def migrate_while_another_looks(self):
        seen.append(target.exists())
        real(self)

    monkeypatch.setattr(ResultsDB, "_migrate", migrate_while_another_looks)
    ResultsDB(target).close()
    assert seen[0] is False, "the path existed before the database had its schema"
    monkeypatch.undo()
    db = ResultsDB(target, readonly=True)
    assert db.schema_version == SCHEMA_VERSION
    db.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.db"]


def test_trainers_creating_one_database_at_once_all_open_it(tmp_path):
    """Processes racing to create one database all open it, and leave no private file behind."""
    script = "import sys; from cartlab.results.db import ResultsDB; ResultsDB(sys.argv[1]).close()"
    target = tmp_path / "results.db"
    procs = [subprocess.Popen([sys.executable, "-c", script, str(target)], stderr=subprocess.PIPE, text=True)
             for _ in range(6)]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(("-wal", "-shm"))) == ["results.db"]
