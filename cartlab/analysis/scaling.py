"""Scaling fits (paper sections 7.3 and 9.2).

    fit = fit_power_law(d, ppl)            # y = a * x^b by log-log least squares
    fit.b, fit.ci, fit.boot_ci             # exponent, t-interval, bootstrap interval
    segment_exponents(d, ppl)              # per-segment implied exponents (Table 11)
    doubling_reduction(fit.b)              # "each doubling reduces PPL by X"
    fit_groups(frame, x="d_model", y="ppl", by=["stage", "n_loops"])   # one fit per group
    fit_saturating(n, loss)                # y = E + A * x^-alpha, Huber loss on log residuals
    fit = fit_chinchilla(n, d, loss, groups=config)   # L = E + A N^-alpha + B D^-beta, cluster bootstrap
    fit.ci["alpha"], fit.optimal_allocation(1e20), fit.loo_size_errors(), fit.residual_diagnostics()
    fit_recurrence_exponent(frame, n_boot=1000)       # Schwethelm et al.'s phi with its interval

The saturating laws share one robust engine (cartlab.analysis.laws: log-sum-exp form, Huber
loss on log residuals, L-BFGS-B from a grid, cluster bootstrap, residual diagnostics).

x can be any positive axis: width, stored or effective parameters, FLOPs, tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from cartlab.analysis import laws


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
            raise ValueError(f"frame: the group {dict(zip(by, key))} holds several variants at {x}={at:g}, not "
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
    return pd.DataFrame(rows)


# --- saturating laws on the robust engine (laws.py) ---------------------------------------------

CHINCHILLA_PARAMS = ("E", "A", "B", "alpha", "beta")


def _check_bootstrap(n_boot: int, level: float) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 0:
        raise ValueError(f"n_boot: must be an integer >= 0, got {n_boot!r}")
    if not 0 < level < 1:
        raise ValueError(f"level: must be in (0, 1), got {level}")


def _labels(name: str, groups, n: int, default) -> list:
    """Cluster labels, one per point: `groups` if given (length-checked), else `default`."""
    if groups is None:
        return list(default)
    labels = list(groups)
    if len(labels) != n:
        raise ValueError(f"{name}: need one cluster label per point ({n}), got {len(labels)}")
    return labels


def _natural(theta: np.ndarray, scales) -> np.ndarray:
    """Centred engine parameters (e, a_k, alpha_k, extra) -> (E, A_k, alpha_k, extra), row-wise:
    E = e^e, A_k = e^{a_k} scale_k^{alpha_k} (the law was fitted in x_k / scale_k)."""
    out = np.array(theta, float)
    k = len(scales)
    out[..., 0] = np.exp(out[..., 0])
    out[..., 1:k + 1] = np.exp(out[..., 1:k + 1] + out[..., k + 1:2 * k + 1] * np.log(scales))
    return out


def _engine(model, ly, grid, bounds, scales, clusters, *, strata=None, delta, n_boot, seed):
    """Point fit and cluster-bootstrap refits of a law in natural units (section 7.3).

    Returns (params, samples (n_boot, p), sum_i Huber_delta(r_i), log residuals r = ly - f)."""
    theta, objective = laws.robust_fit(model, ly, grid, bounds, delta=delta)
    boot = (laws.cluster_bootstrap(model, ly, grid, bounds, theta, clusters=clusters, strata=strata,
                                   n_boot=n_boot, seed=seed, delta=delta) if n_boot else np.empty((0, len(theta))))
    return _natural(theta, scales), _natural(boot, scales), objective, ly - model(theta)[0]


def _intervals(names, samples: np.ndarray, level: float) -> dict[str, tuple[float, float]]:
    """{name: (lo, hi)}: percentile bootstrap interval of each parameter (NaN without samples)."""
    return {k: (float(lo), float(hi)) for k, (lo, hi) in zip(names, laws.percentile_ci(samples, level))}


class _Diagnosed:
    """Residual diagnostics shared by the saturating-law fits."""

    def residual_diagnostics(self, significance: float = 0.05, **axes) -> pd.DataFrame:
        """Spearman rho of the log residuals log L - log L_hat against this fit's own axes (log of
        each scale variable and of the prediction) and any extra `axes` given by name, e.g.
        `log_d=np.log(d)` for a one-variable fit; `missing_term` flags |rho| significant at
        `significance` / (number of axes) (section 7.3; see laws.residual_diagnostics)."""
        return laws.residual_diagnostics(self.residuals, {**self._axes(), **axes}, significance=significance)


# --- one-variable law -------------------------------------------------------------------------

@dataclass(frozen=True)
class SaturatingFit(_Diagnosed):
    """y = E + A * x^-alpha (Chinchilla/OLMo form) fitted with Huber loss on log residuals."""

    E: float
    A: float
    alpha: float
    loss: float  # sum_i Huber_delta(log y_i - log y_hat_i) at the optimum
    n: int
    residuals: np.ndarray = field(repr=False)  # log y - log y_hat
    ci: dict  # {"E", "A", "alpha": percentile bootstrap interval at `level`}, NaN if n_boot = 0
    level: float
    samples: np.ndarray = field(repr=False)  # (n_boot, 3) bootstrap refits of (E, A, alpha)
    x: np.ndarray = field(repr=False)

    def predict(self, x) -> np.ndarray:
        """y = E + A * x^-alpha (section 7.3)."""
        return self.E + self.A * np.asarray(x, float) ** -self.alpha

    def _axes(self) -> dict:
        return {"log_x": np.log(self.x), "log_pred": np.log(self.predict(self.x))}


def fit_saturating(x, y, *, delta: float = laws.DELTA, alphas=(0.1, 0.3, 0.6, 1.0), e_fractions=(0.0, 0.5, 0.9),
                   groups=None, n_boot: int = 0, level: float = 0.95, seed: int = 0) -> SaturatingFit:
    """Fit y = E + A * x^-alpha robustly (section 7.3; method of Hoffmann et al. / OLMo).

    Minimises sum_i Huber_delta(log y_i - LSE(e, a - alpha log x_i)) over (e, a, alpha) = (log E,
    log A, alpha) with L-BFGS-B from the best points of a start grid (alpha in `alphas`, E =
    fraction * min y for fraction in `e_fractions`); see cartlab.analysis.laws. With n_boot > 0,
    `ci` holds percentile intervals over a cluster bootstrap (clusters: `groups`, default one per
    distinct x, so seeds at one x resample together). Needs >= 4 distinct x.
    """
    x, y = _positive("x", x), _positive("y", y)
    if len(x) != len(y):
        raise ValueError(f"x, y: lengths differ ({len(x)} vs {len(y)})")
    if len(np.unique(x)) < 4:
        raise ValueError(f"x: need at least 4 distinct values to fit E, A, alpha; got {np.unique(x).tolist()}")
    _check_bootstrap(n_boot, level)
    clusters = _labels("groups", groups, len(x), x)
    ly, scale = np.log(y), np.exp(np.log(x).mean())
    params, samples, objective, resid = _engine(
        laws.lse_law(np.log(x / scale)), ly, laws.lse_grid(ly, 1, alphas=alphas, e_fractions=e_fractions),
        laws.lse_bounds(ly, 1), [scale], clusters, delta=delta, n_boot=n_boot, seed=seed)
    E, A, alpha = params
    return SaturatingFit(E=float(E), A=float(A), alpha=float(alpha), loss=float(objective), n=len(x), residuals=resid,
                         ci=_intervals(("E", "A", "alpha"), samples, level), level=level, samples=samples, x=x)


# --- joint law in parameters and tokens -------------------------------------------------------

@dataclass(frozen=True)
class ChinchillaFit(_Diagnosed):
    """L(N, D) = E + A N^-alpha + B D^-beta (Hoffmann et al. 2022 approach 3, as replicated by
    Besiroglu et al. 2024), Huber loss on log residuals, cluster-bootstrap intervals."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    ci: dict  # {name: (lo, hi)} percentile bootstrap interval at `level` for each of CHINCHILLA_PARAMS
    level: float
    loss: float  # sum_i Huber_delta(log L_i - log L_hat_i) at the optimum
    n: int
    n_clusters: int
    delta: float
    residuals: np.ndarray = field(repr=False)  # log L - log L_hat
    samples: np.ndarray = field(repr=False)  # (n_boot, 5) bootstrap refits, columns CHINCHILLA_PARAMS
    data: pd.DataFrame = field(repr=False)  # n, d, loss, group: the fitted points

    def predict(self, n, d) -> np.ndarray:
        """L = E + A n^-alpha + B d^-beta (section 7.3)."""
        n, d = np.asarray(n, float), np.asarray(d, float)
        return self.E + self.A * n ** -self.alpha + self.B * d ** -self.beta

    def optimal_allocation(self, C, flops_per_token=6.0) -> tuple[np.ndarray, np.ndarray]:
        """Compute-optimal (N_opt, D_opt) = argmin L(N, D) on the iso-FLOP curve (section 7.3).

        A number k means C = k N D (k = 6: the usual 6ND): closed form N_opt = G (C/k)^(beta /
        (alpha + beta)), G = (alpha A / (beta B))^(1 / (alpha + beta)), D_opt = C / (k N_opt).
        A callable f(N) (FLOPs per token, elementwise on arrays; CART's is not 6N) means C = f(N) D,
        minimised numerically over log N. Returns arrays shaped like C.
        """
        params = np.array([[self.E, self.A, self.B, self.alpha, self.beta]])
        n_opt, d_opt = _allocate(params, C, flops_per_token)
        return n_opt[0], d_opt[0]

    def optimal_allocation_band(self, C, flops_per_token=6.0) -> tuple[tuple, tuple]:
        """Percentile bootstrap band at `level` of the compute-optimal allocation (section 7.3):
        ((N_lo, N_hi), (D_lo, D_hi)), each N_opt, D_opt = optimal_allocation under one bootstrap
        refit. Needs a fit with n_boot > 0."""
        if len(self.samples) == 0:
            raise ValueError("n_boot: the fit has no bootstrap refits (n_boot=0); refit with n_boot > 0")
        n_opt, d_opt = _allocate(self.samples, C, flops_per_token)
        q = [(1 - self.level) / 2, (1 + self.level) / 2]
        (n_lo, n_hi), (d_lo, d_hi) = np.quantile(n_opt, q, axis=0), np.quantile(d_opt, q, axis=0)
        return (n_lo, n_hi), (d_lo, d_hi)

    def loo_size_errors(self) -> pd.DataFrame:
        """Leave-one-size-out extrapolation (section 7.3): for each distinct N, refit on the other
        sizes and predict the held-out points; rel_error = L_hat / L - 1. One row per point:
        held_out_n, n, d, loss, predicted, rel_error. Needs >= 4 distinct N (3 left per refit)."""
        sizes = np.unique(self.data["n"])
        if len(sizes) < 4:
            raise ValueError(f"n: leave-one-size-out needs >= 4 distinct sizes, got {sizes.tolist()}")
        frames = []
        for size in sizes:
            train, test = self.data[self.data["n"] != size], self.data[self.data["n"] == size]
            fit = fit_chinchilla(train["n"], train["d"], train["loss"], delta=self.delta, n_boot=0)
            pred = fit.predict(test["n"], test["d"])
            frames.append(test[["n", "d", "loss"]].assign(held_out_n=size, predicted=pred,
                                                          rel_error=pred / test["loss"].to_numpy() - 1))
        return pd.concat(frames, ignore_index=True)[["held_out_n", "n", "d", "loss", "predicted", "rel_error"]]

    def _axes(self) -> dict:
        n, d = self.data["n"].to_numpy(), self.data["d"].to_numpy()
        return {"log_n": np.log(n), "log_d": np.log(d), "log_pred": np.log(self.predict(n, d))}


