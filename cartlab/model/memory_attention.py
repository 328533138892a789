"""The attention side of LRT's memory (`cartlab.model.memory`): what an injection layer's
self-attention reads of the memory, and the interleaved schedule's key/value buffer.

Two ways the memory c_t (the projected or normed m_{t-1}) reaches a layer's keys and values:

  private slot (`lrt_kv`, ours)       token t also attends to one extra entry (K c_t, V c_t) made
                                       by the layer's own K/V projection, seen by t only
  gated feedback (`lrt_paper`, the    per-layer projections k_fb = W_k c_t, v_fb = W_v c_t are
  published recipe; LRT code,          mixed into the layer's own keys and values before the
  nanochat/gpt.py)                     rotary embedding, by a learned gate per head:
                                          k_t <- g_local k_t + g_fb k_fb,  v_t <- g_local v_t + g_fb v_fb
                                       (g_local, g_fb) = 2 sigmoid(W_g x_t[:32]), W_g zero at init
                                       (both gates 1); applied at every position, also where
                                       there is no memory (the full pass, position 0: k_fb = 0)

Keys and values of every position then go where a plain layer's go (the cache, or the buffer).
Under left padding every mask also hides the pad keys (`hide_padding`), and a row whose previous
position is a pad has no slot (`PrivateKV.present` per row).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from cartlab.model.layers import (Block, KVCache, LayerKV, SelfAttention, apply_rope, attend, merge_heads, padding,
                                  split_heads)

GATE_CHANNELS = 32
"""Input channels of the feedback gate (the first 32 of the attention's input, as the authors' code)."""


class PrivateKV(NamedTuple):
    """One extra key/value entry per query that only that query sees (the `lrt_kv` slot). The
    attention layer projects `source` (B, T, d) with its own K/V projection and rotates the key to
    the query's own position, so the slot's score does not depend on where the token sits.
    `present` bool marks the queries that have a slot: (T,), or per row (B, T) under left padding,
    where a row's first real token has no previous token either; None means all of them."""

    source: torch.Tensor
    present: torch.Tensor | None = None


class KVFeedback(nn.Module):
    """The published recipe's gated K/V feedback at one layer (module docstring): the projection
    c -> (k_fb, v_fb) and the gate, both owned by the memory, applied inside the attention."""

    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.channels = cfg.n_heads, min(GATE_CHANNELS, cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, 2 * cfg.d_model, bias=False)
        nn.init.normal_(self.proj.weight, 0.0, cfg.init_std)
        self.gate = nn.Linear(self.channels, 2 * cfg.n_heads, bias=False)
        nn.init.zeros_(self.gate.weight)

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """g_local, g_fb (B, T, H, 1) each: one value per head."""
        g = 2 * torch.sigmoid(self.gate(x[..., : self.channels]))  # (B, T, 2H)
        return g.unsqueeze(-1).chunk(2, dim=-2)

    def feedback(self, c: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """k_fb, v_fb (B, T, d) each, or None for zero feedback."""
        return None if c is None else self.proj(c).chunk(2, dim=-1)


def per_head(g: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """t (B, T, d) with each head's channels scaled by its gate g (B, T, H, 1)."""
    return (g * t.unflatten(-1, (g.size(-2), -1))).flatten(-2)


class LayerRead(NamedTuple):
    """What one injection layer's attention reads of the memory: the private slot (`lrt_kv`) and
    the gated feedback (`lrt_paper`), each None when off; `c` (B, T, d) is the feedback's memory
    (None: zero feedback)."""

    private: PrivateKV | None = None
    feedback: KVFeedback | None = None
    c: torch.Tensor | None = None


def attend_visible(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None,
                   slot: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None,
                   keys: torch.Tensor | None = None) -> torch.Tensor:
    """Attention with an explicit key mask and an optional private slot. q: (B, H, T, hd); k, v:
    (B, H, S, hd); `visible` (T, S) bool says which keys each query sees (None: the causal rule of
    `attend`); `slot` is (k_slot, v_slot, present) with k_slot, v_slot (B, H, T, hd): query t also
    sees key t of the slot when present[t] ((T,) or per row (B, T); all when present is None);
    `keys` (B, S) bool, if given, hides the padding (`hide_padding`)."""
    T, S = q.size(-2), k.size(-2)
    if T == 1 and visible is None and keys is None and (slot is None or slot[2] is None):  # one decoding query
        if slot is not None:  # sees every key and its own slot: no mask to build
            k, v = torch.cat([k, slot[0]], dim=-2), torch.cat([v, slot[1]], dim=-2)
        return attend(q, k, v, causal=False)
    visible = visible_keys(visible, T, S, slot is not None, None if slot is None else slot[2], keys, q.size(0),
                           q.device)
    if slot is not None:
        k, v = torch.cat([k, slot[0]], dim=-2), torch.cat([v, slot[1]], dim=-2)  # (B, H, S + T, hd)
    if T == 1 and bool(visible.all()):
        return attend(q, k, v, causal=False)  # one decoding query that sees everything: the fast path
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible)


def visible_keys(visible: torch.Tensor | None, T: int, S: int, slot: bool, present: torch.Tensor | None,
                 keys: torch.Tensor | None, batch: int, device) -> torch.Tensor:
    """The bool key mask of `attend_visible`: (T, S), with the slot's T columns after the S keys
    (T, S + T) when `slot`, or per row (B, 1, T, S [+ T]) under padding (`keys` (B, S)) or a per-row
    `present` (B, T)."""
    if visible is None:
        visible = torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)
    if keys is not None:
        visible = hide_padding(visible, keys)  # (B, 1, T, S)
    if not slot:
        return visible
    own = torch.eye(T, dtype=torch.bool, device=device)
    if present is not None:
        own = own & present[..., None]  # (T, T), or (B, T, T) per row
    if own.dim() == 3 or visible.dim() == 4:  # per-row masks: (B, 1, T, .)
        shape = (batch, 1, T)
        own = (own.unsqueeze(1) if own.dim() == 3 else own).expand(*shape, T)
        visible = visible.expand(*shape, S)
    return torch.cat([visible, own], dim=-1)  # (..., T, S + T)


def hide_padding(visible: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The key mask `visible` (T, S), in which each query sees a prefix of the keys ending at its
    own, restricted to the real keys `keys` (B, S): (B, 1, T, S). A query keeps its own key, so a
    pad's softmax has a finite entry (as `layers.visible`; a pad's output is never read)."""
    after = torch.cat([visible[:, 1:], torch.zeros_like(visible[:, :1])], dim=1)
    own = visible & ~after  # (T, S): the last key each query sees, its own
    return (visible & keys[:, None, None, :]) | own


class SlotAttention(SelfAttention):
    """A Dense layer's causal self-attention that also reads LRT's memory (`LayerRead`: the
    private slot, the gated feedback) and, during the interleaved schedule, the buffer
    (`BufferKV.write`). Without any of them it is the plain causal attention, the same call as
    `SelfAttention`."""

    def forward(self, x: torch.Tensor, rope, cache: LayerKV | None = None,
                read: LayerRead | None = None) -> torch.Tensor:
        private, feedback, c = read if read is not None else (None, None, None)
        buffer = cache if isinstance(cache, BufferKV) else None
        cache = None if buffer is not None else cache  # a decoding cache takes the new keys; the buffer below
        q = apply_rope(split_heads(self.q(x), self.n_heads), rope)  # (B, H, T, hd)
        if feedback is None:
            k, v = self.keys_values(x, rope, cache)  # (B, H, S, hd)
        else:
            k, v = self.mixed_keys_values(x, rope, cache, feedback, c, buffer)
        slot = self.private_kv(private, rope)
        if buffer is not None:  # the interleaved schedule: every key of the sequence, this pass's written in
            k, v = buffer.write(k, v, slot)  # (B, H, T [+ n], hd) each
            return self.proj(merge_heads(buffer.owner.attend(q, k, v, slot, padding(rope))))
        if slot is not None:
            return self.proj(merge_heads(attend_visible(q, k, v, None, slot, padding(rope))))
        return self.proj(merge_heads(attend(q, k, v, causal=True, keys=padding(rope))))

    def mixed_keys_values(self, x: torch.Tensor, rope, cache: LayerKV | None, feedback: KVFeedback,
                          c: torch.Tensor | None, buffer: "BufferKV | None" = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """The gated feedback mix (module docstring), then rotary and the cache as usual. A buffer
        that refreshes keeps the mix's parts (`BufferKV.keep`)."""
        k, v = self.kv(x)  # (B, T, d) each
        g_local, g_fb = feedback.gates(x)  # (B, T, H, 1) each
        k, v = per_head(g_local, k), per_head(g_local, v)
        if buffer is not None:
            buffer.keep(k, v, g_fb)
        fb = feedback.feedback(c)
        if fb is not None:
            k, v = k + per_head(g_fb, fb[0]), v + per_head(g_fb, fb[1])
        k = apply_rope(split_heads(k, self.n_heads), rope)
        v = split_heads(v, self.n_heads)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, H, S, hd)
        return k, v

    def private_kv(self, slot: PrivateKV | None, rope):
        """The slot's keys and values (B, H, T, hd) from this layer's own K/V projection, keys
        rotated to the query's position (relative offset 0), and its `present` mask."""
        if slot is None:
            return None
        k, v = self.kv(slot.source)
        return apply_rope(split_heads(k, self.n_heads), rope), split_heads(v, self.n_heads), slot.present


