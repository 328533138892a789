"""The test-time depth profile (issue 14; paper section 7.4, Table 12): a CART model trained at R
loops, run at other loop counts on every validation domain.

The paper trains at a fixed R=6 and finds the model gets worse with more loops at inference; it
names training-time variable R as the likely cure. This measure stores the evidence for either
case once per run, after the last evaluation: the mean validation loss (and perplexity) of the
final weights at each inference R of `depth_grid`, on the same fixed batches the evaluation reads
(so at the trained R it equals the run's final eval loss). `cartlab.analysis.depth` classifies
the profile's shape from these rows.

The grid, written as a rule (`depth_grid(R)`, R the trained loop count; under `random_loops` the
configured `n_loops`, the R the sampled counts are centred on):

    every integer 1 .. 2R, then ceil(2.5R), 3R and 4R
    R=4 -> 1 2 3 4 5 6 7 8 10 12 16        R=6 -> 1 .. 12 15 18 24        R=1 -> 1 2 3 4

dense where the shape turns (around R), sparse out to 4R where only the trend matters. A model
with an unshared core (`share_core=False`) holds one core block per loop a training step can run
(R, or loops_max under `random_loops`) and cannot run more loops than that, so its grid stops
there (`profile_grid`).

Cost: one pass of 4R loops per batch, decoded (coda + head) at every grid point
(`losses_by_depth`), instead of a forward per grid point (16 loop applications per batch at R=4 instead of 74). At the
cpu-demo size (R=4, 3 domains x 8 batches x 8 x 128 tokens) it takes 11.8 s of one CPU thread
against 1.8 s for the evaluation itself (6.7x; a forward per R measured ~19x in wall time), once per run, after
the last evaluation (measured 2026-11-25 as process CPU time, the machine being shared).

Rows: split = domain, x = inference R, metric "loss" (mean nats/token) and "ppl" (e^loss).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from cartlab.measures import MeasureContext, loops_r_times, register_measure
from cartlab.model.family import family_of, looping


def depth_grid(trained_r: int, max_r: int | None = None) -> list[int]:
    """The inference loop counts of a depth profile: every integer 1..2R, then ceil(2.5R), 3R, 4R;
    only those <= `max_r` when given (an unshared core's block count)."""
    if isinstance(trained_r, bool) or not isinstance(trained_r, int) or trained_r < 1:
        raise ValueError(f"trained_r={trained_r!r} is not allowed; it must be an integer >= 1")
    grid = set(range(1, 2 * trained_r + 1)) | {math.ceil(2.5 * trained_r), 3 * trained_r, 4 * trained_r}
    return sorted(r for r in grid if max_r is None or r <= max_r)


def profile_grid(model_cfg) -> list[int]:
    """`depth_grid` of a CART config's trained R, stopping at its core block count when unshared."""
    if not family_of(model_cfg).loops:
        raise ValueError(f"model.kind={model_cfg.kind!r} has no loop count to profile; only "
                         f"{looping('name')!r} loops")
    return depth_grid(model_cfg.n_loops, None if model_cfg.share_core else model_cfg.n_core_blocks)


def losses_by_depth(model, x: torch.Tensor, y: torch.Tensor, grid: list[int]) -> dict[int, float]:
    """{r: the loss of `model(x, y, n_loops=r)`} for every r in `grid`, from one pass of max(grid)
    loops. A loop step reads only its index r and the states before it, so the state after r
    loops of a longer pass is the r-loop forward's last state; decoding it through the coda and
    the head (the calls `CART.forward` makes) gives that forward's loss for one coda + head
    instead of a whole forward per r (tests/test_depth_profile.py checks the equality for every
    core variant)."""
    wanted, states = set(grid), {}

    def keep(r: int, h: torch.Tensor, prev: torch.Tensor) -> None:
        if r + 1 in wanted:
            states[r + 1] = h  # (B, T, d) after r + 1 loops

    e, rope = model.encode(x)  # (B, T, d)
    model.recur(e, rope, max(grid), observe=keep)
    return {r: model.head(model.coda(states[r], rope, None), y)[1].item() for r in grid}


@register_measure("depth_profile", when="final", applies=loops_r_times)
def depth_profile(ctx: MeasureContext) -> list[dict]:
    """Validation loss and perplexity per domain at inference R = 1 .. 4x the trained R (`depth_grid`)."""
    grid = profile_grid(ctx.model_cfg)
    rows = []
    for split in ctx.val_bins:
        with ctx.autocast():
            per_batch = [losses_by_depth(ctx.model, x, y, grid) for x, y in ctx.batches(split)]  # the eval's windows
        for r in grid:
            mean = float(np.mean([b[r] for b in per_batch]))  # as `cartlab.train.loop.evaluate` averages
            rows.append({"split": split, "x": r, "metric": "loss", "value": mean})
            rows.append({"split": split, "x": r, "metric": "ppl", "value": math.exp(min(mean, 50.0))})
    return rows
