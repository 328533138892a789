"""Studies: one flat YAML per experiment of the paper (ablations/NAME.yaml), expanded into runs.

    name: cpu-demo
    description: one line
    preset: cpu-demo                 # training preset every run starts from
    set: {data.recipe: embedded}     # dotted overrides for every run
    seeds: [1, 2]                    # default seeds of every run
    grid:                            # optional: every run is repeated over this product
      model.d_model: [256, 512]
    runs:
      - label: baseline
      - label: unshare_core
        hooks: [unshare_core]        # ablation hooks (cartlab.model.hooks)
        seeds: [1]
      - label: dense-flops
        set: {dense_match: flops}    # the Dense baseline matched to the CART of this run
      - label: dense-12L
        model: {kind: dense, d_model: 1024, n_layers: 12}   # replaces the model section
                                                            # (study-wide model.* values skip it)

A run's length can be a budget instead of `steps`: `tokens: 4.0e+5` (steps = ceil(tokens /
tokens per step)) or `flops: 1.0e+13` (steps = ceil(flops / (tokens per step x the training FLOPs
per token of the run's own resolved model, `cartlab.model.account`))), given study-wide, per
entry (which wins over the study's), or as a grid key, so a width x token-budget grid or an
IsoFLOP sweep is one YAML:

    grid:
      model.d_model: [64, 96, 128]
      tokens: [1.0e+5, 2.0e+5, 4.0e+5]   # or flops: [...] for an IsoFLOP sweep
    runs:
      - label: cart                      # runs cart-d_model64-t1e5, ..., cart-d_model128-t4e5

The derived `steps` is written into each run's config, so it shows in the run's name and id
(`...-steps49-...`). A budget assumes one process (tokens per step = batch_size x grad_accum x
seq_len); a run given both `steps` and a budget, or a budget below one step, is refused.

A run's id is its TrainConfig's name, so runs shared by two studies are trained once, and a
study re-run after any crash trains only what is not completed in the results database.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from cartlab.cluster import SlurmConfig
from cartlab.config import Config, ConfigError, field, load_yaml
from cartlab.train.config import PRESETS, TrainConfig, preset_dict


BUDGETS = ("tokens", "flops")
"""What a study can give instead of `steps`: training tokens or training FLOPs per run."""
BUDGET_LABELS = {"tokens": "t", "flops": "f"}
"""How a budget grid value shows in a run's label: tokens 2e5 -> t2e5."""


SAFE_NAME = r"[A-Za-z0-9][A-Za-z0-9._+=-]{0,127}"
SAFE_NAME_RULE = ("must be a name of letters, digits and . _ + = - (starting with a letter or digit, at most 128), "
                  "not a path")
"""Study names and run labels become file and folder names (reports/<study>/...): no '/', no '..'."""


def is_safe_name(value) -> bool:
    import re

    return isinstance(value, str) and re.fullmatch(SAFE_NAME, value) is not None and ".." not in value


def studies_dir() -> Path:
    """The shipped study files: the checkout's ablations/, else the installed package's copy."""
    from cartlab import resources

    return resources.studies_dir()


def list_studies() -> list[str]:
    return sorted(p.stem for p in studies_dir().glob("*.yaml"))


@dataclass
class StudyRun:
    label: str
    """The run's role in the study (e.g. 'baseline', 'unshare_core'), with grid values appended."""
    seed: int
    config: TrainConfig

    @property
    def run_id(self) -> str:
        return self.config.run_name()


@dataclass
class RunSpec(Config):
    """One entry under `runs:`."""

    label: str
    """The run's role in the study (unique within it)."""
    hooks: list[str] = field(default_factory=list)
    """Ablation hooks (cartlab.model.hooks), as a list: [unshare_core, no_lti]."""
    seeds: list[int] | None = None
    """This entry's seeds; null: the study's."""
    set: dict = field(default_factory=dict)
    """Dotted overrides for this entry only."""
    model: dict | None = None
    """Replaces the preset's model section (study-wide model.* values skip this entry)."""
    tokens: float | None = field(None, gt=0, none="null for the study's budget", elide_default=True)
    """Training tokens of this entry (instead of steps; wins over the study's budget)."""
    flops: float | None = field(None, gt=0, none="null for the study's budget", elide_default=True)
    """Training FLOPs of this entry (instead of steps; wins over the study's budget)."""

    def validate(self) -> None:
        if not self.label.strip():
            raise self.reject("label", "must be a non-empty name")
        if not is_safe_name(self.label):
            raise self.reject("label", SAFE_NAME_RULE)
        _one_budget(self)


