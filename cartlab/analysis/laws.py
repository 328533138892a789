"""Robust fitting engine for saturating scaling laws in log-sum-exp form (paper sections 7.3, 9.2).

The method of Hoffmann et al. (2022, approach 3) as replicated by Besiroglu et al. (2024): a law
L_hat = E + sum_k A_k x_k^-alpha_k is written as

    log L_hat = LSE(e, a_1 - alpha_1 log x_1, ..., a_K - alpha_K log x_K),   E = e^e, A_k = e^a_k,

and fitted by minimising sum_i w_i Huber_delta(log L_i - log L_hat_i) (delta = 1e-3) with L-BFGS-B
and an analytic gradient, started from the best points of a grid. Uncertainty is a cluster
bootstrap: whole clusters (all seeds of one configuration) are resampled, which is a refit with
integer weights w_i = the number of times point i's cluster was drawn.

    model = lse_law(np.log(np.c_[n / gm(n), d / gm(d)]))        # theta = (e, a_1, a_2, alpha_1, alpha_2)
    grid, bounds = lse_grid(np.log(loss), 2), lse_bounds(np.log(loss), 2)
    theta, objective = robust_fit(model, np.log(loss), grid, bounds)
    thetas = cluster_bootstrap(model, np.log(loss), grid, bounds, theta, clusters=config_ids, n_boot=4000)
    residual_diagnostics(resid, {"log_n": np.log(n), "log_d": np.log(d)})   # Spearman rho per axis

Features log x_k are best centred (x / geometric mean) so that a_k is O(1); callers convert back
with A_k = e^a_k * scale_k^alpha_k.
"""
from __future__ import annotations

import contextlib
import itertools

import numpy as np
import pandas as pd
from scipy import optimize, stats

try:  # optional: present with scikit-learn (the `eval` extra); without it BLAS keeps its threads
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None

DELTA = 1e-3  # Huber delta on log-loss residuals (Hoffmann et al. 2022; Besiroglu et al. 2024)
_LBFGS = dict(maxiter=2000, ftol=1e-13, gtol=1e-10, maxcor=20)


