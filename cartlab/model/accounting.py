"""Parameter and FLOP accounting from a config alone (section 3.5, Tables 1 and 3).

The model is built on the meta device (no memory, no init), so every hook and every registered
component is counted exactly as built, and `applications()` says how often each part runs:

    stored     = sum of unique parameters (tied embedding once)
    effective  = sum over parts of params(part) * applications(part)
                 (CART: stored + (R-1) * core block, + (R-1) * anchor KV under unfreeze_kv)
    fwd FLOPs  = sum over parts of applications * (2 T * matmul weights + 4 T^2 * attn width)

LRT (Dense with `lrt_kv`/`lrt_residual`, `cartlab.model.memory`): the memory projection(s) are
stored parameters applied once per token; `lrt_kv` re-applies each injection layer's K/V
projection to the memory (counted in effective parameters and FLOPs, like CART's unfrozen
anchor) and adds 4 T d per injection layer for the private slots. Its training forward is not its
inference forward: the interleaved schedule adds a memory-free initialisation pass of every
layer, so `train_forward_flops` (from `train_applications()`) is about 2x `forward_flops`, and
`train_flops_per_token` is 3x that (the backward runs through both passes). `memory_overhead`
compares an LRT config with its Dense backbone.

CART trained with variable depth (hooks `random_loops`, `truncated_bptt`): effective parameters
and forward FLOPs are counted at the expected R of training (`cartlab.model.loops`; applications
may be fractional), and the backward skips the loops truncated BPTT runs without gradient:

    train FLOPs per sequence at R = 3 * forward(R) - 2 * max(0, R - k) * one loop's forward

`train_flops_per_token()` is its expectation over the R distribution, exactly (forward(R) is
linear in R); `train_flops_per_token(n_loops=R)` is one step's value at its drawn R.

FLOPs follow the paper's Table 3 convention, which we reproduce to <1%: per sequence of length
T, matmuls at 2 FLOPs per weight per token, attention scores and values at 4 T^2 d per attention
application (no causal halving), LM head excluded (`lm_head_flops` has it separately).
Effective layers = forward FLOPs / one Dense layer's forward FLOPs at the same width.

Table 1's effective counts at R=6 follow from this for every width, and at R=10 for d=1024.
Its R=10 rows for d=256, 512, 768 do not: (effective - stored) / (R - 1) there is 0.78M, 3.93M
and 7.89M per extra loop against 0.72M, 2.88M and 5.90M at R=6, which no count linear in R can
give; we take the R=6 rows as the definition and do not chase those three.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from cartlab.model.config import CARTConfig, ConfigError, DenseConfig, LMConfig
from cartlab.model.family import build_model
from cartlab.model.layers import Attention
from cartlab.model.loops import LoopSampler


@dataclass(frozen=True)
class Accounting:
    stored_params: int
    effective_params: int | float
    """Parameters applied per token (fractional under random loops: the expected count)."""
    embedding_params: int
    seq_len: int
    forward_flops: float
    """Forward FLOPs per sequence of `seq_len` tokens, LM head excluded (Table 3)."""
    lm_head_flops: float
    effective_layers: float
    """forward_flops / forward FLOPs of one Dense layer of the same width (Table 3)."""
    train_forward_flops: float
    """FLOPs of one training forward per sequence, LM head excluded: forward_flops, except for
    LRT, whose interleaved schedule adds an initialisation pass (about 2x)."""
    mean_loops: float | None = None
    """The R the counts above use: the trained R, its expectation under random loops (CART), or
    None (a model without loops)."""
    loop_flops: float = 0.0
    """Forward FLOPs per sequence of one loop (everything that runs R times), LM head excluded."""
    bptt_loops: int | None = None
    """k of truncated BPTT (the backward covers the last k loops), None for all loops."""
    frozen_loops: float = 0.0
    """Expected loops per training forward that run without gradient: E[max(0, R - k)]."""

    @property
    def non_embedding_stored(self) -> int:
        return self.stored_params - self.embedding_params

    @property
    def non_embedding_effective(self) -> int:
        return self.effective_params - self.embedding_params

    @property
    def leverage(self) -> float:
        """effective / stored (Table 1)."""
        return self.effective_params / self.stored_params

    def train_flops_per_token(self, include_lm_head: bool = True, n_loops: int | None = None) -> float:
        """The training forward plus a backward of 2x the forward (section 4.5) per token, the
        backward skipping the loops truncated BPTT runs without gradient; the LM head runs once
        per token in every model. `n_loops`: at that R (a step's draw) instead of on average."""
        fwd, frozen = self.train_forward_flops, self.frozen_loops
        if n_loops is not None and self.mean_loops is None:
            raise ValueError(f"n_loops={n_loops!r} is not allowed: this model has no loops; pass n_loops=None")
        if n_loops is not None:
            fwd += (n_loops - self.mean_loops) * self.loop_flops
            frozen = max(0, n_loops - self.bptt_loops) if self.bptt_loops is not None else 0
        fwd += self.lm_head_flops if include_lm_head else 0.0
        return (3.0 * fwd - 2.0 * frozen * self.loop_flops) / self.seq_len

    def to_dict(self) -> dict:
        return {**asdict(self), "leverage": self.leverage}


def build_meta(cfg: LMConfig) -> nn.Module:
    with torch.device("meta"):
        return build_model(cfg)


def _part_flops(part: nn.Module, T: int) -> float:
    weights = sum(m.weight.numel() for m in part.modules() if isinstance(m, nn.Linear))
    attention = sum(m.attn_dim for m in part.modules() if isinstance(m, Attention))
    extra = sum(m.extra_flops(T) for m in part.modules() if hasattr(m, "extra_flops"))
    return 2.0 * T * weights + 4.0 * T * T * attention + extra


def account(cfg: LMConfig, seq_len: int = 1024) -> Accounting:
    """Parameters and forward FLOPs of the model `cfg` describes, per sequence of `seq_len`."""
    if seq_len < 1:
        raise ConfigError(f"seq_len={seq_len!r} is not allowed; it must be an integer >= 1")
    model = build_meta(cfg)
    loops = loop_distribution(cfg)  # {R: probability}, None without loops
    mean = None if loops is None else sum(r * p for r, p in loops.items())
    at = {} if mean is None else {"n_loops": mean}

    def forward(parts) -> float:
        return sum(_part_flops(part, seq_len) * k for name, part, k in parts if name != "embedding")

    parts = model.applications(**at)
    embedding = model.wte.weight.numel()
    effective = sum(sum(p.numel() for p in part.parameters()) * k for _, part, k in parts)
    flops = forward(parts)
    k = getattr(cfg, "bptt_loops", None)
    return Accounting(
        stored_params=model.num_params(),
        effective_params=int(effective) if float(effective).is_integer() else effective,
        embedding_params=embedding,
        seq_len=seq_len,
        forward_flops=flops,
        lm_head_flops=2.0 * seq_len * cfg.d_model * cfg.vocab_size,
        effective_layers=flops / dense_layer_flops(cfg, seq_len),
        train_forward_flops=forward(model.train_applications(**at)),
        mean_loops=mean,
        loop_flops=0.0 if mean is None else forward(model.applications(n_loops=mean + 1)) - flops,
        bptt_loops=k,
        frozen_loops=0.0 if k is None or loops is None else sum(p * max(0, r - k) for r, p in loops.items()),
    )


def loop_distribution(cfg: LMConfig) -> dict[int, float] | None:
    """{R: probability} of the loop counts training runs (CART: {n_loops: 1.0} unless
    `random_loops`), None for a model without loops."""
    if getattr(cfg, "n_loops", None) is None:
        return None
    return LoopSampler(cfg).distribution()


def memory_backbone(cfg: DenseConfig) -> DenseConfig:
    """The Dense config `cfg` is built on: the same fields without the LRT hooks and memory fields."""
    keep = {k: v for k, v in cfg.to_dict().items() if k != "hooks" and not k.startswith("memory_")}
    return DenseConfig.from_dict(keep)


def memory_overhead(cfg: DenseConfig, seq_len: int = 1024) -> dict:
    """What LRT's memory costs over its Dense backbone: extra stored parameters (absolute and in %
    of the backbone's), inference forward FLOPs in %, and the training-compute ratio (train FLOPs
    per token, LM head included)."""
    lrt, base = account(cfg, seq_len), account(memory_backbone(cfg), seq_len)
    extra = lrt.stored_params - base.stored_params
    return {
        "params": extra,
        "params_pct": 100.0 * extra / base.stored_params,
        "inference_flops_pct": 100.0 * (lrt.forward_flops / base.forward_flops - 1.0),
        "train_flops_ratio": lrt.train_flops_per_token() / base.train_flops_per_token(),
    }


def lrt_variants(cfg: DenseConfig, seq_len: int = 1024) -> list[dict]:
    """`memory_overhead` of each LRT variant (`cartlab.model.lrt.LRT_VARIANTS`) built on cfg's
    Dense backbone (cfg itself may be the backbone or any LRT on it), with the variant's name."""
    from cartlab.model.lrt import LRT_VARIANTS

    base = memory_backbone(cfg).to_dict()
    return [{"variant": name, **memory_overhead(LMConfig.from_dict({**base, **fields}), seq_len)}
            for name, fields in LRT_VARIANTS.items()]


def dense_layer_flops(cfg: LMConfig, seq_len: int) -> float:
    """Forward FLOPs of one Dense (MHA + SwiGLU) layer of cfg's width, per sequence."""
    layer = build_meta(_dense_like(cfg, n_layers=1)).layers[0]
    return _part_flops(layer, seq_len)


def _dense_like(cfg: LMConfig, n_layers: int) -> DenseConfig:
    shared = {k: getattr(cfg, k) for k in ("vocab_size", "d_model", "n_heads", "ffn_multiple_of", "rope_theta",
                                          "norm_eps", "init_std")}
    return DenseConfig(n_layers=n_layers, **shared)


MATCH_ON = ("stored", "effective", "flops")
ROUNDING = {"nearest": round, "up": math.ceil, "down": math.floor}
PAPER_ROUNDING = {"stored": "nearest", "effective": "up", "flops": "nearest"}


def matched_dense(cfg: CARTConfig, on: str = "stored", seq_len: int = 1024, rounding: str | None = None) -> DenseConfig:
    """The Dense config of cfg's width whose layer count matches CART on stored parameters,
    effective parameters, or forward FLOPs (section 4.3), rounded to a whole layer.

    `rounding` None follows the paper's baselines (PAPER_ROUNDING): at d=1024, P=6, R=6 the
    stored match is the nearest layer count, 7 (122.7M vs 125.1M: the paper's Dense 7L); the
    effective match is the smallest Dense with at least CART's effective count, 12 (186.9M vs
    178.8M: the paper's Dense 12L; the nearest would be 11 at 174.0M); the FLOPs match is the
    nearest, 12 (367 vs 355 GFLOPs). Table 3 labels Dense 17L (520 GFLOPs) "FLOPs-eq.", but no
    CART row of that table reaches it (R=10 is 460 GFLOPs, 15.0 layers), so we do not reproduce
    that label. Pass "nearest", "up" or "down" to choose another rule.
    """
    rounding = PAPER_ROUNDING.get(on) if rounding is None else rounding
    if on not in MATCH_ON:
        raise ConfigError(f"on={on!r} is not allowed; choose one of {list(MATCH_ON)}")
    if rounding not in ROUNDING:
        raise ConfigError(f"rounding={rounding!r} is not allowed; choose one of {sorted(ROUNDING)}")
    cart = account(cfg, seq_len)
    one, two = account(_dense_like(cfg, 1), seq_len), account(_dense_like(cfg, 2), seq_len)
    per_layer = two.stored_params - one.stored_params
    base = one.stored_params - per_layer  # embedding and final norm
    if on == "flops":
        layers = cart.forward_flops / dense_layer_flops(cfg, seq_len)
    else:
        target = cart.stored_params if on == "stored" else cart.effective_params
        layers = (target - base) / per_layer
    return _dense_like(cfg, max(1, int(ROUNDING[rounding](layers))))
