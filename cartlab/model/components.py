"""The recurrent core's interchangeable parts (section 3.2), in the order one loop step r uses
them, with state history h_r, h_{r-1}, h_{r-2}:

    1.   x_r     = mixer(h_r, h_{r-1}, h_{r-2})      state mixer: HyperConnection blend
    2.   z_r     = loop_embedding(x_r, r)            loop-index embedding: + LIE(r)
    3.   K, V    = the anchor (section 3.1)          where K, V come from, and the core attention
    3-4. u_r     = CoreBlock(z_r, K, V)              attention + SwiGLU, returns the update
    5.   h_{r+1} = gate(x_r, u_r)                    LTI: A * x_r + u_r, A = sigmoid(lambda)

Each part is registered under the name a `CARTConfig` field uses to select it:

    state_mixer     -> MIXERS           (hyper | last)
    loop_embedding  -> LOOP_EMBEDDINGS  (sinusoidal | none)
    core_attention  -> CORE_ATTENTION   (anchor | recomputed | self)
    state_gate      -> GATES            (lti | residual)

A new variant registers a new part here (or in its own module) and a hook that selects it;
`cart.py` does not change.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn as nn

from cartlab.model.layers import (MLAKV, CrossAttention, KVCache, RMSNorm, SelfAttention, SwiGLU, padding, split_heads,
                                  upcast)

# `cfg` below is a CARTConfig, duck-typed: `cartlab.model.config` imports this module's registries.

MIXERS: dict[str, type[nn.Module]] = {}
LOOP_EMBEDDINGS: dict[str, type[nn.Module]] = {}
GATES: dict[str, type[nn.Module]] = {}


def register(registry: dict, name: str):
    def wrap(cls):
        if name in registry:
            raise ValueError(f"{name!r} is already registered")
        registry[name] = cls
        return cls

    return wrap


class Anchor(NamedTuple):
    """The keys and values the core's cross-attention reads, (B, H, T, hd) each: CART's anchor,
    computed once from the prelude output (section 3.1) and passed to every loop step."""

    k: torch.Tensor
    v: torch.Tensor


@dataclass
class LoopContext:
    """What one core application needs besides its input: loop index, rotary angles, the
    generation cache (or None) and the anchor the loop reads (None for a self-attention core)."""

    r: int
    rope: tuple[torch.Tensor, torch.Tensor]  # or a `PaddedRope` (left-padded rows)
    cache: KVCache | None
    anchor: Anchor | None


# -- step 1: the state mixer (HyperConnection) ----------------------------------------------------------------
@register(MIXERS, "hyper")
class HyperConnection(nn.Module):
    """HyperConnection blend (section 3.2 step 1; Hyper-connections, arXiv:2409.19606): x_r = sum_i w_i h_{r-i} over
    the last 3 states, w = softmax(logits). Logits start at (0, -5, -5), i.e. weights
    (0.987, 0.007, 0.007): plain residual up to 1.3%. (Exactly one-hot would need infinite logits
    and would stop the older states' gradients.) With R=1 all three slots hold the prelude output
    and the blend is the identity, so these logits get a zero gradient."""

    depth = 3

    def __init__(self, cfg):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor([0.0, -5.0, -5.0]))

    def weights(self) -> torch.Tensor:
        """The blend weights (3,), newest state first."""
        return torch.softmax(self.logits.detach().float(), dim=0)

    def forward(self, history: list[torch.Tensor]) -> torch.Tensor:
        w = torch.softmax(upcast(self.logits), dim=0).to(history[0].dtype)
        return sum(w[i] * h for i, h in enumerate(history))


@register(MIXERS, "last")
class LastState(nn.Module):
    """No HyperConnection (section 8.5): the core reads the latest state only."""

    depth = 1

    def __init__(self, cfg):
        super().__init__()

    def forward(self, history: list[torch.Tensor]) -> torch.Tensor:
        return history[0]


# -- step 2: the loop-index embedding -------------------------------------------------------------------------
def sinusoid(r: int, dim: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Transformer sinusoidal code of integer r: (dim,), sin on even and cos on odd channels."""
    i = torch.arange(0, dim, 2, device=device, dtype=dtype)
    angles = r / (10000.0 ** (i / dim))
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten()[:dim]


@register(LOOP_EMBEDDINGS, "sinusoidal")
class SinusoidalLoopEmbedding(nn.Module):
    """Loop-index embedding (section 3.2 step 2): x + s * pe(r), pe sinusoidal in r, so any R
    works at inference (computed on the fly, no table). The code conditions the block's input
    only; the gate carries x_r, not x_r + pe. The learnable scalar s starts at 0.1 so the code
    is comparable to, not larger than, the early residual stream (the paper's scaling was lost)."""

    def __init__(self, cfg):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([0.1]))  # (1,), not 0-d: FSDP2 shards no 0-d tensor
        self._codes: dict[tuple, torch.Tensor] = {}  # (r, dim, device, dtype) -> pe(r), computed once

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "scale"  # checkpoints written before the (1,) shape hold s as a 0-d tensor
        if key in state_dict and state_dict[key].dim() == 0:
            state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor, r: int) -> torch.Tensor:
        key = (r, x.size(-1), x.device, torch.promote_types(x.dtype, torch.float32))  # fp32, or float64
        if key not in self._codes:
            self._codes[key] = sinusoid(*key)
        return x + (self.scale * self._codes[key]).to(x.dtype)


