"""Scaling fits (paper sections 7.3 and 9.2).

    fit = fit_power_law(d, ppl)            # y = a * x^b by log-log least squares
    fit.b, fit.ci, fit.boot_ci             # exponent, t-interval, bootstrap interval
    segment_exponents(d, ppl)              # per-segment implied exponents (Table 11)
    doubling_reduction(fit.b)              # "each doubling reduces PPL by X"
    fit_groups(frame, x="d_model", y="ppl", by=["stage", "n_loops"])   # one fit per group
    fit_saturating(n, loss)                # y = E + A * x^-alpha, Huber loss on log residuals
    fit_recurrence_exponent(frame)         # Schwethelm et al.'s phi

x can be any positive axis: width, stored or effective parameters, FLOPs, tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import optimize, stats


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
    """
    missing = [c for c in [x, y, *by] if c not in frame.columns]
    if missing:
        raise ValueError(f"frame: missing columns {missing}")
    rows = []
    for key, g in frame.groupby(list(by), dropna=False):
        pts = g.groupby(x)[y].mean()
        if len(pts) < min_points:
            continue
        fit = fit_power_law(pts.index.to_numpy(float), pts.to_numpy(float), level=level, n_boot=0)
        rows.append({**dict(zip(by, key)), "n": fit.n, "b": fit.b, "se_b": fit.se_b, "ci_lo": fit.ci[0],
                     "ci_hi": fit.ci[1], "r2": fit.r2, "per_doubling": doubling_reduction(fit.b)})
    if not rows:
        raise ValueError(f"not enough data: need >= {min_points} distinct {x} values within one group of {list(by)}")
    return pd.DataFrame(rows)


# --- saturating law -----------------------------------------------------------------------

@dataclass(frozen=True)
class SaturatingFit:
    """y = E + A * x^-alpha (Chinchilla/OLMo form) fitted with Huber loss on log residuals."""

    E: float
    A: float
    alpha: float
    loss: float  # Huber loss of the best start
    n: int
    residuals: np.ndarray = field(repr=False)

    def predict(self, x) -> np.ndarray:
        """y = E + A * x^-alpha (section 7.3)."""
        return self.E + self.A * np.asarray(x, float) ** -self.alpha


def _huber_fit(resid_fn, starts, bounds, delta):
    """Best of several trust-region fits of sum huber_delta(resid) (scipy least_squares)."""
    best = None
    for p0 in starts:
        p0 = np.clip(p0, bounds[0], bounds[1])
        try:
            r = optimize.least_squares(resid_fn, p0, bounds=bounds, loss="huber", f_scale=delta,
                                       x_scale="jac", xtol=1e-15, ftol=1e-15, gtol=1e-15, max_nfev=5000)
        except (ValueError, FloatingPointError):
            continue
        if np.all(np.isfinite(r.fun)) and (best is None or r.cost < best.cost):
            best = r
    if best is None:
        raise ValueError("fit: no start converged; check that y decreases with x and is > 0")
    return best


def fit_saturating(x, y, *, delta: float = 1e-3, alphas=(0.1, 0.3, 0.6, 1.0),
                   e_fractions=(0.0, 0.5, 0.9)) -> SaturatingFit:
    """Fit y = E + A * x^-alpha robustly (section 7.3; method of Hoffmann et al. / OLMo).

    Minimises sum_i Huber_delta(log y_i - log(E + A x_i^-alpha)) over (log E, log A, alpha),
    from a grid of starts (alpha in `alphas`, E = fraction * min y, A then set so the curve
    passes through the smallest-x point), keeping the best. Needs n >= 4 points.
    """
    x, y = _positive("x", x), _positive("y", y)
    if len(x) != len(y):
        raise ValueError(f"x, y: lengths differ ({len(x)} vs {len(y)})")
    if len(np.unique(x)) < 4:
        raise ValueError(f"x: need at least 4 distinct values to fit E, A, alpha; got {np.unique(x).tolist()}")
    lx, ly = np.log(x), np.log(y)
    scale = np.exp(lx.mean())  # fit in x / scale for conditioning
    lxs = lx - np.log(scale)

    def resid(p):
        le, la, alpha = p
        return ly - np.logaddexp(le, la - alpha * lxs)

    i0 = np.argmin(x)
    starts = []
    for alpha in alphas:
        for f in e_fractions:
            E0 = max(f * y.min(), 1e-8 * y.min())
            A0 = max(y[i0] - E0, 1e-8)
            starts.append([np.log(E0), np.log(A0) + alpha * lxs[i0], alpha])
    bounds = ([-50.0, -50.0, 0.0], [50.0, 50.0, 5.0])
    r = _huber_fit(resid, starts, bounds, delta)
    le, la, alpha = r.x
    return SaturatingFit(E=float(np.exp(le)), A=float(np.exp(la) * scale ** alpha), alpha=float(alpha),
                         loss=float(r.cost), n=len(x), residuals=resid(r.x))


