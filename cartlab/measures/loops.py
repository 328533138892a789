"""Inside CART's loop, at every evaluation (issue 15): the per-loop logit lens and the loop map's
contraction, per validation domain, into the `probes` table.

    cartlab train --preset cpu-demo measures='[logit_lens,loop_contraction]'

Both apply to CART models with more than one loop (with R = 1 there is nothing to compare), run
at every evaluation (`when="eval"`), at the model's trained R, and read the first of the
evaluation's own fixed batches (`ctx.batches`), so every step and every run is measured on the
same tokens.

logit_lens (`cartlab.model.probes.logit_lens`), rows per domain (split), averaged over the first
`LENS_BATCHES` evaluation batches (equal-sized, so the averages are token means):

    x = r (1..R)   loss         cross-entropy of head(coda(h_r)), nats; at r = R it is the model's own
                                loss on those batches (the logged eval loss when eval_batches <= LENS_BATCHES)
                   kl_to_final  KL(p_R || p_r), nats: what stopping at loop r loses (0 at r = R)
                   top1_agree   share of tokens whose top-1 at loop r is the final top-1
                   settled      share whose top-1 equals the final one at r and every later loop
    x = 0          settle_loop  mean over tokens of the loop from which the top-1 never changes
                                (`mean_settle_loop`; 1 = right from the first loop, R = only at R)

loop_contraction (`cartlab.model.probes.loop_contraction`), rows per domain, on the first
`CONTRACTION_SEQUENCES` sequences of the first evaluation batch, at `CONTRACTION_TOKENS` tokens
sampled with a fixed seed (the same tokens at every evaluation, so a trajectory over steps is not
sampling noise). Each sequence only reads itself, so taking fewer sequences is exact for them.

    x = r (1..R)   radius_mean, radius_max   spectral radius of d h_r / d h_{r-1} per token: mean, max
                   norm_mean, norm_max       its operator 2-norm (>= radius)
                   gate_radius               the LTI gate's radius max_c A_c (the Jacobian's linear
                                             part); absent for a model without a gate (`no_lti`):
                                             the residual "gate" has no radius to compare with
                   iters                     Arnoldi products the radius took (< CONTRACTION_ITERS:
                                             converged to CONTRACTION_TOL)

Cost at the cpu-demo size (d=128, P=2, R=4, vocab 4096; evaluation 3 domains x 8 batches x 8 x
128 tokens; a model trained 81 steps), in CPU seconds on one thread, which other processes on a
shared machine disturb far less than wall time (`benchmarks/bench_loop_measures.py`, 2026-11-25):

    one training update 0.39 s; one evaluation 1.30 s; a 200-update run with 4 evaluations 83 s
    logit_lens, 2 batches per domain          1.30 s per evaluation (1.0x the evaluation;
                                              all 8 batches: ~5.7 s, 4x: R heads and softmaxes)
    loop_contraction, 2 sequences, 64 tokens, <= 20 iterations, tol 3e-3
                                              1.31 s per evaluation (1.0x; a whole batch of 8
                                              sequences: 4.4 s)
    both                                      +10.4 s on the 200-update run (+12.5%)

At these settings the radius is within 0.06% and the norm within 0.01% of 60 unstopped
iterations on the same tokens (13-20 iterations used; tol 1e-2 saves 0.3 s for a 0.4% error).
In the causal-leak study (R=2, one domain, 10 evaluations of 1,000 updates) the evaluation and
both measures together took ~0.3 s per evaluation on an idle machine, ~3% of the run.

A state-dependent K, V (`unfreeze_kv`, `self_attn_core`) couples positions, and each product is
then repeated once per sampled token of the busiest sequence; the contraction samples
CONTRACTION_SEQUENCES tokens there (about one per sequence) to stay in the same budget.
"""
from __future__ import annotations

import numpy as np

from cartlab.measures import MeasureContext, loops_r_times, register_measure
from cartlab.model.probes import logit_lens as lens_rows, loop_contraction as contraction_rows, mean_settle_loop

LENS_METRICS = ("loss", "kl_to_final", "top1_agree", "settled")
CONTRACTION_METRICS = ("radius_mean", "radius_max", "norm_mean", "norm_max", "gate_radius", "iters")
LENS_BATCHES = 2
"""Evaluation batches per domain the lens decodes (each costs ~R evaluation forwards: R heads)."""
CONTRACTION_SEQUENCES = 2
"""Sequences of the first evaluation batch the contraction reads (a product costs ~2 loop steps on them)."""
CONTRACTION_TOKENS = 64
"""Tokens sampled among them (nearly free for token-local loop steps, which share every product)."""
CONTRACTION_ITERS = 20
"""Largest number of Jacobian-vector products per estimate (radius; the norm takes as many, twice)."""
CONTRACTION_TOL = 3e-3
"""Relative change of every token's estimate in one iteration below which the iteration stops."""
SEED = 0
"""Seed of the sampled tokens and start vectors: the same at every evaluation."""


def loops_to_look_inside(model_cfg) -> bool:
    """A model looping R > 1 times (not in fixed-point mode): a loop whose states can be compared with the final one."""
    return loops_r_times(model_cfg) and model_cfg.n_loops > 1


@register_measure("logit_lens", applies=loops_to_look_inside, when="eval")
def logit_lens(ctx: MeasureContext) -> list[dict]:
    """Per-loop logit lens per domain: loss, KL to the final distribution, top-1 agreement and settling by loop."""
    out = []
    for split in ctx.val_bins:
        per_batch = ctx.over_batches(split, LENS_BATCHES, lens_rows)
        rows = [{"loop": r + 1, **{k: float(np.mean([b[r][k] for b in per_batch])) for k in LENS_METRICS}}
                for r in range(len(per_batch[0]))]  # equal-sized batches: the means are token means
        out += [{"split": split, "x": row["loop"], "metric": m, "value": row[m]} for row in rows for m in LENS_METRICS]
        out.append({"split": split, "x": 0, "metric": "settle_loop", "value": mean_settle_loop(rows)})
    return out


@register_measure("loop_contraction", applies=loops_to_look_inside, when="eval")
def loop_contraction(ctx: MeasureContext) -> list[dict]:
    """Spectral radius and norm of the loop step's Jacobian dh_{r+1}/dh_r per loop and domain, and the gate's radius."""
    cfg = ctx.model_cfg
    token_local = cfg.core_attention == "anchor"  # the frozen anchor: no position reads another's state
    n_tokens = CONTRACTION_TOKENS if token_local else CONTRACTION_SEQUENCES
    metrics = CONTRACTION_METRICS if cfg.state_gate != "residual" else tuple(
        m for m in CONTRACTION_METRICS if m != "gate_radius")
    out = []
    for split in ctx.val_bins:
        x, _ = ctx.batches(split, 1)[0]
        # loop_contraction turns gradients on for itself (measures run under no_grad)
        rows = contraction_rows(ctx.model, x[:CONTRACTION_SEQUENCES], n_tokens=n_tokens, n_iter=CONTRACTION_ITERS,
                                tol=CONTRACTION_TOL, seed=SEED)
        out += [{"split": split, "x": row["loop"], "metric": m, "value": float(row[m])}
                for row in rows for m in metrics]
    return out
