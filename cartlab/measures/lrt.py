"""LRT's approximation probe: how far the interleaved training forward is from the exact recurrence.

An LRT model (Dense with `lrt_kv` / `lrt_residual`, `cartlab.model.memory`) trains with the
interleaved schedule at S = `memory_subsets`: position t reads a memory m_{t-1} refined only as
far as its subset's turn allows. At inference (cached decoding, the validation loss) it runs the
exact recurrence. `lrt_gap` measures the distance between the two on the trained model, once at
the end of training, on each validation domain's fixed evaluation batches, for S over a grid:
1, 2, 4, ... below the sequence length T, the trained S, and T (where the interleaved forward is
exact, so its row is the check that the probe measures nothing but the approximation).

Rows (split = the domain, x = S):
    loss         mean validation loss of the interleaved forward with S subsets (eval mode)
    loss_exact   the exact recurrence's loss on the same batches (the same at every S; with all
                 the evaluation batches it is the run's final validation loss)
    loss_gap     loss - loss_exact: > 0 when the interleaved forward predicts worse than the
                 recurrence the model is used with; 0 up to float error at S = T
    loss_abs_gap the mean over tokens of |per-token loss - exact per-token loss|: how far the two
                 forwards' predictions are apart, whichever way (the signed gap averages errors of
                 both signs and on a small model sits within noise of 0 at every S)
    source_dist  how far the memory itself is off: the relative RMS distance of the source
                 layer's states, sqrt(mean (m^S - m)^2) / sqrt(mean m^2) over batch, positions and
                 width (m^S the interleaved states, m the exact ones), averaged over batches; 0 at
                 S = T, and the first S positions of every S are exact

Cost: the exact recurrence runs position by position and every S is one interleaved forward
(about two plain forwards, plus S passes over T/S positions each), so the probe costs several
evaluations. Measured on the trained cpu-demo LRT (d=128, 4 layers, seq 128, 8 batches of 8 per
domain, 3 domains, one thread on a loaded 2-core machine): probe 95 s, one evaluation 14 s, the
200 training steps 320 s; on idle cores all three shrink alike (an evaluation is ~3 s). It runs
once per run, so by default it reads all the evaluation batches (`batches=None`), and its exact
loss is then the run's final validation loss; `batches=4` halves it.

Sweeps (`memory_sweeps`): the same rows for 2 sweeps and for the trained number of sweeps, at
every S below T, under the metric names with a suffix (`loss_gap_sweeps2`, ...); each extra
sweep costs about one more plain forward per S.

`lrt_bpb` (at every evaluation) reports what the LRT authors report, in bits per byte (the nats of
the scored tokens / ln 2 / their UTF-8 bytes, from the build's tokenizer): for the trained S and
sweeps, each pass of the interleaved forward on its own positions (x = pass index, 0 the
memory-free full pass: `bpb_pass`), the merged refined outputs (`bpb_merged`), the exact
recurrence (`bpb_sequential`, the validation loss's forward), their gap, and the sequential BPB by
position bucket [0, 1), [1, 2), [2, 4), ... (x = first position: `bpb_sequential_bucket`). It
reads 2 evaluation batches per domain by default (`batches`): the sequential forward costs about
one evaluation of those batches.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.nn.functional as F

from cartlab.measures import MeasureContext, register_measure
from cartlab.model.family import family_of
from cartlab.model.layers import KVCache
from cartlab.model.memory import trace

METRICS = ("loss", "loss_exact", "loss_gap", "loss_abs_gap", "source_dist")


def has_memory(model_cfg) -> bool:
    """Configs of a family with a recurrent memory (LRT, either hook)."""
    return family_of(model_cfg).memory


def subset_grid(T: int, trained: int) -> list[int]:
    """S = 1, 2, 4, ... below T, the trained S (when below T) and T itself, in order."""
    grid = {T} | {2 ** k for k in range(T.bit_length()) if 2 ** k < T}
    if trained < T:
        grid.add(trained)
    return sorted(grid)


def relative_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """sqrt(mean (a - b)^2) / sqrt(mean b^2): a's distance from the reference b, relative to b's scale."""
    a, b = a.float(), b.float()
    return ((a - b).pow(2).mean() / b.pow(2).mean().clamp_min(1e-30)).sqrt().item()


def abs_gap(logits: torch.Tensor, exact_logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean over the scored tokens (target != -1) of |per-token loss - exact per-token loss|."""
    def token_loss(z):
        return F.cross_entropy(z.float().flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="none")

    keep = targets.flatten() != -1
    return (token_loss(logits) - token_loss(exact_logits))[keep].abs().mean().item()


def sweep_grid(trained: int) -> list[int]:
    """The sweep counts beyond one that the probe measures: 2 and the trained `memory_sweeps`."""
    return sorted({2, trained} - {1})


