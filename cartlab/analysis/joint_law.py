"""Saturating scaling laws on the robust engine (paper sections 7.3 and 9.2).

    fit_saturating(n, loss)                # y = E + A * x^-alpha, Huber loss on log residuals
    fit = fit_chinchilla(n, d, loss, groups=config)   # L = E + A N^-alpha + B D^-beta, cluster bootstrap
    fit.ci["alpha"], fit.optimal_allocation(1e20), fit.loo_size_errors(), fit.residual_diagnostics()
    fit_recurrence_exponent(frame, n_boot=1000)       # Schwethelm et al.'s phi with its interval

The laws share one robust engine (cartlab.analysis.laws: log-sum-exp form, Huber loss on log
residuals, L-BFGS-B from a grid, cluster bootstrap, residual diagnostics). Fitting a study's
runs (their N, D and accounted FLOPs) and the joint law's figures are in
`cartlab.analysis.scaling_study`; pure power laws in `cartlab.analysis.scaling`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cartlab.analysis import laws
from cartlab.analysis.scaling import _ols, _positive

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


# --- FLOPs per token against N ---------------------------------------------------------------

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
