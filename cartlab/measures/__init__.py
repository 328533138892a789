"""Measurements of a model in training, stored in the results database's `probes` table.

The measures themselves live in this package's modules (`MODULES`): `depth` (the test-time
depth profile), `lrt` (LRT's interleaved-vs-exact gap, and its bits per byte the authors'
way), `loops` (per-loop logit lens, the loop map's contraction), `solver` (the fixed-point solve's
residual, iterations, converged share), `adaptive` (the compute-quality frontier of adaptive
depth: loss against mean loops per token; opt-in).

A measure is a function `ctx -> rows` registered for the models it applies to:

    @register_measure("depth_profile", when="final", applies=lambda m: family_of(m).loops)
    def depth_profile(ctx: MeasureContext) -> list[dict]:
        "Validation loss at inference R = 1 .. 4x the trained R, per domain."
        ...
        return [{"split": "prose", "x": 3, "metric": "loss", "value": 2.1}, ...]

`when` is "eval" (at every evaluation, e.g. the per-loop logit lens) or "final" (once, after the
last step's evaluation: the expensive ones). A measure registered with `default=False` runs only
when a run names it. The loop fills `probe` (the measure's name) and
`step`. A row's `x` is the measure's axis (inference R, the LRT subset count S, the loop index)
and `split` the validation domain ('' when not per domain). `TrainConfig.measures` picks which
run (null: every measure that applies to the model; [] none).

Measures read the same fixed validation batches as the evaluation (`ctx.batches(split)`), so two
runs are measured on the same tokens. They run on rank 0 with the model in eval mode, under
`torch.no_grad()` unless they ask for gradients themselves (`torch.enable_grad()`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:
    from cartlab.model import LMConfig

WHEN = ("eval", "final")


@dataclass(frozen=True)
class Measure:
    name: str
    fn: Callable[["MeasureContext"], list[dict]]
    applies: Callable[["LMConfig"], bool]
    when: str
    default: bool = True
    """Run when `TrainConfig.measures` is null; False: only when named (an expensive, opt-in measure)."""

    @property
    def summary(self) -> str:
        return (self.fn.__doc__ or "").strip().splitlines()[0]


MEASURES: dict[str, Measure] = {}


def register_measure(name: str, *, applies: Callable[["LMConfig"], bool], when: str = "final",
                     default: bool = True):
    """Register `fn(ctx) -> rows` as the measure `name`, run on models where `applies(config)`
    (with `default=False` only when a run names it in `measures`)."""
    if when not in WHEN:
        raise ValueError(f"measure {name!r}: when={when!r} is not allowed; choose one of {WHEN}")

    def wrap(fn):
        if name in MEASURES:
            raise ValueError(f"measure {name!r} is already registered")
        if not fn.__doc__:
            raise ValueError(f"measure {name!r} needs a docstring saying what it measures")
        MEASURES[name] = Measure(name, fn, applies, when, default)
        return fn

    return wrap


def loops_r_times(model_cfg: "LMConfig") -> bool:
    """A looping model that runs R loops: the per-loop measures apply. Not the fixed-point mode
    (hook fixed_point), whose depth is the solver's (measure `solver`)."""
    from cartlab.model.family import family_of

    return family_of(model_cfg).loops and getattr(model_cfg, "solver", "none") == "none"


MODULES = ("depth", "lrt", "loops", "solver", "adaptive")
"""The modules of this package that register measures, imported on first use."""


def _load() -> None:
    import importlib

    for name in MODULES:
        importlib.import_module(f"cartlab.measures.{name}")


def measures_for(model_cfg: "LMConfig", names: list[str] | None = None) -> list[Measure]:
    """The measures to run on `model_cfg`: `names` (checked by TrainConfig) or every one that applies."""
    _load()
    if names is None:
        return [m for m in MEASURES.values() if m.default and m.applies(model_cfg)]
    return [MEASURES[n] for n in names]


def known() -> dict[str, Measure]:
    _load()
    return MEASURES


@dataclass
class MeasureContext:
    """What a measure reads: the model (eval mode), its config, the training config, the
    validation bins by domain, the step, and the device and its autocast."""

    model: torch.nn.Module
    model_cfg: "LMConfig"
    cfg: Any  # the run's `cartlab.train.TrainConfig` (not imported: training imports the measures)
    val_bins: dict[str, Any]
    step: int
    device: torch.device
    selection: Any = None
    token_bytes: torch.Tensor | None = None
    """(vocab,) UTF-8 bytes of each token id (the data build's tokenizer, `Tokenizer.token_bytes`),
    for measures in bits per byte; None when the run has no tokenizer at hand."""

    def batches(self, split: str, n: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first `n` (default `eval_batches`) validation batches of `split`, on the device:
        the same windows every evaluation reads."""
        from cartlab.data import BatchLoader

        loader = BatchLoader(self.val_bins[split], self.cfg.eval_batch_size, self.cfg.seq_len, "sequential")
        n = min(self.cfg.eval_batches if n is None else n, loader.steps_per_epoch)
        return [tuple(t.to(self.device) for t in loader.next_batch()) for _ in range(n)]

    def autocast(self):
        import contextlib

        return self.selection.autocast() if self.selection is not None else contextlib.nullcontext()

    def over_batches(self, split: str, n: int, fn) -> list:
        """`fn(model, x, y)` on each of the first n (at most `eval_batches`) validation batches of
        `split`, under the run's autocast: one result per batch."""
        out = []
        for x, y in self.batches(split, min(n, self.cfg.eval_batches)):
            with self.autocast():
                out.append(fn(self.model, x, y))
        return out


def run_measures(measures: list[Measure], ctx: MeasureContext) -> list[dict]:
    """Every measure's rows, tagged with its name and the step; the model is left as it was."""
    was_training = ctx.model.training
    ctx.model.eval()
    rows: list[dict] = []
    try:
        for m in measures:
            with torch.no_grad():
                for row in m.fn(ctx):
                    rows.append({"probe": m.name, "step": ctx.step, **row})
    finally:
        ctx.model.train(was_training)
    return rows
