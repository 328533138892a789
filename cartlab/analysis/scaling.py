"""Power-law scaling fits and their figures (paper section 7.3).

    fit = fit_power_law(d, ppl)            # y = a * x^b by log-log least squares
    fit.b, fit.ci, fit.boot_ci             # exponent, t-interval, bootstrap interval
    segment_exponents(d, ppl)              # per-segment implied exponents (Table 11)
    doubling_reduction(fit.b)              # "each doubling reduces PPL by X"
    fit_groups(frame, x="d_model", y="ppl", by=["stage", "n_loops"])   # one fit per group
    plot_scaling_fit(runs, eval_log, x="flops", where={"stage": "stage2", "n_loops": 6})
    plot_scaling_groups(runs, eval_log, x="d_model")                    # every fitted configuration

x can be any positive axis: width, stored or effective parameters, tokens, or training FLOPs. The
FLOPs axis is the model accounting (`cartlab.analysis.runs.run_flops`: `cartlab.model.account`,
LM head, LRT memory passes, truncated BPTT and random R included), the same number the training
loop logs and the joint law uses, never 6 * N * D.

The saturating laws (E + A x^-alpha, Chinchilla's L(N, D), the recurrence exponent) are in
`cartlab.analysis.joint_law`; the joint law on a study's runs in `cartlab.analysis.scaling_study`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from cartlab.analysis.figures import key_label, one_variant_per, plain_log_y, select_runs, width_ticks
from cartlab.analysis.schema import final_eval


@dataclass(frozen=True)
class PowerLawFit:
    """y = a * x^b fitted as log y = log a + b log x."""

    a: float
    b: float
    se_log_a: float  # standard error of log a
    se_b: float
    ci: tuple[float, float]  # t-interval for b at `level`
    boot_ci: tuple[float, float]  # bootstrap percentile interval for b (NaN if n_boot=0)
    level: float
    n: int
    r2: float
    residuals: np.ndarray = field(repr=False)  # log y - fitted log y
    log_x_mean: float = field(repr=False, default=np.nan)  # mean of log x
    log_x_sxx: float = field(repr=False, default=np.nan)  # sum (log x - mean)^2
    resid_var: float = field(repr=False, default=np.nan)  # s^2 = RSS / (n - 2)

    def predict(self, x) -> np.ndarray:
        """y = a * x^b (section 7.3, Table 11)."""
        return self.a * np.asarray(x, float) ** self.b

    def predict_band(self, x) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise `level` confidence band of the fitted curve: exp(log a + b log x -/+ t s_fit),
        s_fit^2 = s^2 (1/n + (log x - mean log x)^2 / S_xx) (section 7.3)."""
        lx = np.log(np.asarray(x, float))
        s = np.sqrt(self.resid_var * (1.0 / self.n + (lx - self.log_x_mean) ** 2 / self.log_x_sxx))
        t = stats.t.ppf(0.5 + self.level / 2, self.n - 2)
        mid = np.log(self.a) + self.b * lx
        return np.exp(mid - t * s), np.exp(mid + t * s)


def _positive(name: str, values) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-d sequence, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"{name}: values must be finite and > 0 for a log-log fit, got {arr.tolist()}")
    return arr