@register_measure("lrt_gap", when="final", applies=has_memory)
def lrt_gap(ctx: MeasureContext, batches: int | None = None) -> list[dict]:
    """LRT's interleaved-vs-exact gap: loss and source-state distance against the subset count S and sweeps."""
    model, grid = ctx.model, subset_grid(ctx.cfg.seq_len, ctx.model_cfg.memory_subsets)
    runs = [(S, 1) for S in grid] + [(S, n) for n in sweep_grid(ctx.model_cfg.memory_sweep_count)
                                     for S in grid if S < ctx.cfg.seq_len]
    rows = []
    for split in ctx.val_bins:
        total, n = defaultdict(float), 0
        for x, y in ctx.batches(split, batches):
            with ctx.autocast():
                exact_logits, exact_loss, exact = trace(model, x, y)  # exact recurrence: (B, T, d) source states
                total["loss_exact"] += exact_loss.item()
                for S, sweeps in runs:
                    logits, loss, source = trace(model, x, y, S, sweeps)
                    total["loss", S, sweeps] += loss.item()
                    total["loss_abs_gap", S, sweeps] += abs_gap(logits, exact_logits, y)
                    total["source_dist", S, sweeps] += relative_rms(source, exact)
            n += 1
        exact_loss = total["loss_exact"] / n
        for S, sweeps in runs:
            loss = total["loss", S, sweeps] / n
            values = {"loss": loss, "loss_exact": exact_loss, "loss_gap": loss - exact_loss,
                      "loss_abs_gap": total["loss_abs_gap", S, sweeps] / n,
                      "source_dist": total["source_dist", S, sweeps] / n}
            rows += [{"split": split, "x": S, "metric": metric_name(m, sweeps), "value": values[m]} for m in METRICS
                     if sweeps == 1 or m != "loss_exact"]
    return rows


def metric_name(metric: str, sweeps: int) -> str:
    """'loss_gap' for one sweep, 'loss_gap_sweeps2' for two."""
    return metric if sweeps == 1 else f"{metric}_sweeps{sweeps}"


# -- bits per byte, the authors' way (LRT code: nanochat/loss_eval.py evaluate_bpb_sequential) ----------------------
BPB_METRICS = ("bpb_pass", "bpb_merged", "bpb_sequential", "bpb_gap", "bpb_sequential_bucket", "bytes_per_token")


def position_buckets(T: int) -> list[tuple[int, int]]:
    """[0, 1), [1, 2), [2, 4), [4, 8), ... up to T: the positions whose sequential loss is pooled."""
    edges = [0] + [2 ** k for k in range(T.bit_length()) if 2 ** k < T] + [T]
    return list(zip(edges, edges[1:]))


@register_measure("lrt_bpb", when="eval", applies=has_memory)
def lrt_bpb(ctx: MeasureContext, batches: int | None = 2) -> list[dict]:
    """LRT's bits per byte at each evaluation: per pass, merged (parallel) and sequential, by position bucket."""
    if ctx.token_bytes is None:  # no tokenizer, no bytes
        return []
    model, cfg = ctx.model, ctx.model_cfg
    S, sweeps = cfg.memory_subsets, cfg.memory_sweep_count
    table = ctx.token_bytes.to(ctx.device)
    buckets = position_buckets(ctx.cfg.seq_len)
    rows = []
    for split in ctx.val_bins:
        nats, nbytes, ntokens = defaultdict(float), defaultdict(float), defaultdict(int)

        def add(key, losses: torch.Tensor, targets: torch.Tensor) -> None:
            keep = targets != -1
            nats[key] += losses[keep].double().sum().item()
            nbytes[key] += table[targets[keep]].sum().item()
            ntokens[key] += int(keep.sum())

        for x, y in ctx.batches(split, batches):
            with ctx.autocast():
                emb = model.wte(x)
                run = model.memory.interleaved(model, emb, S, sweeps)
                for p, (pos, out) in enumerate(run.passes):
                    target = y if pos is None else y[:, pos]
                    add(("bpb_pass", p), token_losses(model.head(out, None)[0], target), target)
                add(("bpb_merged", S), token_losses(model.head(run.out, None)[0], y), y)
                exact = token_losses(model.head(model.memory.sequential(model, emb, KVCache())[0], None)[0], y)
                add(("bpb_sequential", S), exact, y)
                for lo, hi in buckets:
                    add(("bpb_sequential_bucket", lo), exact[:, lo:hi], y[:, lo:hi])
        bpb = {key: nats[key] / math.log(2) / max(nbytes[key], 1.0) for key in nats}
        bpb["bpb_gap", S] = bpb["bpb_merged", S] - bpb["bpb_sequential", S]
        rows += [{"split": split, "x": x, "metric": metric, "value": value} for (metric, x), value in bpb.items()]
        rows.append({"split": split, "x": 0, "metric": "bytes_per_token",
                     "value": nbytes["bpb_merged", S] / max(ntokens["bpb_merged", S], 1)})
    return rows


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy (B, T) in nats; 0 where the target is -1."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1,
                           reduction="none").view(targets.shape)
