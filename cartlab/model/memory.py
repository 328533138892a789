"""The mechanics of LRT's recurrent memory (the model: `cartlab.model.lrt.LRT`, the Dense layers
with this memory).

The previous token's state at a high source layer s is fed back into the current token:

    m_{t-1} = h^s_{t-1}                      layer s's output at position t-1 (the memory)
    c_t     = W RMSNorm(m_{t-1})             memory projection: one W shared by every injection
                                             layer (memory_shared, the default) or one per layer
    at each injection layer i, on token t's input x_t:
      lrt_residual:  x_t <- x_t + g_i * c_t                     g_i (d,), zero at init
      lrt_kv:        t also attends to one extra entry (K_i c_t, V_i c_t): layer i's own key/value
                     projection of c_t, key rotated to t's position, seen by t only (`PrivateKV`,
                     read by `SlotAttention`)

The published recipe (`lrt_paper`, the authors' code) reads the memory differently at three
points, each a field: c_t = the model's own final norm of m_{t-1} (`memory_read: norm`; with the
last layer as source this is the h_final the LM head reads), every layer injects, the residual
scale is one scalar per layer starting at 0.1 (`memory_gamma`), and instead of a slot each layer
mixes per-layer K/V projections of c_t into its own keys and values through a learned per-head
gate (`memory_kv_feedback`; `cartlab.model.memory_attention`).

Position 0 has no m_{-1}: it gets no residual term and no slot, so it is computed exactly as in
Dense (the feedback gate still scales its own keys and values). Because the residual gain starts at zero, an untrained `lrt_residual` model equals its
Dense backbone (same weights, same logits); an `lrt_kv` slot takes attention mass from the start.

Parameters (d = d_model, n = injection layers): shared d^2 + d, unshared n (d^2 + d), plus n d
gains with `lrt_residual`. `lrt_kv` adds no weights (it re-applies each layer's K/V projection).

Three ways to run the same recurrence over a sequence (`LatentMemory.schedule` picks one):

  sequential     positions one at a time through a KVCache that also carries m_{t-1}
                 (`cache.states["memory"]`). Exact. Used for cached decoding (one new token is one
                 step, no extra forward pass), for prompts of several tokens (prefill: T steps of
                 one token, the price of a recurrence across positions), and for the eval-mode
                 forward without a cache (lm-eval, validation loss).
  interleaved    training (train-mode forward). One full-sequence initialisation pass without
                 memory fills a buffer (`Buffer`) of every layer's keys/values and the source
                 states; then the positions {t : t % S == k} for k = 0..S-1 are refined in turn:
                 each subset runs through all layers reading m_{t-1} from the buffer, attends to
                 the buffer's keys/values of the other positions and its own fresh ones, and
                 writes its keys/values and source states back. Every token is supervised from its
                 refined state. The S refinements together cost about one full pass, so the
                 forward costs about 2 plain forwards whatever S (the LRT summary's "roughly 2x").
                 S = 1 is one refinement on init-pass memories; S >= T is the exact recurrence
                 (subset k = {k} reads the exact m_{k-1} and exact keys of positions < k).
                 Gradients flow through the buffer (nothing is detached): the source layers learn
                 what to store, and the backward pass costs 2x a plain backward, so a training
                 step costs about 2x Dense's (accounting: `LRT.train_applications`).
                 `memory_sweeps` = n runs the sweep over the S subsets n times, each reading the
                 memories the last wrote (n sweeps make the first n S positions exact; each costs
                 about one more pass). `memory_loss: all_passes` (the published recipe) averages
                 the losses of every pass, the memory-free one included, instead of supervising
                 each token from its refined state; `memory_kv_refresh` re-mixes, before each
                 pass, the buffered keys and values of positions no pass has written yet with the
                 latest memory's gated feedback.
  exact_reference  a slow loop with no cache at all: for each t the whole prefix is recomputed,
                 each position reading the memory found for it so far. O(T^2) work; for tests.

`trace` runs either fast schedule and also returns the source states m_t, for the probe that
measures how far the interleaved forward is from the exact recurrence (`cartlab.measures.lrt`).

Left padding (an `attention_mask` (B, T), 1 for real tokens, 0 for pads before them): each row's
real tokens run as they would unpadded. Rotary positions and the key mask come from
`CausalLM.positions` (per step for the sequential schedule, which keeps the mask in the cache), and
a position reads the memory only where the position before it is a real token: a row's first
real token gets no residual term, no slot (hidden, not zeroed) and zero feedback, as position 0.
The sequential schedule takes a mask, and so does the interleaved one while it is exact (S >= T:
the eval forward with gradients); the approximate interleaved schedule (S < T, training) refuses
one, since its subsets t % S would split a padded row differently from the unpadded one.

Refusals: a cache filled by a model without memory; a padding mask with S < T.
"""
from __future__ import annotations

