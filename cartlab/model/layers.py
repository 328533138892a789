"""Transformer building blocks shared by CART and Dense, in the order a layer uses them:
norm, rotary positions, key/value projections (MLA and MHA), attention, SwiGLU, the pre-norm
block, and the KV cache used for generation.

Shapes: B batch, T sequence (new positions), S all key positions (cache + new), d model width,
H heads, hd head dim, d_c MLA latent width.
"""
from __future__ import annotations

from collections import defaultdict
from typing import ClassVar, NamedTuple, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F


class LMShape(Protocol):
    """What the layers read of a model config (every `LMConfig` has it); a Protocol, so that
    this module, which the configs' modules import, imports no config."""

    vocab_size: int
    d_model: int
    n_heads: int
    head_dim: int
    ffn_hidden: int
    rope_theta: float
    norm_eps: float
    init_std: float


def upcast(x: torch.Tensor) -> torch.Tensor:
    """x in at least fp32, where precision matters (norms, rotary angles, softmax, the gate): bf16
    and fp16 become fp32, fp32 and fp64 stay as they are (a float64 model computes in float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = upcast(x)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * upcast(self.weight)).type_as(x)


# -- rotary position embedding ------------------------------------------------------------------
def rope_angles(head_dim: int, theta: float, start: int, length: int, device,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of positions [start, start+length): each (length, hd/2), computed on the fly so
    there is no maximum sequence length; in fp32 (float64 for a float64 model)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=dtype) / head_dim))
    pos = torch.arange(start, start + length, device=device, dtype=dtype)
    angles = torch.outer(pos, inv_freq)
    return angles.cos(), angles.sin()


def rope_angles_at(head_dim: int, theta: float, pos: torch.Tensor,
                   dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of per-row positions pos (B, T): each (B, 1, T, hd/2), broadcasting over heads."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=dtype) / head_dim))
    angles = pos.to(dtype)[:, None, :, None] * inv_freq  # (B, 1, T, hd/2)
    return angles.cos(), angles.sin()


class PaddedRope(NamedTuple):
    """Rotary angles of a left-padded batch, (B, 1, T, hd/2) each (a row's real tokens numbered
    from 0, as if unpadded), and `keys`: which key positions, cached and new, hold real tokens,
    (B, S) bool. Passed wherever the plain (cos, sin) pair goes; attention reads `keys`."""

    cos: torch.Tensor
    sin: torch.Tensor
    keys: torch.Tensor


def check_mask(attention_mask: torch.Tensor | None, B: int, T: int) -> None:
    """Refuse an attention mask whose shape is not the new positions' (B, T)."""
    if attention_mask is not None and tuple(attention_mask.shape) != (B, T):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; allowed: (B, T) = {(B, T)}, "
                         f"1 for real tokens and 0 for left padding of the new positions")