# --- recurrence-equivalence exponent --------------------------------------------------------

@dataclass(frozen=True)
class RecurrenceFit:
    """loss = E + A * (N_once + R^phi * N_rec)^-alpha (Schwethelm et al.; paper section 9.2)."""

    E: float
    A: float
    alpha: float
    phi: float
    loss: float
    n: int
    residuals: np.ndarray = field(repr=False)

    def predict(self, n_once, n_rec, n_loops) -> np.ndarray:
        """loss = E + A * (n_once + n_loops^phi * n_rec)^-alpha (Schwethelm et al.; section 9.2)."""
        n = np.asarray(n_once, float) + np.asarray(n_loops, float) ** self.phi * np.asarray(n_rec, float)
        return self.E + self.A * n ** -self.alpha


def fit_recurrence_exponent(frame: pd.DataFrame, *, loss: str = "loss", n_once: str = "n_once",
                            n_rec: str = "n_rec", delta: float = 1e-3) -> RecurrenceFit:
    """Fit the recurrence-equivalence exponent phi of Schwethelm et al. (paper section 9.2).

    loss = E + A * (N_once + R^phi * N_rec)^-alpha, Huber loss on log residuals, several starts.
    `frame` has one row per configuration (seed means or single runs) with columns `model`
    ("cart" | "dense"), `n_layers` (Dense depth), `n_loops` (CART R), the target `loss` and the
    parameter split: `n_once` = parameters applied once per token (for CART: stored parameters
    outside the recurrent core; for Dense: all parameters) and `n_rec` = parameters of the
    recurrent core applied R times (Dense: 0). phi = 1: a loop is worth a unique layer.

    The Dense curve pins (E, A, alpha) and the CART loop counts pin phi, so this needs Dense runs
    at >= 3 depths and CART runs at >= 2 loop counts; otherwise ValueError("not enough data: ...").
    """
    missing = [c for c in ("model", "n_layers", "n_loops", loss, n_once, n_rec) if c not in frame.columns]
    if missing:
        raise ValueError(f"frame: missing columns {missing}; need model, n_layers, n_loops, {loss}, {n_once}, {n_rec}")
    bad = sorted(set(frame["model"].dropna()) - {"cart", "dense"})
    if bad:
        raise ValueError(f"model: values {bad} not allowed; allowed: ['cart', 'dense']")
    dense = frame[frame["model"] == "dense"]
    cart = frame[frame["model"] == "cart"]
    depths = sorted(dense["n_layers"].dropna().unique())
    loops = sorted(cart["n_loops"].dropna().unique())
    needs = []
    if len(depths) < 3:
        needs.append(f"Dense runs at >= 3 depths (n_layers; have {len(depths)}: {[int(d) for d in depths]})")
    if len(loops) < 2:
        needs.append(f"CART runs at >= 2 loop counts (n_loops; have {len(loops)}: {[int(r) for r in loops]})")
    if needs:
        raise ValueError("not enough data: need " + " and ".join(needs))

    rows = pd.concat([dense.assign(**{"_R": 1.0, "_rec": 0.0}), cart.assign(_R=cart["n_loops"], _rec=cart[n_rec])])
    y = _positive(loss, rows[loss])
    once, rec, R = (np.asarray(rows[c], float) for c in (n_once, "_rec", "_R"))
    if np.any(once < 0) or np.any(rec < 0) or np.any(once + rec <= 0):
        raise ValueError(f"{n_once}, {n_rec}: parameter counts must be >= 0 and not both 0")
    scale = np.exp(np.log(once + rec).mean())
    once_s, rec_s, ly = once / scale, rec / scale, np.log(y)
    lR = np.log(R)

    def resid(p):
        le, la, alpha, phi = p
        n = once_s + np.exp(phi * lR) * rec_s
        return ly - np.logaddexp(le, la - alpha * np.log(n))

    starts = []
    for alpha in (0.2, 0.6):
        for f in (0.0, 0.7):
            E0 = max(f * y.min(), 1e-8 * y.min())
            A0 = max(np.median(y) - E0, 1e-8)
            for phi in (0.3, 1.0):
                starts.append([np.log(E0), np.log(A0), alpha, phi])
    bounds = ([-50.0, -50.0, 0.0, -2.0], [50.0, 50.0, 5.0, 3.0])
    r = _huber_fit(resid, starts, bounds, delta)
    le, la, alpha, phi = r.x
    return RecurrenceFit(E=float(np.exp(le)), A=float(np.exp(la) * scale ** alpha), alpha=float(alpha),
                         phi=float(phi), loss=float(r.cost), n=len(y), residuals=resid(r.x))
