"""Figures for the analyses (paper sections 5-8). Each function takes results-schema frames and
returns a matplotlib Figure; nothing is shown or saved (call fig.savefig yourself).

    fig = plot_scaling_fit(res.runs, res.eval_log, where={"stage": "stage2", "n_loops": 6})
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure  # figures outside pyplot: no global state, any backend

from cartlab.analysis.decompose import decompose_gap
from cartlab.analysis.scaling import fit_power_law
from cartlab.analysis.schema import (
    RUNS_COLUMNS, config_label, describe_variants,  # config_label: used by the notebooks
    display_labels, final_eval, is_baseline, validate,
    with_variants,
)
from cartlab.analysis.spectral import radius_trajectories

SCALING_AXES = ("d_model", "stored_params", "effective_params", "tokens", "flops")


def _where(runs: pd.DataFrame, where: dict | None) -> pd.DataFrame:
    validate(runs, "runs")
    runs = with_variants(runs)  # so `where` can name variant, overrides or variant_label
    for col, val in (where or {}).items():
        if col not in runs.columns:
            raise ValueError(f"where: unknown runs column {col!r}; allowed: {list(runs.columns)}")
        runs = runs[runs[col] == val]
    if runs.empty:
        raise ValueError(f"where: no runs match {where}")
    return runs


def _one_variant_per(frame: pd.DataFrame, keys: list[str], what: str) -> None:
    """Refuse to average rows of different variants into one point (they are not seeds of one
    configuration): name the first cell of `keys` that holds several."""
    counts = frame.groupby(keys, dropna=False)["variant"].nunique()
    if (counts > 1).any():
        cell = counts.index[counts > 1][0]
        cell = cell if isinstance(cell, tuple) else (cell,)
        rows = frame[(frame[keys] == pd.Series(dict(zip(keys, cell)))).all(axis=1)]
        where = ", ".join(f"{k}={v}" for k, v in zip(keys, cell))
        raise ValueError(f"{what}: {where} holds several variants, not seeds of one configuration: "
                         f"{describe_variants(rows, rows['variant'])}; narrow `where` (e.g. overrides='')")


def plot_scaling_fit(runs: pd.DataFrame, eval_log: pd.DataFrame, *, x: str = "d_model", split: str = "wiki",
                     metric: str = "ppl", where: dict | None = None, level: float = 0.95) -> Figure:
    """Power-law fit y = a x^b of the final `metric` on `split` with its `level` band, and log
    residuals (section 7.3). x is a runs column or "flops" = 6 * effective_params * tokens. Each
    point is the seed mean of one variant; `where` must leave one variant per x."""
    if x not in SCALING_AXES:
        raise ValueError(f"x: {x!r} not allowed; allowed: {list(SCALING_AXES)}")
    fe = final_eval(_where(runs, where), eval_log)
    fe = fe[fe["split"] == split]
    if x == "flops":
        fe = fe.assign(flops=6.0 * fe["effective_params"] * fe["tokens"])
    _one_variant_per(fe, [x], "where")
    pts = fe.groupby(x)[metric].agg(["mean", "std"]).reset_index().dropna(subset=[x])
    fit = fit_power_law(pts[x], pts["mean"], level=level, n_boot=0)
    fig = Figure(figsize=(5, 5))
    ax, axr = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    grid = np.geomspace(pts[x].min(), pts[x].max(), 100)
    lo, hi = fit.predict_band(grid)
    ax.fill_between(grid, lo, hi, alpha=0.25, label=f"{level:.0%} CI")
    ax.plot(grid, fit.predict(grid), label=f"fit: b = {fit.b:.3f} [{fit.ci[0]:.3f}, {fit.ci[1]:.3f}]")
    ax.errorbar(pts[x], pts["mean"], yerr=pts["std"].fillna(0), fmt="o", color="k", label="data")
    ax.set(xscale="log", yscale="log", ylabel=f"{metric} ({split})")
    ax.legend(fontsize=8)
    axr.axhline(0, color="grey", lw=0.8)
    axr.plot(pts[x], fit.residuals, "o", color="k")
    axr.set(xlabel=x, ylabel="log residual")
    fig.tight_layout()
    return fig


def plot_radius_trajectories(runs: pd.DataFrame, train_log: pd.DataFrame, *, column: str = "rho_max",
                             where: dict | None = None) -> Figure:
    """Spectral radius over training per variant, seed mean with a 1-sd band (section 6)."""
    traj = radius_trajectories(_where(runs, where), train_log, column=column)
    traj = traj.assign(config=display_labels(traj))
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    palette = sns.color_palette(n_colors=traj["variant"].nunique())
    for color, (_, g) in zip(palette, traj.groupby("variant")):
        g = g.sort_values("step")
        ax.plot(g["step"], g["mean"], color=color, label=g["config"].iloc[0])
        sd = g["sd"].fillna(0)
        ax.fill_between(g["step"], g["mean"] - sd, g["mean"] + sd, color=color, alpha=0.2)
    ax.set(xlabel="step", ylabel=f"spectral radius ({column})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_gap_waterfall(runs: pd.DataFrame, eval_log: pd.DataFrame, *, cart: dict, split: str = "wiki",
                       metric: str = "ppl", path: str = "effective", k: float = 2.0,
                       tolerance: float = 0.15) -> Figure:
    """Waterfall of the CART-Dense gap's components (section 8; see decompose.decompose_gap):
    one bar per component from the running sum, the total last; hatched bars are within noise,
    and each bar's error bar is its noise, k * sd(c) = k * sd * sqrt(sum w^2 / n)."""
    if path not in ("effective", "stored"):
        raise ValueError(f"path: {path!r} not allowed; allowed: ['effective', 'stored']")
    dec = decompose_gap(runs, eval_log, cart=cart, split=split, metric=metric, k=k, tolerance=tolerance)
    dec = dec[dec["path"] == path]
    parts, total = dec[dec["component"] != "total"], dec[dec["component"] == "total"].iloc[0]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    start, tops = 0.0, []
    for i, row in enumerate(parts.itertuples()):
        color = "tab:red" if row.value > 0 else "tab:green"
        ax.bar(i, row.value, bottom=start, color=color, hatch=None if row.label == "signal" else "//",
               edgecolor="k")
        start += row.value
        tops.append(start)
    ax.bar(len(parts), total["value"], color="tab:grey", edgecolor="k",
           hatch=None if total["label"] == "signal" else "//")
    ax.errorbar(range(len(parts) + 1), tops + [total["value"]], yerr=list(parts["noise"]) + [total["noise"]],
                fmt="none", ecolor="k", capsize=3, label=f"noise: {k:g} sd of each component")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(parts) + 1), list(parts["component"]) + ["total"], rotation=30, ha="right")
    ax.set(ylabel=f"{metric} ({split}): CART - Dense", title=f"gap to {path}-matched Dense")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_variable_r_profile(downstream: pd.DataFrame, runs: pd.DataFrame | None = None, *,
                            run_id: str | None = None, num_fewshot: int = 0) -> Figure:
    """Downstream metrics against the inference loop count (section 7.4, Table 12): one panel per
    (task, metric); with `runs`, a dashed line marks the trained R."""
    validate(downstream, "downstream")
    df = downstream[downstream["num_fewshot"] == num_fewshot]
    if run_id is None:
        counts = df.groupby("run_id")["n_loops"].nunique()
        if counts.empty or counts.max() < 2:
            raise ValueError("downstream: no run evaluated at >= 2 inference loop counts (n_loops)")
        run_id = counts.idxmax()
    df = df[df["run_id"] == run_id]
    if df["n_loops"].nunique() < 2:
        raise ValueError(f"run_id: {run_id!r} has no downstream rows at >= 2 n_loops")
    panels = sorted(df.groupby(["task", "metric"]).groups)
    fig = Figure(figsize=(3 * len(panels), 3))
    axes = fig.subplots(1, len(panels), squeeze=False)
    trained = None
    if runs is not None:
        validate(runs, "runs")
        match = runs.loc[runs["run_id"] == run_id, "n_loops"]
        trained = float(match.iloc[0]) if len(match) else None
    for ax, (task, metric) in zip(axes[0], panels):
        g = df[(df["task"] == task) & (df["metric"] == metric)].sort_values("n_loops")
        ax.errorbar(g["n_loops"], g["value"], yerr=g["stderr"].fillna(0), marker="o")
        if trained is not None:
            ax.axvline(trained, ls="--", color="grey")
        ax.set(title=f"{task} {metric}", xlabel="inference R", yscale="log" if "perplexity" in metric else "linear")
    fig.tight_layout()
    return fig