def fit_power_law(x, y, *, level: float = 0.95, n_boot: int = 1000, bootstrap: str = "residuals",
                  seed: int = 0) -> PowerLawFit:
    """Fit y = a * x^b by ordinary least squares on (log x, log y) (section 7.3).

    b = S_xy / S_xx, log a = mean(log y) - b mean(log x); se(b) = s / sqrt(S_xx) with
    s^2 = RSS / (n - 2); `ci` = b -/+ t_{n-2} se(b). `boot_ci` is the percentile interval of b
    over `n_boot` bootstrap refits, resampling either the leverage-adjusted log residuals
    ("residuals", works for n = 4) or the (x, y) pairs ("pairs"). Both under-cover at small n
    (no t correction); `ci` is the interval to quote. Needs n >= 3 distinct x.
    """
    x, y = _positive("x", x), _positive("y", y)
    if len(x) != len(y):
        raise ValueError(f"x, y: lengths differ ({len(x)} vs {len(y)})")
    if len(np.unique(x)) < 3:
        raise ValueError(f"x: need at least 3 distinct values for a fit with standard errors, got {np.unique(x).tolist()}")
    if not 0 < level < 1:
        raise ValueError(f"level: must be in (0, 1), got {level}")
    if bootstrap not in ("residuals", "pairs"):
        raise ValueError(f"bootstrap: {bootstrap!r} not allowed; allowed: ['residuals', 'pairs']")
    lx, ly = np.log(x), np.log(y)
    n = len(x)
    b, la = _ols(lx, ly)
    resid = ly - (la + b * lx)
    xbar, sxx = lx.mean(), ((lx - lx.mean()) ** 2).sum()
    s2 = (resid ** 2).sum() / (n - 2)
    se_b = np.sqrt(s2 / sxx)
    se_la = np.sqrt(s2 * (1.0 / n + xbar ** 2 / sxx))
    t = stats.t.ppf(0.5 + level / 2, n - 2)
    tss = ((ly - ly.mean()) ** 2).sum()
    r2 = 1 - (resid ** 2).sum() / tss if tss > 0 else 1.0

    boot_ci = (np.nan, np.nan)
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        if bootstrap == "residuals":
            # leverage-adjusted residuals r_i / sqrt(1 - h_i), centred (Davison & Hinkley 6.2.3)
            h = 1.0 / n + (lx - xbar) ** 2 / sxx
            mod = resid / np.sqrt(1 - h)
            mod = mod - mod.mean()
            idx = rng.integers(0, n, size=(n_boot, n))
            ly_b = (la + b * lx)[None, :] + mod[idx]
            lx_b = np.broadcast_to(lx, ly_b.shape)
        else:
            idx = rng.integers(0, n, size=(n_boot, n))
            lx_b, ly_b = lx[idx], ly[idx]
        xc = lx_b - lx_b.mean(axis=1, keepdims=True)
        sxx_b = (xc ** 2).sum(axis=1)
        ok = sxx_b > 1e-12  # drop pair resamples with a single distinct x
        bs = (xc * (ly_b - ly_b.mean(axis=1, keepdims=True))).sum(axis=1)[ok] / sxx_b[ok]
        alpha = (1 - level) / 2
        boot_ci = (float(np.quantile(bs, alpha)), float(np.quantile(bs, 1 - alpha)))

    return PowerLawFit(
        a=float(np.exp(la)), b=float(b), se_log_a=float(se_la), se_b=float(se_b),
        ci=(float(b - t * se_b), float(b + t * se_b)), boot_ci=boot_ci, level=level, n=n,
        r2=float(r2), residuals=resid, log_x_mean=float(xbar), log_x_sxx=float(sxx), resid_var=float(s2),
    )


def _ols(lx: np.ndarray, ly: np.ndarray) -> tuple[float, float]:
    xc = lx - lx.mean()
    b = (xc * (ly - ly.mean())).sum() / (xc ** 2).sum()
    return b, ly.mean() - b * lx.mean()


def segment_exponents(x, y) -> pd.DataFrame:
    """Implied exponent of each consecutive segment, sorted by x (section 7.3, Table 11).

    b_i = log(y_i / y_{i-1}) / log(x_i / x_{i-1}); also the per-doubling change 2^{b_i} - 1.
    """
    x, y = _positive("x", x), _positive("y", y)
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"x, y: need two equal-length sequences of >= 2 points, got {len(x)} and {len(y)}")
    order = np.argsort(x)
    x, y = x[order], y[order]
    if np.any(np.diff(x) == 0):
        raise ValueError(f"x: values must be distinct, got {x.tolist()}")
    b = np.log(y[1:] / y[:-1]) / np.log(x[1:] / x[:-1])
    return pd.DataFrame({"x_from": x[:-1], "x_to": x[1:], "y_from": y[:-1], "y_to": y[1:],
                         "exponent": b, "per_doubling": 2.0 ** b - 1})


def doubling_reduction(b: float) -> float:
    """Fractional reduction of y per doubling of x under y = a x^b: 1 - 2^b (section 7.3).

    b = -0.5 gives 0.293: "each doubling reduces PPL by 29%".
    """
    return float(1.0 - 2.0 ** b)