import time
from typing import NamedTuple

import torch
import torch.nn as nn

from cartlab.model.layers import KVCache, PaddedRope, RMSNorm, check_mask, padding
from cartlab.model.memory_attention import (Buffer, BufferKV, KVFeedback, LayerRead, PrivateKV, SlotAttention,
                                            SlotBlock, attend_visible)

__all__ = ["Recall", "MemoryProjection", "LatentMemory", "Interleaved", "exact_reference", "trace", "require_memory",
           "Buffer", "BufferKV", "KVFeedback", "LayerRead", "PrivateKV", "SlotAttention", "SlotBlock", "attend_visible"]

# Duck-typed on purpose: `cfg` is an `LRTConfig` and `model` an `LRT` (`run`, `stack`, `layers`,
# `rope`, `memory`); this module imports neither, so the model's modules import it and not back.
STATE = "memory"
"""Key of m_{t-1} (B, 1, d) in `KVCache.states`."""


class Recall(NamedTuple):
    """What the positions of one pass read from the memory: the projected memory c_t of each
    projection (one tensor (B, T, d) if shared, one per injection layer if not) and which positions
    have a previous token ((T,) bool, or (B, T) per row under padding; None: all)."""

    c: list[torch.Tensor]
    present: torch.Tensor | None


class MemoryProjection(nn.Module):
    """c = W RMSNorm(m): the source state is a residual stream whose scale grows with depth, so it
    is normalised before the (d, d) projection."""

    def __init__(self, cfg):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        nn.init.normal_(self.proj.weight, 0.0, cfg.init_std)

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(m))  # (B, T, d)


# -- the memory ------------------------------------------------------------------------------------------------
class Interleaved(NamedTuple):
    """What the interleaved schedule returns: the refined outputs and source states m_t (B, T, d)
    each, and every pass as (positions it computed, (n,) or None for all; its outputs (B, n, d)),
    the full pass first (for the all-passes loss)."""

    out: torch.Tensor
    source: torch.Tensor
    passes: list[tuple[torch.Tensor | None, torch.Tensor]]