def plot_loss_curves(runs: pd.DataFrame, log: pd.DataFrame, *, value: str = "loss", split: str | None = None,
                     where: dict | None = None) -> Figure:
    """`value` against step per variant, seed mean with a 1-sd band (section 5.4).

    `log` is a train_log, or an eval_log together with `split`."""
    is_eval = "split" in log.columns
    validate(log, "eval_log" if is_eval else "train_log")
    if value not in log.columns:
        raise ValueError(f"value: {value!r} not a column of the log; allowed: {list(log.columns[2:])}")
    if is_eval:
        if split is None:
            raise ValueError(f"split: required for an eval_log; available: {sorted(log['split'].unique())}")
        log = log[log["split"] == split]
    runs = _where(runs, where)
    df = runs[list(RUNS_COLUMNS)].merge(log[["run_id", "step", value]].dropna(subset=[value]), on="run_id")
    if df.empty:
        raise ValueError(f"log: no {value} values for the selected runs")
    df["config"] = display_labels(df)  # one hue per variant, never two variants under one label
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    sns.lineplot(data=df, x="step", y=value, hue="config", errorbar="sd", ax=ax)
    ax.set(ylabel=value + (f" ({split})" if split else ""))
    fig.tight_layout()
    return fig


def plot_r_reversal(runs: pd.DataFrame, eval_log: pd.DataFrame, *, split: str = "wiki", metric: str = "ppl",
                    stages=("stage1", "stage2"), where: dict | None = None) -> Figure:
    """Which loop count R is best, per width, at each training budget (sections 5.2 and 9.5).

    One panel per d_model: each stage's seed-mean final `metric` relative to that stage's best R
    at that width (m / min_R m - 1, in %), against R; a star marks each stage's best. Lines that
    bottom out at different R are the screen-vs-full reversal. CART baselines only (no hooks, no
    overrides); each cell must hold one variant (narrow `where`, e.g. by prelude_layers).
    """
    fe = final_eval(_where(runs, where), eval_log)
    fe = fe[(fe["split"] == split) & is_baseline(fe) & fe["stage"].isin(stages)]
    if fe["stage"].nunique() < 2:
        raise ValueError(f"stages: need CART baseline runs at two stages of {list(stages)} on {split!r}, "
                         f"found {sorted(fe['stage'].unique())}")
    _one_variant_per(fe, ["stage", "d_model", "n_loops"], "where")
    cells = fe.groupby(["stage", "d_model", "n_loops"])[metric].mean().reset_index()
    widths = sorted(cells["d_model"].unique())
    fig = Figure(figsize=(3 * len(widths), 3.2))
    axes = fig.subplots(1, len(widths), sharey=True, squeeze=False)[0]
    for ax, d in zip(axes, widths):
        for color, stage in zip(sns.color_palette(n_colors=len(stages)), stages):
            g = cells[(cells["d_model"] == d) & (cells["stage"] == stage)].sort_values("n_loops")
            if g.empty:
                continue
            rel = 100 * (g[metric] / g[metric].min() - 1)
            ax.plot(g["n_loops"], rel, "o-", color=color, label=stage)
            best = g[metric].idxmin()
            ax.plot(g.loc[best, "n_loops"], 0, "*", ms=14, color=color, markeredgecolor="k")
        ax.set(title=f"d={int(d)}", xlabel="training R")
    axes[0].set_ylabel(f"{metric} above the stage's best R (%)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig
