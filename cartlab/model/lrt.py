"""LRT, the Latent Recurrent Transformer (2026): the Dense model with a recurrent memory, its own
model family on the Dense backbone.

The previous token's state at the source layer, m_{t-1}, is read by the current token at the
injection layers (the mechanics: `cartlab.model.memory`). Two hooks switch our injection paths
on, `lrt_kv` and `lrt_residual` (both together: our default, built from the LRT summary); the
hook `lrt_paper` sets the published recipe as the authors' code builds it (final normed state
into every layer, gamma, gated K/V feedback, all-passes loss), and every difference between the
two is one `memory_*` field.

Stored exactly as before LRT was a family: an `LRTConfig` serializes to kind 'dense' with its LRT
hooks and its `memory_*` fields (each left out while at its default), so run ids, variant keys
and the runs table's `model` column do not change; `LMConfig.from_dict` reads such a dict back as
an `LRTConfig` because it names LRT hooks (`cartlab.model.family.config_for`).

    from cartlab.model import LRTConfig, build_model
    model = build_model(LRTConfig(d_model=512, n_layers=12, hooks=("lrt_kv", "lrt_residual")))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from cartlab.config import ConfigError, field
from cartlab.model.config import DenseConfig
from cartlab.model.dense import Dense, dense_label, dense_stem
from cartlab.model.family import ModelSpec, register_family
from cartlab.model.hooks import hooks_for, hooks_in, register_hook
from cartlab.model.layers import KVCache, cache_site
from cartlab.model.memory import LatentMemory, Recall
from cartlab.model.memory_attention import SlotBlock


# -- the hooks: which injection paths the memory uses ---------------------------------------------------------
@register_hook("lrt_kv", section="LRT (2026): KVProjection", family="lrt", group="memory")
def lrt_kv(cfg):
    """LRT memory as an extra private key/value entry per token at the injection layers."""
    return {"memory_kv": True}


@register_hook("lrt_residual", section="LRT (2026): ResidualInjection", family="lrt", group="memory")
def lrt_residual(cfg):
    """LRT memory projected and added to the residual stream at the injection layers."""
    return {"memory_residual": True}


@register_hook("lrt_paper", section="LRT (2026): the authors' code, nanochat/gpt.py forward_interleaved_train",
               family="lrt", group="recipe")
def lrt_paper(cfg):
    """The published LRT recipe: final normed state into every layer, gamma 0.1, gated K/V feedback, all-passes loss."""
    return {"memory_residual": True, "memory_kv_feedback": True,
            "memory_source": cfg.n_layers - 1 if cfg.memory_source is None else cfg.memory_source,
            "memory_layers": tuple(range(cfg.n_layers)) if cfg.memory_layers is None else cfg.memory_layers,
            "memory_read": cfg.memory_read or "norm",
            "memory_gamma": PAPER_GAMMA if cfg.memory_gamma is None else cfg.memory_gamma,
            "memory_loss": cfg.memory_loss or "all_passes"}


PAPER_GAMMA = 0.1
"""The published recipe's initial residual scale gamma (one scalar per layer)."""

LRT_HOOKS = hooks_in("memory")
"""LRT's hooks, in registration order: ('lrt_kv', 'lrt_residual'). `lrt_paper` (group 'recipe')
sets the fields of the published recipe; each of its fields set by hand, on top of it, is one
ablation towards ours (`memory_read: projection`, `memory_source`, `memory_layers`,
`memory_loss: refined`), and `lrt_kv` adds our private slot to it."""


LRT_VARIANTS = {
    "ours: lrt_kv+lrt_residual, shared projection": {"hooks": ["lrt_kv", "lrt_residual"]},
    "ours, unshared projections": {"hooks": ["lrt_kv", "lrt_residual"], "memory_shared": False},
    "ours, lrt_kv only": {"hooks": ["lrt_kv"]},
    "ours, lrt_residual only": {"hooks": ["lrt_residual"]},
    "ours, 2 sweeps": {"hooks": ["lrt_kv", "lrt_residual"], "memory_sweeps": 2},
    "lrt_paper": {"hooks": ["lrt_paper"]},
    "lrt_paper, K/V refresh": {"hooks": ["lrt_paper"], "memory_kv_refresh": True},
    "lrt_paper, 2 sweeps": {"hooks": ["lrt_paper"], "memory_sweeps": 2},
}
"""The LRT variants `cartlab model info --lrt-variants` compares on one Dense backbone: the
config fields each sets on top of the backbone's."""

READS = ("projection", "norm")
LOSSES = ("refined", "all_passes")


@dataclass
class LRTConfig(DenseConfig):
    """LRT on a Dense backbone of n_layers layers: at least one of the hooks `lrt_kv`,
    `lrt_residual`, `lrt_paper` (the hooks, not the fields they set, make a stored dict read back
    as LRT). Every `memory_*` field below is left out of `to_dict` at its default."""

    memory_kv: bool = field(False, elide_default=True)
    """LRT KVProjection (set by `lrt_kv`): at each injection layer token t attends to one extra
    key/value entry projected from m_{t-1}, private to t."""
    memory_residual: bool = field(False, elide_default=True)
    """LRT ResidualInjection (set by `lrt_residual`): a projection of m_{t-1} is added to token t's
    residual stream at the input of each injection layer."""
    memory_source: int | None = field(None, ge=0, elide_default=True,
                                      none="null for the second-to-last layer, n_layers - 2")
    """Layer whose output at position t-1 is the memory m_{t-1} (0-based). The default is the
    second-to-last layer (layer 0 for a 1-layer model): the LRT summary reports that higher-level
    source layers give stronger recurrent memory than the final layer, whose state is shaped for
    the next-token head."""
    memory_layers: tuple[int, ...] | None = field(None, elide_default=True,
                                                  none="null for every layer from 0 to memory_source")
    """Injection layers (0-based, distinct, stored sorted). Any layer is causal, since m_{t-1}
    comes from the previous token; layers at or below the source feed the recurrence (m_t then
    depends on m_{t-1}), layers above it only read the previous token's state. The default, every
    layer up to and including the source, makes the whole path to the source recurrent."""
    memory_shared: bool = field(True, elide_default=True)
    """True: one memory projection (d*d weights, plus a norm) shared by every injection layer and
    both injection paths, the low-parameter default (+0.46% parameters at d=512, 12 layers).
    False: one projection per injection layer."""
    memory_subsets: int = field(4, ge=1, elide_default=True)
    """S, the number of disjoint interleaved position subsets {t : t % S == k} refined in turn by
    the interleaved parallel training forward (`cartlab.model.memory`). The training forward costs
    about 2 plain forwards whatever S; S >= sequence length is the exact recurrence. The LRT
    summary gives no value; 4 is our choice."""

    memory_kv_feedback: bool = field(False, elide_default=True)
    """The published recipe's gated K/V feedback (set by `lrt_paper`): per injection layer, key
    and value projections of the memory mixed into the layer's own keys and values by a learned
    gate per head (`cartlab.model.memory_attention`)."""
    memory_read: str | None = field(None, choices=READS, elide_default=True,
                                    none="null for projection, or norm under lrt_paper")
    """How the memory m_{t-1} is read: 'projection' (ours: W RMSNorm(m), shared or per layer, see
    `memory_shared`) or 'norm' (the published recipe: the model's own final norm, no weights; with
    the last layer as source this is the state the LM head reads, h_final)."""
    memory_gamma: float | None = field(None, elide_default=True,
                                       none="null for our per-channel gain starting at 0, or 0.1 under lrt_paper")
    """Residual injection scale: null for ours (a per-channel gain per injection layer, zero at
    init, so an untrained model equals its Dense backbone); a number for the published recipe's
    one scalar per layer, initialised to it (`lrt_paper`: 0.1)."""
    memory_loss: str | None = field(None, choices=LOSSES, elide_default=True,
                                    none="null for refined, or all_passes under lrt_paper")
    """Training loss of the interleaved forward: 'refined' (ours: every token from its refined
    state) or 'all_passes' (the published recipe: the plain mean of the passes' losses, the
    memory-free full pass included, each averaged over its own positions)."""
    memory_kv_refresh: bool = field(False, elide_default=True)
    """The published recipe's optional `--interleaved-kv-refresh`: before each pass, re-mix the
    buffered keys and values at positions no pass has written yet with the latest memory's gated
    feedback (needs `memory_kv_feedback`)."""
    memory_sweeps: int = field(1, ge=1, elide_default=True)
    """How many times the training forward sweeps over the S subsets, each sweep reading the
    memories the last one wrote (the LRT summary's "repeating under a fixed budget"). Each sweep
    costs about one more plain forward; with S >= T one sweep is already exact."""

    memory_budget: float | None = field(None, ge=2, elide_default=True,
                                        none="null to run memory_sweeps sweeps")
    """A compute budget for the training forward, in plain forwards (the memory-free pass counts
    one, each sweep about one more): it picks the number of sweeps, the largest that fits,
    floor(budget) - 1. Set it or `memory_sweeps`, not both."""

    family: ClassVar[str] = "lrt"

    def validate(self) -> None:
        super().validate()
        layers = f"a layer index in 0..{self.n_layers - 1} (n_layers={self.n_layers})"
        if not any(h in hooks_for("lrt") for h in self.hooks):  # the fields alone would read back as Dense
            raise ConfigError.value("hooks", list(self.hooks), (
                f"an LRTConfig needs {' and/or '.join(LRT_HOOKS)}, or lrt_paper; a Dense model without memory is "
                f"a DenseConfig"))
        if self.memory_source is not None and self.memory_source >= self.n_layers:
            raise self.reject("memory_source", f"it must be {layers}")
        if self.memory_layers is not None:
            given = list(self.memory_layers)
            if not given:
                raise ConfigError.value("memory_layers", given, (
                    f"name at least one injection layer, each {layers}, or null for every layer from 0 to "
                    f"memory_source"))
            bad = [i for i in given if not 0 <= i < self.n_layers]
            if bad:
                raise ConfigError.value("memory_layers", given, f"{bad} out of range; each entry must be {layers}")
            if len(set(given)) != len(given):
                raise ConfigError.value("memory_layers", given, "names a layer twice; each layer may appear once")
            self.memory_layers = tuple(sorted(given))
        if self.memory_kv_refresh and not self.memory_kv_feedback:
            raise self.reject("memory_kv_refresh", "it re-mixes the gated K/V feedback of lrt_paper "
                                                   "(memory_kv_feedback), which this config does not have")
        if self.memory_budget is not None and self.memory_sweeps != 1:
            raise self.reject("memory_budget", f"it picks the number of sweeps, and memory_sweeps={self.memory_sweeps} "
                                               f"is set too; set one of them")
        if self.memory_gamma is not None and not self.memory_residual:
            raise self.reject("memory_gamma", "it scales the residual injection; add the hook lrt_residual or lrt_paper")

    @property
    def memory_sweep_count(self) -> int:
        """The sweeps the training forward runs: `memory_sweeps`, or what `memory_budget` picks."""
        return self.memory_sweeps if self.memory_budget is None else int(self.memory_budget) - 1

    @property
    def memory_read_rule(self) -> str:
        """The resolved `memory_read`."""
        return self.memory_read or "projection"

    @property
    def memory_loss_rule(self) -> str:
        """The resolved `memory_loss`."""
        return self.memory_loss or "refined"

    @property
    def memory_source_layer(self) -> int:
        """The resolved `memory_source`."""
        return self.memory_source if self.memory_source is not None else max(0, self.n_layers - 2)

    @property
    def memory_injection_layers(self) -> tuple[int, ...]:
        """The resolved `memory_layers`."""
        if self.memory_layers is not None:
            return self.memory_layers
        return tuple(range(self.memory_source_layer + 1))

    @classmethod
    def tiny(cls, **kw) -> "LRTConfig":
        return super().tiny(**{"hooks": LRT_HOOKS, **kw})


class LRT(Dense):
    """The Dense layers with LRT's memory (`cartlab.model.memory.LatentMemory`), made after the
    backbone's `init_weights()` so one seed gives an LRT model and its Dense backbone the same
    weights. The memory decides in which order positions go through the layers (`schedule`) and
    what each injection layer adds (`inject`)."""

    block = SlotBlock

    def __init__(self, cfg: LRTConfig):
        super().__init__(cfg)
        self.memory = LatentMemory(cfg)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
                subsets: int | None = None, sweeps: int | None = None, attention_mask: torch.Tensor | None = None):
        """idx (B, T) -> logits (B, T, V), loss. `cache` continues a sequence (the exact recurrence);
        `subsets`, `sweeps` run the interleaved schedule with S = subsets and that many sweeps
        (the training forward uses `memory_subsets`, `memory_sweeps`). The training loss is the
        refined tokens' or, with `memory_loss: all_passes`, the mean of the passes' losses.
        `attention_mask` (B, T), 1 for real tokens and 0 for left padding: each row's real tokens
        get what they would unpadded, with a cache, in the eval forward (with or without
        gradients) and at S >= T; the approximate schedule (S < T, training) refuses it."""
        x = self.wte(idx)  # (B, T, d)
        x, passes = self.memory.schedule(self, x, cache, subsets, sweeps, attention_mask)  # (B, T, d)
        if targets is not None and passes is not None and self.memory.loss == "all_passes":
            return self.memory.pass_outputs(self, passes, targets)
        return self.head(x, targets, cache)

    def run(self, x: torch.Tensor, cache: KVCache | None = None, recall: Recall | None = None,
            attention_mask: torch.Tensor | None = None):
        """One pass of the layers over the new positions of x (B, T, d), continuing `cache`;
        `attention_mask` (B, T) marks left padding (`CausalLM.positions`)."""
        out = self.stack(x, self.positions(x, cache, attention_mask), cache, recall)
        if cache is not None:
            cache.pos += x.size(1)
        return out

    def stack(self, x: torch.Tensor, rope, cache: KVCache | None = None, recall: Recall | None = None):
        """The layers on x (B, T, d) at the positions `rope` rotates to; `recall` is the memory
        the positions read (None: none). Returns the output and the memory source layer's output,
        (B, T, d) each."""
        source = None
        for i, layer in enumerate(self.layers):
            x, read = self.memory.inject(i, x, recall)
            x = layer(x, rope, cache_site(cache, f"layer.{i}"), read)
            if i == self.memory.source:
                source = x
        return x, source

    def diagnostics(self) -> dict:
        return self.memory.diagnostics()

    def applications(self) -> list[tuple[str, nn.Module, int]]:
        return [("embedding", self.wte, 1), ("layers", self.layers, 1), *self.memory.applications(self.layers),
                ("norm", self.norm, 1)]

    def train_applications(self) -> list[tuple[str, nn.Module, int]]:
        """One training forward: the interleaved schedule adds a memory-free pass of the layers,
        and any further sweeps, refreshes and LM heads (`LatentMemory.train_passes`)."""
        return self.applications() + self.memory.train_passes(self)


register_family(ModelSpec(name="lrt", display="LRT", config=LRTConfig, model=LRT, stem=dense_stem,
                          label=dense_label, memory=True))
