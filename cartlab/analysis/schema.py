"""The results schema: four long-form ("tidy") tables every analysis reads.

The training engine writes these as SQLite tables with exactly these columns; `published.py`
builds the same frames from the paper's tables. One row per run in `runs`; one row per
(run, step) in `train_log`; one row per (run, step, split) in `eval_log`; one row per
(run, task, metric, few-shot, inference loop count) in `downstream`.

runs
    run_id            str    unique key, e.g. "paper/stage2/cart-d1024-P6-R6"
    name              str    human-readable name (non-default config fields)
    source            str    "published" (numbers from the paper) | "local" (trained here)
    model             str    "cart" | "dense"
    d_model           int    width
    prelude_layers    int    P (CART); NaN for Dense
    n_loops           int    R, the training loop count (CART); NaN for Dense
    n_layers          int    depth of a Dense model; NaN for CART
    hooks             str    comma-joined sorted hook names, "" for the baseline (section 8):
                             unfreeze_kv, single_loop, unshare_core, self_attn_core, no_hyper,
                             no_lti, no_lie (the hook registry is open; other names are allowed)
    seed              int    training seed; NaN when the row is a mean over seeds
    n_seeds           int    number of seeds the row's numbers summarise (1 for a single run)
    stage             str    "stage1" | "stage2" | any other string naming a budget
    stored_params     float  parameters held in memory (section 3.5)
    effective_params  float  parameters applied per token, core counted R times (section 3.5)
    tokens            float  training tokens
    status            str    running | completed | interrupted | diverged | failed | published
                             (cartlab.results.db.STATUSES; paper rows are "published")

train_log: run_id, step, loss, grad_norm, lr, rho_max, rho_mean, tokens_per_s, mfu
    rho_max / rho_mean are the LTI gate's spectral radius and mean |eigenvalue| (section 6).
eval_log: run_id, step, split, loss, ppl
    split is a validation domain ("tinystories", "wiki", "fineweb" or any name); loss in nats.
downstream: run_id, task, metric, value, stderr, num_fewshot, n_loops
    lm-eval names (task "lambada_openai", metric "acc" as a fraction in [0, 1] or
    "perplexity"); n_loops is the loop count used at inference (section 7.4).
"""
from __future__ import annotations

from typing import Iterable, NamedTuple

import numpy as np
import pandas as pd

RUNS_COLUMNS = (
    "run_id", "name", "source", "model", "d_model", "prelude_layers", "n_loops", "n_layers",
    "hooks", "seed", "n_seeds", "stage", "stored_params", "effective_params", "tokens", "status",
)
TRAIN_LOG_COLUMNS = (
    "run_id", "step", "loss", "grad_norm", "lr", "rho_max", "rho_mean", "tokens_per_s", "mfu",
)
EVAL_LOG_COLUMNS = ("run_id", "step", "split", "loss", "ppl")
DOWNSTREAM_COLUMNS = ("run_id", "task", "metric", "value", "stderr", "num_fewshot", "n_loops")

TABLES = {
    "runs": RUNS_COLUMNS,
    "train_log": TRAIN_LOG_COLUMNS,
    "eval_log": EVAL_LOG_COLUMNS,
    "downstream": DOWNSTREAM_COLUMNS,
}

SOURCES = ("published", "local")
MODELS = ("cart", "dense")
PAPER_HOOKS = (
    "unfreeze_kv", "single_loop", "unshare_core", "self_attn_core", "no_hyper", "no_lti", "no_lie",
)

# Columns that identify a configuration: runs equal on these differ only by seed.
CONFIG_COLUMNS = ("source", "model", "d_model", "prelude_layers", "n_loops", "n_layers", "hooks", "stage")


class Results(NamedTuple):
    """The four results tables of one store (or of the paper)."""

    runs: pd.DataFrame
    train_log: pd.DataFrame
    eval_log: pd.DataFrame
    downstream: pd.DataFrame


def empty(table: str) -> pd.DataFrame:
    """An empty frame with the columns of `table` ("runs", "train_log", "eval_log", "downstream"),
    the tables of the results database the paper releases (section 4.4)."""
    return pd.DataFrame(columns=list(_columns(table)))


def validate(frame: pd.DataFrame, table: str) -> pd.DataFrame:
    """Check `frame` against the schema of `table` (results database, section 4.4); return it unchanged.

    Raises ValueError naming missing columns, and for `runs` naming bad values of `source`,
    `model` or `hooks` together with the allowed values. Extra columns are allowed.
    """
    columns = _columns(table)
    if not isinstance(frame, pd.DataFrame):
        raise ValueError(f"{table}: expected a pandas DataFrame, got {type(frame).__name__}")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{table}: missing columns {missing}; the schema needs {list(columns)}")
    if table == "runs":
        for field, allowed in (("source", SOURCES), ("model", MODELS)):
            bad = sorted(set(frame[field].dropna()) - set(allowed))
            if bad:
                raise ValueError(f"runs.{field}: values {bad} not allowed; allowed: {list(allowed)}")
        for hooks in frame["hooks"].fillna(""):
            if format_hooks(parse_hooks(hooks)) != hooks:
                raise ValueError(
                    f"runs.hooks: {hooks!r} is not comma-joined sorted hook names "
                    f"(e.g. {format_hooks(['unshare_core', 'self_attn_core'])!r}, '' for baseline)"
                )
        if frame["run_id"].duplicated().any():
            dup = sorted(frame.loc[frame["run_id"].duplicated(), "run_id"].unique())
            raise ValueError(f"runs.run_id: duplicated ids {dup[:5]}")
    return frame


def parse_hooks(hooks: str) -> tuple[str, ...]:
    """Hook names (section 8 ablations) of a `runs.hooks` string: "no_lti,unshare_core" -> ("no_lti", "unshare_core")."""
    if hooks is None or (isinstance(hooks, float) and np.isnan(hooks)):
        return ()
    if not isinstance(hooks, str):
        raise ValueError(f"runs.hooks: expected a string, got {hooks!r}")
    names = tuple(h.strip() for h in hooks.split(",") if h.strip())
    for h in names:
        if not h.replace("_", "").isalnum():
            raise ValueError(f"runs.hooks: bad hook name {h!r}; known names: {list(PAPER_HOOKS)}")
    return names


def format_hooks(hooks: Iterable[str]) -> str:
    """The canonical `runs.hooks` string of section 8 ablations: sorted, de-duplicated, comma-joined ("" for none)."""
    if isinstance(hooks, str):
        hooks = parse_hooks(hooks)
    return ",".join(sorted(set(hooks)))


def config_label(row) -> str:
    """Short label of a configuration (section 3.5 notation, section 8 hooks):
    "cart d=1024 P=6 R=6 [no_lti]" or "dense d=1024 L=7"."""
    if row["model"] == "dense":
        s = f"dense d={int(row['d_model'])} L={int(row['n_layers'])}"
    else:
        s = f"cart d={int(row['d_model'])} P={int(row['prelude_layers'])} R={int(row['n_loops'])}"
    return s + (f" [{row['hooks']}]" if isinstance(row.get("hooks"), str) and row["hooks"] else "")


def final_eval(runs: pd.DataFrame, eval_log: pd.DataFrame, *, step: int | None = None) -> pd.DataFrame:
    """Each run's evaluation at its last logged step (or at `step`), joined to its run row: the
    "final perplexity" of sections 5 and 7 (step = max logged step per run and split).

    Returns one row per (run, split): the `runs` columns plus `step`, `split`, `loss`, `ppl`.
    """
    validate(runs, "runs")
    validate(eval_log, "eval_log")
    ev = eval_log if step is None else eval_log[eval_log["step"] == step]
    if len(ev):
        last = ev.groupby(["run_id", "split"])["step"].transform("max")
        ev = ev[ev["step"] == last]
    # only the schema columns: a database `runs` frame carries more (e.g. its progress `step`)
    return runs[list(RUNS_COLUMNS)].merge(ev[list(EVAL_LOG_COLUMNS)], on="run_id", how="inner")


def _columns(table: str) -> tuple[str, ...]:
    if table not in TABLES:
        raise ValueError(f"table: {table!r} is not a results table; allowed: {list(TABLES)}")
    return TABLES[table]
