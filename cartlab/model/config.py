"""Model configs: one dataclass per architecture, validated when made, rebuilt from a dict.

`CARTConfig` describes the paper's model (section 3) and every ablation variant of section 8.
Variants are not separate flags sprinkled through the model: a config names the *components*
the model is assembled from (which core attention, which state mixer, which gate, which loop
embedding, shared or unshared core), and ablation hooks (`cartlab.model.hooks`) are named
rewrites of those fields. `hooks` records which rewrites were applied, so a checkpoint that
stores `to_dict()` rebuilds the same variant.

Defaults are the paper's binding configuration: d=1024, P=6, R=6, Llama-2 vocabulary.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from cartlab.model import hooks as _hooks
from cartlab.model.components import CORE_ATTENTION, GATES, LOOP_EMBEDDINGS, MIXERS

HEAD_DIM = 64  # paper widths 256..1024 use 64-dim heads (4, 8, 12, 16 heads)
MIN_VOCAB = 2


class ConfigError(ValueError):
    """A config field has a value the model cannot be built with; the message names the field."""


def _check_choice(field_name: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{field_name}={value!r} is not allowed; choose one of {sorted(allowed)}")


def _check_min(field_name: str, value: int, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{field_name}={value!r} is not allowed; it must be an integer >= {minimum}")


@dataclass
class LMConfig:
    """Fields shared by every language model in cartlab (CART and Dense)."""

    vocab_size: int = 32000
    """Vocabulary size; 32,000 is the Llama-2 tokenizer used by the paper (section 4.1)."""
    d_model: int = 1024
    """Residual width d. The paper sweeps 256, 512, 768, 1024."""
    n_heads: int | None = None
    """Attention heads; None means d_model // 64 (64-dim heads)."""
    ffn_multiple_of: int = 256
    """SwiGLU hidden size is 8/3 * d_model rounded up to a multiple of this (Llama convention);
    with 256 the parameter counts of Table 1 are reproduced."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    init_std: float = 0.02
    """Std of the normal init of embeddings and linear weights (residual outputs are scaled down
    by 1/sqrt(2 * effective layers), as in GPT-2)."""

    kind: ClassVar[str] = "lm"

    def __post_init__(self) -> None:
        _check_min("vocab_size", self.vocab_size, MIN_VOCAB)
        _check_min("d_model", self.d_model, 1)
        _check_min("ffn_multiple_of", self.ffn_multiple_of, 1)
        if self.n_heads is None:
            self.n_heads = max(1, self.d_model // HEAD_DIM)
        _check_min("n_heads", self.n_heads, 1)
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            # RoPE rotates channel pairs, so every head needs an even width
            allowed = [h for h in range(1, self.d_model + 1) if self.d_model % h == 0 and (self.d_model // h) % 2 == 0]
            problem = (f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}" if self.d_model % self.n_heads
                       else f"n_heads={self.n_heads} gives heads of odd width {self.d_model // self.n_heads}")
            raise ConfigError(
                f"{problem}; n_heads must divide d_model into heads of even width (RoPE rotates channel pairs) "
                f"(allowed: {allowed[:12]}{' ...' if len(allowed) > 12 else ''})"
            )
        for name in ("init_std", "norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ConfigError(f"{name}={value!r} is not allowed; it must be a number > 0")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        hidden = int(8 * self.d_model / 3)
        return self.ffn_multiple_of * -(-hidden // self.ffn_multiple_of)

    # -- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if "hooks" in out:
            out["hooks"] = list(out["hooks"])
        return {"kind": self.kind, **out}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LMConfig":
        """Rebuild a config from `to_dict()` output; unknown fields are an error, not ignored."""
        d = dict(d)
        kind = d.pop("kind", cls.kind)
        target = CONFIG_KINDS.get(kind)
        if target is None:
            raise ConfigError(f"kind={kind!r} is not allowed; choose one of {sorted(CONFIG_KINDS)}")
        if cls is not LMConfig and target is not cls:
            raise ConfigError(f"kind={kind!r} does not describe a {cls.__name__}")
        names = {f.name for f in dataclasses.fields(target)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown {target.__name__} field(s) {unknown}; allowed: {sorted(names)}")
        if "hooks" in d:
            d["hooks"] = tuple(d["hooks"])
        return target(**d)

    @classmethod
    def from_json(cls, path: str | Path) -> "LMConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


@dataclass
class CARTConfig(LMConfig):
    """CART (section 3): P prelude layers, a frozen MLA KV anchor, one shared core looped R
    times, one coda layer, tied embeddings.

    The component fields below (`core_attention` ... `share_core`) are what the ablation hooks
    rewrite; set them through `hooks=(...)` rather than by hand so the variant has its paper name.
    """

    prelude_layers: int = 6
    """P: unique MLA self-attention layers before the loop (section 3.1)."""
    n_loops: int = 6
    """R: applications of the core block during training (section 3.2). Can be overridden at
    inference time (`model(idx, n_loops=...)`, section 7.4)."""
    kv_latent_dim: int | None = None
    """MLA latent width d_c of every KV projection; None means d_model // 4, which reproduces
    the stored parameter counts of Table 1 (the paper's value was lost in extraction)."""
    core_attention: str = "anchor"
    """How the core attends: 'anchor' (cross-attention to K,V computed once from the prelude),
    'recomputed' (the anchor's KV projection re-applied to the state every loop) or 'self'
    (MLA self-attention with RoPE; no anchor)."""
    causal_cross_attn: bool = True
    """Causal mask on the core's cross-attention. False reproduces the leak of section 3.4."""
    state_mixer: str = "hyper"
    """'hyper': HyperConnection blend of the last 3 loop states; 'last': the latest state only."""
    state_gate: str = "lti"
    """'lti': sigmoid LTI gate h <- A*h + u with spectral radius < 1; 'residual': h <- h + u."""
    loop_embedding: str = "sinusoidal"
    """'sinusoidal': loop-index embedding added to the core input; 'none'."""
    share_core: bool = True
    """True: one core block applied R times. False: R distinct core blocks (section 8.3)."""
    gate_init: float = 0.9
    """Initial per-channel retention sigmoid(lambda) of the LTI gate."""
    hooks: tuple[str, ...] = ()
    """Ablation hooks applied to this config (names from `cartlab.model.hooks.HOOKS`)."""

    kind: ClassVar[str] = "cart"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_min("prelude_layers", self.prelude_layers, 1)
        _check_min("n_loops", self.n_loops, 1)
        _hooks.apply_hooks(self)
        if self.kv_latent_dim is None:
            self.kv_latent_dim = max(1, self.d_model // 4)
        _check_min("kv_latent_dim", self.kv_latent_dim, 1)
        _check_choice("core_attention", self.core_attention, CORE_ATTENTION)
        _check_choice("state_mixer", self.state_mixer, MIXERS)
        _check_choice("state_gate", self.state_gate, GATES)
        _check_choice("loop_embedding", self.loop_embedding, LOOP_EMBEDDINGS)
        if not 0.0 < self.gate_init < 1.0:
            raise ConfigError(f"gate_init={self.gate_init!r} is not allowed; it must lie in (0, 1)")
        if not self.causal_cross_attn and not CORE_ATTENTION[self.core_attention].cross:
            crosses = sorted(k for k, v in CORE_ATTENTION.items() if v.cross)
            raise ConfigError(
                f"causal_cross_attn=False needs a cross-attention core (core_attention in {crosses}), "
                f"got core_attention={self.core_attention!r}: there is no cross-attention to un-mask"
            )

    @property
    def n_core_blocks(self) -> int:
        """Distinct core blocks stored: 1 when shared, R when unshared."""
        return 1 if self.share_core else self.n_loops

    @property
    def effective_depth(self) -> int:
        """Layer applications per forward pass: P + R + 1."""
        return self.prelude_layers + self.n_loops + 1

    @classmethod
    def paper(cls, d_model: int = 1024, n_loops: int = 6, prelude_layers: int = 6, **kw) -> "CARTConfig":
        """A paper configuration (Table 1): 64-dim heads, d_c = d/4, Llama-2 vocabulary."""
        return cls(d_model=d_model, n_loops=n_loops, prelude_layers=prelude_layers, **kw)

    @classmethod
    def tiny(cls, **kw) -> "CARTConfig":
        """A model small enough to build, train and test in milliseconds on a CPU."""
        base = dict(vocab_size=64, d_model=32, n_heads=4, prelude_layers=2, n_loops=3, ffn_multiple_of=16)
        return cls(**{**base, **kw})


@dataclass
class DenseConfig(LMConfig):
    """Dense baseline (section 4.3): n_layers standard MHA + SwiGLU + RoPE layers, tied embeddings."""

    n_layers: int = 12
    """Number of transformer layers (the paper trains 7 and 12 at d=1024)."""

    kind: ClassVar[str] = "dense"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_min("n_layers", self.n_layers, 1)

    @property
    def effective_depth(self) -> int:
        return self.n_layers

    @classmethod
    def tiny(cls, **kw) -> "DenseConfig":
        base = dict(vocab_size=64, d_model=32, n_heads=4, n_layers=3, ffn_multiple_of=16)
        return cls(**{**base, **kw})


CONFIG_KINDS: dict[str, type[LMConfig]] = {"cart": CARTConfig, "dense": DenseConfig}
