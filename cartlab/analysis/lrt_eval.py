"""LRT evaluated the way its authors report it: bits per byte of each pass, of the merged parallel
forward and of the sequential (true recurrent) forward, and the parallel-versus-sequential gap
over S and sweeps.

Reads two measures of `cartlab.measures.lrt` from the `probes` table, each run's final
measurement, seeds averaged per variant:

    bpb_table(runs, probes)       lrt_bpb: full-pass, mean refinement-pass, merged and sequential
                                  BPB, the gap merged - sequential, bytes per token
    bpb_buckets(runs, probes)     lrt_bpb: sequential BPB by position bucket [0,1), [1,2), [2,4), ...
    sweep_gap(runs, probes)       lrt_gap: mean |per-token loss gap| and source distance against S,
                                  one row per sweep count (1, 2, the trained one)
    plot_sweep_gap(runs, probes)  that gap against S, a line per variant and sweep count
"""
from __future__ import annotations

import re

import pandas as pd
from matplotlib.figure import Figure

from cartlab.analysis.compute import _labelled, _palette

BPB, GAP = "lrt_bpb", "lrt_gap"


def _final(probes: pd.DataFrame | None, probe: str) -> pd.DataFrame:
    """The rows of `probe` at each run's last measured step (empty when there are none)."""
    if probes is None or probes.empty or not (probes["probe"] == probe).any():
        return pd.DataFrame(columns=["run_id", "probe", "step", "split", "x", "metric", "value"])
    p = probes[probes["probe"] == probe]
    return p[p["step"] == p.groupby("run_id")["step"].transform("max")]


def bpb_table(runs: pd.DataFrame, probes: pd.DataFrame | None) -> pd.DataFrame:
    """One row per (variant, domain): BPB of the memory-free full pass, the mean of the refinement
    passes, the merged parallel forward and the sequential forward, merged - sequential, and the
    bytes per token the BPB divides by. Empty when no run has `lrt_bpb` rows."""
    cols = ["config", "split", "full pass", "refinement passes (mean)", "merged", "sequential",
            "merged - sequential", "bytes/token"]
    p = _final(probes, BPB)
    if p.empty:
        return pd.DataFrame(columns=cols)
    p = _labelled(runs, p)
    out = []
    for (config, split), g in p.groupby(["config", "split"]):
        per = g.groupby("metric")
        passes = g[g["metric"] == "bpb_pass"]
        out.append({"config": config, "split": split,
                    "full pass": passes[passes["x"] == 0]["value"].mean(),
                    "refinement passes (mean)": passes[passes["x"] > 0]["value"].mean(),
                    "merged": per.get_group("bpb_merged")["value"].mean(),
                    "sequential": per.get_group("bpb_sequential")["value"].mean(),
                    "merged - sequential": per.get_group("bpb_gap")["value"].mean(),
                    "bytes/token": per.get_group("bytes_per_token")["value"].mean()})
    return pd.DataFrame(out, columns=cols).sort_values(["config", "split"]).reset_index(drop=True)


def bpb_buckets(runs: pd.DataFrame, probes: pd.DataFrame | None) -> pd.DataFrame:
    """Sequential BPB by position bucket: one row per (variant, domain), one column per bucket
    named by its first position. Empty when no run has `lrt_bpb` rows."""
    p = _final(probes, BPB)
    p = p[p["metric"] == "bpb_sequential_bucket"]
    if p.empty:
        return pd.DataFrame(columns=["config", "split"])
    table = _labelled(runs, p).pivot_table(index=["config", "split"], columns="x", values="value", aggfunc="mean")
    table.columns = [f"from {int(x)}" for x in table.columns]
    return table.reset_index()


SUFFIX = re.compile(r"^(?P<metric>.+?)(_sweeps(?P<n>\d+))?$")


def sweep_gap(runs: pd.DataFrame, probes: pd.DataFrame | None) -> pd.DataFrame:
    """`lrt_gap` rows as (config, split, S, sweeps, loss_abs_gap, loss_gap, source_dist), seeds
    averaged: the gap of the interleaved forward from the sequential one, per sweep count."""
    cols = ["config", "split", "S", "sweeps", "loss_abs_gap", "loss_gap", "source_dist"]
    p = _final(probes, GAP)
    if p.empty:
        return pd.DataFrame(columns=cols)
    parts = p["metric"].str.extract(SUFFIX)
    p = p.assign(metric=parts["metric"], sweeps=parts["n"].fillna("1").astype(int), S=p["x"].astype(int))
    p = _labelled(runs, p[p["metric"].isin(cols)])
    table = p.pivot_table(index=["config", "split", "S", "sweeps"], columns="metric", values="value", aggfunc="mean")
    table = table.reset_index()
    table.columns.name = None
    return table.reindex(columns=cols).sort_values(["config", "split", "sweeps", "S"]).reset_index(drop=True)


def plot_sweep_gap(runs: pd.DataFrame, probes: pd.DataFrame, metric: str = "loss_abs_gap") -> Figure:
    """The parallel-versus-sequential gap (`metric`, default the mean |per-token loss gap|)
    against S (log2 axis) per validation domain, one colour per variant, solid for one sweep and
    dashed for more."""
    gap = sweep_gap(runs, probes).dropna(subset=[metric])
    if gap.empty:
        raise ValueError(f"probes: no {GAP!r} rows with {metric}; train an LRT model with measures null or [{GAP}]")
    splits = sorted(gap["split"].unique())
    colors = _palette(gap["config"].unique())
    fig = Figure(figsize=(3.8 * len(splits), 3.4))
    axes = fig.subplots(1, len(splits), squeeze=False)[0]
    for ax, split in zip(axes, splits):
        for (config, sweeps), g in gap[gap["split"] == split].groupby(["config", "sweeps"]):
            ax.plot(g["S"], g[metric], "o-" if sweeps == 1 else "s--", ms=3, color=colors[config],
                    label=f"{config}, {sweeps} sweep{'s' if sweeps > 1 else ''}")
        ax.set_xscale("log", base=2)
        grid = sorted(gap["S"].unique())
        ax.set_xticks(grid, [str(S) for S in grid], fontsize=7)
        ax.minorticks_off()
        ax.set(xlabel="interleaved subsets S (S = T is exact)", title=split,
               ylabel="mean |loss gap| per token (nats)" if metric == "loss_abs_gap" else metric)
    axes[0].legend(fontsize=6)
    fig.suptitle("LRT: parallel (interleaved) vs sequential forward, against S and sweeps")
    fig.tight_layout()
    return fig