def _lse(e: float, a, alpha, lx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """f = LSE(e, a_k - alpha_k lx_k) per row of lx (n, K) and the softmax weights s (n, K + 1),
    s_0 = E / L_hat, s_k = A_k x_k^-alpha_k / L_hat (the gradient of f in e and a_k). No max
    shift is needed: inside lse_bounds (e, a <= 30, alpha <= 5) and on centred features every
    exponent stays far from exp's overflow (709) and underflow (-745)."""
    z = np.exp(a - lx * alpha)
    big_e = np.exp(e)
    total = z.sum(axis=1) + big_e
    s = np.empty((len(total), z.shape[1] + 1))
    s[:, 0] = big_e / total
    np.divide(z, total[:, None], out=s[:, 1:])
    return np.log(total), s


def lse_law(lx: np.ndarray):
    """The law log L_hat = LSE(e, a_k - alpha_k lx_k) on features lx (n, K) (sections 7.3, 9.2).

    Returns model(theta) -> (f, J) for theta = (e, a_1..a_K, alpha_1..alpha_K): f = log L_hat (n,)
    and its Jacobian J (n, 2K + 1), df/de = s_0, df/da_k = s_k, df/dalpha_k = -s_k lx_k.
    """
    lx = np.atleast_2d(np.asarray(lx, float).T).T
    k = lx.shape[1]

    def model(theta):
        f, s = _lse(theta[0], theta[1:k + 1], theta[k + 1:], lx)
        jac = np.empty((len(f), 2 * k + 1))
        jac[:, :k + 1] = s
        np.multiply(s[:, 1:], -lx, out=jac[:, k + 1:])
        return f, jac

    return model


def looped_law(n_once: np.ndarray, n_rec: np.ndarray, log_r: np.ndarray):
    """Schwethelm et al.'s law log L_hat = LSE(e, a - alpha log N_eff), N_eff = N_once + R^phi N_rec
    (section 9.2). Returns model(theta) -> (f, J) for theta = (e, a, alpha, phi), with
    df/dphi = -alpha s_1 R^phi N_rec log R / N_eff.
    """
    n_once, n_rec, log_r = (np.asarray(v, float) for v in (n_once, n_rec, log_r))

    def model(theta):
        e, a, alpha, phi = theta
        looped = np.exp(phi * log_r) * n_rec
        n_eff = n_once + looped
        lx = np.log(n_eff)[:, None]
        f, s = _lse(e, a, alpha, lx)
        jac = np.empty((len(f), 4))
        jac[:, :2] = s
        jac[:, 2] = -s[:, 1] * lx[:, 0]
        jac[:, 3] = -alpha * s[:, 1] * looped * log_r / n_eff
        return f, jac

    return model


def lse_grid(ly: np.ndarray, k: int, *, alphas=(0.1, 0.3, 0.6, 1.0, 1.6), e_fractions=(0.0, 0.5, 0.9),
             a_offsets=(-3.0, -1.5, 0.0), extra=()) -> np.ndarray:
    """Start grid for theta = (e, a_1..a_K, alpha_1..alpha_K, *extra) (sections 7.3, 9.2).

    Besiroglu et al.'s grid (e in [-1, 1], a in [0, 25], alpha in [0, 2]) reduced to the region a
    centred fit can use: E = fraction * min L (fraction 0 means E = 1e-4 min L), a_k = log(median L)
    + offset (term k's size at the centre of the data), alpha_k in `alphas`; `extra` appends one
    axis of values per additional parameter (phi).
    """
    lo = np.log(np.median(np.exp(ly)))
    es = [np.log(max(f, 1e-4)) + ly.min() for f in e_fractions]
    axes = [es] + [[lo + o for o in a_offsets]] * k + [list(alphas)] * k + [list(v) for v in extra]
    return np.array(list(itertools.product(*axes)))


def lse_bounds(ly: np.ndarray, k: int, extra=()) -> list[tuple[float, float]]:
    """L-BFGS-B box for theta = (e, a_1..a_K, alpha_1..alpha_K, *extra) (sections 7.3, 9.2):
    E <= max L (e in [-30, log max L]), a_k in [-30, 30], alpha_k in [0, 5], then `extra`."""
    return [(-30.0, float(ly.max()))] + [(-30.0, 30.0)] * k + [(0.0, 5.0)] * k + list(extra)


def huber(r: np.ndarray, delta: float = DELTA) -> np.ndarray:
    """Huber_delta(r) = r^2 / 2 for |r| <= delta, else delta (|r| - delta / 2) (section 7.3);
    computed as psi (r - psi / 2) with psi = clip(r, -delta, delta) = Huber_delta'(r)."""
    psi = np.clip(r, -delta, delta)
    return psi * (r - 0.5 * psi)


def _objective(theta, model, ly, wn, delta):
    """sum_i wn_i Huber(r_i) / delta and its gradient -J^T (wn psi(r)) / delta, r = ly - f(theta),
    psi = clip(r, -delta, delta), wn = w / sum w (dividing by delta keeps the scale O(|r| / delta))."""
    f, jac = model(theta)
    r = ly - f
    psi = np.clip(r, -delta, delta)
    return float(wn @ (psi * (r - 0.5 * psi))) / delta, -(jac.T @ (wn * psi)) / delta


def _grid_huber(model, ly: np.ndarray, grid: np.ndarray, delta: float) -> np.ndarray:
    """Huber(ly - f(theta_g)) for every grid point g: a (G, n) matrix, so that the objective of
    every grid point under any weights w is one product H @ w."""
    return np.stack([huber(ly - model(g)[0], delta) for g in grid])


def _one_blas_thread():
    """Pin BLAS to one thread: an L-BFGS-B step is a few tiny (2m x 2m) solves that threads only
    slow down, and on a busy 2-core machine their spin-waiting stalls each refit 10-100x."""
    return threadpool_limits(1, user_api="blas") if threadpool_limits else contextlib.nullcontext()


def _minimise(model, ly, wn, delta, starts, bounds) -> tuple[np.ndarray, float]:
    """Best L-BFGS-B minimum of the weighted Huber objective over `starts`."""
    best_x, best_f = None, np.inf
    for x0 in starts:
        x0 = np.clip(x0, [b[0] for b in bounds], [b[1] for b in bounds])
        r = optimize.minimize(_objective, x0, args=(model, ly, wn, delta), jac=True, method="L-BFGS-B",
                              bounds=bounds, options=_LBFGS)
        if np.isfinite(r.fun) and r.fun < best_f:
            best_x, best_f = r.x, float(r.fun)
    if best_x is None:
        raise ValueError("fit: no start converged; check that the loss decreases with scale and is > 0")
    return best_x, best_f


def robust_fit(model, ly: np.ndarray, grid: np.ndarray, bounds, *, delta: float = DELTA,
               n_starts: int = 8) -> tuple[np.ndarray, float]:
    """theta_hat = argmin sum_i Huber_delta(ly_i - f_i(theta)) (sections 7.3, 9.2).

    Every grid point is scored, and L-BFGS-B (analytic gradient) runs from the `n_starts` best;
    the lowest minimum wins. Returns (theta_hat, sum_i Huber_delta(r_i)).
    """
    ly = np.asarray(ly, float)
    wn = np.full(len(ly), 1.0 / len(ly))
    scores = _grid_huber(model, ly, grid, delta) @ wn
    with _one_blas_thread():
        theta, obj = _minimise(model, ly, wn, delta, grid[np.argsort(scores)[:n_starts]], bounds)
    return theta, obj * delta * len(ly)


def cluster_weights(clusters, n_boot: int, *, strata=None, seed: int = 0) -> np.ndarray:
    """Cluster-bootstrap weights (n_boot, n) (sections 7.3, 9.2): within each stratum its m
    clusters are drawn m times with replacement, w_bi = times point i's cluster was drawn in
    replicate b. Seeded numpy Generator: the same seed gives the same weights."""
    codes, labels = _codes(clusters)
    strata_of = np.zeros(len(labels), int) if strata is None else _stratum_of_cluster(codes, labels, strata)
    rng = np.random.default_rng(seed)
    counts = np.zeros((n_boot, len(labels)))
    for s in np.unique(strata_of):
        members = np.flatnonzero(strata_of == s)
        counts[:, members] = rng.multinomial(len(members), np.full(len(members), 1.0 / len(members)), size=n_boot)
    return counts[:, codes]


def _codes(labels) -> tuple[np.ndarray, list]:
    """Integer codes 0..m-1 of hashable labels (one per point) and the m distinct labels."""
    codes, uniques = pd.factorize(pd.Series(list(labels)))
    return codes, list(uniques)


def _stratum_of_cluster(codes: np.ndarray, labels: list, strata) -> np.ndarray:
    """The stratum code of each cluster; a cluster spread over two strata is an input error."""
    s_codes, _ = _codes(strata)
    out = np.full(len(labels), -1)
    for c, s in zip(codes, s_codes):
        if out[c] not in (-1, s):
            raise ValueError(f"strata: cluster {labels[c]!r} spans more than one stratum; clusters must nest in strata")
        out[c] = s
    return out


def cluster_bootstrap(model, ly: np.ndarray, grid: np.ndarray, bounds, theta_hat: np.ndarray, *, clusters,
                      strata=None, n_boot: int = 1000, seed: int = 0, delta: float = DELTA,
                      n_starts: int = 1) -> np.ndarray:
    """Bootstrap refits theta*_b (n_boot, p) with cluster_weights (sections 7.3, 9.2).

    Refit b minimises sum_i w_bi Huber_delta(r_i) from theta_hat and from the `n_starts` grid
    points best under w_b, not the whole grid: the optimum moves little between replicates (on
    the Chinchilla and phi designs of tests/test_analysis_laws.py, starting also from the 2nd to
    4th best grid points lowered no replicate's objective by more than 1e-8, relative).
    """
    ly = np.asarray(ly, float)
    weights = cluster_weights(clusters, n_boot, strata=strata, seed=seed)
    weights /= weights.sum(axis=1, keepdims=True)
    scores = weights @ _grid_huber(model, ly, grid, delta).T  # (n_boot, G)
    out = np.empty((n_boot, len(theta_hat)))
    with _one_blas_thread():
        for b, wn in enumerate(weights):
            starts = [theta_hat, *grid[np.argsort(scores[b])[:n_starts]]]
            out[b] = _minimise(model, ly, wn, delta, starts, bounds)[0]
    return out


def percentile_ci(samples: np.ndarray, level: float) -> np.ndarray:
    """Percentile interval [q_{(1-level)/2}, q_{(1+level)/2}] of each column of `samples`
    (sections 7.3, 9.2); NaN when there are no samples."""
    samples = np.asarray(samples, float)
    if len(samples) == 0:
        return np.full((samples.shape[1], 2), np.nan)
    return np.quantile(samples, [(1 - level) / 2, (1 + level) / 2], axis=0).T


def residual_diagnostics(residuals, axes: dict, *, significance: float = 0.05) -> pd.DataFrame:
    """Spearman rank correlation of the log residuals with each axis (OLMo-style, section 7.3).

    One row per axis: rho, its two-sided p-value and `missing_term` = p < significance / (number
    of axes) (Bonferroni, so a correct model is flagged on any axis with probability <=
    significance). A monotone trend of the residuals along an axis (log N, log D, the prediction)
    means the law lacks a term in it. A constant axis gives rho = NaN and no flag.
    """
    residuals = np.asarray(residuals, float)
    rows = []
    for name, values in axes.items():
        values = np.asarray(values, float)
        if len(np.unique(values)) < 2:
            rho, p = np.nan, np.nan
        else:
            rho, p = stats.spearmanr(residuals, values)
        rows.append({"axis": name, "rho": float(rho), "p": float(p),
                     "missing_term": bool(p < significance / len(axes))})
    return pd.DataFrame(rows)
