"""Small synthetic results-schema frames with known ground truth, for tests and examples.

    runs = pd.DataFrame([run_row("base-s0", seed=0), run_row("nolti-s0", hooks="no_lti"),
                         run_row("gate-s0", overrides="state_gate=residual")])   # a field set by hand
    ev = eval_rows({"base-s0": {"wiki": 20.0}, "nolti-s0": {"wiki": 20.1}}, step=30_500)
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from cartlab.analysis.schema import EVAL_LOG_COLUMNS, RUNS_COLUMNS, TRAIN_LOG_COLUMNS, format_hooks


def run_row(run_id: str, **fields) -> dict:
    """One `runs` row (results schema, paper section 4.4's results.db) with defaults for a local
    CART d=1024 P=6 R=6 Stage-2 run; Dense rows set model="dense" and n_layers. `overrides`
    ("state_gate=residual") marks model fields set by hand; the variant is left to
    `schema.with_variants` (a hash of the configuration columns and overrides) unless given."""
    model = fields.get("model", "cart")
    row = dict(
        run_id=run_id, name=run_id, source="local", model=model, d_model=1024,
        prelude_layers=6 if model == "cart" else np.nan, n_loops=6 if model == "cart" else np.nan,
        n_layers=np.nan, hooks="", seed=0, n_seeds=1, stage="stage2", stored_params=np.nan,
        effective_params=np.nan, tokens=1e9, status="completed", overrides="",
    )
    unknown = set(fields) - set(RUNS_COLUMNS)
    if unknown:
        raise ValueError(f"fields: unknown runs columns {sorted(unknown)}; allowed: {list(RUNS_COLUMNS)}")
    row.update(fields)
    row["hooks"] = format_hooks(row["hooks"])
    return row


def eval_rows(ppl: dict[str, dict[str, float]], *, step: int) -> pd.DataFrame:
    """eval_log rows at `step` from {run_id: {split: ppl}}, with loss = ln(ppl) (section 7.1)."""
    rows = [dict(run_id=r, step=step, split=s, loss=float(np.log(p)), ppl=float(p))
            for r, splits in ppl.items() for s, p in splits.items()]
    return pd.DataFrame(rows, columns=list(EVAL_LOG_COLUMNS))


def train_curves(run_ids, steps, *, loss, rho=None, noise: float = 0.0, seed: int = 0) -> pd.DataFrame:
    """train_log rows: loss(step) and optional rho(step) per run, each times exp(N(0, noise))
    (sections 5.4 and 6 curves)."""
    rng = np.random.default_rng(seed)
    steps = np.asarray(steps)
    frames = []
    for rid in run_ids:
        f = pd.DataFrame({"run_id": rid, "step": steps,
                          "loss": loss(steps) * np.exp(rng.normal(0, noise, len(steps)))})
        if rho is not None:
            f["rho_max"] = rho(steps) * np.exp(rng.normal(0, noise, len(steps)))
        frames.append(f)
    return pd.concat(frames, ignore_index=True).reindex(columns=list(TRAIN_LOG_COLUMNS))
