"""Hooks: named, composable rewrites of a model config (CART's section-8 ablations, LRT on Dense).

A hook is a pure function `config -> {field: value}` registered with `@register_hook` for one
model family (`family="cart"`, `"lrt"`, ...: the `ModelSpec.name` of `cartlab.model.family`,
the config's `family`) and one variant group (`group="ablation"`: `PAPER_ABLATIONS` and
`LRT_HOOKS` are read off the registry by group). Hooks are applied when a config is made
(`CARTConfig(hooks=("no_lti", "unshare_core"))`, `LRTConfig(hooks=("lrt_kv", "lrt_residual"))`),
in registration order whatever order they were given in, and the applied names stay in
`config.hooks`, so `LMConfig.from_dict(config.to_dict())` rebuilds the same variant. A hook of
one family named on a config of another is refused (`hooks=['lrt_kv'] is not allowed: 'lrt_kv'
is a hook of the lrt family, not of dense ...`).

Adding a variant touches neither `cart.py` nor this file: register a component in
`cartlab.model.components` (or your own module) and a hook that selects it:

    from cartlab.model.hooks import register_hook

    @register_hook("my_gate", section="my paper, section 2")
    def my_gate(cfg):
        "Replace the LTI gate by ..."
        return {"state_gate": "my_gate"}

Two CART hooks change how the model is trained, not what it computes (variable-depth
training, Huginn: Geiping et al. 2025; the fixed-R problem of paper section 7.4):
`random_loops` draws R afresh for every optimiser step (`cartlab.train.loops`; n_loops becomes
the mean R) and `truncated_bptt` backpropagates through the last k loops only. Both compose with
every other hook; `model.train_loops`, `model.loops_*` and `model.bptt_loops` tune them and are
refused without their hook.

Two more CART hooks treat the loop as a solver (issue 27): `fixed_point` solves h* = f(h*) for
the loop map instead of looping R times (`cartlab.model.solvers`; `model.solver*`, `backward`,
`phantom_steps` and `jacobian_penalty` tune it), and `exit_head` trains a head that tells when a
token may stop looping (exit='learned' of `cartlab.model.exits`, `model.exit_loss_weight`).

Refused combinations are kept minimal and follow from two rules, not from a hand-kept list:
1. two hooks that set the same field to different values are refused (e.g. `unfreeze_kv` and
   `self_attn_core` both decide where the core's K, V come from);
2. the resulting config must be valid (e.g. `noncausal_cross_attn` needs a cross-attention
   core, so it is refused together with `self_attn_core`; `single_loop` leaves R = 1, nothing
   for `random_loops` to draw or `truncated_bptt` to truncate). When the fields that clash were
   all set by hooks, the message names those hooks (`Applied.refuse_together`), not the fields,
   which the user never typed.
Every other combination of the seven paper ablations builds, trains and evaluates, with or
without `random_loops` and `truncated_bptt`, and so does every combination of the two LRT hooks
(with shared or unshared memory projections).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from cartlab.config import ConfigError, show


@dataclass(frozen=True)
class Hook:
    name: str
    section: str
    fn: Callable[[Any], dict[str, Any]]
    family: str = "cart"
    """The model family whose configs this hook rewrites (`cartlab.model.family`)."""
    group: str = ""
    """What kind of variant it makes: 'ablation' (the paper's section-8 ablations,
    `PAPER_ABLATIONS`), 'control', 'training', 'memory' (LRT's injection paths, `LRT_HOOKS`),
    'solver' (the loop as a solver: `fixed_point`, `exit_head`)."""

    @property
    def summary(self) -> str:
        return (self.fn.__doc__ or "").strip().splitlines()[0]


HOOKS: dict[str, Hook] = {}


def register_hook(name: str, section: str, family: str = "cart", group: str = ""):
    """Register `fn(config) -> {field: value}` as the hook `name` reproducing paper `section`,
    applicable to configs of the model family `family` ('cart', 'dense', 'lrt', or one registered
    later), in the variant group `group` (see `Hook.group`)."""

    def wrap(fn):
        if name in HOOKS:
            raise ValueError(f"hook {name!r} is already registered")
        if not fn.__doc__:
            raise ValueError(f"hook {name!r} needs a docstring saying what it changes")
        HOOKS[name] = Hook(name, section, fn, family, group)
        return fn

    return wrap


def hooks_for(family: str) -> list[str]:
    """Names of the hooks that apply to configs of the family `family`, in registration order."""
    return [n for n, h in HOOKS.items() if h.family == family]


def hooks_in(group: str) -> tuple[str, ...]:
    """Names of the hooks of the variant group `group`, in registration order."""
    return tuple(n for n, h in HOOKS.items() if h.group == group)


@dataclass(frozen=True)
class Applied:
    """What `apply_hooks` did: the hooks as given, and which hook set each field to what."""

    given: tuple[str, ...]
    set_by: dict[str, tuple[str, Any]]
    """field -> (the hook that set it, the value)."""

    def refuse_together(self, fields: tuple[str, ...], why: str) -> None:
        """When the `fields` that a rule of the config refuses together were set by two or more
        hooks, raise that those hooks cannot be combined, naming them, `why` and what each does;
        otherwise return, and the caller refuses the fields themselves."""
        if not all(f in self.set_by for f in fields):
            return
        names = list(dict.fromkeys(self.set_by[f][0] for f in fields))
        if len(names) < 2:
            return
        what = " and ".join(f"{self.set_by[f][0]} sets {f}={show(self.set_by[f][1])}" for f in fields)
        raise ConfigError.value("hooks", list(self.given), (
            f"{' and '.join(repr(n) for n in names)} cannot be combined: {what}: {why}. "
            + " ".join(f"{n}: {HOOKS[n].summary}" for n in names)))


def apply_hooks(cfg) -> Applied:
    """Apply `cfg.hooks` to `cfg` in place (called by `CARTConfig.validate` and
    `DenseConfig.validate`); returns which hook set which field, for the messages of rules
    that refuse a combination of fields (`Applied.refuse_together`)."""
    names = list(cfg.hooks)
    mine = hooks_for(cfg.family)
    unknown = [n for n in names if n not in HOOKS]
    if unknown:
        raise ConfigError.value("hooks", names, f"unknown hook(s) {unknown}; choose from {', '.join(mine)}")
    foreign = [n for n in names if HOOKS[n].family != cfg.family]
    if foreign:
        n = foreign[0]
        instead = cfg.use_instead(HOOKS[n].family)
        use = f"; use {instead}" if instead else ""
        raise ConfigError.value("hooks", names, (
            f"{n!r} is a hook of the {HOOKS[n].family} family, not of {cfg.family}; "
            f"{cfg.family} hooks: {', '.join(mine) or 'none'}{use}"))
    if len(set(names)) != len(names):
        raise ConfigError.value("hooks", names, "names a hook twice; each hook may appear once")
    ordered = [n for n in HOOKS if n in names]
    setters: dict[str, tuple[str, Any]] = {}
    for name in ordered:
        for fld, value in HOOKS[name].fn(cfg).items():
            if not hasattr(cfg, fld):
                raise ConfigError(f"hooks: {name!r} sets {fld!r}, which is not a {type(cfg).__name__} field")
            if fld in setters and setters[fld][1] != value:
                other = setters[fld][0]
                raise ConfigError.value("hooks", names, (
                    f"{other!r} and {name!r} cannot be combined: both set {fld} "
                    f"({setters[fld][1]!r} vs {value!r}). {other}: {HOOKS[other].summary} "
                    f"{name}: {HOOKS[name].summary}"))
            setters[fld] = (name, value)
    for fld, (_, value) in setters.items():
        setattr(cfg, fld, value)
    cfg.hooks = tuple(ordered)
    return Applied(tuple(names), setters)


# -- the paper's seven diagnostic ablations (section 8) -------------------------------------------------
@register_hook("unfreeze_kv", section="8.1 (Ablation X)", group="ablation")
def unfreeze_kv(cfg):
    """Recompute the core's K, V from the state at every loop with the anchor's KV weights."""
    return {"core_attention": "recomputed"}


@register_hook("single_loop", section="8.2 (Ablation Y)", group="ablation")
def single_loop(cfg):
    """Train with R = 1: the core runs once (HyperConnection, LIE and the gate degenerate)."""
    return {"n_loops": 1}


@register_hook("unshare_core", section="8.3 (Ablation Z)", group="ablation")
def unshare_core(cfg):
    """Give each of the R loops its own core block (mixer, LIE, gate and anchor stay shared)."""
    return {"share_core": False}


@register_hook("self_attn_core", section="8.4 (Ablation W)", group="ablation")
def self_attn_core(cfg):
    """Replace the core's anchor cross-attention by MLA self-attention with RoPE; no anchor."""
    return {"core_attention": "self"}


@register_hook("no_hyper", section="8.5 (Ablation HC)", group="ablation")
def no_hyper(cfg):
    """Drop the HyperConnection blend: each loop reads the latest state only."""
    return {"state_mixer": "last"}


@register_hook("no_lti", section="8.6 (Ablation LTI)", group="ablation")
def no_lti(cfg):
    """Drop the LTI gate: plain residual h <- h + u."""
    return {"state_gate": "residual"}


@register_hook("no_lie", section="8.7 (Ablation LIE)", group="ablation")
def no_lie(cfg):
    """Drop the loop-index embedding."""
    return {"loop_embedding": "none"}


# -- negative control ----------------------------------------------------------------------------------------
@register_hook("noncausal_cross_attn", section="3.4 (causal cross-attention requirement)", group="control")
def noncausal_cross_attn(cfg):
    """Negative control: unmask the core's cross-attention, leaking future tokens (section 3.4)."""
    return {"causal_cross_attn": False}


PAPER_ABLATIONS = hooks_in("ablation")
"""The seven diagnostic ablations of section 8, in the paper's order."""


# -- variable-depth training: how R is chosen per step, and how far the backward reaches ----------------
@register_hook("random_loops", section="Huginn (Geiping et al. 2025) / paper 7.4 (fixed-R training)", group="training")
def random_loops(cfg):
    """Draw R for every optimiser step (poisson_lognormal unless train_loops=uniform); n_loops is its mean."""
    return {"train_loops": cfg.train_loops if cfg.train_loops != "fixed" else "poisson_lognormal"}


@register_hook("truncated_bptt", section="Huginn (Geiping et al. 2025) / paper 2 (Parcae)", group="training")
def truncated_bptt(cfg):
    """Backpropagate through the last k = bptt_loops loops only (default ceil(n_loops / 2))."""
    return {"bptt_loops": cfg.bptt_loops or max(1, math.ceil(cfg.n_loops / 2))}


# -- the loop as a solver (issue 27; `cartlab.model.solvers`) ---------------------------------------
@register_hook("fixed_point", section="Deep Equilibrium Models (Bai et al. 2019) / Attractor models", group="solver")
def solve_fixed_point(cfg):
    """Solve h* = f(h*) for the loop map (solver=anderson unless iteration) instead of running R loops."""
    return {"solver": cfg.solver if cfg.solver != "none" else "anderson"}


@register_hook("exit_head", section="LoopUS (Q-head) / Ouro (exit gate); issue 27", group="solver")
def learn_exit_head(cfg):
    """Train a small head on the loop state to predict when further loops stop changing the prediction (exit='learned')."""
    return {"exit_head": True}


def __getattr__(name: str):
    # LRT's hooks are registered by `cartlab.model.lrt`, which imports this module
    if name == "LRT_HOOKS":
        return hooks_in("memory")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
