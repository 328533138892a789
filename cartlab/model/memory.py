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

Position 0 has no m_{-1}: it gets no residual term and no slot, so it is computed exactly as in
Dense. Because the residual gain starts at zero, an untrained `lrt_residual` model equals its
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
  exact_reference  a slow loop with no cache at all: for each t the whole prefix is recomputed,
                 each position reading the memory found for it so far. O(T^2) work; for tests.

`trace` runs either fast schedule and also returns the source states m_t, for the probe that
measures how far the interleaved forward is from the exact recurrence (`cartlab.measures.lrt`).

Refusal: a cache filled by a model without memory.
"""
from __future__ import annotations

import time
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from cartlab.model.layers import (Block, KVCache, LayerKV, RMSNorm, SelfAttention, apply_rope, attend, merge_heads,
                                  split_heads)


# Duck-typed on purpose: `cfg` is an `LRTConfig` and `model` an `LRT` (`run`, `stack`, `layers`,
# `rope`, `memory`); this module imports neither, so the model's modules import it and not back.
STATE = "memory"
"""Key of m_{t-1} (B, 1, d) in `KVCache.states`."""


class Recall(NamedTuple):
    """What the positions of one pass read from the memory: the projected memory c_t of each
    projection (one tensor (B, T, d) if shared, one per injection layer if not) and which positions
    have a previous token ((T,) bool; None: all)."""

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


# -- the private slot in the layers ---------------------------------------------------------------------------
class PrivateKV(NamedTuple):
    """One extra key/value entry per query that only that query sees (the `lrt_kv` slot). The
    attention layer projects `source` (B, T, d) with its own K/V projection and rotates the key to
    the query's own position, so the slot's score does not depend on where the token sits.
    `present` (T,) bool marks the queries that have a slot (position 0 has no previous token);
    None means all of them."""

    source: torch.Tensor
    present: torch.Tensor | None = None


def attend_visible(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None,
                   slot: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None) -> torch.Tensor:
    """Attention with an explicit key mask and an optional private slot. q: (B, H, T, hd); k, v:
    (B, H, S, hd); `visible` (T, S) bool says which keys each query sees (None: the causal rule of
    `attend`); `slot` is (k_slot, v_slot, present) with k_slot, v_slot (B, H, T, hd): query t also
    sees key t of the slot when present[t] (all when present is None)."""
    T, S = q.size(-2), k.size(-2)
    if visible is None:
        visible = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    if slot is not None:
        k_slot, v_slot, present = slot
        own = torch.eye(T, dtype=torch.bool, device=q.device)
        if present is not None:
            own = own & present[:, None]
        k, v = torch.cat([k, k_slot], dim=-2), torch.cat([v, v_slot], dim=-2)  # (B, H, S + T, hd)
        visible = torch.cat([visible, own], dim=-1)  # (T, S + T)
    if T == 1 and bool(visible.all()):
        return attend(q, k, v, causal=False)  # one decoding query that sees everything: the fast path
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible)


class SlotAttention(SelfAttention):
    """A Dense layer's causal self-attention that also reads LRT's private slot (`lrt_kv`) and,
    during the interleaved schedule, the buffer's key mask (`BufferKV.visible`). Without either
    it is the plain causal attention, the same call as `SelfAttention`."""

    def forward(self, x: torch.Tensor, rope, cache: LayerKV | None = None,
                slot: PrivateKV | None = None) -> torch.Tensor:
        q = apply_rope(split_heads(self.q(x), self.n_heads), rope)  # (B, H, T, hd)
        k, v = self.keys_values(x, rope, cache)  # (B, H, S, hd)
        visible = cache.visible(q.size(-2), k.size(-2)) if isinstance(cache, BufferKV) else None
        if slot is None and visible is None:
            return self.proj(merge_heads(attend(q, k, v, causal=True)))
        return self.proj(merge_heads(attend_visible(q, k, v, visible, self.private_kv(slot, rope))))

    def private_kv(self, slot: PrivateKV | None, rope):
        """The slot's keys and values (B, H, T, hd) from this layer's own K/V projection, keys
        rotated to the query's position (relative offset 0), and its `present` mask."""
        if slot is None:
            return None
        k, v = self.kv(slot.source)
        return apply_rope(split_heads(k, self.n_heads), rope), split_heads(v, self.n_heads), slot.present


class SlotBlock(Block):
    """An LRT layer: the Dense pre-norm layer whose attention takes the private slot."""

    attention = SlotAttention

    def forward(self, x: torch.Tensor, rope, cache: LayerKV | None = None,
                slot: PrivateKV | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, cache, slot)
        return x + self.ffn(self.ffn_norm(x))