class SlotBlock(Block):
    """An LRT layer: the Dense pre-norm layer whose attention reads the memory."""

    attention = SlotAttention

    def forward(self, x: torch.Tensor, rope, cache: LayerKV | None = None,
                read: LayerRead | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, cache, read)
        return x + self.ffn(self.ffn_norm(x))


# -- the interleaved schedule's buffer -------------------------------------------------------------------------
class BufferKV(LayerKV):
    """One layer's keys and values (B, H, T, hd) at every position of a training sequence, followed,
    at a layer with private slots, by the slots of the pass being refined (B, H, T + n, hd). The
    initialisation pass (`owner.rows` None) stores its keys; each refinement pass writes its
    positions and its slots with one out-of-place `index_copy` per tensor (autograd keeps every
    version) and its queries read the whole buffer under the pass's key mask (`Buffer.attend`)."""

    def __init__(self, owner: "Buffer"):
        super().__init__()
        self.owner = owner
        self.parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def write(self, k: torch.Tensor, v: torch.Tensor,
              slot: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this pass's keys and values k, v (B, H, n, hd) at its positions, and its private
        slots (k_slot, v_slot (B, H, n, hd), present), if any, after the T positions. Returns the
        keys and values the pass attends to, (B, H, T [+ n], hd) each (`Buffer.attend`)."""
        owner = self.owner
        if owner.rows is None:  # the initialisation pass: every position
            self.k, self.v = k, v
        elif slot is None:
            self.k, self.v = self.k.index_copy(2, owner.rows, k), self.v.index_copy(2, owner.rows, v)
        elif self.k.size(2) == owner.length + slot[0].size(2):  # room for this pass's slots: one write each
            self.k = self.k.index_copy(2, owner.slots, torch.cat([k, slot[0]], dim=2))
            self.v = self.v.index_copy(2, owner.slots, torch.cat([v, slot[1]], dim=2))
        else:  # make the room (the first pass with slots, or one with fewer positions than the last)
            T = owner.length
            self.k = torch.cat([self.k[:, :, :T].index_copy(2, owner.rows, k), slot[0]], dim=2)
            self.v = torch.cat([self.v[:, :, :T].index_copy(2, owner.rows, v), slot[1]], dim=2)
        return self.k, self.v

    def keep(self, k: torch.Tensor, v: torch.Tensor, g_fb: torch.Tensor) -> None:
        """Keep the full pass's gated local keys and values g_local k, g_local v (B, T, d) and the
        feedback gate g_fb (B, T, H, 1), when the buffer refreshes (`Buffer.refreshing`)."""
        if self.owner.refreshing and self.owner.rows is None:
            self.parts = (k, v, g_fb)

    def refresh(self, fb: tuple[torch.Tensor, torch.Tensor], stale: torch.Tensor, rope, n_heads: int) -> None:
        """The published recipe's `--interleaved-kv-refresh`: re-mix the keys and values at the
        `stale` positions (T,) bool, which no pass has written since the full pass, with the
        feedback fb = (k_fb, v_fb) (B, T, d) of the latest memory. (Any slots are dropped: the
        next pass writes its own.)"""
        k, v, g_fb = self.parts
        T = stale.numel()
        k = apply_rope(split_heads(k + per_head(g_fb, fb[0]), n_heads), rope)  # (B, H, T, hd)
        v = split_heads(v + per_head(g_fb, fb[1]), n_heads)
        self.k = torch.where(stale[:, None], k, self.k[:, :, :T])
        self.v = torch.where(stale[:, None], v, self.v[:, :, :T])


class Buffer(KVCache):
    """The interleaved schedule's buffer: a `BufferKV` per layer, and what every layer of the
    pass being refined shares: its positions, where its slots go, and its key masks (made once per
    pass). `refreshing`: keep what `BufferKV.refresh` needs."""

    def __init__(self, length: int, refreshing: bool = False):
        super().__init__()
        self.sites = _Sites(self)
        self.length = length  # T, the sequence's positions
        self.rows: torch.Tensor | None = None  # (n,) the positions the pass computes; None: all (the init pass)
        self.slots: torch.Tensor | None = None  # (2n,) where the pass writes: its positions, then T .. T + n - 1
        self.visible: torch.Tensor | None = None  # (n, T) bool: the keys each refined position sees
        self.masks: dict[bool, torch.Tensor | None] = {}  # the pass's key mask, without and with slots
        self.refreshing = refreshing

    def refine(self, rows: torch.Tensor | None) -> None:
        """The next pass computes the positions `rows` (n,) (None: all of them). A pass over every
        position in order (S = 1) sees the keys causally: no mask, the fused causal path unless
        there are slots."""
        T = self.length
        self.rows, self.masks = rows, {}
        if rows is None:
            self.slots = self.visible = None
            return
        self.slots = torch.cat([rows, T + torch.arange(rows.numel(), device=rows.device)])
        every = rows.numel() == T and bool((rows == torch.arange(T, device=rows.device)).all())
        self.visible = None if every else rows[:, None] >= torch.arange(T, device=rows.device)[None, :]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot: tuple | None,
               keys: torch.Tensor | None) -> torch.Tensor:
        """The pass's attention: queries q (B, H, n, hd) over the buffer's keys and values k, v
        (B, H, T [+ n], hd), by the rule `attend_visible` applies (`visible_keys`, the slots after
        the T keys). Every layer of a pass reads the same positions, keys and slot `present`, so the
        mask is made once per pass, additive, as SDPA makes it of a bool one (0 where a query sees
        a key, -inf elsewhere). The causal rule (the init pass; every position in order, no slots)
        takes the fused causal path; one query that sees every key, two small matmuls."""
        if self.visible is None and slot is None:
            return attend(q, k, v, causal=True, keys=keys)
        has_slot = slot is not None
        if has_slot not in self.masks:
            present = slot[2] if has_slot else None  # (n,) or per row (B, n)
            per_row = keys if keys is not None else present if present is not None and present.dim() == 2 else None
            batch = 1 if per_row is None else per_row.size(0)
            n = q.size(-2)
            visible = visible_keys(self.visible, n, self.length, has_slot, present, keys, batch, q.device)
            everything = n == 1 and bool(visible.all())
            self.masks[has_slot] = None if everything else torch.where(visible, 0.0, float("-inf")).to(q.dtype)
        mask = self.masks[has_slot]
        if mask is None:
            return attend(q, k, v, causal=False)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class _Sites(dict):
    def __init__(self, owner: Buffer):
        super().__init__()
        self.owner = owner

    def __missing__(self, site: str) -> BufferKV:
        self[site] = BufferKV(self.owner)
        return self[site]