@dataclass
class Study(Config):
    name: str
    """The study's name (default: the file's stem)."""
    preset: str = field(choices=lambda: sorted(PRESETS))
    """The training preset every run starts from."""
    runs: list[RunSpec] = field(default_factory=list)
    description: str = ""
    set: dict = field(default_factory=dict)
    """Dotted overrides for every run, e.g. {data.recipe: embedded}."""
    seeds: list[int] = field(default_factory=lambda: [1])
    """Default seeds of every run."""
    grid: dict = field(default_factory=dict)
    """Every run is repeated over the product of these value lists: dotted fields
    (model.d_model) or a budget (tokens, flops)."""
    tokens: float | None = field(None, gt=0, none="null: runs train for their steps", elide_default=True)
    """Training tokens of every run (instead of steps): steps = ceil(tokens / tokens per step)."""
    flops: float | None = field(None, gt=0, none="null: runs train for their steps", elide_default=True)
    """Training FLOPs of every run (instead of steps): steps = ceil(flops / (tokens per step x
    the run's training FLOPs per token))."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig, elide_default=True)
    """Cluster resources of every run's job under `cartlab ablate --launcher slurm` (cartlab.cluster)."""

    def validate(self) -> None:
        if not is_safe_name(self.name):
            raise self.reject("name", SAFE_NAME_RULE)
        if not self.runs:
            raise self.reject("runs", "a study needs at least one entry under runs")
        labels = [r.label for r in self.runs]
        if len(set(labels)) != len(labels):
            raise self.reject("runs", f"run labels must be unique, got {labels}")
        base = preset_dict(self.preset)
        for key, values in self.grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError.value(f"grid.{key}", values, "must be a non-empty list of values")
            if key in BUDGETS:
                self.grid[key] = [_positive(f"grid.{key}", v) for v in values]
                continue
            try:  # the path must name a training field (its values are checked run by run)
                TrainConfig.apply_override(base, f"{key}={_yaml(values[0])}")
            except ConfigError as err:
                raise err.within("grid") from None
        _one_budget(self)
        grid_budgets = [k for k in BUDGETS if k in self.grid]
        if len(grid_budgets) > 1:
            raise ConfigError.value(f"grid.{grid_budgets[1]}", self.grid[grid_budgets[1]],
                                    f"the grid already sets grid.{grid_budgets[0]}; give one budget")
        for path, spec in [("", self), *((f"runs[{i}].", r) for i, r in enumerate(self.runs))]:
            if grid_budgets and _budget_of(spec):
                name, value = _budget_of(spec)
                raise ConfigError.value(path + name, value, f"the grid gives every run a budget "
                                                            f"(grid.{grid_budgets[0]}); give one of them")
        for seed in [*self.seeds, *(s for r in self.runs for s in r.seeds or [])]:
            if seed < 0:
                raise ConfigError.value("seeds", seed, "every seed must be >= 0")

    def expand(self, overrides: list[str] | None = None) -> list[StudyRun]:
        """Every (run, grid point, seed) as a TrainConfig; `overrides` apply to all of them
        (e.g. results_db=..., quiet=true). A bad value names the run entry it came from."""
        axes = list(self.grid)
        keys = [k for k in axes if k not in BUDGETS]
        budget_key = next((k for k in BUDGETS if k in self.grid), None)
        points = list(itertools.product(*(self.grid[k] for k in axes))) if axes else [()]
        steps_given = [o.strip() for o in overrides or [] if o.partition("=")[0].strip() == "steps"]
        out = []
        for i, spec in enumerate(self.runs):
            for point in points:
                values = dict(zip(axes, point))
                budget = _budget_of(spec) or ((budget_key, values[budget_key]) if budget_key else _budget_of(self))
                label = "-".join([spec.label, *(_label_part(k, v) for k, v in values.items())])
                for seed in spec.seeds if spec.seeds is not None else self.seeds:
                    # a run that states its whole model keeps it: study-wide model.* values skip it
                    own_model = spec.model is not None
                    ovr = [f"{k}={_yaml(v)}" for k, v in self.set.items() if not (own_model and k.startswith("model."))]
                    ovr += [f"{k}={_yaml(values[k])}" for k in keys if not (own_model and k.startswith("model."))]
                    ovr += [f"{k}={_yaml(v)}" for k, v in spec.set.items()]
                    if spec.hooks:
                        ovr.append(f"model.hooks={','.join(spec.hooks)}")
                    ovr += [f"seed={seed}", *(overrides or [])]
                    base = preset_dict(self.preset)
                    if own_model:
                        base["model"] = dict(spec.model)
                    try:  # a budgeted run's steps are derived: steps given anywhere for it are refused
                        steps = [*(f"steps={d['steps']}" for d in (self.set, values, spec.set) if "steps" in d),
                                 *steps_given]
                        if budget and steps:
                            raise ConfigError(f"{steps[-1]} is not allowed: this run's length is its budget "
                                              f"{budget[0]}={budget[1]:g}; give steps or a budget, not both", "steps")
                        config = TrainConfig.from_dict(base, ovr)
                        if budget:
                            config = TrainConfig.from_dict(base, [*ovr, f"steps={budget_steps(config, *budget)}"])
                        if config.tracker != "none" and config.tracker_project is None:
                            config = config.replace(tracker_project=self.name)  # the study's runs together
                    except ConfigError as err:
                        raise ConfigError(f"runs[{i}] ({label}): {err}", err.path, err.tail) from None
                    out.append(StudyRun(label, seed, config))
        return out


