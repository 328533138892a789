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


def _final_points(runs: pd.DataFrame, eval_log: pd.DataFrame, x: str, split: str, where: dict | None) -> pd.DataFrame:
    """Final evaluations on `split` of the runs `where` selects, with the column `x` (section 7.3:
    a runs column, or flops = 6 * effective_params * tokens)."""
    if x not in SCALING_AXES:
        raise ValueError(f"x: {x!r} not allowed; allowed: {list(SCALING_AXES)}")
    fe = final_eval(_where(runs, where), eval_log)
    fe = fe[fe["split"] == split]
    return fe.assign(flops=6.0 * fe["effective_params"] * fe["tokens"]) if x == "flops" else fe


def plot_scaling_fit(runs: pd.DataFrame, eval_log: pd.DataFrame, *, x: str = "d_model", split: str = "wiki",
                     metric: str = "ppl", where: dict | None = None, level: float = 0.95) -> Figure:
    """Power-law fit y = a x^b of the final `metric` on `split` with its `level` band, and log
    residuals (section 7.3). x is a runs column or "flops" = 6 * effective_params * tokens. Each
    point is the seed mean of one variant; `where` must leave one variant per x."""
    fe = _final_points(runs, eval_log, x, split, where)
    _one_variant_per(fe, [x], "where")
    pts = fe.groupby(x)[metric].agg(["mean", "std"]).reset_index().dropna(subset=[x])
    fit = fit_power_law(pts[x], pts["mean"], level=level, n_boot=0)
    fig = Figure(figsize=(5, 5))
    ax, axr = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    grid = np.geomspace(pts[x].min(), pts[x].max(), 100)
    lo, hi = fit.predict_band(grid)
    ax.fill_between(grid, lo, hi, alpha=0.25, label=f"{level:.0%} CI")
    ax.plot(grid, fit.predict(grid), label=f"fit: b = {fit.b:.3f} [{fit.ci[0]:.3f}, {fit.ci[1]:.3f}]")
    ax.errorbar(pts[x], pts["mean"], yerr=pts["std"].fillna(0), fmt="o", color="k", label="data (seed mean +/- 1 sd)")
    which = ", ".join(_key_label(k, v) for k, v in (where or {}).items())
    ax.set(xscale="log", yscale="log", ylabel=f"{metric} ({split})")
    fig.suptitle(f"Final {metric} on {split} against {x}: power-law fit" + (f"\n({which})" if which else ""))
    _plain_log_y(ax)
    ax.legend(fontsize=8)
    axr.axhline(0, color="grey", lw=0.8)
    axr.plot(pts[x], fit.residuals, "o", color="k")
    axr.set(xlabel=x, ylabel="log residual")
    _width_ticks(axr, x, pts[x])
    fig.tight_layout()
    return fig


def _width_ticks(ax, x: str, values) -> None:
    """On a log axis of widths, ticks at the widths trained (256, 512, ...), not 3x10^2."""
    if x == "d_model":
        from matplotlib.ticker import NullFormatter

        values = sorted(set(int(v) for v in values))
        ax.set_xticks(values, [str(v) for v in values])
        ax.xaxis.set_minor_formatter(NullFormatter())


