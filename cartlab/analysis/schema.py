"""The results schema: four long-form ("tidy") tables every analysis reads.

The training engine writes these as SQLite tables with exactly these columns; `published.py`
builds the same frames from the paper's tables. One row per run in `runs`; one row per
(run, step) in `train_log`; one row per (run, step, split) in `eval_log`; one row per
(run, task, metric, few-shot, inference loop count, protocol) in `downstream`.

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
    variant           str    what makes the run differ from others except its seed: runs with one
                             variant are seeds of one configuration, and every analysis groups by
                             it. Local runs: `TrainConfig.variant()`, a hash of the whole resolved
                             config minus `seed`; published and synthetic rows: a hash of their
                             configuration columns (`config_variant`)
    overrides         str    model fields set by hand rather than through hooks, "state_gate=residual"
                             ("" for none); a CART baseline has hooks "" AND overrides ""
    variant_label     str    what users see: "cart d=128 P=2 R=4 [no_lti] {state_gate=residual}"
    The three variant columns are optional in a frame: `with_variants` fills them from the
    configuration columns when a frame predates them (the paper's tables, synthetic frames).

train_log: run_id, step, loss, grad_norm, lr, rho_max, rho_mean, tokens_per_s, mfu
    rho_max / rho_mean are the LTI gate's spectral radius and mean |eigenvalue| (section 6).
eval_log: run_id, step, split, loss, ppl
    split is a validation domain ("tinystories", "wiki", "fineweb" or any name); loss in nats.
downstream: run_id, task, metric, value, stderr, num_fewshot, n_loops, protocol
    lm-eval names (task "lambada_openai", metric "acc" as a fraction in [0, 1] or
    "perplexity"); n_loops is the loop count used at inference (section 7.4); protocol is the
    key of how the score was produced (`cartlab.eval.protocol`; "published" for the paper's,
    "" for a score stored before protocols were): scores of two protocols are never pooled.
"""
from __future__ import annotations

from typing import Iterable, NamedTuple

import pandas as pd

from cartlab.results import variants
from cartlab.results.schema import (CONFIG_COLUMNS, DOWNSTREAM_COLUMNS, EVAL_LOG_COLUMNS, FRAMES,  # noqa: F401
                                    PROBES_COLUMNS, RUNS_COLUMNS, TRAIN_LOG_COLUMNS, VARIANT_FIELDS)
from cartlab.results.variants import config_variant  # noqa: F401 - part of this module's API

VARIANT_COLUMNS = VARIANT_FIELDS
"""Optional in `validate` (frames that predate them); `with_variants` fills them."""
TABLES = FRAMES

SOURCES = ("published", "local")


def __getattr__(name: str):
    # MODELS (the stored model kinds) and PAPER_HOOKS (section 8's ablations) are read off the
    # family and hook registries when first asked for, so importing this module loads no torch.
    if name == "MODELS":
        from cartlab.model.family import kinds
        return tuple(kinds())
    if name == "PAPER_HOOKS":
        from cartlab.model.hooks import PAPER_ABLATIONS
        return PAPER_ABLATIONS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

DESCRIBE_COLUMNS = ("variant_label", *CONFIG_COLUMNS, "overrides")
"""What the analyses carry along with a variant to describe it (all equal within one variant)."""


class Results(NamedTuple):
    """The four results tables of one store (or of the paper), and the measurements of its
    trained models (the database's `probes` table; None where there are none, e.g. the paper)."""

    runs: pd.DataFrame
    train_log: pd.DataFrame
    eval_log: pd.DataFrame
    downstream: pd.DataFrame
    probes: pd.DataFrame | None = None


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
    missing = [c for c in columns if c not in frame.columns and not (table == "runs" and c in VARIANT_COLUMNS)]
    if missing:
        raise ValueError(f"{table}: missing columns {missing}; the schema needs {list(columns)}")
    if table == "runs":
        for field, allowed in (("source", SOURCES), ("model", __getattr__("MODELS"))):
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
        if "variant" in frame.columns and frame["variant"].notna().any():
            described = [c for c in (*CONFIG_COLUMNS, "overrides") if c in frame.columns]
            keyed = frame[frame["variant"].notna()]
            spread = keyed[described].astype(str).groupby(keyed["variant"]).nunique()
            if (spread > 1).any().any():
                key = spread.index[(spread > 1).any(axis=1)][0]
                cols = list(spread.columns[spread.loc[key] > 1])
                raise ValueError(f"runs.variant: {key!r} covers rows that differ in {cols}; the rows of one "
                                 f"variant are seeds of one configuration")
    return frame


def final_measurements(probes: pd.DataFrame | None, probe: str) -> pd.DataFrame | None:
    """The rows of measure `probe` (the `probes` table) at each run's last measured step; None
    when no run measured it (e.g. the paper's tables, whose sections report no probes)."""
    if probes is None or probes.empty:
        return None
    validate(probes, "probes")
    p = probes[probes["probe"] == probe]
    if p.empty:
        return None
    return p[p["step"] == p.groupby("run_id")["step"].transform("max")]


# -- variants ------------------------------------------------------------------------------------------
def with_variants(runs: pd.DataFrame) -> pd.DataFrame:
    """`runs` (a copy) with the variant columns of section 4.4's seed grouping filled where missing:
    `overrides` "" and `variant` = config_variant(row) for rows without one, `variant_label` =
    config_label(row). Rows that have a variant (a results database's) keep it."""
    out = runs.copy()
    for c in VARIANT_COLUMNS:
        if c not in out.columns:
            out[c] = pd.Series([None] * len(out), index=out.index, dtype=object)
    out["overrides"] = out["overrides"].astype(object).where(out["overrides"].notna(), "")
    if len(out):
        records = out.to_dict("records")
        todo = out["variant"].isna().to_numpy()
        if todo.any():
            out["variant"] = out["variant"].astype(object)
            out.loc[todo, "variant"] = [config_variant(r) for r, t in zip(records, todo) if t]
        todo = out["variant_label"].isna().to_numpy()
        if todo.any():
            out["variant_label"] = out["variant_label"].astype(object)
            out.loc[todo, "variant_label"] = [_column_label(r) for r, t in zip(records, todo) if t]
    return out


def is_baseline(runs: pd.DataFrame) -> pd.Series:
    """Boolean mask of CART baseline rows (section 8's reference): model "cart", hooks "" AND
    overrides "" (a component field set by hand, e.g. state_gate=residual, is a variant, never a
    baseline seed). A frame without `overrides` is taken to have none."""
    overrides = runs["overrides"] if "overrides" in runs.columns else pd.Series("", index=runs.index)
    return ((runs["model"] == "cart") & (runs["hooks"].fillna("") == "")
            & (overrides.fillna("") == "")).astype(bool)


def display_labels(runs: pd.DataFrame) -> pd.Series:
    """The label users see for each row's variant (section 4.4): `variant_label` (config_label
    when missing), with " #<variant[:6]>" appended where one label names several variants (e.g.
    two learning rates), so no two variants ever share a legend entry or a table row name."""
    runs = with_variants(runs) if len(runs) else runs
    if not len(runs):
        return pd.Series([], index=runs.index, dtype=object)
    labels = runs["variant_label"].astype(str)
    clash = runs.groupby(labels)["variant"].transform("nunique") > 1
    return labels.where(~clash, labels + " #" + runs["variant"].astype(str).str[:6])


def describe_variants(runs: pd.DataFrame, keys) -> str:
    """'cart d=128 P=2 R=4 (variant 1a2b3c4d5e6f), ...': the variants `keys` as an error message
    names them (section 4.4's seed grouping refuses to pool two)."""
    runs = with_variants(runs)
    labels = runs.drop_duplicates("variant").set_index("variant")["variant_label"]
    return ", ".join(f"{labels.get(k, '?')} (variant {k})" for k in sorted(set(keys)))


def parse_hooks(hooks: str) -> tuple[str, ...]:
    """Hook names (section 8 ablations) of a `runs.hooks` string: "no_lti,unshare_core" -> ("no_lti", "unshare_core")."""
    return variants.parse_hooks(hooks, known=__getattr__("PAPER_HOOKS"))


def format_hooks(hooks: Iterable[str]) -> str:
    """The canonical `runs.hooks` string of section 8 ablations: sorted, de-duplicated, comma-joined ("" for none)."""
    return variants.format_hooks(parse_hooks(hooks) if isinstance(hooks, str) else hooks)


def config_label(row) -> str:
    """Short label of a configuration (section 3.5 notation, section 8 hooks): the row's
    `variant_label` when it has one, else "cart d=1024 P=6 R=6 [no_lti]" or "dense d=1024 L=7",
    with " {state_gate=residual}" for fields set by hand (`overrides`)."""
    label = row.get("variant_label") if hasattr(row, "get") else None
    if isinstance(label, str) and label:
        return label
    return _column_label(row)


def family_label(row) -> str:
    """What a scaling law's runs share (section 7.3): the configuration label without its size,
    "cart P=2 R=4 [no_lti] {state_gate=residual}" or "dense" (width, and Dense's depth, are what
    the law varies). The same notation as config_label, built by the same code."""
    return _column_label(row, size=False)


_column_label = variants.column_label


def final_eval(runs: pd.DataFrame, eval_log: pd.DataFrame, *, step: int | None = None) -> pd.DataFrame:
    """Each run's evaluation at its last logged step (or at `step`), joined to its run row: the
    "final perplexity" of sections 5 and 7 (step = max logged step per run and split).

    Returns one row per (run, split): the `runs` columns (variant columns filled, `with_variants`)
    plus `step`, `split`, `loss`, `ppl`.
    """
    validate(runs, "runs")
    validate(eval_log, "eval_log")
    runs = with_variants(runs)
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