@register(LOOP_EMBEDDINGS, "none")
class NoLoopEmbedding(nn.Module):
    """No loop-index embedding (section 8.7): every loop sees the same function."""

    def __init__(self, cfg):
        super().__init__()

    def forward(self, x: torch.Tensor, r: int) -> torch.Tensor:
        return x


# -- step 3: where K, V come from (the anchor, section 3.1) ---------------------------------------------------
class AnchorKV(nn.Module):
    """The anchor's MLA KV projection (section 3.1): RMSNorm, then MLAKV, split into heads."""

    def __init__(self, cfg):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.kv = MLAKV(cfg, cfg.kv_latent_dim)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(self.norm(x))
        return split_heads(k, self.n_heads), split_heads(v, self.n_heads)  # (B, H, T, hd) each


class FrozenAnchor(AnchorKV):
    """CART's anchor: K, V computed once from the prelude output and reused by every loop. In
    generation the anchor cache grows by the new positions only."""

    loop_invariant = True  # no loop writes a cache row: a token may stop looping without leaving a gap

    def applications(self, n_loops: int) -> int:
        return 1

    def begin(self, e: torch.Tensor, cache: KVCache | None) -> Anchor:
        """The anchor of the prelude output e (B, T, d), continuing the cache's anchor rows."""
        k, v = (t.contiguous() for t in self.project(e))  # laid out once, read by every loop
        if cache is not None:
            k, v = cache["anchor"].append(k, v)
        return Anchor(k, v)

    def read(self, x: torch.Tensor, loop: LoopContext) -> LoopContext:
        """Loop `loop.r` reads the anchor it was given."""
        return loop


class RecomputedAnchor(AnchorKV):
    """Ablation X (section 8.1): the same KV projection re-applied to the core's input state at
    every loop, so K, V evolve with the state. Generation keeps one cache per loop."""

    loop_invariant = False  # every loop writes its own cache rows

    def applications(self, n_loops: int) -> int:
        return n_loops

    def begin(self, e: torch.Tensor, cache: KVCache | None) -> None:
        return None  # nothing is computed once: every loop projects its own state

    def read(self, x: torch.Tensor, loop: LoopContext) -> LoopContext:
        """Loop `loop.r` reads K, V projected from its core input x (B, T, d)."""
        k, v = self.project(x)
        site = None if loop.cache is None else loop.cache[f"loop.{loop.r}"]  # no per-r name without a cache
        if site is not None:
            k, v = site.append(k, v)
        return replace(loop, anchor=Anchor(k, v))


class NoAnchor(nn.Module):
    """No anchor (self-attention core): nothing is computed from the prelude output."""

    loop_invariant = False  # the self-attention core writes a cache per loop

    def __init__(self, cfg):
        super().__init__()

    def applications(self, n_loops: int) -> int:
        return 0

    def begin(self, e: torch.Tensor, cache: KVCache | None) -> None:
        return None

    def read(self, x: torch.Tensor, loop: LoopContext) -> LoopContext:
        return loop