def _allocate(params: np.ndarray, C, flops_per_token) -> tuple[np.ndarray, np.ndarray]:
    """N_opt, D_opt (len(params), *shape of C) for rows (E, A, B, alpha, beta) of `params`."""
    C = np.asarray(C, float)
    if not np.all(np.isfinite(C)) or np.any(C <= 0):
        raise ValueError(f"C: FLOPs budgets must be finite and > 0, got {np.ravel(C).tolist()}")
    _, A, B, alpha, beta = (params[:, i].reshape((-1,) + (1,) * C.ndim) for i in range(5))
    if callable(flops_per_token):
        n_opt = _numeric_allocation(A, B, alpha, beta, C, flops_per_token)
        return n_opt, C / flops_per_token(n_opt)
    k = float(flops_per_token)
    if not np.isfinite(k) or k <= 0:
        raise ValueError(f"flops_per_token: must be a number > 0 (C = k N D) or a callable of N, "
                         f"got {flops_per_token!r}")
    G = (alpha * A / (beta * B)) ** (1 / (alpha + beta))
    n_opt = G * (C / k) ** (beta / (alpha + beta))
    return n_opt, C / (k * n_opt)


def _numeric_allocation(A, B, alpha, beta, C, fpt, n_grid: int = 400, n_golden: int = 60) -> np.ndarray:
    """argmin over u = log N in [0, log C] of A e^(-alpha u) + B (C / fpt(e^u))^-beta, elementwise
    over parameter rows and budgets: the best point of an `n_grid` grid, then golden-section
    search between its neighbours (section 7.3)."""
    def reducible(u):
        return A * np.exp(-alpha * u) + B * (C / fpt(np.exp(u))) ** -beta

    top = np.broadcast_to(np.log(C), np.broadcast_shapes(A.shape, C.shape))
    step = top / (n_grid - 1)
    best_u = np.zeros_like(top)
    best = reducible(best_u)
    for i in range(1, n_grid):
        value = reducible(i * step)
        better = value < best
        best_u, best = np.where(better, i * step, best_u), np.where(better, value, best)
    lo, hi = np.maximum(best_u - step, 0.0), np.minimum(best_u + step, top)
    g = (np.sqrt(5) - 1) / 2
    for _ in range(n_golden):
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
        left = reducible(a) < reducible(b)
        lo, hi = np.where(left, lo, a), np.where(left, b, hi)
    return np.exp((lo + hi) / 2)


