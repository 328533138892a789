"""The loop count R of every training step (hook `random_loops`; `CARTConfig.train_loops`).

Training CART at one fixed R makes it worse at every other R (paper section 7.4, Table 12).
Huginn (Geiping et al. 2025, "Scaling up test-time compute with latent reasoning") draws R per
step instead; `LoopSampler` draws

    fixed              R = n_loops
    uniform            R ~ uniform on loops_min..loops_max
    poisson_lognormal  tau ~ N(log(n_loops - 1) - sigma^2 / 2, sigma),  R = 1 + Poisson(e^tau),
                       clipped to loops_min..loops_max

The last is Huginn's "poisson-lognormal-filling" scheme with its mean recurrence r_bar set to
n_loops - 1: E[e^tau] = n_loops - 1, so the unclipped mean of R is n_loops (Huginn's own mean is
r_bar + 1, e.g. 33 for r_bar = 32). The default range 1..2 * n_loops - 1 clips the upper tail,
so the mean of the R actually trained, `expected()`, is a little below n_loops: at n_loops = 6
and Huginn's sigma = 0.5, R lies in 1..11 with mean 5.75 and standard deviation 2.8.

The sampler holds no state: R at `step` comes from its own stream
`numpy.random.default_rng([seed, step, STREAM])`. Two runs with the same seed draw the same
sequence, a resumed run continues it exactly with nothing to checkpoint, every DDP rank (same
seed, same step) draws the same R without communicating, and no other random stream (data order,
initialisation) is consumed or shifted by it.
"""
from __future__ import annotations

import math

import numpy as np

from cartlab.model.config import CARTConfig

STREAM = 0x4C4F4F50  # "LOOP": sets this stream apart from any other keyed by (seed, step)
QUADRATURE = np.linspace(-12.0, 12.0, 6001)  # standard-normal grid for tau (trapezoid rule, error ~1e-15)


class LoopSampler:
    """R for every training step of the model `cfg` under run seed `seed`: `sampler(step)`."""

    def __init__(self, cfg: CARTConfig, seed: int = 0):
        self.kind = getattr(cfg, "train_loops", "fixed")
        self.mean = cfg.n_loops
        self.low, self.high = cfg.loop_range
        self.sigma = cfg.loops_sigma
        self.seed = seed

    @property
    def varies(self) -> bool:
        """True when R changes from step to step."""
        return self.kind != "fixed"

    def __call__(self, step: int) -> int:
        """R for optimiser step `step` (0-based); the same on every call, process and rank."""
        if not self.varies:
            return self.mean
        rng = np.random.default_rng([self.seed, step, STREAM])
        if self.kind == "uniform":
            r = int(rng.integers(self.low, self.high + 1))
        else:
            r = 1 + int(rng.poisson(math.exp(rng.normal(self.mu, self.sigma))))
        return min(max(r, self.low), self.high)

    @property
    def mu(self) -> float:
        """Mean of poisson_lognormal's log-rate tau, chosen so that E[e^tau] = n_loops - 1."""
        return math.log(self.mean - 1) - self.sigma**2 / 2

    def support(self) -> range:
        """Every R a step can draw."""
        return range(self.low, self.high + 1) if self.varies else range(self.mean, self.mean + 1)

    def distribution(self) -> dict[int, float]:
        """P(R = r) for every r of the support, the clipping included: exact for fixed and
        uniform; for poisson_lognormal the Poisson CDF integrated over tau (trapezoid rule on a
        fine grid: a 4x finer grid changes no probability by more than 1e-15)."""
        support = np.arange(self.support().start, self.support().stop)
        if not self.varies or self.kind == "uniform":
            return {int(r): 1.0 / len(support) for r in support}
        z = QUADRATURE
        weights = np.exp(-0.5 * z**2)
        weights /= weights.sum()
        rate = np.exp(self.mu + self.sigma * z)  # e^tau on the grid
        # P(R <= r) = P(Poisson(e^tau) <= r - 1), averaged over tau; the top of the support takes the rest
        from scipy import special  # here, not at import: every model import would pay for scipy

        cdf = np.array([weights @ special.pdtr(r - 1, rate) for r in support[:-1]] + [1.0])
        probs = np.diff(cdf, prepend=0.0)
        return {int(r): float(p) for r, p in zip(support, probs)}

    def expected(self) -> float:
        """The mean R of training: the mean of `distribution()`."""
        return float(sum(r * p for r, p in self.distribution().items()))

