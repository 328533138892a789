"""The LTI gate's spectral radius (paper section 6), over training and across widths and loop counts.

    tab = radius_table(res.runs, res.train_log, step=30_500)   # d_model x n_loops, Table 8
    radius_band(tab)                                           # (0.790, 0.830)
    is_monotone(tab, along="d_model")                          # rises with d at every R
    persistence(tab)                                           # rho^R per cell
    radius_trajectories(runs, train_log)                       # mean/sd over seeds per step
    gateless(runs)                                             # runs without an LTI gate (no_lti)
    plot_radius_trajectories(runs, train_log)                  # the same, drawn

What happens inside the loop (the probes of `cartlab.measures.loops`) is `cartlab.analysis.loops`.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from cartlab.analysis.figures import select_runs
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


# -- figure ----------------------------------------------------------------------------------------------
def plot_radius_trajectories(runs: pd.DataFrame, train_log: pd.DataFrame, *, column: str = "rho_max",
                             where: dict | None = None) -> Figure:
    """Spectral radius over training per variant, seed mean with a 1-sd band (section 6). Runs
    without an LTI gate (`spectral.gateless`) have no radius: they are named "no gate" in the
    legend, not drawn as a line at 1. Each variant has its own line style too, so variants whose
    radius coincides (the gate barely moves in a short run) stay visible on top of each other."""
    import seaborn as sns
    from matplotlib.figure import Figure

    runs = with_variants(select_runs(runs, where))
    nogate = gateless(runs).values
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    if not nogate.all():
        traj = radius_trajectories(runs[~nogate], train_log, column=column)
        traj = traj.assign(config=display_labels(traj))
        palette = sns.color_palette(n_colors=traj["variant"].nunique())
        styles = ["-", "--", "-.", ":", (0, (5, 1, 1, 1))]
        for i, (color, (_, g)) in enumerate(zip(palette, traj.groupby("variant"))):
            g = g.sort_values("step")
            ax.plot(g["step"], g["mean"], color=color, ls=styles[i % len(styles)], lw=2.2 - 0.3 * (i % 4),
                    label=g["config"].iloc[0])
            sd = g["sd"].fillna(0)
            ax.fill_between(g["step"], g["mean"] - sd, g["mean"] + sd, color=color, alpha=0.2)
    for label in sorted(set(display_labels(runs)[nogate])):
        ax.plot([], [], " ", label=f"{label}: no gate")
    ax.set(xlabel="step", ylabel=f"spectral radius ({column})", title=f"LTI gate radius ({column}) over training")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