def fit_chinchilla(n, d, loss, *, groups=None, delta: float = laws.DELTA, n_boot: int = 1000, level: float = 0.95,
                   seed: int = 0) -> ChinchillaFit:
    """Fit L(N, D) = E + A N^-alpha + B D^-beta (section 7.3; Hoffmann et al. approach 3).

    log L_hat = LSE(e, a - alpha log N, b - beta log D), minimising sum_i Huber_delta(log L_i -
    log L_hat_i) (delta = 1e-3) with L-BFGS-B from the best points of a grid (Besiroglu et al.
    2024; cartlab.analysis.laws). `ci` holds percentile intervals over `n_boot` cluster-bootstrap
    refits: `groups` labels the clusters (e.g. one per configuration, so all its seeds resample
    together; default one per distinct (N, D) pair). Deterministic for a given `seed`.
    Needs >= 3 distinct N, >= 3 distinct D and >= 6 points.
    """
    n, d, y = _positive("n", n), _positive("d", d), _positive("loss", loss)
    if not len(n) == len(d) == len(y):
        raise ValueError(f"n, d, loss: lengths differ ({len(n)}, {len(d)}, {len(y)})")
    for name, v in (("n", n), ("d", d)):
        if len(np.unique(v)) < 3:
            raise ValueError(f"{name}: need at least 3 distinct values to fit E, A, B, alpha, beta; "
                             f"got {np.unique(v).tolist()}")
    if len(y) < 6:
        raise ValueError(f"loss: need at least 6 points for 5 parameters, got {len(y)}")
    _check_bootstrap(n_boot, level)
    clusters = _labels("groups", groups, len(y), zip(n, d))
    ly, scales = np.log(y), np.exp([np.log(n).mean(), np.log(d).mean()])
    params, samples, objective, resid = _engine(
        laws.lse_law(np.log(np.column_stack([n, d]) / scales)), ly, laws.lse_grid(ly, 2), laws.lse_bounds(ly, 2),
        scales, clusters, delta=delta, n_boot=n_boot, seed=seed)
    return ChinchillaFit(**dict(zip(CHINCHILLA_PARAMS, map(float, params))),
                         ci=_intervals(CHINCHILLA_PARAMS, samples, level), level=level, loss=float(objective),
                         n=len(y), n_clusters=len(set(clusters)), delta=delta, residuals=resid, samples=samples,
                         data=pd.DataFrame({"n": n, "d": d, "loss": y, "group": clusters}))


