"""The results database as pandas DataFrames (columns of `cartlab.analysis.schema`).

The readers open the database read-only (`ResultsDB(path, readonly=True)`): they never migrate,
create or change it, so a database on a read-only disk, or of an older schema, can be analysed;
a missing file is an error naming it, not a new empty database.

    from cartlab import results
    runs = results.runs("runs/results.db")
    log = results.train_log("runs/results.db", run_ids=runs.run_id)
    results.import_published("runs/results.db")   # the paper's tables as runs marked 'published'
"""
from __future__ import annotations

import json
import os

import pandas as pd

from cartlab.results.db import STATUSES, ResultsDB

__all__ = ["ResultsDB", "STATUSES", "runs", "train_log", "eval_log", "downstream", "artifacts", "probes",
           "findings", "import_published"]


def _frame(path, table, run_ids=None) -> pd.DataFrame:
    db = ResultsDB(path, readonly=True)
    try:
        return db.frame(table, None if run_ids is None else list(run_ids))
    finally:
        db.close()


def runs(path: str | os.PathLike, source: str | None = None) -> pd.DataFrame:
    """One row per run; `source` filters 'local' or 'published'. `variant` groups runs as seeds
    of one configuration (every analysis in `cartlab.analysis` groups by it)."""
    df = _frame(path, "runs")
    return df if source is None else df[df.source == source].reset_index(drop=True)


def train_log(path, run_ids=None) -> pd.DataFrame:
    return _frame(path, "train_log", run_ids)


def eval_log(path, run_ids=None) -> pd.DataFrame:
    return _frame(path, "eval_log", run_ids)


def downstream(path, run_ids=None) -> pd.DataFrame:
    return _frame(path, "downstream", run_ids)


def artifacts(path, run_ids=None) -> pd.DataFrame:
    return _frame(path, "artifacts", run_ids)


def probes(path, run_ids=None, probe: str | None = None) -> pd.DataFrame:
    """Measurements of trained models, one row per (run, probe, step, split, x, metric): see
    `cartlab.train.measures` for what each probe stores and what its `x` is."""
    df = _frame(path, "probes", run_ids)
    return df if probe is None else df[df.probe == probe].reset_index(drop=True)


def findings(path, study: str | None = None) -> pd.DataFrame:
    """What the reports concluded: one row per (study, analysis, claim, domain) with the effect,
    its seed-noise interval, the seeds and the verdict (`cartlab.analysis.findings`)."""
    db = ResultsDB(path, readonly=True)
    try:
        return db.findings(study)
    finally:
        db.close()


def import_published(path: str | os.PathLike) -> int:
    """Import the paper's tables (data/paper/) as runs with source='published' and
    status='published'; idempotent. Returns the number of runs imported."""
    from cartlab.analysis.published import load_published

    pub = load_published()
    db = ResultsDB(path)
    try:
        cols = set(pub.runs.columns)
        for row in pub.runs.to_dict("records"):
            fields = {k: (None if pd.isna(v) else v) for k, v in row.items() if k != "run_id" and k in cols}
            fields = {k: (int(v) if isinstance(v, float) and v.is_integer() and k not in ("effective_params",) else v)
                      for k, v in fields.items()}
            fields["status"] = "published"
            fields["source"] = "published"
            fields.setdefault("name", row["run_id"])
            fields["config_json"] = json.dumps({"published": True})
            db.upsert_run(row["run_id"], **{k: v for k, v in fields.items() if k in _RUN_FIELDS})
        for rid, grp in pub.train_log.groupby("run_id"):
            db.log_train(rid, grp.drop(columns="run_id").to_dict("records"))
        for (rid, step), grp in pub.eval_log.groupby(["run_id", "step"]):
            db.log_eval(rid, int(step), {r["split"]: {"loss": r["loss"], "ppl": r["ppl"]} for r in grp.to_dict("records")})
        for rid, grp in pub.downstream.groupby("run_id"):
            db.log_downstream(rid, grp.to_dict("records"))
        return len(pub.runs)
    finally:
        db.close()


from cartlab.results.db import RUN_COLUMNS as _RUN_FIELDS  # noqa: E402