class LatentMemory(nn.Module):
    """LRT's memory (see the module docstring): the projection(s), the per-layer residual gains,
    the gated K/V feedback, the injection at the injection layers, and the three schedules."""

    def __init__(self, cfg):
        super().__init__()
        self.source = cfg.memory_source_layer
        self.layers = cfg.memory_injection_layers
        self.index = {layer: j for j, layer in enumerate(self.layers)}
        self.subsets, self.sweeps = cfg.memory_subsets, cfg.memory_sweep_count
        self.kv, self.residual = cfg.memory_kv, cfg.memory_residual
        self.loss, self.refresh = cfg.memory_loss_rule, cfg.memory_kv_refresh
        self.d_model = cfg.d_model
        n_proj = 0 if cfg.memory_read_rule == "norm" else 1 if cfg.memory_shared else len(self.layers)
        self.read = nn.ModuleList(MemoryProjection(cfg) for _ in range(n_proj))
        gamma = cfg.memory_gamma
        self.gain = nn.Parameter(torch.full((len(self.layers), cfg.d_model if gamma is None else 1),
                                            0.0 if gamma is None else gamma)) if self.residual else None
        self.feedback = (nn.ModuleList(KVFeedback(cfg) for _ in self.layers) if cfg.memory_kv_feedback else None)
        self.last_cost: float | None = None  # wall time of the last interleaved forward / its init pass

    # -- what one pass reads ------------------------------------------------------------------------------
    def recall(self, model: nn.Module, m: torch.Tensor, present: torch.Tensor | None) -> Recall:
        """m (B, T, d): m_{t-1} for each position of a pass (zeros where there is none, as marked
        by `present`). With `memory_read: norm` the memory is read through the model's final norm
        (the published recipe's h_final when the source is the last layer)."""
        return Recall([read(m) for read in self.read] if self.read else [model.norm(m)], present)

    def inject(self, i: int, x: torch.Tensor, recall: Recall | None):
        """Layer i's input x (B, T, d) with the residual term added, and what its attention reads
        (`LayerRead`, or None)."""
        j = self.index.get(i)
        if j is None:
            return x, None
        feedback = None if self.feedback is None else self.feedback[j]
        if recall is None:  # no memory: the feedback gate still mixes the layer's own keys and values
            return x, (None if feedback is None else LayerRead(feedback=feedback))
        c = recall.c[j % len(recall.c)]  # (B, T, d)
        if self.residual:
            x = x + self.gain[j] * c
        if not self.kv and feedback is None:
            return x, None
        return x, LayerRead(PrivateKV(c, recall.present) if self.kv else None, feedback, c)

    # -- schedules ---------------------------------------------------------------------------------------------
    def schedule(self, model: nn.Module, x: torch.Tensor, cache: KVCache | None, subsets: int | None,
                 sweeps: int | None = None, attention_mask: torch.Tensor | None = None):
        """Outputs (B, T, d) of the embedded tokens x and, for the training forward, its passes
        (else None): sequential with a cache; interleaved in training or when `subsets` or
        `sweeps` is given; otherwise exact (sequential on a private cache, or interleaved with
        S = T when gradients are wanted: the same values, differentiable). `attention_mask`
        (B, T) marks left padding (module docstring)."""
        if cache is not None:
            if subsets is not None or sweeps is not None:
                raise ValueError(f"subsets={subsets!r}, sweeps={sweeps!r} is not allowed with a cache: cached calls "
                                 f"run the exact recurrence one position at a time")
            return self.sequential(model, x, cache, attention_mask)[0], None
        if subsets is not None or sweeps is not None or self.training:
            run = self.interleaved(model, x, self.subsets if subsets is None else subsets,
                                   self.sweeps if sweeps is None else sweeps, attention_mask)
            return run.out, (run.passes if self.training else None)
        if torch.is_grad_enabled():
            return self.interleaved(model, x, x.size(1), 1, attention_mask).out, None
        return self.sequential(model, x, KVCache(), attention_mask)[0], None

    # Both schedules return the outputs and the source layer's states m_t (B, T, d) each: the
    # model uses the outputs; the approximation probe (`trace`) compares the states.
    def sequential(self, model: nn.Module, x: torch.Tensor, cache: KVCache,
                   attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact recurrence, one position at a time on `cache` (which carries m_{t-1} and,
        once padded, the key mask)."""
        check_mask(attention_mask, *x.shape[:2])
        outs, sources = [], []
        for j in range(x.size(1)):
            step = None if attention_mask is None else attention_mask[:, j: j + 1]  # (B, 1)
            out, source = model.run(x[:, j: j + 1], cache, self.previous(model, cache), step)  # (B, 1, d) each
            cache.states[STATE] = source
            outs.append(out)
            sources.append(source)
        return torch.cat(outs, dim=1), torch.cat(sources, dim=1)

    def previous(self, model: nn.Module, cache: KVCache) -> Recall | None:
        """What the next position on `cache` reads: m_{t-1}, none at position 0 and, under padding,
        none in the rows whose previous position is a pad (`present` (B, 1))."""
        if cache.pos == 0:
            return None
        if STATE not in cache.states:
            raise ValueError(f"this cache holds {cache.pos} positions but no LRT memory: it was filled by a "
                             f"model without memory; start LRT decoding from a new KVCache()")
        m, keys = cache.states[STATE], cache.states.get("keys")  # (B, 1, d), (B, pos) bool or None
        if keys is None:
            return self.recall(model, m, None)
        present = keys[:, -1:]  # (B, 1)
        return self.recall(model, m * present[..., None].to(m.dtype), present)

    def interleaved(self, model: nn.Module, x: torch.Tensor, subsets: int, sweeps: int = 1,
                    attention_mask: torch.Tensor | None = None) -> Interleaved:
        """Interleaved parallel training (module docstring) with S = `subsets` (>= 1; S >= T is
        exact), the sweep over the S subsets run `sweeps` times, each reading the memories the
        last one wrote; `attention_mask` (B, T) for left padding, with S >= T only. Records the
        measured cost, wall time / init-pass wall time, in `last_cost`."""
        for name, value in (("subsets", subsets), ("sweeps", sweeps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is not allowed; it must be an integer >= 1")
        T = x.size(1)
        if attention_mask is not None and subsets < T:
            raise ValueError(f"attention_mask is not allowed with subsets={subsets} < T={T}: the approximate "
                             f"interleaved schedule (training) splits padded rows differently; use subsets >= T, "
                             f"the eval forward or a cache")
        rope = model.positions(x, None, attention_mask)
        keys = padding(rope)  # (B, T) bool, or None unpadded
        buffer = Buffer(T, refreshing=self.refresh)
        start = time.perf_counter()
        out, source = model.stack(x, rope, buffer)  # initialisation pass, no memory: (B, T, d) each
        init = time.perf_counter() - start
        passes = [(None, out)]
        count = min(subsets, T)
        # the latest outputs and source states of each subset k, positions k, k + S, ...: (B, n_k, d)
        outs = [out[:, k::subsets] for k in range(count)]
        sources = [source[:, k::subsets] for k in range(count)]
        stale = torch.ones(T, dtype=torch.bool, device=x.device)  # positions no pass has written yet
        for k in [k for _ in range(sweeps) for k in range(count)]:
            if self.refresh and bool(stale.any()):  # the published recipe's K/V refresh, before each pass
                self.refresh_buffer(model, buffer, merge(source, sources, subsets), stale, rope)
            rows = torch.arange(k, T, subsets, device=x.device)  # (n,) positions of subset k
            before = (rows - 1).clamp(min=0)
            present = rows > 0 if keys is None else (rows > 0) & keys[:, before]  # (n,), or (B, n) padded
            m = previous_states(sources, k, rows.numel()) * present[..., None].to(source.dtype)  # m_{t-1}: (B, n, d)
            buffer.refine(rows)
            outs[k], sources[k] = model.stack(x[:, rows], rope_at(rope, rows), buffer, self.recall(model, m, present))
            stale = stale.index_fill(0, rows, False)
            passes.append((rows, outs[k]))
        self.last_cost = (time.perf_counter() - start) / max(init, 1e-9)
        return Interleaved(merge(out, outs, subsets), merge(source, sources, subsets), passes)

    def refresh_buffer(self, model: nn.Module, buffer: Buffer, source: torch.Tensor, stale: torch.Tensor,
                       rope) -> None:
        """Re-mix the buffer's keys and values at the `stale` positions (T,) bool with the gated
        feedback of the latest memory m_{t-1} = source[t-1] (`BufferKV.refresh`)."""
        buffer.refine(None)
        m = torch.cat([torch.zeros_like(source[:, :1]), source[:, :-1]], dim=1)  # m_{t-1}: (B, T, d)
        recall = self.recall(model, m, torch.arange(m.size(1), device=m.device) > 0)
        for i, j in self.index.items():
            fb = self.feedback[j]
            buffer[f"layer.{i}"].refresh(fb.feedback(recall.c[j % len(recall.c)]), stale, rope, fb.n_heads)

    def pass_outputs(self, model: nn.Module, passes: list, targets: torch.Tensor):
        """The published recipe's loss (`memory_loss: all_passes`): the plain mean of the passes'
        losses, the full memory-free pass included, each averaged over its own positions; and the
        refined logits (B, T, V), gathered from the last sweep's passes (the LM head runs once
        per pass, not once more on the merged outputs)."""
        logits, losses = [], []
        for rows, out in passes:
            logits_p, loss_p = model.head(out, targets if rows is None else targets[:, rows])
            logits.append(logits_p)
            losses.append(loss_p)
        refined = logits[0].new_empty(*targets.shape, logits[0].size(-1))  # (B, T, V)
        covered = torch.zeros(targets.size(1), dtype=torch.bool, device=targets.device)
        for (rows, _), logits_p in zip(reversed(passes), reversed(logits)):  # the last sweep's passes
            if bool(covered.all()):
                break
            refined[:, rows] = logits_p
            covered[rows] = True
        return refined, torch.stack(losses).mean()

    # -- accounting ----------------------------------------------------------------------------------------------
    def applications(self, layers: nn.ModuleList) -> list:
        """Per forward: the projection(s) and feedback once per token, and with `lrt_kv` each
        injection layer's K/V projection once more (on c_t)."""
        parts = [("memory", self, 1)]
        if self.kv:
            parts.append(("memory_kv", nn.ModuleList(layers[i].attn.kv for i in self.layers), 1))
        return parts

    def train_passes(self, model: nn.Module) -> list:
        """What the interleaved training forward runs besides one LRT forward: the memory-free
        initialisation pass of every layer (with the feedback gates), `memory_sweeps - 1` more
        sweeps, the K/V refreshes (one per pass of the first sweep, over every position), and for
        the all-passes loss the LM head on every pass (the full pass's head, and one per extra
        sweep, beyond the one head per token every model runs)."""
        parts = [("init_pass", model.layers, 1)]
        if self.feedback is not None:
            parts.append(("init_pass_gates", nn.ModuleList(f.gate for f in self.feedback), 1))
        if self.sweeps > 1:
            parts += [("sweeps", model.layers, self.sweeps - 1)]
            parts += [(f"sweeps_{name}", part, k * (self.sweeps - 1)) for name, part, k in self.applications(model.layers)]
        if self.refresh:
            parts.append(("refresh", nn.ModuleList(f.proj for f in self.feedback), self.subsets))
        if self.loss == "all_passes":
            parts.append(("pass_heads", model.lm_head, self.sweeps))  # the full pass's, and one per extra sweep
        return parts

    def extra_flops(self, T: int) -> float:
        """The private slots' scores and values: 4 T d per `lrt_kv` injection layer."""
        return 4.0 * T * self.d_model * len(self.layers) if self.kv else 0.0

    def diagnostics(self) -> dict:
        return {} if self.last_cost is None else {"lrt_forward_cost": self.last_cost}