# --- recurrence-equivalence exponent --------------------------------------------------------

RECURRENCE_PARAMS = ("E", "A", "alpha", "phi")


@dataclass(frozen=True)
class RecurrenceFit(_Diagnosed):
    """loss = E + A * (N_once + R^phi * N_rec)^-alpha (Schwethelm et al.; paper section 9.2)."""

    E: float
    A: float
    alpha: float
    phi: float
    loss: float  # sum_i Huber_delta(log L_i - log L_hat_i) at the optimum
    n: int
    residuals: np.ndarray = field(repr=False)  # log L - log L_hat
    ci: dict  # {name: (lo, hi)} percentile bootstrap interval at `level` for E, A, alpha, phi; NaN if n_boot = 0
    level: float
    samples: np.ndarray = field(repr=False)  # (n_boot, 4) bootstrap refits, columns RECURRENCE_PARAMS
    data: pd.DataFrame = field(repr=False)  # model, n_once, n_rec, n_loops (Dense: 1, n_rec 0), loss, group

    def predict(self, n_once, n_rec, n_loops) -> np.ndarray:
        """loss = E + A * (n_once + n_loops^phi * n_rec)^-alpha (Schwethelm et al.; section 9.2)."""
        n = np.asarray(n_once, float) + np.asarray(n_loops, float) ** self.phi * np.asarray(n_rec, float)
        return self.E + self.A * n ** -self.alpha

    def _axes(self) -> dict:
        once, rec, r = (self.data[c].to_numpy() for c in ("n_once", "n_rec", "n_loops"))
        return {"log_n_eff": np.log(once + r ** self.phi * rec), "log_r": np.log(r),
                "log_pred": np.log(self.predict(once, rec, r))}


