"""Speed of the scaling-law engine (cartlab.analysis.laws) on this machine, issue 16 acceptance 3.

    python benchmarks/bench_scaling.py              # 4,000 bootstrap refits of fit_chinchilla on 250 points (~30 s)
    python benchmarks/bench_scaling.py --quick      # 400 refits, for a smoke run

Prints:
1. fit_chinchilla on 250 synthetic points (10 sizes x 5 token counts x 5 seeds, one cluster per
   configuration): wall and CPU time of the point fit and of the bootstrap refits, refits/s and
   the target (4,000 refits in under a minute on 2 cores);
2. fit_recurrence_exponent on a Dense ladder plus CART runs (60 points): the same figures.
The engine runs in one process with BLAS pinned to one thread (its problems are tiny), so it
uses one of the 2 cores; the load average is printed because other processes on a shared
machine stretch the wall time, not the CPU time.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import pandas as pd

from cartlab.analysis import scaling

TRUE = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)  # Hoffmann et al. (2022), approach 3


def chinchilla_points(seed: int = 0, sigma: float = 0.01):
    """10 sizes x 5 token counts x 5 seeds = 250 points of L(N, D) * exp(N(0, sigma))."""
    rng = np.random.default_rng(seed)
    n, d = (a.ravel() for a in np.meshgrid(np.geomspace(2e7, 2e9, 10), np.geomspace(4e8, 4e10, 5)))
    config = np.repeat(np.arange(n.size), 5)
    n, d = n[config], d[config]
    loss = TRUE["E"] + TRUE["A"] * n ** -TRUE["alpha"] + TRUE["B"] * d ** -TRUE["beta"]
    return n, d, loss * np.exp(rng.normal(0, sigma, n.size)), config


def recurrence_frame(seed: int = 0, sigma: float = 0.003) -> pd.DataFrame:
    """Dense at 8 depths and CART at preludes 2, 4 x R in 1..8, 3 seeds each; phi = 0.6."""
    rng = np.random.default_rng(seed)
    layer, embed = 3.1e6, 16e6
    rows = [dict(model="dense", n_layers=L, n_loops=np.nan, n_once=embed + L * layer, n_rec=0.0)
            for L in (2, 4, 8, 12, 16, 24, 32, 48) for _ in range(3)]
    rows += [dict(model="cart", n_layers=np.nan, n_loops=R, n_once=embed + P * layer, n_rec=2 * layer)
             for P in (2, 4) for R in (1, 2, 3, 4, 6, 8) for _ in range(3)]
    f = pd.DataFrame(rows)
    n_eff = f["n_once"] + f["n_loops"].fillna(1) ** 0.6 * f["n_rec"]
    f["loss"] = (2.0 + 300.0 * n_eff ** -0.3) * np.exp(rng.normal(0, sigma, len(f)))
    return f


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def report(fit_once, fit_boot, n_boot: int, target_s: float | None) -> object:
    _, wall0, cpu0 = timed(fit_once)
    fit, wall, cpu = timed(fit_boot)
    boot_wall, boot_cpu = wall - wall0, cpu - cpu0  # the bootstrap alone: minus one point fit
    print(f"   point fit      {wall0:7.2f} s wall {cpu0:7.2f} s CPU")
    print(f"   {n_boot:5d} refits   {boot_wall:7.2f} s wall {boot_cpu:7.2f} s CPU   "
          f"{n_boot / boot_wall:6.0f} refits/s wall   {n_boot / boot_cpu:6.0f} refits/s CPU")
    if target_s is not None:
        scaled = boot_wall * 4000 / n_boot
        print(f"   4,000 refits take {scaled:.1f} s wall (target < {target_s:.0f} s) "
              f"{'ok' if scaled < target_s else 'MISSED'}")
    return fit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-boot", type=int, default=4000)
    p.add_argument("--quick", action="store_true", help="400 refits instead of 4,000")
    args = p.parse_args()
    n_boot = 400 if args.quick else args.n_boot
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} (1 min)")

    n, d, loss, config = chinchilla_points()
    print(f"\n1. fit_chinchilla, {len(loss)} points in {config.max() + 1} clusters")
    fit = report(lambda: scaling.fit_chinchilla(n, d, loss, groups=config, n_boot=0),
                 lambda: scaling.fit_chinchilla(n, d, loss, groups=config, n_boot=n_boot), n_boot, 60.0)
    for name, true in TRUE.items():
        lo, hi = fit.ci[name]
        print(f"   {name:5s} {getattr(fit, name):9.4g}  [{lo:9.4g}, {hi:9.4g}]  truth {true:g}")

    frame = recurrence_frame()
    n_phi = max(n_boot // 4, 1)
    print(f"\n2. fit_recurrence_exponent, {len(frame)} points")
    fit = report(lambda: scaling.fit_recurrence_exponent(frame),
                 lambda: scaling.fit_recurrence_exponent(frame, n_boot=n_phi), n_phi, None)
    print(f"   phi   {fit.phi:9.4g}  [{fit.ci['phi'][0]:9.4g}, {fit.ci['phi'][1]:9.4g}]  truth 0.6")


if __name__ == "__main__":
    main()
