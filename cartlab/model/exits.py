"""Per-token exit rules for CART's loop (adaptive depth at inference; issue 27).

    logits, _ = model(idx, n_loops=12, exit="kl", exit_threshold=1e-3)
    model.loops_per_token  # (B, T): loops each token ran, 1..12

A rule decides after every loop, for every token, whether that token stops. A stopped token keeps
its whole state history (h_r, h_{r-1}, ...) from then on, so its final state is the one it had
when it stopped; `n_loops` is the largest R any token runs. The zero-shot criteria follow Huginn
(Geiping et al. 2025, `ExitEvaluator` of seal-rg/recurrent-pretraining); `learned` follows the
exit heads of LoopUS and Ouro:

    fixed     never stops early: every token runs n_loops (today's behaviour, bit for bit)
    kl        KL(p_r || p_{r-1}) < threshold (nats): the prediction stopped moving
    entropy   H(p_r) < threshold (nats): the prediction is confident
    latent    |h_r - h_{r-1}| / |h_r| < threshold: the state stopped moving
    argmax    the top-1 token was the same for `threshold` loops in a row (an integer >= 1)
    learned   the exit head's probability that further loops no longer change the prediction
              is > threshold (needs the hook `exit_head`; `cartlab.model.exits.ExitHead`)

The prediction p_r a rule reads is the tied LM head applied straight to the loop state
(norm, then lm_head: the logit lens without the coda). The coda attends across positions, so a
per-loop coda would make one token's exit depend on its neighbours' intermediate states; the
head alone keeps every decision a function of the token's own state. With CART's frozen anchor
no token reads another token's loop state either, so a token's loop count and final state do
not depend on which other tokens stopped when: KV-cached decoding with exits equals the uncached
forward with the same exits, and a token that stops early leaves no gap in any cache (the anchor
is written once, before the loop). Variants whose core reads other tokens' loop states
(`unfreeze_kv`, `self_attn_core`) stay exact too: there the stopped tokens still take part in
every loop (their states frozen), and cached decoding runs all n_loops so that every per-loop
cache gets its row.

p_0 and h_0 (the prelude output) are the reference for the first loop, so a token may stop
after one loop.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from cartlab.model.layers import RMSNorm, upcast

EXITS: dict[str, type["ExitRule"]] = {}


def register_exit(name: str):
    def wrap(cls):
        if name in EXITS:
            raise ValueError(f"exit rule {name!r} is already registered")
        cls.name = name
        EXITS[name] = cls
        return cls

    return wrap


class ExitRule:
    """One exit criterion with its threshold. `read(model, h, prev)` is what the rule compares
    from a loop state h (B, T, d) (prev: the previous loop's reading); `done(cur, prev)` is the
    (B, T) bool of tokens that stop now."""

    name = ""
    default: float = 0.0
    """The threshold used when none is given."""

    def __init__(self, threshold: float | None = None):
        t = self.default if threshold is None else threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"exit_threshold={threshold!r} is not allowed for exit={self.name!r}: "
                             f"it must be a finite number >= 0")
        self.threshold = float(t)

    def read(self, model: nn.Module, h: torch.Tensor, prev: Any) -> Any:
        raise NotImplementedError

    def done(self, cur: Any, prev: Any) -> torch.Tensor:
        raise NotImplementedError


def lens(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """log p_r (B, T, V), fp32 (or float64): the tied head read straight off the loop state h (B, T, d)."""
    return F.log_softmax(upcast(model.lm_head(model.norm(h))), dim=-1)


@register_exit("fixed")
class Fixed(ExitRule):
    """Every token runs n_loops (the threshold is ignored)."""

    def read(self, model, h, prev):
        return None

    def done(self, cur, prev):
        raise AssertionError("the fixed rule is never asked")  # CART runs the plain loop for it


@register_exit("kl")
class KLExit(ExitRule):
    default = 1e-3

    def read(self, model, h, prev):
        return lens(model, h)

    def done(self, cur, prev):
        return (cur.exp() * (cur - prev)).sum(-1) < self.threshold  # KL(p_r || p_{r-1}): (B, T)


@register_exit("entropy")
class EntropyExit(ExitRule):
    default = 1.0

    def read(self, model, h, prev):
        return lens(model, h)

    def done(self, cur, prev):
        return -(cur.exp() * cur).sum(-1) < self.threshold


@register_exit("latent")
class LatentExit(ExitRule):
    default = 1e-2

    def read(self, model, h, prev):
        return upcast(h)

    def done(self, cur, prev):
        return (cur - prev).norm(dim=-1) < self.threshold * cur.norm(dim=-1)


@register_exit("argmax")
class ArgmaxExit(ExitRule):
    """Stops when the top-1 token has been the same at `threshold` successive loop ends."""

    default = 2

    def __init__(self, threshold: float | None = None):
        super().__init__(threshold)
        if self.threshold != int(self.threshold) or self.threshold < 1:
            raise ValueError(f"exit_threshold={threshold!r} is not allowed for exit='argmax': it counts loops "
                             f"with an unchanged top-1 and must be an integer >= 1")

    def read(self, model, h, prev):
        top = model.lm_head(model.norm(h)).argmax(-1)  # (B, T)
        streak = torch.zeros_like(top) if prev is None else torch.where(top == prev[0], prev[1] + 1, 0)
        return top, streak

    def done(self, cur, prev):
        return cur[1] >= self.threshold


@register_exit("learned")
class LearnedExit(ExitRule):
    """Stops when the exit head says further loops will not change the prediction."""

    default = 0.5

    def read(self, model, h, prev):
        if getattr(model, "exit_head", None) is None:
            raise ValueError("exit='learned' needs a model with an exit head (hook exit_head); this one has none")
        return torch.sigmoid(upcast(model.exit_head(h)))  # (B, T)

    def done(self, cur, prev):
        return cur > self.threshold


class ExitHead(nn.Module):
    """The learned exit head (hook `exit_head`; LoopUS's Q-head, Ouro's exit gate): RMSNorm and a
    linear map of a loop state h_r (B, T, d) to the logit (B, T) of "the prediction has settled".

    Target: the logit-lens top-1 at loop r equals the top-1 at every later loop of the training
    step (the `settled` of `cartlab.model.probes.logit_lens`, read through the head alone as the
    rules read it). The head reads detached states, so its binary cross-entropy, added to the
    training loss with weight `exit_loss_weight`, trains the head only: the language model's
    gradients are the same with and without it (before a global gradient-norm clip, which the
    head's gradient joins)."""

    def __init__(self, cfg):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.proj = nn.Linear(cfg.d_model, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(h)).squeeze(-1)  # (B, T)

    def loss(self, model: nn.Module, states: list[torch.Tensor]) -> torch.Tensor:
        """Binary cross-entropy of the head on the R loop states (B, T, d) of one forward."""
        target = settled(model, states)  # (R, B, T)
        logits = upcast(torch.stack([self(h.detach()) for h in states]))  # (R, B, T)
        return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype))