def fit_recurrence_exponent(frame: pd.DataFrame, *, loss: str = "loss", n_once: str = "n_once",
                            n_rec: str = "n_rec", delta: float = laws.DELTA, groups=None, n_boot: int = 0,
                            level: float = 0.95, seed: int = 0) -> RecurrenceFit:
    """Fit the recurrence-equivalence exponent phi of Schwethelm et al. (paper section 9.2).

    loss = E + A * (N_once + R^phi * N_rec)^-alpha, i.e. log L_hat = LSE(e, a - alpha log N_eff),
    fitted with Huber loss on log residuals by the engine of cartlab.analysis.laws.
    `frame` has one row per run or configuration with columns `model` ("cart" | "dense"),
    `n_layers` (Dense depth), `n_loops` (CART R), the target `loss` and the parameter split:
    `n_once` = parameters applied once per token (for CART: stored parameters outside the
    recurrent core; for Dense: all parameters) and `n_rec` = parameters of the recurrent core
    applied R times (Dense: 0). phi = 1: a loop is worth a unique layer.

    With n_boot > 0, `ci` holds percentile intervals (phi's included) over a cluster bootstrap
    stratified by model (each replicate redraws the Dense and the CART configurations separately);
    `groups` names the column(s) that identify a configuration (default: model, n_layers, n_loops,
    `n_once`, `n_rec`, so the seeds of one configuration resample together).

    The Dense curve pins (E, A, alpha) and the CART loop counts pin phi, so this needs Dense runs
    at >= 3 depths and CART runs at >= 2 loop counts; otherwise ValueError("not enough data: ...").
    """
    missing = [c for c in ("model", "n_layers", "n_loops", loss, n_once, n_rec) if c not in frame.columns]
    if missing:
        raise ValueError(f"frame: missing columns {missing}; need model, n_layers, n_loops, {loss}, {n_once}, {n_rec}")
    bad = sorted(set(frame["model"].dropna()) - {"cart", "dense"})
    if bad:
        raise ValueError(f"model: values {bad} not allowed; allowed: ['cart', 'dense']")
    _check_recurrence_data(frame)
    _check_bootstrap(n_boot, level)
    keys = ["model", "n_layers", "n_loops", n_once, n_rec] if groups is None else _columns("groups", frame, groups)
    dense, cart = frame[frame["model"] == "dense"], frame[frame["model"] == "cart"]
    rows = pd.concat([dense.assign(_R=1.0, _rec=0.0), cart.assign(_R=cart["n_loops"], _rec=cart[n_rec])])
    y = _positive(loss, rows[loss])
    once, rec, R = (np.asarray(rows[c], float) for c in (n_once, "_rec", "_R"))
    if np.any(once < 0) or np.any(rec < 0) or np.any(once + rec <= 0):
        raise ValueError(f"{n_once}, {n_rec}: parameter counts must be >= 0 and not both 0")
    clusters = rows.groupby(keys, dropna=False, sort=False).ngroup().to_numpy()
    ly, scale = np.log(y), np.exp(np.log(once + rec).mean())
    params, samples, objective, resid = _engine(
        laws.looped_law(once / scale, rec / scale, np.log(R)), ly, laws.lse_grid(ly, 1, extra=[(0.0, 0.5, 1.0, 1.5)]),
        laws.lse_bounds(ly, 1, extra=[(-2.0, 3.0)]), [scale], clusters, strata=rows["model"].to_numpy(),
        delta=delta, n_boot=n_boot, seed=seed)
    E, A, alpha, phi = params
    return RecurrenceFit(E=float(E), A=float(A), alpha=float(alpha), phi=float(phi), loss=float(objective), n=len(y),
                         residuals=resid, ci=_intervals(RECURRENCE_PARAMS, samples, level), level=level,
                         samples=samples, data=pd.DataFrame({"model": rows["model"].to_numpy(), "n_once": once,
                                                             "n_rec": rec, "n_loops": R, "loss": y, "group": clusters}))