def padding(rope) -> torch.Tensor | None:
    """The real-token key mask (B, S) a `PaddedRope` carries; None for a plain (cos, sin)."""
    return rope.keys if isinstance(rope, PaddedRope) else None


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate channel pairs (first half, second half) of x: (B, H, T, hd)."""
    cos, sin = rope[0], rope[1]
    x1, x2 = upcast(x).chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.type_as(x)


# -- key/value projections -------------------------------------------------------------------------
class MLAKV(nn.Module):
    """Multi-head latent attention KV projection (section 3.1, DeepSeek-V2): compress to a latent
    of width d_c, normalise it, expand to full-rank K and V. Costs 3*d*d_c instead of 2*d^2.

    The paper does not say whether the latent is normalised; we follow DeepSeek-V2 and put an
    RMSNorm on it (d_c parameters). RoPE is applied to the expanded keys (no decoupled RoPE head):
    we cache K and V rather than absorbing the up-projection, so the decoupling is not needed.
    """

    def __init__(self, cfg: LMShape, latent_dim: int):
        super().__init__()
        self.d_model = cfg.d_model
        self.down = nn.Linear(cfg.d_model, latent_dim, bias=False)
        self.norm = RMSNorm(latent_dim, cfg.norm_eps)
        self.up = nn.Linear(latent_dim, 2 * cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.norm(self.down(x))  # (B, T, d_c)
        return self.up(c).split(self.d_model, dim=-1)  # K, V: (B, T, d) each


class MHAKV(nn.Module):
    """Standard multi-head attention KV projection: K, V = x W_k, x W_v (2*d^2 parameters)."""

    def __init__(self, cfg: LMShape):
        super().__init__()
        self.d_model = cfg.d_model
        self.proj = nn.Linear(cfg.d_model, 2 * cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.proj(x).split(self.d_model, dim=-1)  # K, V: (B, T, d) each


# -- attention ------------------------------------------------------------------------------------------
def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    B, T, d = x.shape
    return x.view(B, T, n_heads, d // n_heads).transpose(1, 2)  # (B, H, T, hd)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    B, H, T, hd = x.shape
    return x.transpose(1, 2).reshape(B, T, H * hd)  # (B, T, d)


def visible(T: int, S: int, causal: bool, keys: torch.Tensor) -> torch.Tensor:
    """Which keys each query sees under padding: (B, 1, T, S) bool. Real keys (`keys` (B, S)),
    up to the query's own position if `causal`, and always the query's own key, so that a padded
    query's softmax has a finite entry (its output is never read by a real token)."""
    mask = keys[:, None, None, :]  # (B, 1, 1, S)
    causal_mask = torch.ones(T, S, dtype=torch.bool, device=keys.device).tril(diagonal=S - T)
    if causal:
        mask = mask & causal_mask
    own = causal_mask & ~torch.ones_like(causal_mask).tril(diagonal=S - T - 1)  # (T, S): key S - T + t
    return mask | own


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
           keys: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention. q: (B, H, T, hd); k, v: (B, H, S, hd) with S >= T, the last
    T key positions being the queries' own. With `causal`, query t sees keys up to its position;
    `keys` (B, S) bool, if given, hides padding (`visible`)."""
    T, S = q.size(-2), k.size(-2)
    if keys is not None:
        mask = visible(T, S, causal, keys)  # (B, 1, T, S)
        if T == 1:
            att = (q @ k.transpose(-2, -1)) * q.size(-1) ** -0.5  # (B, H, 1, S)
            att = upcast(att).masked_fill(~mask, float("-inf"))
            return torch.softmax(att, dim=-1).type_as(q) @ v
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if T == 1:  # one new query (cached decoding) sees every key; two small matmuls beat the
        # fused kernel here, whose per-call setup dominates at T=1 on CPU
        att = (q @ k.transpose(-2, -1)) * q.size(-1) ** -0.5  # (B, H, 1, S)
        return torch.softmax(upcast(att), dim=-1).type_as(q) @ v
    if not causal:
        return F.scaled_dot_product_attention(q, k, v)
    if T == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Attention(nn.Module):
    """Base of every attention module: query and output projections. `attn_dim` and `causal` are
    read by the FLOP accounting (4 * T * S * attn_dim per application)."""

    def __init__(self, cfg: LMShape, causal: bool = True):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.attn_dim = cfg.d_model
        self.causal = causal
        self.q = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)


class SelfAttention(Attention):
    """Causal self-attention with RoPE; `kv` is the KV projection (MLAKV in CART, MHAKV in Dense)."""

    def __init__(self, cfg: LMShape, kv: nn.Module):
        super().__init__(cfg, causal=True)
        self.kv = kv

    def forward(self, x: torch.Tensor, rope, cache: "LayerKV | None" = None) -> torch.Tensor:
        q = apply_rope(split_heads(self.q(x), self.n_heads), rope)  # (B, H, T, hd)
        k, v = self.keys_values(x, rope, cache)
        return self.proj(merge_heads(attend(q, k, v, causal=True, keys=padding(rope))))

    def keys_values(self, x: torch.Tensor, rope, cache: "LayerKV | None") -> tuple[torch.Tensor, torch.Tensor]:
        """K (rotated) and V of x's new positions, appended to `cache`: (B, H, S, hd) each."""
        k, v = self.kv(x)
        k = apply_rope(split_heads(k, self.n_heads), rope)
        v = split_heads(v, self.n_heads)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, H, S, hd)
        return k, v


