"""The fixed-point solve at every evaluation (hook `fixed_point`, issue 27; `cartlab.model.solvers`),
per validation domain, into the `probes` table:

    x = 0   residual     mean over tokens of |f(h) - h| / |f(h)| where each token's solve stopped
            iterations   mean solver iterations per token (the fixed-point model's loops per token)
            converged    share of tokens whose residual fell below solver_tol within solver_max_iter
    x = k   residual_curve   mean residual over tokens after iteration k (1..iterations run); a
                             token that converged keeps its final residual, so the curve is the
                             batch's convergence picture

on the first `SOLVER_BATCHES` evaluation batches of each domain (averaged; the curve of the first),
the model in eval mode, so the solve is the one the evaluation's forward ran. Applies to CART
models with the hook fixed_point.

loop_residual (opt-in: `measures: [..., loop_residual]`) is the same picture for a model that
loops R times: its loop run on to `RESIDUAL_FACTOR` x R loops (an unshared core: its blocks) on the
first evaluation batch of each domain, each loop's |h_r - h_{r-1}| / |h_r| per token:

    x = r   residual_curve   mean over tokens       converged   share of tokens below RESIDUAL_TOL

A loop that contracts drives the curve towards 0; one that does not levels off or grows.
"""
from __future__ import annotations

import numpy as np

from cartlab.measures import MeasureContext, loops_r_times, register_measure
from cartlab.model.family import family_of

SOLVER_BATCHES = 2
"""Evaluation batches per domain whose solves are summarised (each is one evaluation forward)."""
SUMMARY = ("residual", "iterations", "converged")
RESIDUAL_FACTOR = 4
"""loop_residual runs the loop to this many times the trained R."""
RESIDUAL_TOL = 1e-3
"""loop_residual's "converged": a token whose state moved by less than this, relatively, in a loop."""


def solves(model_cfg) -> bool:
    return family_of(model_cfg).loops and getattr(model_cfg, "solver", "none") != "none"


@register_measure("solver", applies=solves, when="eval")
def solver(ctx: MeasureContext) -> list[dict]:
    """Fixed-point solve per domain: final residual, iterations and converged share, and the residual curve."""
    out = []
    for split in ctx.val_bins:
        summaries, curve = [], None
        for x, _ in ctx.batches(split, min(SOLVER_BATCHES, ctx.cfg.eval_batches)):
            with ctx.autocast():
                ctx.model(x)
            stats = ctx.model.solver_stats
            summaries.append(stats.summary())
            curve = stats.curve.float().cpu().numpy() if curve is None else curve
        out += [{"split": split, "x": 0, "metric": m, "value": float(np.mean([s[m] for s in summaries]))}
                for m in SUMMARY]
        out += [{"split": split, "x": k + 1, "metric": "residual_curve", "value": float(v)} for k, v in enumerate(curve)]
    return out


@register_measure("loop_residual", applies=lambda m: loops_r_times(m) and m.n_loops > 1, when="eval", default=False)
def loop_residual(ctx: MeasureContext) -> list[dict]:
    """The loop run on to 4R loops per domain: relative state change per loop and the share of tokens below tolerance."""
    cfg = ctx.model_cfg
    loops = RESIDUAL_FACTOR * cfg.n_loops if cfg.share_core else cfg.n_core_blocks
    out = []
    for split in ctx.val_bins:
        x, _ = ctx.batches(split, 1)[0]
        rows = []

        def observe(r, h, prev):
            res = (h.float() - prev.float()).norm(dim=-1) / h.float().norm(dim=-1).clamp_min(1e-12)  # (B, T)
            rows.append((r + 1, res.mean(), (res < RESIDUAL_TOL).float().mean()))

        with ctx.autocast():
            e, rope = ctx.model.encode(x)
            ctx.model.recur(e, rope, loops, observe=observe)
        for r, res, conv in rows:
            out += [{"split": split, "x": r, "metric": "residual_curve", "value": res.item()},
                    {"split": split, "x": r, "metric": "converged", "value": conv.item()}]
    return out