def _columns(name: str, frame: pd.DataFrame, columns) -> list[str]:
    """A column name or list of names, each checked to be in `frame`."""
    keys = [columns] if isinstance(columns, str) else list(columns)
    absent = [c for c in keys if c not in frame.columns]
    if absent or not keys:
        raise ValueError(f"{name}: need one or more columns of frame, got {keys} (not in frame: {absent}); "
                         f"allowed: {list(frame.columns)}")
    return keys


def _check_recurrence_data(frame: pd.DataFrame) -> None:
    """Section 9.2: Dense runs at >= 3 depths and CART runs at >= 2 loop counts, else ValueError."""
    depths = sorted(frame.loc[frame["model"] == "dense", "n_layers"].dropna().unique())
    loops = sorted(frame.loc[frame["model"] == "cart", "n_loops"].dropna().unique())
    needs = []
    if len(depths) < 3:
        needs.append(f"Dense runs at >= 3 depths (n_layers; have {len(depths)}: {[int(d) for d in depths]})")
    if len(loops) < 2:
        needs.append(f"CART runs at >= 2 loop counts (n_loops; have {len(loops)}: {[int(r) for r in loops]})")
    if needs:
        raise ValueError("not enough data: need " + " and ".join(needs))


# --- the joint law on a study's runs (notebooks/scaling_law.ipynb) ---------------------------

@dataclass(frozen=True)
class PowerCurve:
    """f(N) = c * N^k: FLOPs per token as a function of parameters, fitted on a family's runs."""

    c: float
    k: float
    lo: float  # the range of N it was fitted on
    hi: float

    def __call__(self, n) -> np.ndarray:
        return self.c * np.asarray(n, float) ** self.k


def flops_per_token_curve(n, flops_per_token) -> PowerCurve:
    """FLOPs per token of a model family as a power of its parameter count N, by least squares
    on (log N, log FLOPs per token) over its runs (section 7.3's C = f(N) D, for a family whose
    f is not 6N: CART counts its core R times and, at laptop sizes, the LM head and attention
    weigh as much as the weights). Exact for f = k N; an approximation between the fitted sizes
    otherwise, and an extrapolation outside [lo, hi]. Needs >= 2 distinct N."""
    n, f = _positive("n", n), _positive("flops_per_token", flops_per_token)
    if len(n) != len(f):
        raise ValueError(f"n, flops_per_token: lengths differ ({len(n)} vs {len(f)})")
    if len(np.unique(n)) < 2:
        raise ValueError(f"n: need at least 2 distinct values to fit FLOPs per token against N, "
                         f"got {np.unique(n).tolist()}")
    k, log_c = _ols(np.log(n), np.log(f))
    return PowerCurve(c=float(np.exp(log_c)), k=float(k), lo=float(n.min()), hi=float(n.max()))


