"""The results database as pandas DataFrames (columns of `cartlab.analysis.schema`).

The paper's tables are imported as runs marked 'published' by
`cartlab.analysis.published.import_published` (it reads them with the analysis layer, above this one).

The readers open the database read-only (`ResultsDB(path, readonly=True)`): they never migrate,
create or change it, so a database on a read-only disk, or of an older schema, can be analysed;
a missing file is an error naming it, not a new empty database.

    from cartlab import results
    runs = results.runs("runs/results.db")
    log = results.train_log("runs/results.db", run_ids=runs.run_id)
"""
from __future__ import annotations

import os

import pandas as pd

from cartlab.results.db import STATUSES, ResultsDB

__all__ = ["ResultsDB", "STATUSES", "runs", "train_log", "eval_log", "downstream", "artifacts", "probes",
           "findings"]


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
