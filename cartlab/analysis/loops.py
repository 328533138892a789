"""Inside the loop (issue 15): the per-loop logit lens and the loop map's contraction, from the
`probes` table (`cartlab.measures.loops`, measured at every evaluation), and their figures.

    loop_profile(runs, probes, metric="kl_to_final")           # per variant, domain, loop at the last step
    loop_trajectory(runs, probes, metric="radius_mean")        # per variant, domain, step at the last loop
    loop_summary(runs, probes)                                 # one row per variant and domain
    plot_loop_profiles(runs, probes); plot_loop_contraction(runs, probes)
    plot_loop_trajectories(runs, probes, metric="settle_loop")

The LTI gate's radius over training (section 6) is `cartlab.analysis.spectral`.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd

from cartlab.analysis.figures import domain_panels, select_runs, variant_colors
from cartlab.analysis.schema import (
    DESCRIBE_COLUMNS, RUNS_COLUMNS, display_labels, validate, with_variants,
)
from cartlab.analysis.spectral import gateless


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


# -- figures ---------------------------------------------------------------------------------------------
def plot_loop_profiles(runs: pd.DataFrame, probes: pd.DataFrame, *, metrics=("loss", "kl_to_final"), splits=None,
                       step: int | None = None, loops=None, where: dict | None = None) -> Figure:
    """Loop measures against the loop index (section 3.2's loop steps, issue 15; default: the logit lens's loss and KL to
    the final distribution): each metric (rows) per validation domain (columns) at `step`
    (default: each run's last measured), one line per variant, seed mean with 1-sd error bars.
    `loops` keeps only those loop indices."""
    from matplotlib.figure import Figure

    if PER_EVALUATION[0] in metrics:
        raise ValueError(f"metrics: {PER_EVALUATION[0]} is one number per evaluation, not per loop; plot it with "
                         f"plot_loop_trajectories")
    runs = select_runs(runs, where)
    profiles = {m: loop_profile(runs, probes, metric=m, step=step) for m in metrics}
    panels = domain_panels(pd.concat(profiles.values()), splits, ", ".join(metrics))
    colors = variant_colors(pd.concat(profiles.values()))
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
    from matplotlib.figure import Figure

    runs = select_runs(runs, where)
    radius = loop_profile(runs, probes, metric="radius_mean", step=step)
    norm = loop_profile(runs, probes, metric="norm_mean", step=step)
    try:
        gate = loop_profile(runs, probes, metric="gate_radius", step=step)
    except ValueError:  # only runs without a gate
        gate = radius.iloc[:0]
    nogate = set(with_variants(runs).loc[gateless(runs).values, "variant"])
    if loops is not None:
        radius, norm = radius[radius["loop"].isin(loops)], norm[norm["loop"].isin(loops)]
    panels = domain_panels(radius, splits, "the contraction")
    colors = variant_colors(radius)
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
    from matplotlib.figure import Figure

    runs = select_runs(runs, where)
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
    panels = domain_panels(every, splits, metric)
    colors = variant_colors(every)
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