def fit_groups(frame: pd.DataFrame, *, x: str = "d_model", y: str = "ppl", by=("stage", "model", "n_loops"),
               level: float = 0.95, min_points: int = 3) -> pd.DataFrame:
    """fit_power_law of `y` on `x` within each group of `by` that has >= `min_points` distinct x
    (seed means first: y at each x is the mean over the group's rows). One row per fitted group:
    the `by` values, n, b, se_b, ci_lo, ci_hi, r2, per_doubling = 1 - 2^b (section 7.3). Groups
    with fewer points are skipped; if none is left, a ValueError says what is needed.

    A frame of runs (with a `variant` column, e.g. `schema.final_eval`'s) is also split by `hooks`
    and `overrides`, and each point must be the seeds of ONE variant: a group holding two variants
    at one x (say two learning rates) is refused with their names, never averaged.
    """
    missing = [c for c in [x, y, *by] if c not in frame.columns]
    if missing:
        raise ValueError(f"frame: missing columns {missing}")
    by = list(by)
    if "variant" in frame.columns:
        from cartlab.analysis.schema import describe_variants

        by += [c for c in ("hooks", "overrides")  # only when they tell rows apart: no all-equal columns
               if c in frame.columns and c not in by and frame[c].fillna("").nunique() > 1]
    rows = []
    for key, g in frame.groupby(by, dropna=False):
        if "variant" in g.columns and (g.groupby(x)["variant"].nunique() > 1).any():
            at = g.groupby(x)["variant"].nunique().gt(1).idxmax()
            group = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in zip(by, key)}
            raise ValueError(f"frame: the group {group} holds several variants at {x}={at:g}, not "
                             f"seeds of one configuration: {describe_variants(g, g.loc[g[x] == at, 'variant'])}; "
                             f"filter the frame or add columns to `by`")
        pts = g.groupby(x)[y].mean()
        if len(pts) < min_points:
            continue
        fit = fit_power_law(pts.index.to_numpy(float), pts.to_numpy(float), level=level, n_boot=0)
        rows.append({**dict(zip(by, key)), "n": fit.n, "b": fit.b, "se_b": fit.se_b, "ci_lo": fit.ci[0],
                     "ci_hi": fit.ci[1], "r2": fit.r2, "per_doubling": doubling_reduction(fit.b)})
    if not rows:
        raise ValueError(f"not enough data: need >= {min_points} distinct {x} values within one group of {list(by)}")
    out = pd.DataFrame(rows)
    for c in by:  # integers as integers: prelude_layers 2, not 2.0 (nullable where a group has none)
        if pd.api.types.is_float_dtype(out[c]) and (out[c].dropna() % 1 == 0).all():
            out[c] = out[c].astype("Int64")
    return out


# -- figures ---------------------------------------------------------------------------------------------
SCALING_AXES = ("d_model", "stored_params", "effective_params", "tokens", "flops")


AXIS_LABELS = {"d_model": "d_model (width)", "stored_params": "stored parameters",
               "effective_params": "effective parameters", "tokens": "training tokens",
               "flops": "training FLOPs (model accounting)"}


def _final_points(runs: pd.DataFrame, eval_log: pd.DataFrame, x: str, split: str, where: dict | None) -> pd.DataFrame:
    """Final evaluations on `split` of the runs `where` selects, with the column `x` (section 7.3:
    a runs column, or flops: the run's training FLOPs by the model accounting, `runs.run_flops`,
    the number the training loop logs)."""
    if x not in SCALING_AXES:
        raise ValueError(f"x: {x!r} not allowed; allowed: {list(SCALING_AXES)}")
    selected = select_runs(runs, where)
    fe = final_eval(selected, eval_log)
    fe = fe[fe["split"] == split]
    if x != "flops":
        return fe
    from cartlab.analysis.runs import run_flops

    flops = run_flops(selected).set_index("run_id")["flops"]
    fe = fe.assign(flops=fe["run_id"].map(flops).astype(float))
    if fe["flops"].isna().any():
        unknown = sorted(fe.loc[fe["flops"].isna(), "run_id"])
        raise ValueError(f"x='flops': runs {unknown[:5]} have no stored training config (config_json), so their "
                         f"training FLOPs are unknown (published rows carry none); plot them against d_model, "
                         f"effective_params or tokens")
    return fe


