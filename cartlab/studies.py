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

A run's id is its TrainConfig's name, so runs shared by two studies are trained once, and a
study re-run after any crash trains only what is not completed in the results database.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import yaml

from cartlab.config import Config, ConfigError, field, load_yaml
from cartlab.train.config import PRESETS, TrainConfig, preset_dict


def studies_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "ablations"


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

    def validate(self) -> None:
        if not self.label.strip():
            raise self.reject("label", "must be a non-empty name")


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
    """Every run is repeated over the product of these dotted fields' value lists."""

    def validate(self) -> None:
        if not self.runs:
            raise self.reject("runs", "a study needs at least one entry under runs")
        labels = [r.label for r in self.runs]
        if len(set(labels)) != len(labels):
            raise self.reject("runs", f"run labels must be unique, got {labels}")
        for key, values in self.grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError.value(f"grid.{key}", values, "must be a non-empty list of values")
        for seed in [*self.seeds, *(s for r in self.runs for s in r.seeds or [])]:
            if seed < 0:
                raise ConfigError.value("seeds", seed, "every seed must be >= 0")

    def expand(self, overrides: list[str] | None = None) -> list[StudyRun]:
        """Every (run, grid point, seed) as a TrainConfig; `overrides` apply to all of them
        (e.g. results_db=..., quiet=true). A bad value names the run entry it came from."""
        keys = list(self.grid)
        points = list(itertools.product(*(self.grid[k] for k in keys))) if keys else [()]
        out = []
        for i, spec in enumerate(self.runs):
            for point in points:
                for seed in spec.seeds if spec.seeds is not None else self.seeds:
                    # a run that states its whole model keeps it: study-wide model.* values skip it
                    own_model = spec.model is not None
                    ovr = [f"{k}={_yaml(v)}" for k, v in self.set.items() if not (own_model and k.startswith("model."))]
                    ovr += [f"{k}={_yaml(v)}" for k, v in zip(keys, point) if not (own_model and k.startswith("model."))]
                    ovr += [f"{k}={_yaml(v)}" for k, v in spec.set.items()]
                    if spec.hooks:
                        ovr.append(f"model.hooks={','.join(spec.hooks)}")
                    ovr += [f"seed={seed}", *(overrides or [])]
                    base = preset_dict(self.preset)
                    if own_model:
                        base["model"] = dict(spec.model)
                    label = "-".join([spec.label, *(f"{k.split('.')[-1]}{v}" for k, v in zip(keys, point))])
                    try:
                        config = TrainConfig.from_dict(base, ovr)
                    except ConfigError as err:
                        raise ConfigError(f"runs[{i}] ({spec.label}): {err}", err.path, err.tail) from None
                    out.append(StudyRun(label, seed, config))
        return out


def _yaml(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def load_study(name_or_path: str | Path) -> Study:
    """ablations/NAME.yaml (or a path to a study YAML), validated: every run must make a valid
    config now, not hours into the study. Errors start with the file's name."""
    path = Path(name_or_path)
    if not path.suffix:
        path = studies_dir() / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"study {str(name_or_path)!r} not found; choose one of {list_studies()} or give a YAML path")
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