def budget_steps(config: TrainConfig, budget: str, value: float) -> int:
    """Optimizer steps that spend `value` training tokens (budget "tokens") or training FLOPs
    ("flops") on the run `config`: ceil(value / per step), where a step is tokens_per_step tokens
    (one process) at `account(model, seq_len).train_flops_per_token()` FLOPs each, the model
    being the one trained (a matched Dense when dense_match is set), so the training loop's
    logged FLOPs reach the budget. A budget below one step is refused."""
    per_step = float(config.tokens_per_step)
    unit = f"{config.tokens_per_step} tokens = batch_size x grad_accum x seq_len"
    if budget == "flops":
        from cartlab.model import account

        per_token = account(config.model_config(), config.seq_len).train_flops_per_token()
        per_step *= per_token
        unit = f"{per_step:.4g} FLOPs = {config.tokens_per_step} tokens x {per_token:.4g} training FLOPs per token"
    if value < per_step:
        raise ConfigError.value(budget, value, f"less than one step of this run, {unit}")
    return math.ceil(value / per_step - 1e-9)  # an exact multiple stays exact despite rounding


def _budget_of(spec) -> tuple[str, float] | None:
    """(name, value) of the one budget a study or run entry sets, or None."""
    return next(((k, getattr(spec, k)) for k in BUDGETS if getattr(spec, k) is not None), None)


def _one_budget(spec: Config) -> None:
    if all(getattr(spec, k) is not None for k in BUDGETS):
        raise spec.reject("flops", f"tokens={spec.tokens:g} is set too; give one budget, tokens or flops")


def _positive(path: str, value) -> float:
    """A budget read from a grid list ("2e5" in YAML is a string): a finite number > 0."""
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and number > 0):
        raise ConfigError.value(path, value, "every budget must be a number > 0")
    return number


def _label_part(key: str, value) -> str:
    """A grid value in a run's label: d_model64 for model.d_model=64, t2e5 for tokens=200000."""
    if key not in BUDGETS:
        return f"{key.split('.')[-1]}{value}"
    mantissa, exponent = f"{value:e}".split("e")
    return f"{BUDGET_LABELS[key]}{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _yaml(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def load_study(name_or_path: str | Path) -> Study:
    """ablations/NAME.yaml (a NAME is a name, never a path that leaves ablations/) or an explicit
    path to a .yaml/.yml file, validated: every run must make a valid config now, not hours into
    the study. Errors start with the file's name."""
    given = str(name_or_path)
    if given.endswith((".yaml", ".yml")):
        path = Path(given)
        if not path.is_file():
            raise ConfigError(f"study file {given!r} not found" + (" (it is a directory)" if path.is_dir() else ""))
    elif is_safe_name(given):
        path = studies_dir() / f"{given}.yaml"
        if not path.is_file():
            import difflib

            close = difflib.get_close_matches(given, list_studies(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"study {given!r} not found{hint}; choose one of {list_studies()} "
                              f"or give a path to a .yaml file")
    else:
        raise ConfigError(f"study {given!r} is not allowed: give a study name in ablations/ "
                          f"(one of {list_studies()}) or a path to a .yaml file")
    d = load_yaml(path, "study")
    if not isinstance(d, dict):
        raise ConfigError(f"{path.name}: a study must be a mapping (name, preset, runs, ...), got {type(d).__name__}")
    d.setdefault("name", path.stem)
    try:
        study = Study.from_dict(d)
        study.expand()
    except ConfigError as err:
        raise ConfigError(f"{path.name}: {err}", err.path, err.tail) from None
    return study
