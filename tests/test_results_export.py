"""`cartlab results export` (issue 18): every table of the results database to parquet or CSV,
read back equal to what `cartlab.results` reads; a manifest; the database untouched; a folder
that is not empty refused unless --force; an error leaves nothing behind.
Run: pytest tests/test_results_export.py
"""
from __future__ import annotations

import json

import pandas as pd
import pytest

from cartlab import __version__, results
from cartlab.cli import main
from cartlab.results.cli import export
from cartlab.analysis.published import import_published
from cartlab.results.db import TABLES, ResultsDB

READERS = {t: getattr(results, t) for t in TABLES}


@pytest.fixture
def db(tmp_path):
    """A database with rows in every table: the paper's published runs and a local run with its
    logs, probes, a downstream score and a checkpoint (nulls, text, JSON and integers included)."""
    path = tmp_path / "results.db"
    import_published(path)
    w = ResultsDB(path)
    w.upsert_run("local-a", model="cart", d_model=64, n_loops=3, hooks="no_lti", seed=1, status="completed",
                 config_json={"train": {"steps": 2}}, step=2)
    w.log_train("local-a", [{"step": s, "loss": 5.0 / s, "grad_norm": 0.5, "lr": 1e-3, "rho_max": None,
                             "hyper_weights": json.dumps([[0.5, 0.5]]), "n_loops": 3, "flops": 1.5e9 * s}
                            for s in (1, 2)])
    w.log_eval("local-a", 2, {"prose": {"loss": 4.25, "ppl": 70.1}, "stories, short": {"loss": 3.5, "ppl": 33.1}})
    w.log_probes("local-a", [{"probe": "depth_profile", "step": 2, "split": "prose", "x": r, "metric": "loss",
                              "value": 4.0 + r / 10} for r in (1, 2, 3)])
    w.log_downstream("local-a", [{"task": "cartlab_mc", "metric": "acc", "value": 0.25, "stderr": None}])
    w.add_artifact("local-a", "checkpoint", "runs/local-a/checkpoints/step_00000002", 2)
    w.close()
    return path


def test_parquet_export_equals_the_database(db, tmp_path, capsys):
    before = db.read_bytes()
    out = tmp_path / "export"
    assert main(["results", "export", "--format", "parquet", str(out), "--db", str(db)]) == 0
    assert "cartlab: exported" in capsys.readouterr().out
    assert db.read_bytes() == before and not db.with_name(db.name + "-wal").exists()  # read-only
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{t}.parquet" for t in TABLES] + ["manifest.json"])
    for table, read in READERS.items():
        expected = read(db)
        assert len(expected) > 0, table  # the fixture fills every table
        pd.testing.assert_frame_equal(pd.read_parquet(out / f"{table}.parquet"), expected)
        assert manifest["tables"][table] == {"file": f"{table}.parquet", "rows": len(expected)}
    assert manifest["format"] == "parquet" and manifest["schema_version"] == ResultsDB(db, readonly=True).schema_version
    assert manifest["cartlab_version"] == __version__ and manifest["source"] == str(db.resolve())


def test_csv_export_reads_back_equal(db, tmp_path):
    out = tmp_path / "csv"
    manifest = export(db, out, "csv")
    for table, read in READERS.items():
        expected = read(db)
        back = pd.read_csv(out / f"{table}.csv", keep_default_na=False, na_values=[""])
        assert list(back.columns) == list(expected.columns) and len(back) == manifest["tables"][table]["rows"]
        for col in expected.columns:  # CSV has no types: numbers compare as numbers, the rest as text
            if pd.api.types.is_numeric_dtype(expected[col]):
                pd.testing.assert_series_equal(back[col].astype(float), expected[col].astype(float), check_names=False)
            else:  # an empty text and a null are both an empty field in CSV
                assert text(back[col]) == text(expected[col]), col
    local = pd.read_csv(out / "eval_log.csv").query("run_id == 'local-a'")
    assert sorted(local.split) == ["prose", "stories, short"]  # a comma in a value is quoted


def text(column: pd.Series) -> list[str]:
    return ["" if pd.isna(v) else str(v) for v in column]


def test_a_folder_in_use_is_refused_unless_forced(db, tmp_path, capsys):
    out = tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["results", "export", str(out), "--db", str(db)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not empty" in err and "--force" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]

    export(db, out, "csv", force=True)
    export(db, out, "parquet", force=True)  # replaces the CSV export: one export in the folder, other files kept
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{t}.parquet" for t in TABLES]
                                                           + ["manifest.json", "notes.txt"])
    assert json.loads((out / "manifest.json").read_text())["format"] == "parquet"


def test_an_error_leaves_nothing_behind(db, tmp_path, monkeypatch, capsys):
    calls = []

    def fail_on_third(self, path, **kw):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        path.write_text("partial")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", fail_on_third)
    listing = sorted(p.name for p in tmp_path.iterdir())
    assert main(["results", "export", str(tmp_path / "export"), "--db", str(db)]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == listing  # no DIR, no temporary folder


def test_a_missing_database_is_one_line(tmp_path, capsys):
    assert main(["results", "export", str(tmp_path / "x"), "--db", str(tmp_path / "nope.db")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such results database" in err
    assert list(tmp_path.iterdir()) == []
