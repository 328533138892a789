"""Screen-vs-full-training agreement (paper section 9.5): does a short screen (stage 1) rank
settings as full training (stage 2) does?

    screen_correlation(stage1, stage2)               # Spearman over shared cells
    best_setting_agreement(stage1, stage2)           # per-scale best R, screen vs full
    detect_reversals(stage1, stage2)                 # pairs of settings whose order flips
    plot_r_reversal(runs, eval_log, split="wiki")    # best R per width at each stage, drawn

Seed noise (bands, seed means, the curves over training) is `cartlab.analysis.stats`.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import pandas as pd
from scipy import stats as sps

from cartlab.analysis.figures import one_variant_per, select_runs
from cartlab.analysis.schema import final_eval, is_baseline


def _cells(frame: pd.DataFrame, on, value: str, name: str) -> pd.Series:
    missing = [c for c in list(on) + [value] if c not in frame.columns]
    if missing:
        raise ValueError(f"{name}: missing columns {missing}")
    if frame.duplicated(list(on)).any():
        raise ValueError(f"{name}: several rows per cell {list(on)}; average seeds first (seed_summary)")
    return frame.set_index(list(on))[value]


@dataclass(frozen=True)
class ScreenCorrelation:
    """Spearman rank correlation between a screen and full training over shared cells."""

    rho: float
    pvalue: float
    n: int
    cells: pd.DataFrame


def screen_correlation(screen: pd.DataFrame, full: pd.DataFrame, *, on=("d_model", "n_loops"),
                       value: str = "ppl", full_value: str | None = None) -> ScreenCorrelation:
    """Spearman rank correlation of a screen with full training (section 9.5).

    rho = Pearson correlation of the ranks = 1 - 6 sum d_i^2 / (n (n^2 - 1)) without ties,
    over the cells (`on`) present in both frames (scipy.stats.spearmanr). Needs >= 3 shared cells.
    """
    a = _cells(screen, on, value, "screen")
    b = _cells(full, on, full_value or value, "full")
    shared = a.index.intersection(b.index)
    if len(shared) < 3:
        raise ValueError(f"screen, full: need >= 3 shared cells on {list(on)}, found {len(shared)}")
    cells = pd.DataFrame({"screen": a.loc[shared], "full": b.loc[shared]}).sort_index()
    res = sps.spearmanr(cells["screen"], cells["full"])
    return ScreenCorrelation(rho=float(res.statistic), pvalue=float(res.pvalue), n=len(cells),
                             cells=cells.reset_index())


def best_setting_agreement(screen: pd.DataFrame, full: pd.DataFrame, *, group: str = "d_model",
                           setting: str = "n_loops", value: str = "ppl", full_value: str | None = None,
                           shared_only: bool = False, lower_is_better: bool = True) -> pd.DataFrame:
    """Per group (scale), the best `setting` by the screen and by full training (section 9.5).

    best = argmin value over settings within a group (argmax if not lower_is_better); `agree` is
    whether they coincide. With shared_only, only settings present in both frames compete.
    """
    a = _cells(screen, (group, setting), value, "screen")
    b = _cells(full, (group, setting), full_value or value, "full")
    if shared_only:
        shared = a.index.intersection(b.index)
        a, b = a.loc[shared], b.loc[shared]
    rows = []
    for g in sorted(set(a.index.get_level_values(0)) & set(b.index.get_level_values(0))):
        sa, sb = a.xs(g, level=0), b.xs(g, level=0)
        pick = (lambda s: s.idxmin()) if lower_is_better else (lambda s: s.idxmax())
        rows.append({group: g, "best_screen": pick(sa), "best_full": pick(sb),
                     "agree": bool(pick(sa) == pick(sb))})
    if not rows:
        raise ValueError(f"screen, full: no {group} value present in both")
    return pd.DataFrame(rows)


def detect_reversals(screen: pd.DataFrame, full: pd.DataFrame, *, group: str = "d_model",
                     setting: str = "n_loops", value: str = "ppl", full_value: str | None = None) -> pd.DataFrame:
    """Pairs of settings whose order differs between screen and full training (section 5.2).

    For each group and each pair (s1 < s2) present in both: diff = value(s2) - value(s1) in each
    frame; `reversed` iff sign(diff_screen) != sign(diff_full) (both non-zero).
    """
    a = _cells(screen, (group, setting), value, "screen")
    b = _cells(full, (group, setting), full_value or value, "full")
    shared = a.index.intersection(b.index)
    rows = []
    for g in sorted(set(shared.get_level_values(0))):
        settings = sorted(s for gg, s in shared if gg == g)
        for s1, s2 in combinations(settings, 2):
            da, db = a[(g, s2)] - a[(g, s1)], b[(g, s2)] - b[(g, s1)]
            rows.append({group: g, "setting_a": s1, "setting_b": s2, "diff_screen": da, "diff_full": db,
                         "reversed": bool(da * db < 0)})
    return pd.DataFrame(rows, columns=[group, "setting_a", "setting_b", "diff_screen", "diff_full", "reversed"])


# -- figure ----------------------------------------------------------------------------------------------
def plot_r_reversal(runs: pd.DataFrame, eval_log: pd.DataFrame, *, split: str = "wiki", metric: str = "ppl",
                    stages=("stage1", "stage2"), where: dict | None = None) -> Figure:
    """Which loop count R is best, per width, at each training budget (sections 5.2 and 9.5).

    One panel per d_model: each stage's seed-mean final `metric` relative to that stage's best R
    at that width (m / min_R m - 1, in %), against R; a star marks each stage's best. Lines that
    bottom out at different R are the screen-vs-full reversal. CART baselines only (no hooks, no
    overrides); each cell must hold one variant (narrow `where`, e.g. by prelude_layers).
    """
    import seaborn as sns
    from matplotlib.figure import Figure

    fe = final_eval(select_runs(runs, where), eval_log)
    fe = fe[(fe["split"] == split) & is_baseline(fe) & fe["stage"].isin(stages)]
    if fe["stage"].nunique() < 2:
        raise ValueError(f"stages: need CART baseline runs at two stages of {list(stages)} on {split!r}, "
                         f"found {sorted(fe['stage'].unique())}")
    one_variant_per(fe, ["stage", "d_model", "n_loops"], "where")
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