def previous_states(sources: list[torch.Tensor], k: int, n: int) -> torch.Tensor:
    """The source states at the positions before subset k's n positions, (B, n, d), from the latest
    states of each subset (`sources`, subset j at positions j, j + S, ...): position k + i S - 1 is
    i-th of subset k - 1, or for k = 0 the (i - 1)-th of the last subset. Position 0 has none; it
    reads position 0's state, which its `present` mask zeroes."""
    if k > 0:
        return sources[k - 1][:, :n]
    return torch.cat([sources[0][:, :1], sources[-1][:, : n - 1]], dim=1)


def merge(full: torch.Tensor, parts: list[torch.Tensor], subsets: int) -> torch.Tensor:
    """The per-subset tensors `parts` (subset k (B, n_k, d) at positions k, k + S, ...) written over
    the initialisation pass's `full` (B, T, d), in position order. Written over it, not gathered,
    so that the initialisation pass's outputs stay in the graph: FSDP2 gathers a layer's
    parameters for the backward of each of its calls when that call's output gets a gradient."""
    T = full.size(1)
    rows = torch.cat([torch.arange(k, T, subsets, device=full.device) for k in range(len(parts))])
    return full.index_copy(1, rows, torch.cat(parts, dim=1))


def rope_at(rope, rows: torch.Tensor):
    """The rotary angles of the positions `rows` (n,) of a full-sequence `rope`: a plain (cos,
    sin) pair (T, hd/2) each, or a `PaddedRope` ((B, 1, T, hd/2), its key mask kept whole)."""
    if isinstance(rope, PaddedRope):
        return PaddedRope(rope.cos[:, :, rows], rope.sin[:, :, rows], rope.keys)
    return rope[0][rows], rope[1][rows]