# -- step 3: the core block's attention -----------------------------------------------------------------------
class AnchorCrossAttention(CrossAttention):
    """MLA cross-attention (section 3.2 step 3): queries from the state, K, V from the anchor.
    Causal by default; `causal_cross_attn=False` lets position t read anchor rows built from
    tokens after t, the leak of section 3.4."""

    def __init__(self, cfg):
        super().__init__(cfg, causal=cfg.causal_cross_attn)

    def forward(self, h: torch.Tensor, x: torch.Tensor, loop: LoopContext) -> torch.Tensor:
        return super().forward(h, loop.anchor.k, loop.anchor.v, padding(loop.rope))


class CoreSelfAttention(SelfAttention):
    """Ablation W (section 8.4): MLA self-attention with RoPE inside the core, structurally a
    prelude layer's attention; K, V are recomputed from the state at every loop."""

    def __init__(self, cfg):
        super().__init__(cfg, MLAKV(cfg, cfg.kv_latent_dim))

    def forward(self, h: torch.Tensor, x: torch.Tensor, loop: LoopContext) -> torch.Tensor:
        site = None if loop.cache is None else loop.cache[f"loop.{loop.r}"]  # (as above: no per-r name to compile)
        return super().forward(h, loop.rope, site)


@dataclass(frozen=True)
class CoreAttentionKind:
    source: type[nn.Module]  # built once per model: where K, V come from
    attention: type[nn.Module]  # built per core block
    cross: bool  # attends to given K, V (so `causal_cross_attn` applies)


CORE_ATTENTION: dict[str, CoreAttentionKind] = {
    "anchor": CoreAttentionKind(FrozenAnchor, AnchorCrossAttention, cross=True),
    "recomputed": CoreAttentionKind(RecomputedAnchor, AnchorCrossAttention, cross=True),
    "self": CoreAttentionKind(NoAnchor, CoreSelfAttention, cross=False),
}


# -- steps 3-4: the core block --------------------------------------------------------------------------------
class CoreBlock(nn.Module):
    """One application of the core (section 3.2 steps 3-4), pre-norm: attention, then SwiGLU.
    Returns the update u = a + ffn(norm(x + a)); the gate decides how u meets the state."""

    def __init__(self, cfg):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = CORE_ATTENTION[cfg.core_attention].attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, loop: LoopContext) -> torch.Tensor:
        a = self.attn(self.attn_norm(x), x, loop)  # (B, T, d)
        return a + self.ffn(self.ffn_norm(x + a))


# -- step 5: the gate (LTI) -----------------------------------------------------------------------------------
RHO_CAP = 1.0 - 2.0**-16  # keeps A < 1 in fp32 even when sigmoid saturates to exactly 1.0


@register(GATES, "lti")
class LTIGate(nn.Module):
    """Sigmoid LTI gate (section 3.2 step 5): h_{r+1} = A * x_r + u_r with A = diag(sigmoid(lambda)).

    The linear part of the recurrence has transition matrix A, so its spectral radius is
    max_c A_c < 1 by construction. The paper's exact update rule was lost in extraction; we
    scale the carried state only (the update u enters at full strength), so removing the gate
    (A = I) is exactly the plain residual of section 8.6. A is computed in fp32 even under bf16
    autocast and capped at 1 - 2^-16, since sigmoid rounds to 1.0 in fp32 for lambda > ~17."""

    def __init__(self, cfg):
        super().__init__()
        init = math.log(cfg.gate_init / (1.0 - cfg.gate_init))
        self.logit = nn.Parameter(torch.full((cfg.d_model,), init))

    def retention(self) -> torch.Tensor:
        return RHO_CAP * torch.sigmoid(upcast(self.logit))  # (d,), fp32 (float64 in a float64 model)

    def forward(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return (self.retention() * upcast(x) + upcast(u)).type_as(x)

    def spectral_radius(self) -> dict[str, float]:
        a = self.retention().detach()
        return {"max": a.max().item(), "mean": a.mean().item()}


@register(GATES, "residual")
class ResidualGate(nn.Module):
    """No LTI gate (section 8.6): h_{r+1} = x_r + u_r. The transition is the identity, so the
    reported spectral radius is exactly 1."""

    def __init__(self, cfg):
        super().__init__()

    def forward(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return x + u

    def spectral_radius(self) -> dict[str, float]:
        return {"max": 1.0, "mean": 1.0}
