"""Model configs: one dataclass per architecture, validated when made, rebuilt from a dict.

`CARTConfig` describes the paper's model (section 3) and every ablation variant of section 8.
Variants are not separate flags sprinkled through the model: a config names the *components*
the model is assembled from (which core attention, which state mixer, which gate, which loop
embedding, shared or unshared core) and how it is trained (a fixed or a random loop count per
step, full or truncated backpropagation through the loops), and hooks (`cartlab.model.hooks`)
are named rewrites of those fields. `hooks` records which rewrites were applied, so a checkpoint
that stores `to_dict()` rebuilds the same variant.

Defaults are the paper's binding configuration: d=1024, P=6, R=6, Llama-2 vocabulary.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping

from cartlab.config import Config, ConfigError, field, load_yaml, show
from cartlab.model import hooks as _hooks
from cartlab.model.components import CORE_ATTENTION, GATES, LOOP_EMBEDDINGS, MIXERS
from cartlab.model.family import FAMILIES, config_for

HEAD_DIM = 64  # paper widths 256..1024 use 64-dim heads (4, 8, 12, 16 heads)
MIN_VOCAB = 2
TRAIN_LOOPS = ("fixed", "uniform", "poisson_lognormal")
"""How a CART training step chooses its loop count R (`CARTConfig.train_loops`; drawn by
`cartlab.model.loops.LoopSampler`)."""
RANGE_FIELDS = ("loops_min", "loops_max", "loops_sigma")  # shape a random R; refused without one
SOLVER_FIELDS = ("solver_tol", "solver_max_iter", "backward", "phantom_steps", "jacobian_penalty")
"""Shape the fixed-point mode (hook `fixed_point`); refused without it."""


@dataclass
class LMConfig(Config):
    """Fields shared by every language model in cartlab (CART, Dense, LRT and any registered family)."""

    vocab_size: int = field(32000, ge=MIN_VOCAB)
    """Vocabulary size; 32,000 is the Llama-2 tokenizer used by the paper (section 4.1)."""
    d_model: int = field(1024, ge=1)
    """Residual width d. The paper sweeps 256, 512, 768, 1024."""
    n_heads: int | None = field(None, ge=1, none="null for d_model // 64")
    """Attention heads; None means d_model // 64 (64-dim heads)."""
    ffn_multiple_of: int = field(256, ge=1)
    """SwiGLU hidden size is 8/3 * d_model rounded up to a multiple of this (Llama convention);
    with 256 the parameter counts of Table 1 are reproduced."""
    rope_theta: float = field(10000.0, gt=0)
    """RoPE base frequency."""
    norm_eps: float = field(1e-5, gt=0)
    """RMSNorm epsilon."""
    init_std: float = field(0.02, gt=0)
    """Std of the normal init of embeddings and linear weights (residual outputs are scaled down
    by 1/sqrt(2 * effective layers), as in GPT-2)."""

    kind: ClassVar[str] = "lm"
    """What `to_dict` stores under "kind" (two families may share one: LRT is stored as 'dense')."""
    family: ClassVar[str] = "lm"
    """The model family (`cartlab.model.family.ModelSpec.name`) whose hooks this config takes."""
    tag: ClassVar[str] = "kind"

    def validate(self) -> None:
        if self.n_heads is None:
            self.n_heads = max(1, self.d_model // HEAD_DIM)
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            # RoPE rotates channel pairs, so every head needs an even width
            allowed = [h for h in range(1, self.d_model + 1) if self.d_model % h == 0 and (self.d_model // h) % 2 == 0]
            problem = (f"does not divide d_model={self.d_model}" if self.d_model % self.n_heads
                       else f"gives heads of odd width {self.d_model // self.n_heads}")
            raise ConfigError.value("n_heads", self.n_heads, (
                f"it {problem}; n_heads must divide d_model into heads of even width (RoPE rotates channel "
                f"pairs): {allowed[:12]}{' ...' if len(allowed) > 12 else ''}"))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        hidden = int(8 * self.d_model / 3)
        return self.ffn_multiple_of * -(-hidden // self.ffn_multiple_of)

    # -- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **super().to_dict()}

    @classmethod
    def concrete(cls, d: Mapping) -> type:
        """The config class of `d`, picked through the family registry (`family.config_for`)."""
        d = {**d, "kind": d.get("kind", cls.kind if cls is not LMConfig else "cart")}
        target = config_for(d)
        if cls is not LMConfig and not issubclass(target, cls):
            raise ConfigError.value("kind", d["kind"], f"a {cls.__name__} has kind {cls.kind!r}")
        return target

    def use_instead(self, family: str) -> str:
        """What to build instead when a hook of `family` is named on this config: the family's
        config class when it is stored under this config's kind ("" otherwise)."""
        spec = FAMILIES.get(family)
        if spec is None or spec.config.kind != self.kind:
            return ""
        return f"{spec.config.__name__} (or kind {self.kind!r} through LMConfig.from_dict)"

    @classmethod
    def from_json(cls, path: str | Path) -> "LMConfig":
        return cls.from_dict(load_yaml(path, "model config"))  # JSON is YAML


@dataclass
class CARTConfig(LMConfig):
    """CART (section 3): P prelude layers, a frozen MLA KV anchor, one shared core looped R
    times, one coda layer, tied embeddings.

    The component fields below (`core_attention` ... `share_core`) are what the ablation hooks
    rewrite; set them through `hooks=(...)` rather than by hand so the variant has its paper name.
    """

    prelude_layers: int = field(6, ge=1)
    """P: unique MLA self-attention layers before the loop (section 3.1)."""
    n_loops: int = field(6, ge=1)
    """R: applications of the core block during training (section 3.2). Can be overridden at
    inference time (`model(idx, n_loops=...)`, section 7.4)."""
    kv_latent_dim: int | None = field(None, ge=1, none="null for d_model // 4")
    """MLA latent width d_c of every KV projection; None means d_model // 4, which reproduces
    the stored parameter counts of Table 1 (the paper's value was lost in extraction)."""
    core_attention: str = field("anchor", choices=lambda: CORE_ATTENTION)
    """How the core attends: 'anchor' (cross-attention to K,V computed once from the prelude),
    'recomputed' (the anchor's KV projection re-applied to the state every loop) or 'self'
    (MLA self-attention with RoPE; no anchor)."""
    causal_cross_attn: bool = True
    """Causal mask on the core's cross-attention. False reproduces the leak of section 3.4."""
    state_mixer: str = field("hyper", choices=lambda: MIXERS)
    """'hyper': HyperConnection blend of the last 3 loop states; 'last': the latest state only."""
    state_gate: str = field("lti", choices=lambda: GATES)
    """'lti': sigmoid LTI gate h <- A*h + u with spectral radius < 1; 'residual': h <- h + u."""
    loop_embedding: str = field("sinusoidal", choices=lambda: LOOP_EMBEDDINGS)
    """'sinusoidal': loop-index embedding added to the core input; 'none'."""
    share_core: bool = True
    """True: one core block applied R times. False: R distinct core blocks (section 8.3)."""
    gate_init: float = field(0.9, gt=0, lt=1)
    """Initial per-channel retention sigmoid(lambda) of the LTI gate."""
    hooks: tuple[str, ...] = ()
    """Ablation hooks applied to this config (names from `cartlab.model.hooks.HOOKS`)."""

    # -- variable-depth training (hooks random_loops, truncated_bptt; Huginn, paper 7.4) ------------
    # Every field below is left out of `to_dict` at its default, so a fixed-R, full-BPTT config
    # names and hashes exactly as before these fields existed.
    train_loops: str = field("fixed", choices=TRAIN_LOOPS, elide_default=True)
    """How each training step chooses R (set it through the hook `random_loops`): 'fixed' trains
    every step at R = n_loops; 'uniform' draws R uniformly from loops_min..loops_max;
    'poisson_lognormal' draws Huginn's R = 1 + Poisson(e^tau), tau ~ N(log(n_loops - 1) -
    sigma^2 / 2, sigma), whose mean is n_loops, clipped to loops_min..loops_max
    (`cartlab.train.loops`). With random loops n_loops is the mean R, and the R inference uses
    unless told otherwise."""
    loops_min: int = field(1, ge=1, elide_default=True)
    """Smallest R a random-loops training step runs."""
    loops_max: int | None = field(None, ge=1, elide_default=True, none="null for 2 * n_loops - loops_min")
    """Largest R a random-loops training step runs. The default centres the range on n_loops (so
    'uniform' has mean n_loops). An unshared core stores this many blocks, one per loop a step
    can reach."""
    loops_sigma: float = field(0.5, gt=0, elide_default=True)
    """sigma of poisson_lognormal's log-rate tau (Huginn's 0.5)."""
    bptt_loops: int | None = field(None, ge=1, elide_default=True, none="null to backpropagate through every loop")
    """k of truncated backpropagation through the loops (set it through the hook
    `truncated_bptt`): in training, the first R - k loops run without gradient and only the last
    k loops (all R when R <= k) are backpropagated through."""

    # -- fixed-point mode (hook fixed_point, issue 27; `cartlab.model.solvers`) ---------------------------
    # Left out of `to_dict` at their defaults, like the fields above.
    solver: str = field("none", choices=("none", "iteration", "anderson"), elide_default=True)
    """'none' loops R times; set through the hook `fixed_point`: 'iteration' (plain fixed-point
    iteration) or 'anderson' (Anderson acceleration) solves h* = f(h*) for the loop map instead."""
    solver_tol: float = field(1e-3, gt=0, elide_default=True)
    """A token's solve stops when |f(h) - h| / |f(h)| < solver_tol."""
    solver_max_iter: int = field(30, ge=1, elide_default=True)
    """Most solver iterations (forward, and the implicit backward's own solve)."""
    backward: str = field("ift", choices=("ift", "phantom", "unrolled"), elide_default=True)
    """Gradient of the fixed point: 'ift' (implicit differentiation, memory constant in the
    iterations), 'phantom' (phantom_steps unrolled steps from h*), 'unrolled' (through every iteration)."""
    phantom_steps: int = field(2, ge=1, elide_default=True)
    """k of backward='phantom'."""
    jacobian_penalty: float = field(0.0, ge=0, elide_default=True)
    """Weight of the Jacobian penalty |J|_F^2 / d at h* (one Hutchinson probe) in the training loss."""

    # -- the learned exit head (hook exit_head, issue 27; `cartlab.model.exits.ExitHead`) ---------------
    exit_head: bool = field(False, elide_default=True)
    """A head on the loop state that learns when further loops stop changing the prediction
    (set it through the hook `exit_head`); read at inference by exit='learned'."""
    exit_loss_weight: float = field(0.01, gt=0, elide_default=True)
    """Weight of the exit head's binary cross-entropy in the training loss."""

    kind: ClassVar[str] = "cart"
    family: ClassVar[str] = "cart"

    def validate(self) -> None:
        super().validate()
        applied = _hooks.apply_hooks(self)
        if self.kv_latent_dim is None:
            self.kv_latent_dim = max(1, self.d_model // 4)
        if not self.causal_cross_attn and not CORE_ATTENTION[self.core_attention].cross:
            applied.refuse_together(("core_attention", "causal_cross_attn"),
                                    "the core has no cross-attention to un-mask")
            crosses = sorted(k for k, v in CORE_ATTENTION.items() if v.cross)
            raise self.reject("causal_cross_attn", (
                f"an unmasked cross-attention needs a cross-attention core (core_attention in {crosses}), got "
                f"core_attention={self.core_attention!r}: there is no cross-attention to un-mask"))
        self._check_training_depth()
        self._check_fixed_point(applied)
        self._check_exit_head(applied)

    def _check_exit_head(self, applied) -> None:
        if self.exit_head and "exit_head" not in self.hooks:
            raise self.reject("exit_head", "a learned exit head is the hook exit_head: add it to hooks, or leave "
                                           "exit_head false")
        if not self.exit_head and self.exit_loss_weight != 0.01:
            raise self.reject("exit_loss_weight", "exit_loss_weight weighs the exit head's loss: add the hook "
                                                  "exit_head or leave it at 0.01")
        if self.exit_head and self.solver != "none":
            why = "the exit head learns when a loop may stop, the fixed-point mode stops by its solver"
            applied.refuse_together(("solver", "exit_head"), why)
            raise self.reject("exit_head", f"{why}; use one of exit_head and fixed_point")

    def _check_fixed_point(self, applied) -> None:
        """The solver fields belong to the hook fixed_point, which needs a loop map of h alone
        whose only input is the frozen anchor: a shared core, no random R, no truncation."""
        if self.solver == "none":
            for f in dataclasses.fields(self):
                if f.name in SOLVER_FIELDS and getattr(self, f.name) != f.default:
                    raise self.reject(f.name, (
                        f"{f.name} shapes the fixed-point mode: add the hook fixed_point or leave {f.name} at its "
                        f"default ({show(f.default)})"))
            return
        if "fixed_point" not in self.hooks:
            raise self.reject("solver", "a fixed-point solve is the hook fixed_point: add it to hooks, or leave "
                                        "solver='none'")
        needs = {"core_attention": ("anchor", "the fixed point must depend on the input through the frozen anchor"),
                 "share_core": (True, "the loop map must be the same at every iteration"),
                 "train_loops": ("fixed", "the solver, not a drawn R, sets the depth"),
                 "bptt_loops": (None, "the backward mode sets the gradient (backward=ift|phantom|unrolled)")}
        for name, (value, why) in needs.items():
            if getattr(self, name) != value:
                applied.refuse_together(("solver", name), f"the fixed-point mode needs {name}={show(value)}: {why}")
                raise self.reject(name, f"the hook fixed_point needs {name}={show(value)}: {why}")
        if self.backward != "phantom" and self.phantom_steps != 2:
            raise self.reject("phantom_steps", "phantom_steps is k of backward='phantom' only; leave it at 2")

    def _check_training_depth(self) -> None:
        """The variable-depth fields: each belongs to its hook, and the loop range must make sense."""
        if self.loops_vary and "random_loops" not in self.hooks:
            raise self.reject("train_loops", (
                f"a random loop count is the hook random_loops: add it to hooks (train_loops={self.train_loops} "
                f"then picks its distribution), or leave train_loops='fixed'"))
        if self.bptt_loops is not None and "truncated_bptt" not in self.hooks:
            raise self.reject("bptt_loops", (
                "truncated backpropagation is the hook truncated_bptt: add it to hooks, or leave bptt_loops null"))
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.name in RANGE_FIELDS}
        if not self.loops_vary:
            for name, default in defaults.items():
                if getattr(self, name) != default:
                    raise self.reject(name, (
                        f"{name} shapes the random loop count, which this model does not draw; add the hook "
                        f"random_loops or leave {name} at its default ({show(default)})"))
        else:
            low, high = self.loop_range
            if self.n_loops < low:
                raise self.reject("n_loops", f"with random loops n_loops is the mean R and must be >= loops_min={low}")
            if self.n_loops > high:  # only a loops_max given by hand: the default is >= n_loops
                raise self.reject("loops_max", f"it must be >= n_loops={self.n_loops}, the mean R of random loops")
            if low == high:
                name = "loops_max" if self.loops_max is not None else "hooks"
                raise ConfigError.value(name, self.loops_max if self.loops_max is not None else list(self.hooks), (
                    f"random_loops would draw R from {low}..{high}, i.e. R={low} at every step (n_loops={self.n_loops}"
                    f"{', set by single_loop' if 'single_loop' in self.hooks else ''}); drop random_loops, or widen "
                    f"loops_min..loops_max"))
            if self.train_loops == "poisson_lognormal" and self.n_loops < 2:
                raise self.reject("n_loops", (
                    "poisson_lognormal draws R = 1 + Poisson with mean n_loops - 1, so n_loops must be >= 2 "
                    "(or use train_loops=uniform)"))
            if self.train_loops != "poisson_lognormal" and self.loops_sigma != defaults["loops_sigma"]:
                raise self.reject("loops_sigma", (
                    f"loops_sigma shapes train_loops=poisson_lognormal only, not {self.train_loops}; leave it at "
                    f"{show(defaults['loops_sigma'])}"))
        high = self.loop_range[1]
        if self.bptt_loops is not None and self.bptt_loops >= high:
            raise self.reject("bptt_loops", (
                f"truncated_bptt through the last {self.bptt_loops} loops truncates nothing when a step runs at most "
                f"{high} loop{'s' if high > 1 else ''} (n_loops={self.n_loops}"
                f"{', set by single_loop' if 'single_loop' in self.hooks else ''}); it must be < {high}, or drop "
                f"truncated_bptt"))

    @property
    def loops_vary(self) -> bool:
        """True when training draws R afresh for every step (hook `random_loops`)."""
        return self.train_loops != "fixed"

    @property
    def loop_range(self) -> tuple[int, int]:
        """(smallest, largest) R a training step runs: (n_loops, n_loops) unless loops vary."""
        if not self.loops_vary:
            return self.n_loops, self.n_loops
        high = self.loops_max if self.loops_max is not None else 2 * self.n_loops - self.loops_min
        return self.loops_min, high

    @property
    def n_core_blocks(self) -> int:
        """Distinct core blocks stored: 1 when shared; when unshared, one per loop a training step
        can run (R, or loops_max under random loops)."""
        return 1 if self.share_core else self.loop_range[1]

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
    """Dense baseline (section 4.3): n_layers standard MHA + SwiGLU + RoPE layers, tied embeddings.

    LRT, the Dense model with a recurrent memory, is its own family on this config
    (`cartlab.model.lrt.LRTConfig`), stored under the same kind 'dense'.
    """

    n_layers: int = field(12, ge=1)
    """Number of transformer layers (the paper trains 7 and 12 at d=1024)."""
    hooks: tuple[str, ...] = field((), elide_default=True)
    """Hooks applied to this config (names of the config's family from `cartlab.model.hooks.HOOKS`)."""

    kind: ClassVar[str] = "dense"
    family: ClassVar[str] = "dense"

    def validate(self) -> None:
        super().validate()
        _hooks.apply_hooks(self)

    @property
    def effective_depth(self) -> int:
        return self.n_layers

    @classmethod
    def tiny(cls, **kw) -> "DenseConfig":
        base = dict(vocab_size=64, d_model=32, n_heads=4, n_layers=3, ffn_multiple_of=16)
        return cls(**{**base, **kw})


SHAPE_FIELDS = ("vocab_size", "d_model", "n_heads", "ffn_multiple_of", "prelude_layers", "n_loops", "n_layers", "hooks")
"""The fields a model's label states; every other field is the family default or the hooks' value
unless `model_overrides` says otherwise."""


def model_overrides(cfg: LMConfig) -> dict[str, Any]:
    """The fields of `cfg` set by hand: those that differ from the config the family's defaults
    and its hooks give at the same shape. `CARTConfig(state_gate="residual")` -> {"state_gate":
    "residual"}: the no-LTI model, but not the `no_lti` variant's name, so it is never taken
    for a baseline."""
    shape = {k: v for k, v in cfg.to_dict().items() if k in SHAPE_FIELDS}
    reference = type(cfg).from_dict(shape).to_dict()
    return {k: v for k, v in cfg.to_dict().items() if k not in SHAPE_FIELDS and v != reference.get(k)}


def format_overrides(overrides: dict[str, Any]) -> str:
    """{"state_gate": "residual", "gate_init": 0.5} -> "gate_init=0.5,state_gate=residual" ("" for none)."""
    return ",".join(f"{k}={v if not isinstance(v, bool) else str(v).lower()}" for k, v in sorted(overrides.items()))