# -- the memory ------------------------------------------------------------------------------------------------
class LatentMemory(nn.Module):
    """LRT's memory (see the module docstring): the projection(s), the per-layer residual gains,
    the injection at the injection layers, and the three schedules."""

    def __init__(self, cfg):
        super().__init__()
        self.source = cfg.memory_source_layer
        self.layers = cfg.memory_injection_layers
        self.index = {layer: j for j, layer in enumerate(self.layers)}
        self.subsets = cfg.memory_subsets
        self.kv, self.residual = cfg.memory_kv, cfg.memory_residual
        self.d_model = cfg.d_model
        n_proj = 1 if cfg.memory_shared else len(self.layers)
        self.read = nn.ModuleList(MemoryProjection(cfg) for _ in range(n_proj))
        self.gain = nn.Parameter(torch.zeros(len(self.layers), cfg.d_model)) if self.residual else None
        self.last_cost: float | None = None  # wall time of the last interleaved forward / its init pass

    # -- what one pass reads ------------------------------------------------------------------------------
    def recall(self, m: torch.Tensor, present: torch.Tensor | None) -> Recall:
        """m (B, T, d): m_{t-1} for each position of a pass (zeros where there is none, as marked
        by `present`)."""
        return Recall([read(m) for read in self.read], present)

    def inject(self, i: int, x: torch.Tensor, recall: Recall | None):
        """Layer i's input x (B, T, d) with the residual term added, and its private slot (or None)."""
        j = self.index.get(i)
        if recall is None or j is None:
            return x, None
        c = recall.c[j % len(recall.c)]  # (B, T, d)
        if self.residual:
            x = x + self.gain[j] * c
        return x, (PrivateKV(c, recall.present) if self.kv else None)

    # -- schedules ---------------------------------------------------------------------------------------------
    def schedule(self, model: nn.Module, x: torch.Tensor, cache: KVCache | None, subsets: int | None) -> torch.Tensor:
        """Outputs (B, T, d) of the embedded tokens x: sequential with a cache; interleaved in
        training or when `subsets` is given; otherwise exact (sequential on a private cache, or
        interleaved with S = T when gradients are wanted: the same values, differentiable)."""
        if cache is not None:
            if subsets is not None:
                raise ValueError(f"subsets={subsets!r} is not allowed with a cache: cached calls run the exact "
                                 f"recurrence one position at a time")
            return self.sequential(model, x, cache)[0]
        if subsets is not None or self.training:
            return self.interleaved(model, x, self.subsets if subsets is None else subsets)[0]
        if torch.is_grad_enabled():
            return self.interleaved(model, x, x.size(1))[0]
        return self.sequential(model, x, KVCache())[0]

    # Both schedules return the outputs and the source layer's states m_t (B, T, d) each: the
    # model uses the outputs; the approximation probe (`trace`) compares the states.
    def sequential(self, model: nn.Module, x: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact recurrence, one position at a time on `cache` (which carries m_{t-1})."""
        outs, sources = [], []
        for j in range(x.size(1)):
            if cache.pos == 0:
                recall = None
            elif STATE in cache.states:
                recall = self.recall(cache.states[STATE], None)
            else:
                raise ValueError(f"this cache holds {cache.pos} positions but no LRT memory: it was filled by a "
                                 f"model without memory; start LRT decoding from a new KVCache()")
            out, source = model.run(x[:, j: j + 1], cache, recall)  # (B, 1, d) each
            cache.states[STATE] = source
            outs.append(out)
            sources.append(source)
        return torch.cat(outs, dim=1), torch.cat(sources, dim=1)

    def interleaved(self, model: nn.Module, x: torch.Tensor, subsets: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Interleaved parallel training (module docstring) with S = `subsets` (>= 1; S >= T is
        exact). Records the measured cost, wall time / init-pass wall time, in `last_cost`."""
        if isinstance(subsets, bool) or not isinstance(subsets, int) or subsets < 1:
            raise ValueError(f"subsets={subsets!r} is not allowed; it must be an integer >= 1")
        T = x.size(1)
        rope = model.rope(0, T, x.device)
        buffer = Buffer()
        start = time.perf_counter()
        out, source = model.stack(x, rope, buffer)  # initialisation pass, no memory: (B, T, d) each
        init = time.perf_counter() - start
        for k in range(min(subsets, T)):
            rows = torch.arange(k, T, subsets, device=x.device)  # (n,) positions of subset k
            present = rows > 0
            m = source[:, (rows - 1).clamp(min=0)] * present[:, None].to(source.dtype)  # m_{t-1}: (B, n, d)
            buffer.rows = rows
            out_k, source_k = model.stack(x[:, rows], (rope[0][rows], rope[1][rows]), buffer,
                                          self.recall(m, present))
            out = out.index_copy(1, rows, out_k)
            source = source.index_copy(1, rows, source_k)
        self.last_cost = (time.perf_counter() - start) / max(init, 1e-9)
        return out, source

    # -- accounting ----------------------------------------------------------------------------------------------
    def applications(self, layers: nn.ModuleList) -> list:
        """Per forward: the projection(s) once per token, and with `lrt_kv` each injection layer's
        K/V projection once more (on c_t)."""
        parts = [("memory", self, 1)]
        if self.kv:
            parts.append(("memory_kv", nn.ModuleList(layers[i].attn.kv for i in self.layers), 1))
        return parts

    def init_pass(self, layers: nn.ModuleList) -> list:
        """What the interleaved training forward runs besides one LRT forward: the memory-free
        initialisation pass of every layer."""
        return [("init_pass", layers, 1)]

    def extra_flops(self, T: int) -> float:
        """The private slots' scores and values: 4 T d per `lrt_kv` injection layer."""
        return 4.0 * T * self.d_model * len(self.layers) if self.kv else 0.0

    def diagnostics(self) -> dict:
        return {} if self.last_cost is None else {"lrt_forward_cost": self.last_cost}


class BufferKV(LayerKV):
    """One layer's keys and values (B, H, T, hd) at every position of a training sequence. While
    `owner.rows` is None a pass writes all positions; otherwise the pass computes the positions
    `rows` only, writes them (out of place, so autograd keeps every version) and each of its
    queries sees the keys at positions <= its own."""

    def __init__(self, owner: "Buffer"):
        super().__init__()
        self.owner = owner

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.owner.rows
        if rows is None:
            self.k, self.v = k, v
        else:
            self.k, self.v = self.k.index_copy(2, rows, k), self.v.index_copy(2, rows, v)
        self.length = self.k.size(2)
        return self.k, self.v

    def visible(self, T: int, S: int) -> torch.Tensor | None:
        """Which of the S keys each of the T new queries sees, (T, S) bool: None (the causal rule
        of `attend`) while a pass writes every position, else the keys at or before each query."""
        rows = self.owner.rows
        if rows is None:
            return None
        return rows[:, None] >= torch.arange(S, device=rows.device)[None, :]  # (T, S)


class Buffer(KVCache):
    """The interleaved schedule's buffer: a `BufferKV` per layer, and the positions being refined."""

    def __init__(self):
        super().__init__()
        self.sites = _Sites(self)
        self.rows: torch.Tensor | None = None


class _Sites(dict):
    def __init__(self, owner: Buffer):
        super().__init__()
        self.owner = owner

    def __missing__(self, site: str) -> BufferKV:
        self[site] = BufferKV(self.owner)
        return self[site]


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
        recall = model.memory.recall(torch.stack(memories, dim=1), present)
        out, source = model.stack(x[:, : t + 1], model.rope(0, t + 1, idx.device), None, recall)
        memories.append(source[:, t])
        logits.append(model.head(out[:, t: t + 1], None)[0])
    return torch.cat(logits, dim=1)


def trace(model: nn.Module, idx: torch.Tensor, targets: torch.Tensor | None = None, subsets: int | None = None):
    """One forward of an LRT model that also hands back the memory: the interleaved schedule with
    S = `subsets`, or for None the exact recurrence (sequential, as the eval forward runs it).
    Returns logits (B, T, V), the loss (None without targets) and the source layer's states m_t
    (B, T, d). The approximation probe (`cartlab.measures.lrt`) compares the two schedules with it."""
    require_memory(model, "trace")
    x = model.wte(idx)  # (B, T, d)
    if subsets is None:
        out, source = model.memory.sequential(model, x, KVCache())
    else:
        out, source = model.memory.interleaved(model, x, subsets)
    logits, loss = model.head(out, targets)
    return logits, loss, source


def require_memory(model: nn.Module, what: str) -> None:
    """Refuse a model without LRT's memory, naming the function `what` that needs it."""
    if not isinstance(getattr(model, "memory", None), LatentMemory):
        raise ValueError(f"{what} needs a model with the LRT memory (hooks lrt_kv / lrt_residual); this one has none")