def exact_reference(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) of the exact recurrence computed the slow way, with no cache: for each t
    the prefix 0..t runs through the layers in one pass in which position j reads m_{j-1} as found
    when j was the newest position; m_t and the logits at t are read off that pass. O(T^2) work.
    Differentiable (nothing is written in place): wrap it in `torch.no_grad()` for values only."""
    require_memory(model, "exact_reference")
    B, T = idx.shape
    x = model.wte(idx)  # (B, T, d)
    memories = [torch.zeros_like(x[:, 0])]  # memories[t] = m_{t-1}: (B, d)
    logits = []
    for t in range(T):
        present = torch.arange(t + 1, device=idx.device) > 0
        recall = model.memory.recall(model, torch.stack(memories, dim=1), present)
        out, source = model.stack(x[:, : t + 1], model.rope(0, t + 1, idx.device), None, recall)
        memories.append(source[:, t])
        logits.append(model.head(out[:, t: t + 1], None)[0])
    return torch.cat(logits, dim=1)


def trace(model: nn.Module, idx: torch.Tensor, targets: torch.Tensor | None = None, subsets: int | None = None,
          sweeps: int = 1):
    """One forward of an LRT model that also hands back the memory: the interleaved schedule with
    S = `subsets` and `sweeps` sweeps, or for subsets None the exact recurrence (sequential, as the
    eval forward runs it). Returns logits (B, T, V), the loss (None without targets) and the source
    layer's states m_t (B, T, d). The approximation probe (`cartlab.measures.lrt`) compares the two
    schedules with it."""
    require_memory(model, "trace")
    x = model.wte(idx)  # (B, T, d)
    if subsets is None:
        out, source = model.memory.sequential(model, x, KVCache())
    else:
        out, source, _ = model.memory.interleaved(model, x, subsets, sweeps)
    logits, loss = model.head(out, targets)
    return logits, loss, source


def require_memory(model: nn.Module, what: str) -> None:
    """Refuse a model without LRT's memory, naming the function `what` that needs it."""
    if not isinstance(getattr(model, "memory", None), LatentMemory):
        raise ValueError(f"{what} needs a model with the LRT memory (hooks lrt_kv / lrt_residual); this one has none")