class CrossAttention(Attention):
    """Queries from x, keys and values given (already split into heads). No RoPE: the anchor
    carries no rotary phase, and positions enter only through the causal mask (section 3.2)."""

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                keys: torch.Tensor | None = None) -> torch.Tensor:
        q = split_heads(self.q(x), self.n_heads)  # (B, H, T, hd)
        return self.proj(merge_heads(attend(q, k, v, causal=self.causal, keys=keys)))


# -- feed-forward and block ------------------------------------------------------------------------
class SwiGLU(nn.Module):
    """FFN(x) = W_down(silu(W_gate x) * W_up x), hidden = 8/3 d rounded up (Shazeer 2020)."""

    def __init__(self, cfg: LMShape):
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.up = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.down = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """Pre-norm transformer layer: x + attn(norm(x)), then + ffn(norm(x)). CART's prelude and
    coda layers use MLA keys/values; Dense layers use MHA. `attention` is the self-attention
    class (LRT's layers use one that also sees a memory slot, `cartlab.model.memory`)."""

    attention: ClassVar[type[SelfAttention]] = SelfAttention

    def __init__(self, cfg: LMShape, kv: nn.Module):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = self.attention(cfg, kv)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, rope, cache: "LayerKV | None" = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, cache)
        return x + self.ffn(self.ffn_norm(x))


# -- KV cache ----------------------------------------------------------------------------------------------
class LayerKV:
    """Keys and values of one attention site for every position seen so far: (B, H, S, hd).
    Stored in buffers that double when full, so appending a token copies one position."""

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.size(-2)
        if self.k is None or self.length + T > self.k.size(-2):
            capacity = max(2 * (self.length + T), 64)
            grown_k = k.new_empty(*k.shape[:-2], capacity, k.size(-1))
            grown_v = v.new_empty(*v.shape[:-2], capacity, v.size(-1))
            if self.k is not None:
                grown_k[..., : self.length, :] = self.k[..., : self.length, :]
                grown_v[..., : self.length, :] = self.v[..., : self.length, :]
            self.k, self.v = grown_k, grown_v
        self.k[..., self.length: self.length + T, :] = k
        self.v[..., self.length: self.length + T, :] = v
        self.length += T
        return self.k[..., : self.length, :], self.v[..., : self.length, :]


class KVCache:
    """All attention caches of one model, by site name ('prelude.0', 'anchor', 'loop.3', ...),
    created on first use so a variant holds only the caches it needs. `pos` counts positions
    already processed; the model advances it after each forward."""

    def __init__(self):
        self.sites: dict[str, LayerKV] = defaultdict(LayerKV)
        self.pos = 0
        self.states: dict[str, torch.Tensor] = {}
        """Per-sequence recurrent state carried from one call to the next (LRT keeps m_{t-1}
        here under 'memory': the source layer's output at the last position processed)."""
        self._head_t: torch.Tensor | None = None
        self._head_key: tuple[int, int] | None = None

    def __getitem__(self, site: str) -> LayerKV:
        return self.sites[site]

    def head_t(self, weight: torch.Tensor) -> torch.Tensor:
        """The LM head weight (V, d) as a contiguous (d, V) copy, made once per generation and
        remade if the weight changes in place. On CPU a one-row matmul against (d, V) runs ~3x
        faster than F.linear against (V, d) (at V=32000, d=256: 1.1 vs 3.7 ms per token)."""
        key = (weight.data_ptr(), weight._version)
        if self._head_key != key:
            self._head_t, self._head_key = weight.detach().t().contiguous(), key
        return self._head_t


def cache_site(cache: KVCache | None, site: str) -> LayerKV | None:
    return None if cache is None else cache[site]
