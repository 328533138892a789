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
"""
from __future__ import annotations

import numpy as np

from cartlab.measures import MeasureContext, register_measure
from cartlab.model.family import family_of

SOLVER_BATCHES = 2
"""Evaluation batches per domain whose solves are summarised (each is one evaluation forward)."""
SUMMARY = ("residual", "iterations", "converged")


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
