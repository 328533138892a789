"""Seed noise and screen-vs-full-training agreement (paper sections 4.4, 8 and 9.5).

    band = seed_band([20.31, 20.35, 20.40], k=2)     # mean, sd, n, band of k sd
    compare_to_band(20.9, band)                      # single-seed delta: signal or within noise
    screen_correlation(stage1, stage2)               # Spearman over shared cells (section 9.5)
    best_setting_agreement(stage1, stage2)           # per-scale best R, screen vs full
    detect_reversals(stage1, stage2)                 # pairs of settings whose order flips
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np
import pandas as pd
from scipy import stats as sps

from cartlab.analysis.schema import DESCRIBE_COLUMNS, display_labels, final_eval, is_baseline


@dataclass(frozen=True)
class SeedBand:
    """mean +/- k * sd over n seeds."""

    mean: float
    sd: float
    n: int
    k: float

    @property
    def half_width(self) -> float:
        """half width = k * sd (section 4.4)."""
        return self.k * self.sd

    @property
    def lo(self) -> float:
        """Lower edge of the band: lo = mean - k * sd (section 4.4)."""
        return self.mean - self.half_width

    @property
    def hi(self) -> float:
        """Upper edge of the band: hi = mean + k * sd (section 4.4)."""
        return self.mean + self.half_width


def seed_band(values, *, k: float = 2.0) -> SeedBand:
    """Seed-noise band of a baseline (section 4.4, section 8's interpretability threshold).

    mean = sum(v) / n, sd = sqrt(sum (v - mean)^2 / (n - 1)) (sample sd), band = mean +/- k sd.
    Needs n >= 2 finite values; with n = 3 (the paper's seeds) the sd itself is uncertain by
    roughly +/- 50%, which `compare_to_band` states in its caveat.
    """
    v = np.asarray(values, dtype=float)
    if v.ndim != 1 or not np.all(np.isfinite(v)):
        raise ValueError(f"values: expected a 1-d sequence of finite numbers, got {values!r}")
    if len(v) < 2:
        raise ValueError(f"values: need >= 2 seeds for a seed-noise band, got n={len(v)}")
    if not k > 0:
        raise ValueError(f"k: band width in sd must be > 0, got {k}")
    return SeedBand(mean=float(v.mean()), sd=float(v.std(ddof=1)), n=len(v), k=float(k))


@dataclass(frozen=True)
class DeltaVsBand:
    """A single-seed delta judged against a baseline's seed band."""

    value: float
    delta: float  # value - band.mean
    z: float  # delta / band.sd
    signal: bool  # |delta| > k * sd
    label: str  # "signal" | "within noise"
    caveat: str


def compare_to_band(value: float, band: SeedBand, *, n_variant: int = 1) -> DeltaVsBand:
    """Is a variant's value outside the baseline's seed band? (section 8's criterion)

    delta = value - mean_baseline, z = delta / sd_baseline; signal iff |delta| > k * sd_baseline.
    The caveat states both sample sizes: the band measures the baseline's seed noise only, and a
    single-seed variant's own noise is not measured.
    """
    if not np.isfinite(value):
        raise ValueError(f"value: must be finite, got {value}")
    if n_variant < 1:
        raise ValueError(f"n_variant: must be >= 1, got {n_variant}")
    delta = float(value - band.mean)
    z = delta / band.sd if band.sd > 0 else np.copysign(np.inf, delta) if delta else 0.0
    signal = bool(abs(delta) > band.half_width)
    caveat = (f"baseline band = mean +/- {band.k:g} sd over n={band.n} seeds; variant n={n_variant}"
              + ("; the variant's own seed noise is not measured" if n_variant == 1 else "")
              + (f"; with n={band.n} the sd is itself uncertain" if band.n < 5 else ""))
    return DeltaVsBand(value=float(value), delta=delta, z=float(z), signal=signal,
                       label="signal" if signal else "within noise", caveat=caveat)


def seed_summary(runs: pd.DataFrame, eval_log: pd.DataFrame, *, metric: str = "ppl",
                 step: int | None = None) -> pd.DataFrame:
    """Per variant and split: mean, sd (ddof=1), n of the final `metric` over seeds (section 4.4).

    Seeds are the runs of one `variant` (the run's whole config minus its seed), never runs that
    merely agree on some columns: a run with a component field set by hand is its own variant.
    Columns: variant, config (display label), variant_label, the CONFIG_COLUMNS, overrides,
    split, mean, sd, n. Rows that are already seed means (seed NaN, n_seeds > 1) keep their mean
    with sd NaN and n = n_seeds.
    """
    if metric not in ("ppl", "loss"):
        raise ValueError(f"metric: {metric!r} not allowed; allowed: ['ppl', 'loss']")
    fe = final_eval(runs, eval_log, step=step)
    fe = fe.assign(config=display_labels(fe))
    g = fe.groupby(["variant", "split"], dropna=False)
    out = g[metric].agg(mean="mean", sd=lambda s: s.std(ddof=1) if len(s) > 1 else np.nan, n="size")
    described = g[["config", *DESCRIBE_COLUMNS]].first()
    out = described.join(out).reset_index()
    out["n"] = np.where(out["n"] == 1, g["n_seeds"].first().to_numpy(), out["n"])
    cols = ["variant", "config", *DESCRIBE_COLUMNS, "split", "mean", "sd", "n"]
    return out[cols]


def band_comparisons(runs: pd.DataFrame, eval_log: pd.DataFrame, *, split: str, metric: str = "ppl",
                     k: float = 2.0) -> pd.DataFrame:
    """Every variant against the seed band of its stage's CART baseline (section 8's test).

    For each CART baseline variant (hooks '' and no overrides, `schema.is_baseline`) with >= 2
    seeds: band = mean +/- k sd of its final `metric` on `split`; every other variant of the same
    stage (ablations, fields set by hand, other R, Dense) is compared by its seed mean: delta =
    mean - band mean, z = delta / sd, "signal" iff |delta| > k sd (compare_to_band). Columns:
    baseline, config, variant, n, value, delta, z, label; the frame's attrs["caveat"] states the
    sample sizes. Raises if no baseline has >= 2 seeds.
    """
    fe = final_eval(runs, eval_log)
    fe = fe[fe["split"] == split]
    fe = fe.assign(config=display_labels(fe), baseline=is_baseline(fe), stage=fe["stage"].fillna(""))
    g = fe.groupby("variant")
    summ = g[["stage", "config", "baseline"]].first().join(
        g[metric].agg(mean="mean", sd=lambda s: s.std(ddof=1) if len(s) > 1 else np.nan, n="size")).reset_index()
    bases = summ[summ["baseline"] & summ["sd"].notna()]
    if bases.empty:
        raise ValueError(f"runs: no CART baseline (hooks '' and no overrides) with >= 2 seeds on split {split!r}; "
                         "train the baseline with several seeds to get a noise band")
    rows, caveat = [], ""
    for _, b in bases.iterrows():
        band = seed_band(fe.loc[fe["variant"] == b["variant"], metric].to_numpy(), k=k)
        for _, v in summ[(summ["stage"] == b["stage"]) & (summ["variant"] != b["variant"])].iterrows():
            cmp = compare_to_band(v["mean"], band, n_variant=int(v["n"]))
            caveat = cmp.caveat
            rows.append({"baseline": b["config"], "config": v["config"], "variant": v["variant"], "n": int(v["n"]),
                         "value": v["mean"], "delta": cmp.delta, "z": cmp.z, "label": cmp.label})
    out = pd.DataFrame(rows, columns=["baseline", "config", "variant", "n", "value", "delta", "z", "label"])
    out.attrs["caveat"] = caveat
    return out


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
