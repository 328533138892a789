"""The compute-quality frontier of adaptive depth (issue 27): validation loss per domain against
the mean loops per token, for a fixed R, for every exit rule over a sweep of thresholds
(`cartlab.model.exits`), and for the fixed-point mode over a sweep of iteration caps. Opt-in
(`measures: [adaptive_depth]`), once after the last evaluation.

Rows per domain (split), on the first `FRONTIER_BATCHES` evaluation batches (equal-sized, so the
means are token means); each point is a pair of rows with the same x:

    fixed_loss, fixed_loops          x = R, 1 .. 2R (an unshared core: up to its blocks); loops = R
    {rule}_loss, {rule}_loops        x = the threshold, rule in kl, entropy, latent, argmax (and
                                     learned with the hook exit_head), each token stopping by the
                                     rule after at most 2R loops (`max_loops`)
    fixed_point_loss, fixed_point_loops   x = the iteration cap (1, 2, 4, ... solver_max_iter),
                                     fixed-point models only; loops = mean solver iterations

Thresholds (`THRESHOLDS`): entropy's are fractions of log V nats (the uniform distribution's
entropy), so one sweep fits every vocabulary; argmax's count loops with an unchanged top-1.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from cartlab.measures import MeasureContext, register_measure
from cartlab.measures.depth import losses_by_depth
from cartlab.model.family import family_of

FRONTIER_BATCHES = 2
"""Evaluation batches per domain (each point costs about one forward per batch)."""
THRESHOLDS = {
    "kl": (1e-4, 1e-3, 1e-2, 1e-1),
    "entropy": (0.1, 0.25, 0.5, 0.75),  # x log V
    "latent": (3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
    "argmax": (1, 2, 3),
    "learned": (0.3, 0.5, 0.7, 0.9),
}


def max_loops(model_cfg) -> int:
    """The most loops a frontier point runs: 2R, or an unshared core's block count."""
    top = 2 * model_cfg.n_loops
    return top if model_cfg.share_core else min(top, model_cfg.n_core_blocks)


def frontier(model, x: torch.Tensor, y: torch.Tensor) -> list[tuple[str, float, float, float]]:
    """(curve, x, loss, mean loops per token) of every point of one batch (module docstring)."""
    cfg = model.config
    if cfg.solver != "none":
        return fixed_point_points(model, x, y)
    top = max_loops(cfg)
    points = [("fixed", r, loss, r) for r, loss in losses_by_depth(model, x, y, list(range(1, top + 1))).items()]
    for rule, thresholds in THRESHOLDS.items():
        if rule == "learned" and model.exit_head is None:
            continue
        scale = math.log(cfg.vocab_size) if rule == "entropy" else 1.0
        for t in thresholds:
            _, loss = model(x, y, n_loops=top, exit=rule, exit_threshold=t * scale)
            points.append((rule, t * scale, loss.item(), model.loops_per_token.double().mean().item()))
    return points


def fixed_point_points(model, x: torch.Tensor, y: torch.Tensor) -> list[tuple[str, float, float, float]]:
    """The fixed-point mode under iteration caps 1, 2, 4, ... up to its solver_max_iter."""
    cfg = model.config
    caps = sorted({2**k for k in range(int(math.log2(cfg.solver_max_iter)) + 1)} | {cfg.solver_max_iter})
    points, kept = [], cfg.solver_max_iter
    try:
        for cap in caps:
            cfg.solver_max_iter = cap
            _, loss = model(x, y)
            points.append(("fixed_point", cap, loss.item(), model.loops_per_token.double().mean().item()))
    finally:
        cfg.solver_max_iter = kept
    return points


@register_measure("adaptive_depth", when="final", applies=lambda m: family_of(m).loops, default=False)
def adaptive_depth(ctx: MeasureContext) -> list[dict]:
    """Validation loss against mean loops per token: fixed R, each exit rule over thresholds, the fixed-point mode."""
    out = []
    for split in ctx.val_bins:
        per_batch = ctx.over_batches(split, FRONTIER_BATCHES, frontier)
        for i, (curve, at, _, _) in enumerate(per_batch[0]):
            loss = float(np.mean([b[i][2] for b in per_batch]))
            loops = float(np.mean([b[i][3] for b in per_batch]))
            out += [{"split": split, "x": float(at), "metric": f"{curve}_loss", "value": loss},
                    {"split": split, "x": float(at), "metric": f"{curve}_loops", "value": loops}]
    return out
