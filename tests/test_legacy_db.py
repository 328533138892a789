"""A results database written before the family-spec refactor (issue 25, acceptance 2) still
opens, resumes and reports, with every run id and variant key unchanged.

The fixture (tests/fixtures/legacy_db) was written by `make.py` at commit 831a703: five smoke-
preset runs (CART, a stored-matched Dense, LRT with lrt_kv + lrt_residual, CART with random_loops
+ truncated_bptt, and a no_lti CART interrupted at step 6 with the checkpoint it wrote then), the study
they came from, and `expected.json`: what that commit's code said of each run.
Run: pytest tests/test_legacy_db.py
"""
from __future__ import annotations

import json
import shutil
import sqlite3

import pytest

from conftest import REPO, run_offline_cli

FIXTURE = REPO / "tests" / "fixtures" / "legacy_db"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())


@pytest.fixture
def legacy(tmp_path):
    """A copy of the fixture: results.db, the interrupted run's checkpoints under runs/, the study."""
    shutil.copy(FIXTURE / "results.db", tmp_path / "results.db")
    shutil.copytree(FIXTURE / "runs", tmp_path / "runs")
    shutil.copy(FIXTURE / "study.yaml", tmp_path / "legacy.yaml")
    return tmp_path


def stored_runs(db) -> dict[str, dict]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return {r["run_id"]: dict(r) for r in con.execute("SELECT * FROM runs")}
    finally:
        con.close()


def test_the_study_expands_to_the_stored_run_ids_and_variant_keys():
    """Today's code names and keys the same study's runs exactly as the old code did."""
    from cartlab.studies import load_study

    runs = load_study(FIXTURE / "study.yaml").expand()
    assert {r.run_id: r.config.variant() for r in runs} == {k: v["variant"] for k, v in EXPECTED["runs"].items()}
    assert {r.run_id: r.config.variant_fields()["variant_label"] for r in runs} == {
        k: v["variant_label"] for k, v in EXPECTED["runs"].items()}


def test_it_opens_and_every_stored_config_and_checkpoint_loads(legacy):
    from cartlab import results
    from cartlab.checkpoint import build, latest
    from cartlab.results.db import ResultsDB
    from cartlab.train import TrainConfig

    ResultsDB(legacy / "results.db").close()  # a writable open (migrations, if any, run here)
    rows = stored_runs(legacy / "results.db")
    assert {k: (r["variant"], r["variant_label"], r["status"]) for k, r in rows.items()} == {
        k: (v["variant"], v["variant_label"], v["status"]) for k, v in EXPECTED["runs"].items()}
    frame = results.runs(legacy / "results.db").set_index("run_id")
    assert set(frame.index) == set(EXPECTED["runs"])
    for run_id, row in rows.items():
        cfg = TrainConfig.from_dict(json.loads(row["config_json"])["train"])
        assert cfg.run_name() == run_id and cfg.variant() == row["variant"]
    model, _ = build(latest(legacy / "runs" / EXPECTED["interrupted"] / "checkpoints"))
    assert model.config.hooks == ("no_lti",)


@pytest.mark.slow
def test_it_resumes_and_reports_with_run_ids_unchanged(legacy, smoke_run):
    """The interrupted run resumes from the checkpoint it stopped with to completion under its old id;
    the completed study then reports (the embedded corpus is the smoke run's build)."""
    db, run_id = legacy / "results.db", EXPECTED["interrupted"]
    before = sqlite3.connect(db).execute("SELECT step, loss FROM train_log WHERE run_id = ? AND step <= 4 "
                                         "ORDER BY step", (run_id,)).fetchall()
    proc = run_offline_cli("train", "--resume", run_id, "--db", str(db), "--quiet", f"out_dir={legacy / 'runs'}",
                           data_root=smoke_run.data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = stored_runs(db)
    assert set(rows) == set(EXPECTED["runs"])  # no run was added under a new id
    assert all(r["status"] == "completed" for r in rows.values()), {k: r["status"] for k, r in rows.items()}
    assert rows[run_id]["variant"] == EXPECTED["runs"][run_id]["variant"] and rows[run_id]["step"] == 8
    con = sqlite3.connect(db)
    assert con.execute("SELECT step, loss FROM train_log WHERE run_id = ? AND step <= 4 ORDER BY step",
                       (run_id,)).fetchall() == before  # the steps before the checkpoint are as logged
    assert con.execute("SELECT count(*) FROM train_log WHERE run_id = ?", (run_id,)).fetchone()[0] == 4
    con.close()

    # what `cartlab report` computes before it executes the notebooks (their rendering is
    # tests/test_notebooks.py's): completeness, the results frames, the findings and their block
    from cartlab.analysis.findings import shows_markdown
    from cartlab.analysis.study import study_findings
    from cartlab.report import completeness, load_results, run_overview, store_findings

    study = str(legacy / "legacy.yaml")
    state = completeness(study, db)
    assert state.complete, state.line()
    res = load_results(study, db)
    assert set(res.runs.run_id) == set(EXPECTED["runs"]) and len(run_overview(study, res)) == len(EXPECTED["runs"])
    found = study_findings(res)
    assert "What this study shows" in shows_markdown(found, completeness=state.line())
    store_findings("legacy", db, found, log=lambda s: None)
    con = sqlite3.connect(db)
    assert con.execute("SELECT count(*) FROM findings WHERE study = 'legacy'").fetchone()[0] == len(found)
    con.close()