def _plain_log_y(ax) -> None:
    """A log y axis labelled 0.9, 20, 30 or 100, 1000 rather than 9e-01, 2x10^1 or 10^3: matplotlib's
    LogFormatter picks which ticks get a label (fewer as the range grows), %g writes it."""
    from matplotlib.ticker import LogFormatter

    class Plain(LogFormatter):
        def __call__(self, x, pos=None):
            return f"{x:g}" if super().__call__(x, pos) else ""

    ax.yaxis.set_major_formatter(Plain(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(Plain(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def plot_radius_trajectories(runs: pd.DataFrame, train_log: pd.DataFrame, *, column: str = "rho_max",
                             where: dict | None = None) -> Figure:
    """Spectral radius over training per variant, seed mean with a 1-sd band (section 6). Runs
    without an LTI gate (`spectral.gateless`) have no radius: they are named "no gate" in the
    legend, not drawn as a line at 1. Each variant has its own line style too, so variants whose
    radius coincides (the gate barely moves in a short run) stay visible on top of each other."""
    from cartlab.analysis.spectral import gateless

    runs = with_variants(_where(runs, where))
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


def plot_gap_waterfall(runs: pd.DataFrame, eval_log: pd.DataFrame, *, cart: dict, split: str = "wiki",
                       metric: str = "ppl", path: str = "effective", k: float = 2.0,
                       tolerance: float = 0.15) -> Figure:
    """Waterfall of the CART-Dense gap's components (section 8; see decompose.decompose_gap):
    one bar per component from the running sum, the total last; red costs perplexity, green
    helps, hatched bars are within noise, and each bar's error bar is its noise,
    k * sd(c) = k * sd * sqrt(sum w^2 / n). The legend says all of this."""
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
    ax.set(xlabel="component (section 8)", ylabel=f"{metric} ({split}): CART - Dense",
           title=f"CART's {metric} gap to the {path}-matched Dense, component by component")
    from matplotlib.patches import Patch

    handles, _ = ax.get_legend_handles_labels()
    handles += [Patch(facecolor="tab:red", edgecolor="k", label=f"costs {metric} (CART worse)"),
                Patch(facecolor="tab:green", edgecolor="k", label=f"helps (lowers {metric})"),
                Patch(facecolor="white", edgecolor="k", hatch="//", label="hatched: within noise"),
                Patch(facecolor="tab:grey", edgecolor="k", label="total gap")]
    ax.legend(handles=handles, fontsize=7)
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
        ax.set(title=f"{task} {metric}", xlabel="inference R", ylabel=metric,
               yscale="log" if "perplexity" in metric else "linear")
    fig.suptitle(f"Downstream metrics against the inference loop count ({num_fewshot}-shot"
                 + (", dashed: trained R)" if trained is not None else ")"))
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
    what = f"Validation {value} on {split}" if is_eval else f"Training {value}"
    ax.set(xlabel="step", ylabel=value + (f" ({split})" if split else ""),
           title=f"{what} against step (seed mean +/- 1 sd)")
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
    fig.suptitle(f"Best training R per width: {' vs '.join(stages)} ({metric} on {split}; stars: each stage's best)")
    fig.tight_layout()
    return fig


# -- inside the loop (issue 15): the logit lens and the loop map's contraction ---------------------------------
def _loop_panels(frame: pd.DataFrame, splits, what: str) -> list[str]:
    """The validation domains to draw, one panel each: `splits` (checked) or every one measured."""
    have = sorted(frame["split"].unique())
    if splits is None:
        return have
    missing = [s for s in splits if s not in have]
    if missing or not splits:
        raise ValueError(f"splits: {missing or splits} not measured for {what}; available: {have}")
    return list(splits)


def _variant_colors(frame: pd.DataFrame) -> dict:
    """variant -> (colour, display label), colours in label order, so every panel agrees."""
    labels = frame.drop_duplicates("variant").assign(config=lambda f: display_labels(f)).set_index("variant")["config"]
    palette = sns.color_palette(n_colors=len(labels))
    return {v: (color, labels[v]) for color, v in zip(palette, sorted(labels.index, key=lambda v: labels[v]))}


def plot_loop_profiles(runs: pd.DataFrame, probes: pd.DataFrame, *, metrics=("loss", "kl_to_final"), splits=None,
                       step: int | None = None, loops=None, where: dict | None = None) -> Figure:
    """Loop measures against the loop index (section 3.2's loop steps, issue 15; default: the logit lens's loss and KL to
    the final distribution): each metric (rows) per validation domain (columns) at `step`
    (default: each run's last measured), one line per variant, seed mean with 1-sd error bars.
    `loops` keeps only those loop indices."""
    from cartlab.analysis.spectral import LOOP_MEASURES, PER_EVALUATION, loop_profile

    if PER_EVALUATION[0] in metrics:
        raise ValueError(f"metrics: {PER_EVALUATION[0]} is one number per evaluation, not per loop; plot it with "
                         f"plot_loop_trajectories")
    runs = _where(runs, where)
    profiles = {m: loop_profile(runs, probes, metric=m, step=step) for m in metrics}
    panels = _loop_panels(pd.concat(profiles.values()), splits, ", ".join(metrics))
    colors = _variant_colors(pd.concat(profiles.values()))
    fig = Figure(figsize=(max(6.0, 3.6 * len(panels)), 2.8 * len(metrics) + 0.6))
    axes = fig.subplots(len(metrics), len(panels), squeeze=False, sharex=True)
    for i, (metric, prof) in enumerate(profiles.items()):
        if loops is not None:
            prof = prof[prof["loop"].isin(loops)]
        for j, split in enumerate(panels):
            ax = axes[i, j]
            for variant, g in prof[prof["split"] == split].groupby("variant"):
                g = g.sort_values("loop")
                color, label = colors[variant]
                ax.errorbar(g["loop"], g["mean"], yerr=g["sd"].fillna(0), marker="o", color=color, label=label,
                            capsize=2)
            ax.set(title=f"{split}: {metric}", xlabel="loop r", ylabel=LOOP_MEASURES[metric].label)
            ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0, 0].legend(fontsize=7)
    last = int(max(p["step"].max() for p in profiles.values()))
    kinds = {LOOP_MEASURES[m].probe for m in metrics}
    titles = {"logit_lens": "Logit lens: the state after each loop decoded by coda and head",
              "loop_contraction": "Contraction of each loop step"}
    fig.suptitle(f"{titles[kinds.pop()] if len(kinds) == 1 else 'Loop measures'} (step {step or last})")
    fig.tight_layout()
    return fig


def plot_loop_contraction(runs: pd.DataFrame, probes: pd.DataFrame, *, splits=None, step: int | None = None,
                          loops=None, where: dict | None = None) -> Figure:
    """The loop map's contraction (section 6, beyond the gate's radius) per validation domain at `step` (default: the last
    measured): the spectral radius of dh_r/dh_(r-1) (solid, mean over tokens, seed-mean with 1-sd
    bars) and its 2-norm (dashed) against the loop, and the LTI gate's radius (dotted, the
    Jacobian's linear part) in the same colour. A run without a gate has no dotted line and is
    labelled "no gate"; grey marks 1, the edge of contraction."""
    from cartlab.analysis.spectral import gateless, loop_profile

    runs = _where(runs, where)
    radius = loop_profile(runs, probes, metric="radius_mean", step=step)
    norm = loop_profile(runs, probes, metric="norm_mean", step=step)
    try:
        gate = loop_profile(runs, probes, metric="gate_radius", step=step)
    except ValueError:  # only runs without a gate
        gate = radius.iloc[:0]
    nogate = set(with_variants(runs).loc[gateless(runs).values, "variant"])
    if loops is not None:
        radius, norm = radius[radius["loop"].isin(loops)], norm[norm["loop"].isin(loops)]
    panels = _loop_panels(radius, splits, "the contraction")
    colors = _variant_colors(radius)
    fig = Figure(figsize=(max(6.0, 4.2 * len(panels)), 3.8))
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    for ax, split in zip(axes, panels):
        ax.axhline(1.0, color="grey", lw=0.8)
        for variant, g in radius[radius["split"] == split].groupby("variant"):
            color, label = colors[variant]
            g = g.sort_values("loop")
            n = norm[(norm["split"] == split) & (norm["variant"] == variant)].sort_values("loop")
            ax.errorbar(g["loop"], g["mean"], yerr=g["sd"].fillna(0), marker="o", color=color, capsize=2,
                        label=f"{label} (no gate)" if variant in nogate else label)
            ax.plot(n["loop"], n["mean"], ls="--", marker=".", color=color)
            gr = gate[(gate["split"] == split) & (gate["variant"] == variant)]
            if variant not in nogate and len(gr):
                ax.axhline(gr["mean"].mean(), ls=":", color=color)
        ax.set(title=split, xlabel="loop r", ylabel="|eigenvalue| / norm of dh_r/dh_(r-1)")
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].plot([], [], "k-o", label="radius (mean over tokens)")
    axes[0].plot([], [], "k--.", label="2-norm (mean over tokens)")
    axes[0].plot([], [], "k:", label="LTI gate radius")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Contraction of one loop step (step {step or int(radius['step'].max())})")
    fig.tight_layout()
    return fig


def plot_loop_trajectories(runs: pd.DataFrame, probes: pd.DataFrame, *, metric: str = "radius_mean",
                           loops=None, splits=None, where: dict | None = None) -> Figure:
    """A loop measure over training steps (section 6's trajectories, issue 15), per validation domain (columns), one colour
    per variant (seed mean with a 1-sd band) and one line style per loop in `loops` (default: each
    run's last loop R; settle_loop has no loop). For a radius or norm the gate's radius follows in
    the same colour, dotted, except for runs without a gate (labelled "no gate")."""
    from cartlab.analysis.spectral import LOOP_MEASURES, PER_EVALUATION, gateless, loop_trajectory

    runs = _where(runs, where)
    picks = [None] if metric in PER_EVALUATION or not loops else list(loops)
    trajs = {r: loop_trajectory(runs, probes, metric=metric, loop=r) for r in picks}
    gate = None
    if metric.startswith(("radius", "norm")):
        try:
            gate = loop_trajectory(runs, probes, metric="gate_radius")
        except ValueError:
            gate = None
    nogate = set(with_variants(runs).loc[gateless(runs).values, "variant"])
    every = pd.concat(trajs.values())
    panels = _loop_panels(every, splits, metric)
    colors = _variant_colors(every)
    styles = ["-", "--", "-.", (0, (1, 1)), (0, (5, 1, 1, 1))]
    fig = Figure(figsize=(max(6.0, 4.2 * len(panels)), 3.8))
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    for ax, split in zip(axes, panels):
        for k, (r, traj) in enumerate(trajs.items()):
            for variant, g in traj[traj["split"] == split].groupby("variant"):
                g = g.sort_values("step")
                color, label = colors[variant]
                where_r = "" if metric in PER_EVALUATION else f", loop {r if r is not None else 'R'}"
                tag = " (no gate)" if variant in nogate else ""
                ax.plot(g["step"], g["mean"], ls=styles[k % len(styles)], color=color, label=f"{label}{tag}{where_r}")
                sd = g["sd"].fillna(0)
                ax.fill_between(g["step"], g["mean"] - sd, g["mean"] + sd, color=color, alpha=0.2)
        if gate is not None:
            for variant, g in gate[gate["split"] == split].groupby("variant"):
                if variant not in nogate and variant in colors:
                    g = g.sort_values("step")
                    ax.plot(g["step"], g["mean"], ls=":", color=colors[variant][0], label=f"{colors[variant][1]}, gate")
        ax.set(title=split, xlabel="step", ylabel=LOOP_MEASURES[metric].label)
    axes[0].legend(fontsize=7)
    where_r = "" if metric in PER_EVALUATION else (
        f" at loop {', '.join(map(str, loops))}" if loops else " at the last loop")
    label = LOOP_MEASURES[metric].label
    fig.suptitle(f"{label[0].upper()}{label[1:]}{where_r}, over training")
    fig.tight_layout()
    return fig


# -- report views (issue 18): every domain, the optimiser's state, every fitted configuration ------------------
TRAIN_LOG_LABELS = {"loss": "training loss (nats)", "lr": "learning rate", "grad_norm": "gradient norm (before clipping)",
                    "tokens_per_s": "throughput (tokens/s)", "mfu": "model FLOPs utilisation"}


def _variant_panels(df: pd.DataFrame, panels: dict, *, title: str, log_y=()) -> Figure:
    """One panel per `title: (mask of df's rows, y column, y label)`, y against step per variant
    (seed mean, 1-sd band), colours fixed across panels and one legend below them all."""
    df = df.assign(config=display_labels(df))  # one hue per variant, never two variants under one label
    order = sorted(df["config"].unique())
    palette = dict(zip(order, sns.color_palette(n_colors=len(order))))
    fig = Figure(figsize=(4.2 * len(panels), 3.4 + 0.22 * -(-len(order) // 3)), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, (mask, y, ylabel)) in zip(axes, panels.items()):
        sns.lineplot(data=df[mask], x="step", y=y, hue="config", hue_order=order, palette=palette, errorbar="sd",
                     ax=ax, legend=ax is axes[0])
        ax.set(title=name, xlabel="step", ylabel=ylabel)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if name in log_y:
            ax.set_yscale("log")
            _plain_log_y(ax)
    handles, labels = axes[0].get_legend_handles_labels()
    axes[0].get_legend().remove()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(3, len(labels)), fontsize=7, frameon=False)
    fig.suptitle(title)
    return fig


def plot_validation_curves(runs: pd.DataFrame, eval_log: pd.DataFrame, *, value: str = "ppl", splits=None,
                           where: dict | None = None) -> Figure:
    """Validation `value` against step on every domain (one panel per split, default all that
    were evaluated), one line per variant: seed mean with a 1-sd band (section 5.4). Perplexity
    is drawn on a log axis: it falls by orders of magnitude early in training."""
    validate(eval_log, "eval_log")
    if value not in ("ppl", "loss"):
        raise ValueError(f"value: {value!r} not allowed; allowed: ['ppl', 'loss']")
    runs = _where(runs, where)
    df = runs[list(RUNS_COLUMNS)].merge(eval_log[["run_id", "step", "split", value]].dropna(subset=[value]), on="run_id")
    if df.empty:
        raise ValueError(f"eval_log: no {value} values for the selected runs")
    names = _loop_panels(df, splits, f"validation {value}")
    ylabel = f"validation {value}" + (" (nats)" if value == "loss" else "")
    panels = {s: (df["split"] == s, value, ylabel) for s in names}
    return _variant_panels(df, panels, log_y=names if value == "ppl" else (),
                           title=f"Validation {value} per domain over training (seed mean +/- 1 sd)")


def plot_train_dynamics(runs: pd.DataFrame, train_log: pd.DataFrame, *, columns=("lr", "grad_norm", "tokens_per_s"),
                        where: dict | None = None) -> Figure:
    """What the training loop logs besides the loss (section 4.3's recipe), against step (one panel per train_log
    column that has values: by default the learning rate, the gradient norm before clipping (log
    axis) and the throughput), one line per variant: seed mean with a 1-sd band."""
    validate(train_log, "train_log")
    unknown = [c for c in columns if c not in train_log.columns or c in ("run_id", "step")]
    if unknown:
        raise ValueError(f"columns: {unknown} not logged; allowed: {list(train_log.columns[2:])}")
    runs = _where(runs, where)
    df = runs[list(RUNS_COLUMNS)].merge(train_log[["run_id", "step", *columns]], on="run_id")
    have = [c for c in columns if df[c].notna().any()]
    if not have:
        raise ValueError(f"train_log: no values of {list(columns)} for the selected runs")
    panels = {c: (df[c].notna(), c, TRAIN_LOG_LABELS.get(c, c)) for c in have}
    return _variant_panels(df, panels, log_y=("grad_norm",),
                           title="Training dynamics: " + ", ".join(TRAIN_LOG_LABELS.get(c, c) for c in have))


SHORT_KEYS = {"prelude_layers": "P", "n_loops": "R", "n_layers": "L", "model": ""}


def plot_scaling_groups(runs: pd.DataFrame, eval_log: pd.DataFrame, *, x: str = "d_model", split: str = "wiki",
                        metric: str = "ppl", by=("stage", "model", "prelude_layers", "n_loops", "n_layers"),
                        where: dict | None = None, min_points: int = 3) -> Figure:
    """Every configuration `scaling.fit_groups` fits (section 7.3), not only a stage's headline:
    one panel per stage, per configuration (a group of `by`) its seed-mean final `metric`
    against `x` and its power-law fit y = a x^b, labelled with b. Groups with fewer than
    `min_points` values of x are left out, as fit_groups leaves them; each point must be the
    seeds of one variant (narrow `where`, e.g. hooks='', overrides='')."""
    fe = _final_points(runs, eval_log, x, split, where)
    by = list(by)
    _one_variant_per(fe, by + [x], "where")
    groups = [(dict(zip(by, key)), g) for key, g in fe.groupby(by, dropna=False) if g[x].nunique() >= min_points]
    if not groups:
        raise ValueError(f"where: no configuration of {by} has >= {min_points} distinct {x} values on {split!r}")
    stages = sorted({key.get("stage") for key, _ in groups}, key=str)
    fig = Figure(figsize=(4.6 * len(stages), 4.2))
    axes = fig.subplots(1, len(stages), squeeze=False)[0]  # stages differ in budget: each its own y range
    for ax, stage in zip(axes, stages):
        mine = [(key, g) for key, g in groups if key.get("stage") == stage]
        varying = [k for k in by if k != "stage" and len({str(key[k]) for key, _ in mine}) > 1] or \
                  [k for k in by if k not in ("stage", "model")]
        for color, (key, g) in zip(sns.color_palette(n_colors=len(mine)), mine):
            pts = g.groupby(x)[metric].mean()
            fit = fit_power_law(pts.index.to_numpy(float), pts.to_numpy(float), n_boot=0)
            grid = np.geomspace(pts.index.min(), pts.index.max(), 50)
            name = " ".join(_key_label(k, key[k]) for k in varying if key[k] == key[k])  # NaN: not applicable
            ax.plot(pts.index, pts.values, "o", color=color)
            ax.plot(grid, fit.predict(grid), "-", color=color, label=f"{name}: b = {fit.b:.3f}")
        ax.set(xscale="log", yscale="log", title=str(stage), xlabel=x, ylabel=f"final {metric} ({split})")
        _width_ticks(ax, x, fe[x])
        _plain_log_y(ax)
        ax.legend(fontsize=7)
    fig.suptitle(f"Final {metric} on {split} against {x}: every configuration with >= {min_points} values "
                 f"(points: seed means, lines: power-law fits)")
    fig.tight_layout()
    return fig


def _key_label(key: str, value) -> str:
    """"R=4" for n_loops 4.0, "cart" for model cart: the section 3.5 notation of a config column."""
    value = f"{value:g}" if isinstance(value, (float, np.floating)) else str(value)
    short = SHORT_KEYS.get(key, key)
    return f"{short}={value}" if short else value


# --- the joint law L(N, D) (section 7.3; notebooks/scaling_law.ipynb) -----------------------

N_LABELS = {"stored": "N: stored non-embedding parameters", "effective": "N: effective non-embedding parameters"}


def _count(value: float, _pos=None) -> str:
    """A count as people write it: 64, 950, 12k, 1.5M, 2B, 3T."""
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= div:
            return f"{value / div:.3g}{suffix}"
    return f"{value:.3g}"


def _sci(value: float, _pos=None) -> str:
    """FLOPs as 3e13 (not 3x10^13)."""
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def _log_ticks(axis, style=_count) -> None:
    """Readable ticks on a log axis, set after its limits: decades when it spans three, else 1-2-5
    steps of each decade, finer steps only when the axis spans less than a factor 2.5; labelled
    by `style`, no minor labels."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    lo, hi = sorted(axis.get_view_interval())
    for subs, enough in (((1.0,), 3), ((1.0, 2.0, 5.0), 2), ((1.0, 1.5, 2.0, 3.0, 5.0, 7.0), 2),
                         (tuple(float(s) for s in range(1, 10)), 0)):
        ticks = [t for t in LogLocator(10, subs=subs).tick_values(lo, hi) if lo <= t <= hi]
        if len(ticks) >= enough:
            break
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(FuncFormatter(style))
    axis.set_minor_formatter(NullFormatter())


def plot_iso_loss(fits: dict, *, frontier: dict | None = None, levels: int = 10) -> Figure:
    """Iso-loss contours of each joint fit L(N, D) = E + A N^-alpha + B D^-beta (section 7.3),
    one panel per fit ({"stored": fit, "effective": fit}: which parameter count is N), with the
    fitted runs drawn in the colour of their measured loss on the same scale. With `frontier`
    ({name: FLOPs per token, a number k for C = k N D or a callable of N}) the compute-optimal
    path (N*(C), D*(C)) is drawn too."""
    import matplotlib.colors as mcolors

    fig = Figure(figsize=(5.2 * len(fits), 4.4))
    axes = fig.subplots(1, len(fits), squeeze=False)[0]
    for ax, (name, fit) in zip(axes, fits.items()):
        n, d, loss = (fit.data[c].to_numpy(float) for c in ("n", "d", "loss"))
        N, D = np.meshgrid(np.geomspace(n.min() / 2, n.max() * 2, 200), np.geomspace(d.min() / 2, d.max() * 2, 200))
        Z = fit.predict(N, D)
        norm = mcolors.Normalize(min(loss.min(), np.quantile(Z, 0.02)), max(loss.max(), np.quantile(Z, 0.98)))
        cs = ax.contour(N, D, Z, levels=np.linspace(norm.vmin, norm.vmax, levels), cmap="viridis", norm=norm)
        ax.clabel(cs, fmt="%.2f", fontsize=7)
        dots = ax.scatter(n, d, c=loss, cmap="viridis", norm=norm, edgecolors="k", s=45, zorder=3, label="runs")
        if frontier and name in frontier:
            f = frontier[name]
            spent = (f(n) if callable(f) else f * n) * d  # the runs' training FLOPs
            C = np.geomspace(spent.min() / 30, spent.max() * 30, 80)
            n_opt, d_opt = fit.optimal_allocation(C, f)
            keep = (n_opt > N.min()) & (n_opt < N.max()) & (d_opt > D.min()) & (d_opt < D.max())
            ax.plot(n_opt[keep], d_opt[keep], "r--", lw=1.5, label="compute-optimal N*(C), D*(C)")
        ax.set(xscale="log", yscale="log", xlim=(N.min(), N.max()), ylim=(D.min(), D.max()),
               xlabel=N_LABELS.get(name, f"N ({name})"), ylabel="D: training tokens",
               title=f"fitted loss, N = {name}: alpha = {fit.alpha:.2f}, beta = {fit.beta:.2f}")
        _log_ticks(ax.xaxis)
        _log_ticks(ax.yaxis)
        ax.legend(fontsize=7, loc="lower left", framealpha=0.9)
        fig.colorbar(dots, ax=ax, label="validation loss (nats)")
    fig.tight_layout()
    return fig


def plot_compute_frontier(fits: dict, flops_per_token: dict, C, *, points: pd.DataFrame | None = None) -> Figure:
    """The compute-optimal allocation N*(C), D*(C) of each joint fit (section 7.3) with its
    bootstrap band, for C = f(N) D with f = `flops_per_token[name]` (a number k or a callable of
    N). `points` (scaling_points rows: n_stored, n_effective, tokens, flops) draws the runs
    and shades the compute range they span: the frontier outside it is an extrapolation."""
    C = np.asarray(C, float)
    fig = Figure(figsize=(10, 4))
    ax_n, ax_d = fig.subplots(1, 2)
    colors = dict(zip(fits, sns.color_palette(n_colors=len(fits))))
    for name, fit in fits.items():
        f = flops_per_token[name]
        n_opt, d_opt = fit.optimal_allocation(C, f)
        ax_n.plot(C, n_opt, color=colors[name], label=f"N = {name}")
        ax_d.plot(C, d_opt, color=colors[name], label=f"N = {name}")
        if len(fit.samples):
            (n_lo, n_hi), (d_lo, d_hi) = fit.optimal_allocation_band(C, f)
            ax_n.fill_between(C, n_lo, n_hi, color=colors[name], alpha=0.2)
            ax_d.fill_between(C, d_lo, d_hi, color=colors[name], alpha=0.2,
                              label=f"{fit.level:.0%} bootstrap band")
        if points is not None:
            ax_n.plot(points["flops"], points[f"n_{name}"], "o", color=colors[name], mec="k", ms=4)
    if points is not None:
        ax_d.plot(points["flops"], points["tokens"], "o", color="grey", mec="k", ms=4, label="runs")
        for ax in (ax_n, ax_d):
            ax.axvspan(points["flops"].min(), points["flops"].max(), color="grey", alpha=0.1, lw=0)
    ax_n.set(xscale="log", yscale="log", xlabel="C: training FLOPs", ylabel="N*: non-embedding parameters",
             title="compute-optimal model size N*(C)")
    ax_d.set(xscale="log", yscale="log", xlabel="C: training FLOPs", ylabel="D*: training tokens",
             title="compute-optimal data D*(C)")
    for ax in (ax_n, ax_d):
        _log_ticks(ax.xaxis, _sci)
        _log_ticks(ax.yaxis)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_law_residuals(fits: dict) -> Figure:
    """Log residuals log L - log L_hat of each joint fit against N and against D (section 7.3):
    a trend left in either means the law misses a term."""
    fig = Figure(figsize=(9, 3.2 * len(fits)))
    axes = fig.subplots(len(fits), 2, squeeze=False)
    for row, (name, fit) in zip(axes, fits.items()):
        for ax, col, label in zip(row, ("n", "d"), (N_LABELS.get(name, f"N ({name})"), "D: training tokens")):
            ax.axhline(0, color="grey", lw=0.8)
            ax.plot(fit.data[col], fit.residuals, "o", color="k")
            ax.set(xscale="log", xlabel=label, ylabel="log L - log L_hat",
                   title=f"N = {name}: residuals against {col.upper()}")
            _log_ticks(ax.xaxis)
    fig.tight_layout()
    return fig


# -- the test-time depth profile (issue 14, section 7.4) -----------------------------------------------------
def plot_depth_profiles(profiles: pd.DataFrame, summary: pd.DataFrame | None = None, *, metric: str = "loss",
                        splits=None) -> Figure:
    """Validation `metric` against the inference loop count R per domain (section 7.4, the shape of
    Table 12):
    one line per variant, seed mean with 1-sd error bars (`cartlab.analysis.depth.profile_means`),
    a dotted line at the variant's trained R, and with `summary` (`summarise_profiles`) each
    variant's shape on that domain in the legend. `profiles` is `depth_profiles(...)`."""
    from cartlab.analysis.depth import profile_means

    if profiles.empty:
        raise ValueError("profiles: no depth profiles to plot (train with the depth_profile measure)")
    means = profile_means(profiles, metric)
    panels = _loop_panels(means, splits, "the depth profile")
    labels = means.drop_duplicates("variant").set_index("variant")["config"].sort_values()  # distinct per variant
    colors = dict(zip(labels.index, zip(sns.color_palette(n_colors=len(labels)), labels)))
    shape = {} if summary is None else {(s.variant, s.split): s.shape for s in summary.itertuples()}
    fig = Figure(figsize=(4.2 * len(panels), 3.6))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, split in zip(axes, panels):
        for variant, g in means[means["split"] == split].groupby("variant"):
            color, label = colors[variant]
            tail = f" [{shape[variant, split]}]" if (variant, split) in shape else ""
            ax.errorbar(g["n_loops"], g["mean"], yerr=g["sd"].fillna(0), marker="o", ms=3, color=color, capsize=2,
                        label=label + tail)
            ax.axvline(g["trained_r"].iloc[0], ls=":", color=color)
        ax.set(title=f"{split}: {metric} against inference R", xlabel="inference loop count R",
               ylabel=f"validation {metric}" + (" (nats/token)" if metric == "loss" else ""))
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=6)
    fig.suptitle("Test-time depth profile: dotted = trained R, bars = 1 sd over seeds")
    fig.tight_layout()
    return fig


def figure_png(fig: Figure, dpi: int = 110) -> bytes:
    """The PNG bytes of `fig`, for an `ipywidgets.Image` that a widget redraws (the section-6 run
    pickers of the spectral-radius notebook). (Redrawing into an
    `ipywidgets.Output` makes a headless run send on the kernel's shell channel while it waits
    for the cell's reply there, which can hang nbclient: jupyter/nbclient#312.)"""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()
