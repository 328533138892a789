"""The LTI gate's spectral radius (paper section 6), and what happens inside the loop (issue 15).

    tab = radius_table(res.runs, res.train_log, step=30_500)   # d_model x n_loops, Table 8
    radius_band(tab)                                           # (0.790, 0.830)
    is_monotone(tab, along="d_model")                          # rises with d at every R
    persistence(tab)                                           # rho^R per cell
    radius_trajectories(runs, train_log)                       # mean/sd over seeds per step
    gateless(runs)                                             # runs without an LTI gate (no_lti)

From the `probes` table (`cartlab.measures.loops`: the per-loop logit lens and the loop map's
contraction, measured at every evaluation):

    loop_profile(runs, probes, metric="kl_to_final")           # per variant, domain, loop at the last step
    loop_trajectory(runs, probes, metric="radius_mean")        # per variant, domain, step at the last loop
    loop_summary(runs, probes)                                 # one row per variant and domain
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd

from cartlab.analysis.schema import (
    DESCRIBE_COLUMNS, RUNS_COLUMNS, describe_variants, display_labels, validate, with_variants,
)

RADIUS_COLUMNS = ("rho_max", "rho_mean")


def _check_column(column: str) -> None:
    if column not in RADIUS_COLUMNS:
        raise ValueError(f"column: {column!r} not allowed; allowed: {list(RADIUS_COLUMNS)}")


def radius_table(runs: pd.DataFrame, train_log: pd.DataFrame, *, step: int | None = None,
                 column: str = "rho_max", where: dict | None = None) -> pd.DataFrame:
    """Seed-mean spectral radius per (d_model, n_loops), rows d_model, columns n_loops
    (section 6, Table 8).

    rho(d, R) = mean over runs of `column` at `step` (default: each run's last step logging it).
    `where` filters runs first (e.g. {"stage": "stage2", "prelude_layers": 6, "hooks": "",
    "overrides": ""}); it must leave one variant per cell (runs of two variants are not seeds of
    one configuration, so a cell that holds two is refused, never averaged).
    """
    _check_column(column)
    validate(runs, "runs")
    validate(train_log, "train_log")
    runs = with_variants(runs)
    sel = runs
    for col, val in (where or {}).items():
        if col not in runs.columns:
            raise ValueError(f"where: unknown runs column {col!r}")
        sel = sel[sel[col] == val]
    log = train_log.dropna(subset=[column])
    if step is not None:
        log = log[log["step"] == step]
    log = log[log["step"] == log.groupby("run_id")["step"].transform("max")]
    merged = sel[sel["model"] == "cart"].merge(log[["run_id", column]], on="run_id")
    if merged.empty:
        raise ValueError(f"train_log.{column}: no CART radius values for the selected runs at step={step}")
    counts = merged.groupby(["d_model", "n_loops"])["variant"].nunique()
    if (counts > 1).any():
        d, r = counts.index[counts > 1][0]
        cell = merged[(merged["d_model"] == d) & (merged["n_loops"] == r)]
        raise ValueError(f"where: the cell d_model={d:g}, n_loops={r:g} holds several variants, not seeds of one "
                         f"configuration: {describe_variants(cell, cell['variant'])}; narrow `where` "
                         f"(e.g. hooks='', overrides='')")
    tab = merged.pivot_table(index="d_model", columns="n_loops", values=column, aggfunc="mean")
    tab.columns = tab.columns.astype(int)
    return tab


def radius_band(table: pd.DataFrame) -> tuple[float, float]:
    """band = (min over cells of rho, max over cells of rho), NaN cells ignored: the band the
    radius settles in (section 6; Table 8 gives 0.79-0.83)."""
    v = table.to_numpy(float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise ValueError("table: no finite radius values")
    return float(v.min()), float(v.max())


def is_monotone(table: pd.DataFrame, *, along: str, increasing: bool = True, strict: bool = True) -> pd.Series:
    """Whether rho rises (or falls) along `along` ("d_model" = down each column, "n_loops" = along
    each row), per slice: diff(rho) > 0 for every consecutive pair of measured cells (>= 0 if not
    strict) (section 6). Missing cells are skipped; slices with fewer than two cells are left out."""
    if along not in ("d_model", "n_loops"):
        raise ValueError(f"along: {along!r} not allowed; allowed: ['d_model', 'n_loops']")
    t = table.sort_index().sort_index(axis=1)
    slices = t if along == "d_model" else t.T  # each column of `slices` is one slice, ordered along `along`
    sign = 1 if increasing else -1
    out = {}
    for key, s in slices.items():
        d = np.diff(s.dropna().to_numpy(float)) * sign
        if d.size:
            out[key] = bool((d > 0).all() if strict else (d >= 0).all())
    return pd.Series(out, dtype=bool)


def relative_gain(table: pd.DataFrame, *, along: str) -> pd.DataFrame:
    """Relative change of rho between consecutive cells along `along`: rho_i / rho_{i-1} - 1 (section 6,
    e.g. "about X% per pair of additional loops")."""
    if along not in ("d_model", "n_loops"):
        raise ValueError(f"along: {along!r} not allowed; allowed: ['d_model', 'n_loops']")
    t = table.sort_index().sort_index(axis=1)
    axis = 0 if along == "d_model" else 1
    return (t / t.shift(1, axis=axis) - 1).dropna(how="all", axis=axis)


def persistence(rho, n_loops=None):
    """Fraction of the initial residual surviving all R gate applications: rho^R (section 6).

    Given a radius table (columns = R), returns the table of rho^R; given numbers, rho ** n_loops.
    The fraction discarded is 1 - rho^R (e.g. 0.79^6 = 0.243, 76% discarded).
    """
    if isinstance(rho, pd.DataFrame):
        if n_loops is not None:
            raise ValueError("n_loops: taken from the table's columns; do not pass it with a table")
        return rho ** np.asarray(rho.columns, float)[None, :]
    if n_loops is None:
        raise ValueError("n_loops: required when rho is a number or array")
    r, n = np.asarray(rho, float), np.asarray(n_loops, float)
    if np.any((r < 0) | (r > 1)):
        raise ValueError(f"rho: spectral radius must be in [0, 1] for a contracting gate, got {rho}")
    if np.any(n < 1):
        raise ValueError(f"n_loops: must be >= 1, got {n_loops}")
    out = r ** n
    return float(out) if out.ndim == 0 else out


def radius_trajectories(runs: pd.DataFrame, train_log: pd.DataFrame, *, column: str = "rho_max") -> pd.DataFrame:
    """Radius over training per variant: mean, sd (ddof=1; NaN for one seed), n per step (sec. 6).

    The seeds of a variant are its runs (`schema.with_variants`). Returns long form: variant,
    variant_label, the CONFIG_COLUMNS, overrides, step, mean, sd, n.
    """
    _check_column(column)
    validate(runs, "runs")
    validate(train_log, "train_log")
    runs = with_variants(runs)
    merged = runs[list(RUNS_COLUMNS)].merge(train_log[["run_id", "step", column]].dropna(subset=[column]), on="run_id")
    if merged.empty:
        raise ValueError(f"train_log.{column}: no values for the given runs")
    g = merged.groupby(["variant", "step"])
    out = g[column].agg(mean="mean", sd=lambda s: s.std(ddof=1) if len(s) > 1 else np.nan, n="size")
    out = g[list(DESCRIBE_COLUMNS)].first().join(out).reset_index()
    return out[["variant", *DESCRIBE_COLUMNS, "step", "mean", "sd", "n"]]


def gateless(runs: pd.DataFrame) -> pd.Series:
    """True for CART runs without an LTI gate (section 8.6: hook `no_lti`, or `state_gate=residual`
    set by hand): their logged radius is the identity's 1 by definition, not a measured contraction, so
    figures label them "no gate" instead of drawing a line at 1."""
    runs = with_variants(runs)
    hooks = runs["hooks"].fillna("").map(lambda h: "no_lti" in h.split(","))
    hand = runs["overrides"].fillna("").map(lambda o: "state_gate=residual" in o.split(","))
    return (runs["model"] == "cart") & (hooks | hand)


# -- inside the loop (issue 15): the probes of cartlab.measures.loops -----------------------------------------
class LoopMeasure(NamedTuple):
    probe: str  # the measure that stores it (cartlab.measures.loops)
    label: str  # axis label, with units
    what: str   # one line for widgets and captions


LOOP_MEASURES = {
    "loss": LoopMeasure("logit_lens", "lens loss (nats)",
                        "next-token cross-entropy of the state after loop r, decoded by coda and head"),
    "kl_to_final": LoopMeasure("logit_lens", "KL to the final distribution (nats)",
                               "KL(p_R || p_r): what stopping at loop r instead of R loses"),
    "top1_agree": LoopMeasure("logit_lens", "top-1 agreement (share of tokens)",
                              "share of tokens whose top-1 at loop r is the final top-1"),
    "settled": LoopMeasure("logit_lens", "settled (share of tokens)",
                           "share of tokens whose top-1 no longer changes from loop r on"),
    "settle_loop": LoopMeasure("logit_lens", "mean settle loop",
                               "mean loop from which the top-1 token no longer changes"),
    "radius_mean": LoopMeasure("loop_contraction", "spectral radius (mean over tokens)",
                               "spectral radius of one loop step's Jacobian dh_r/dh_(r-1), mean over tokens"),
    "radius_max": LoopMeasure("loop_contraction", "spectral radius (max over tokens)",
                              "spectral radius of dh_r/dh_(r-1), max over tokens: the whole step's radius"),
    "norm_mean": LoopMeasure("loop_contraction", "2-norm (mean over tokens)",
                             "operator 2-norm of dh_r/dh_(r-1), mean over tokens (> 1: some direction grows)"),
    "norm_max": LoopMeasure("loop_contraction", "2-norm (max over tokens)",
                            "operator 2-norm of dh_r/dh_(r-1), max over tokens"),
    "gate_radius": LoopMeasure("loop_contraction", "LTI gate radius",
                               "the LTI gate's radius max_c A_c, the Jacobian's linear part (absent without a gate)"),
}
"""metric -> (probe, label, what): the measures the loop views and widgets offer. `settle_loop` is
one number per evaluation (stored at x = 0); every other metric has one value per loop r (x = r)."""
PER_EVALUATION = ("settle_loop",)


def _check_metric(metric: str) -> str:
    if metric not in LOOP_MEASURES:
        raise ValueError(f"metric: {metric!r} not allowed; allowed: {list(LOOP_MEASURES)}")
    return LOOP_MEASURES[metric].probe


def loop_measure(runs: pd.DataFrame, probes: pd.DataFrame | None, metric: str) -> pd.DataFrame:
    """The probes rows of `metric` (the per-loop measures beside section 6's gate radius) joined to
    their runs' variants: run_id, variant,
    DESCRIBE_COLUMNS, seed, step, split, loop, value (loop = the probes' x; 0 for settle_loop).
    Raises ValueError naming the metric when no selected run measured it."""
    probe = _check_metric(metric)
    validate(runs, "runs")
    if probes is None or not len(probes):
        raise ValueError(f"probes: no {probe} rows; train with measures [{probe}] (CART runs with R > 1 measure it by "
                         f"default)")
    validate(probes, "probes")
    runs = with_variants(runs)
    rows = probes[(probes["probe"] == probe) & (probes["metric"] == metric)]
    merged = runs[[*RUNS_COLUMNS]].merge(rows[["run_id", "step", "split", "x", "value"]], on="run_id")
    if merged.empty:
        raise ValueError(f"probes: no {probe} {metric} rows for the selected runs")
    merged = merged.rename(columns={"x": "loop"}).assign(loop=lambda f: f["loop"].astype(int))
    return merged[["run_id", "variant", *DESCRIBE_COLUMNS, "seed", "step", "split", "loop", "value"]]


def _seed_stats(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """mean, sd (ddof=1; NaN for one seed) and n over the runs (seeds) of each `keys` cell, with
    the variant's description carried along."""
    g = frame.groupby(keys)
    out = g["value"].agg(mean="mean", sd=lambda s: s.std(ddof=1) if len(s) > 1 else np.nan, n="size")
    return g[list(DESCRIBE_COLUMNS)].first().join(out).reset_index()


def loop_profile(runs: pd.DataFrame, probes: pd.DataFrame | None, *, metric: str = "loss",
                 step: int | None = None) -> pd.DataFrame:
    """`metric` against the loop index (section 3.2's loop steps) per variant and domain at `step`
    (default: the last step every seed of the variant reached, so seeds stopped at different
    steps are still compared at one step), seed mean, sd and n: the logit lens's loss / KL /
    agreement by loop, or the contraction by loop. Columns: variant, split, loop,
    DESCRIBE_COLUMNS, step, mean, sd, n."""
    f = loop_measure(runs, probes, metric)
    if step is not None:
        f = f[f["step"] == step]
        if f.empty:
            raise ValueError(f"step: no {metric} measured at step {step}")
    else:
        last = f.groupby("run_id")["step"].transform("max")  # each run's last measured step
        f = f[f["step"] == last.groupby(f["variant"]).transform("min")]
    out = _seed_stats(f, ["variant", "split", "loop"])
    steps = f.groupby("variant")["step"].max().rename("step")
    return out.join(steps, on="variant")[["variant", "split", "loop", *DESCRIBE_COLUMNS, "step", "mean", "sd", "n"]]


def loop_trajectory(runs: pd.DataFrame, probes: pd.DataFrame | None, *, metric: str = "radius_mean",
                    loop: int | None = None) -> pd.DataFrame:
    """(Section 6's trajectories, per loop.) `metric` at loop `loop` (default: each run's last loop
    r = R) over training steps, per variant and domain, seed mean, sd and n. settle_loop has one value per evaluation and takes no loop.
    Columns: variant, split, step, DESCRIBE_COLUMNS, loop, mean, sd, n."""
    f = loop_measure(runs, probes, metric)
    if metric in PER_EVALUATION:
        if loop is not None:
            raise ValueError(f"loop: {metric} is one number per evaluation; pass loop=None")
    elif loop is None:
        f = f[f["loop"] == f.groupby("run_id")["loop"].transform("max")]
    else:
        f = f[f["loop"] == loop]
        if f.empty:
            raise ValueError(f"loop: no run measured {metric} at loop {loop}")
    out = _seed_stats(f, ["variant", "split", "step"])
    loops = f.groupby("variant")["loop"].max().rename("loop")
    return out.join(loops, on="variant")[["variant", "split", "step", *DESCRIBE_COLUMNS, "loop", "mean", "sd", "n"]]


SUMMARY_COLUMNS = {
    "loss": ("first", "lens loss at loop 1"), "kl_to_final": ("first", "KL at loop 1"),
    "settle_loop": ("only", "settle loop"), "radius_mean": ("last", "radius at loop R"),
    "norm_max": ("last", "max norm at loop R"), "gate_radius": ("last", "gate radius"),
}


def loop_summary(runs: pd.DataFrame, probes: pd.DataFrame | None) -> pd.DataFrame:
    """(Section 6, inside the loop.) One row per variant and domain at the last measured step, seed means: R, the lens loss
    and KL at loop 1 (how far one loop is from the final prediction), the mean settle loop, the
    loop step's radius and largest norm at loop R, and the gate's radius ("no gate" without one).
    Measures a run did not take are left empty. (kl = KL(p_R || p_r); radius = max |eig dh_r/dh_(r-1)|.)"""
    parts = []
    for metric, (where, name) in SUMMARY_COLUMNS.items():
        try:
            prof = loop_profile(runs, probes, metric=metric)
        except ValueError:
            continue
        pick = "min" if where == "first" else "max"
        prof = prof[prof["loop"] == prof.groupby("variant")["loop"].transform(pick)].set_index(["variant", "split"])
        if not parts:
            parts.append(prof["step"])
        parts.append(prof["mean"].rename(name))
    if not parts:
        raise ValueError("probes: no logit_lens or loop_contraction rows for the selected runs")
    runs = with_variants(runs).drop_duplicates("variant")
    info = pd.DataFrame({"variant": runs["variant"], "config": display_labels(runs), "R": runs["n_loops"],
                         "no_gate": gateless(runs)})
    table = info.merge(pd.concat(parts, axis=1).reset_index(), on="variant")
    if "gate radius" in table:
        table["gate radius"] = table["gate radius"].astype(object).where(~table["no_gate"], "no gate")
    table = table.sort_values(["split", "config"])
    return table[["config", "split", "R", "step", *(c for c in table.columns if c in
                                                   {n for _, n in SUMMARY_COLUMNS.values()})]].reset_index(drop=True)