@torch.no_grad()
def settled(model: nn.Module, states: list[torch.Tensor]) -> torch.Tensor:
    """1.0 where the top-1 of the head read off state r equals the top-1 at every later state, (R, B, T)."""
    tops = torch.stack([model.lm_head(model.norm(h)).argmax(-1) for h in states])  # (R, B, T)
    same = (tops == tops[-1]).float()
    return same.flip(0).cumprod(0).flip(0)


def exit_rule(exit: str | None, threshold: float | None = None) -> ExitRule | None:
    """The rule `exit` with `threshold`; None for today's fixed-R loop (exit None or 'fixed')."""
    if exit is None:
        if threshold is not None:
            raise ValueError(f"exit_threshold={threshold!r} is not allowed without an exit rule; "
                             f"name one with exit= ({', '.join(EXITS)})")
        return None
    if exit not in EXITS:
        raise ValueError(f"exit={exit!r} is not allowed; choose one of {', '.join(EXITS)}")
    rule = EXITS[exit](threshold)
    return None if exit == "fixed" else rule


class Halting:
    """One forward's exit bookkeeping: which tokens still loop (B, T) and how many loops each ran."""

    def __init__(self, rule: ExitRule, model: nn.Module, e: torch.Tensor):
        self.rule, self.model = rule, model
        self.active = torch.ones(e.shape[:-1], dtype=torch.bool, device=e.device)  # (B, T)
        self.loops = torch.zeros(e.shape[:-1], dtype=torch.long, device=e.device)  # (B, T)
        self.prev = rule.read(model, e, None)  # the reading of h_0 = e

    def advance(self, old: list[torch.Tensor], new: list[torch.Tensor]) -> list[torch.Tensor]:
        """The history after one loop: `new` for the tokens still looping, `old` for the stopped."""
        keep = self.active[..., None]  # (B, T, 1)
        history = [torch.where(keep, n, o) for n, o in zip(new, old)]
        self.loops += self.active
        cur = self.rule.read(self.model, new[0], self.prev)
        self.active = self.active & ~self.rule.done(cur, self.prev)
        self.prev = cur
        return history

    def finished(self) -> bool:
        """True when no token loops any more (one host sync)."""
        return not bool(self.active.any())