def scaling_points(runs: pd.DataFrame, eval_log: pd.DataFrame, *, split: str) -> pd.DataFrame:
    """One row per run for the joint law L(N, D) (section 7.3): its variant, `family` (the
    architecture apart from width: "cart P=2 R=4", "dense", with hooks and fields set by hand),
    n_stored and n_effective (non-embedding parameters, `cartlab.model.account` of the run's
    stored model config), tokens (D: training tokens), flops_per_token (training, LM head
    included, as the training loop counts it), flops = flops_per_token * tokens, and loss: the
    final validation loss on `split`, or the mean over the run's domains for split="mean".

    Needs each run's training config (the results database's config_json; published rows have
    none). Within a family each (N, D) cell must hold the seeds of ONE variant: two variants
    there (say two learning rates) are refused by name, never pooled."""
    from cartlab.analysis.schema import describe_variants, final_eval

    fe = final_eval(runs, eval_log)
    if split == "mean":  # every run's domains weigh equally
        fe = fe.drop_duplicates("run_id").assign(loss=fe["run_id"].map(fe.groupby("run_id")["loss"].mean()))
    else:
        if split not in set(fe["split"]):
            raise ValueError(f"split: {split!r} not among the runs' evaluated splits {sorted(set(fe['split']))}, "
                             f"or 'mean' for the mean over them")
        fe = fe[fe["split"] == split]
    if fe.empty:
        raise ValueError("runs: no run has a final evaluation")
    configs = runs.set_index("run_id")["config_json"] if "config_json" in runs.columns else pd.Series(dtype=object)
    rows = []
    for row in fe.to_dict("records"):
        acc = _accounting(row["run_id"], configs.get(row["run_id"]))
        rows.append({"run_id": row["run_id"], "variant": row["variant"], "variant_label": row["variant_label"],
                     "family": _family(row), "model": row["model"], "d_model": row["d_model"], "seed": row["seed"],
                     "n_stored": float(acc.non_embedding_stored), "n_effective": float(acc.non_embedding_effective),
                     "tokens": float(row["tokens"]), "flops_per_token": acc.train_flops_per_token(),
                     "loss": float(row["loss"])})
    points = pd.DataFrame(rows)
    points["flops"] = points["flops_per_token"] * points["tokens"]
    cells = points.groupby(["family", "n_stored", "tokens"])["variant"].nunique()
    if (cells > 1).any():
        family, n, d = cells.index[cells > 1][0]
        at = points[(points["family"] == family) & (points["n_stored"] == n) & (points["tokens"] == d)]
        raise ValueError(f"runs: {family} at N={n:.4g}, D={d:.4g} holds several variants, not seeds of one "
                         f"configuration: {describe_variants(runs, at['variant'])}; select the runs to fit")
    return points.sort_values(["family", "n_stored", "tokens", "seed"]).reset_index(drop=True)


def _accounting(run_id: str, config_json):
    """`cartlab.model.account` of the model a run trained, from its stored config."""
    import json

    from cartlab.model import account
    from cartlab.model.config import LMConfig

    try:
        config = json.loads(config_json) if isinstance(config_json, str) else None
        model, seq_len = config["model"], config["train"]["seq_len"]
    except (TypeError, KeyError, ValueError):
        raise ValueError(f"runs: {run_id!r} has no stored training config (config_json), so its non-embedding "
                         f"parameters and FLOPs are unknown; the joint law needs runs trained here") from None
    return account(LMConfig.from_dict(model), int(seq_len))


def _family(row: dict) -> str:
    """What a law's runs share: the architecture apart from width (and length)."""
    shape = (f"cart P={int(row['prelude_layers'])} R={int(row['n_loops'])}" if row["model"] == "cart"
             else str(row["model"]))
    hooks = f" [{row['hooks']}]" if isinstance(row.get("hooks"), str) and row["hooks"] else ""
    overrides = f" {{{row['overrides']}}}" if isinstance(row.get("overrides"), str) and row["overrides"] else ""
    return shape + hooks + overrides


def law_families(points: pd.DataFrame, *, min_sizes: int = 3, min_budgets: int = 3) -> tuple[dict, dict]:
    """Split `scaling_points` rows by family into ({family: rows} that a joint law can be fitted
    to, {family: why not}): the law's 5 parameters need >= `min_sizes` model sizes, >=
    `min_budgets` token budgets and >= 6 runs (section 7.3)."""
    ready, short = {}, {}
    for family, g in points.groupby("family"):
        sizes, budgets = g["n_stored"].nunique(), g["tokens"].nunique()
        if sizes >= min_sizes and budgets >= min_budgets and len(g) >= 6:
            ready[family] = g
        else:
            short[family] = (f"its {len(g)} run(s) span {sizes} model size(s) and {budgets} token budget(s); the "
                             f"law's 5 parameters need >= {min_sizes} sizes, >= {min_budgets} budgets and >= 6 runs")
    return ready, short


def joint_fits(points: pd.DataFrame, *, n_boot: int = 200, level: float = 0.95, seed: int = 0) -> dict:
    """fit_chinchilla of loss on (N, tokens) for N = n_stored and N = n_effective, the seeds of
    one variant forming one bootstrap cluster (section 7.3): {"stored": fit, "effective": fit}.
    `points` is one family's rows of `scaling_points`."""
    if points["family"].nunique() > 1:
        raise ValueError(f"points: one law per family; got {sorted(points['family'].unique())}")
    return {kind: fit_chinchilla(points[f"n_{kind}"], points["tokens"], points["loss"], groups=points["variant"],
                                 n_boot=n_boot, level=level, seed=seed)
            for kind in ("stored", "effective")}


def law_table(fits: dict) -> pd.DataFrame:
    """The parameters of several joint fits side by side (section 7.3): one row per parameter
    (E, A, B, alpha, beta, and a = beta / (alpha + beta), the exponent of N_opt ~ C^a under C =
    k N D), one estimate/lo/hi column triple per fit name, intervals from the fits' bootstrap."""
    out = {"parameter": [*CHINCHILLA_PARAMS, "a"]}
    for name, fit in fits.items():
        a = fit.beta / (fit.alpha + fit.beta)
        if len(fit.samples):
            boot = fit.samples[:, 4] / (fit.samples[:, 3] + fit.samples[:, 4])
            a_ci = tuple(np.quantile(boot, [(1 - fit.level) / 2, (1 + fit.level) / 2]))
        else:
            a_ci = (np.nan, np.nan)
        cis = [*(fit.ci[p] for p in CHINCHILLA_PARAMS), a_ci]
        out[f"{name}"] = [*(getattr(fit, p) for p in CHINCHILLA_PARAMS), a]
        out[f"{name} lo"] = [lo for lo, _ in cis]
        out[f"{name} hi"] = [hi for _, hi in cis]
    return pd.DataFrame(out)


def frontier_table(fits: dict, flops_per_token: dict, C) -> pd.DataFrame:
    """The compute-optimal allocation of each joint fit at the budgets `C` (section 7.3): one row
    per (fit name, C) with N_opt, D_opt, tokens per parameter D/N and, for fits with bootstrap
    refits, their percentile band (N_lo, N_hi, D_lo, D_hi)."""
    C = np.atleast_1d(np.asarray(C, float))
    frames = []
    for name, fit in fits.items():
        n_opt, d_opt = fit.optimal_allocation(C, flops_per_token[name])
        frame = pd.DataFrame({"N": name, "C": C, "N_opt": n_opt, "D_opt": d_opt, "tokens_per_param": d_opt / n_opt})
        if len(fit.samples):
            (n_lo, n_hi), (d_lo, d_hi) = fit.optimal_allocation_band(C, flops_per_token[name])
            frame = frame.assign(N_lo=n_lo, N_hi=n_hi, D_lo=d_lo, D_hi=d_hi)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)