def plot_scaling_fit(runs: pd.DataFrame, eval_log: pd.DataFrame, *, x: str = "d_model", split: str = "wiki",
                     metric: str = "ppl", where: dict | None = None, level: float = 0.95) -> Figure:
    """Power-law fit y = a x^b of the final `metric` on `split` with its `level` band, and log
    residuals (section 7.3). x is a runs column or "flops" (the model accounting). Each
    point is the seed mean of one variant; `where` must leave one variant per x."""
    from matplotlib.figure import Figure

    fe = _final_points(runs, eval_log, x, split, where)
    one_variant_per(fe, [x], "where")
    pts = fe.groupby(x)[metric].agg(["mean", "std"]).reset_index().dropna(subset=[x])
    fit = fit_power_law(pts[x], pts["mean"], level=level, n_boot=0)
    fig = Figure(figsize=(5, 5))
    ax, axr = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    grid = np.geomspace(pts[x].min(), pts[x].max(), 100)
    lo, hi = fit.predict_band(grid)
    ax.fill_between(grid, lo, hi, alpha=0.25, label=f"{level:.0%} CI")
    ax.plot(grid, fit.predict(grid), label=f"fit: b = {fit.b:.3f} [{fit.ci[0]:.3f}, {fit.ci[1]:.3f}]")
    ax.errorbar(pts[x], pts["mean"], yerr=pts["std"].fillna(0), fmt="o", color="k", label="data (seed mean +/- 1 sd)")
    which = ", ".join(key_label(k, v) for k, v in (where or {}).items())
    ax.set(xscale="log", yscale="log", ylabel=f"{metric} ({split})")
    fig.suptitle(f"Final {metric} on {split} against {AXIS_LABELS[x]}: power-law fit" + (f"\n({which})" if which else ""))
    plain_log_y(ax)
    ax.legend(fontsize=8)
    axr.axhline(0, color="grey", lw=0.8)
    axr.plot(pts[x], fit.residuals, "o", color="k")
    axr.set(xlabel=AXIS_LABELS[x], ylabel="log residual")
    width_ticks(axr, x, pts[x])
    fig.tight_layout()
    return fig


def plot_scaling_groups(runs: pd.DataFrame, eval_log: pd.DataFrame, *, x: str = "d_model", split: str = "wiki",
                        metric: str = "ppl", by=("stage", "model", "prelude_layers", "n_loops", "n_layers"),
                        where: dict | None = None, min_points: int = 3) -> Figure:
    """Every configuration `scaling.fit_groups` fits (section 7.3), not only a stage's headline:
    one panel per stage, per configuration (a group of `by`) its seed-mean final `metric`
    against `x` and its power-law fit y = a x^b, labelled with b. Groups with fewer than
    `min_points` values of x are left out, as fit_groups leaves them; each point must be the
    seeds of one variant (narrow `where`, e.g. hooks='', overrides='')."""
    import seaborn as sns
    from matplotlib.figure import Figure

    fe = _final_points(runs, eval_log, x, split, where)
    by = list(by)
    one_variant_per(fe, by + [x], "where")
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
            name = " ".join(key_label(k, key[k]) for k in varying if key[k] == key[k])  # NaN: not applicable
            ax.plot(pts.index, pts.values, "o", color=color)
            ax.plot(grid, fit.predict(grid), "-", color=color, label=f"{name}: b = {fit.b:.3f}")
        ax.set(xscale="log", yscale="log", title=str(stage), xlabel=AXIS_LABELS[x], ylabel=f"final {metric} ({split})")
        width_ticks(ax, x, fe[x])
        plain_log_y(ax)
        ax.legend(fontsize=7)
    fig.suptitle(f"Final {metric} on {split} against {AXIS_LABELS[x]}: every configuration with >= {min_points} values "
                 f"(points: seed means, lines: power-law fits)")
    fig.tight_layout()
    return fig


# Moved to their own modules; still reachable as scaling.<name> (README, benchmarks, older notebooks).
_MOVED = {name: "cartlab.analysis.joint_law" for name in (
    "CHINCHILLA_PARAMS", "RECURRENCE_PARAMS", "SaturatingFit", "ChinchillaFit", "RecurrenceFit", "fit_saturating",
    "fit_chinchilla", "fit_recurrence_exponent", "PowerCurve", "flops_per_token_curve")}
_MOVED.update({name: "cartlab.analysis.scaling_study" for name in (
    "scaling_points", "law_families", "joint_fits", "law_table", "frontier_table")})


def __getattr__(name):
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
