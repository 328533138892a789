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
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cartlab.model.config import ConfigError
from cartlab.train.config import TrainConfig

STUDY_FIELDS = {"name", "description", "preset", "set", "seeds", "grid", "runs"}
RUN_FIELDS = {"label", "hooks", "seeds", "set", "model"}


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
class Study:
    name: str
    preset: str
    runs: list[dict]
    description: str = ""
    set: dict = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [1])
    grid: dict = field(default_factory=dict)

    def expand(self, overrides: list[str] | None = None) -> list[StudyRun]:
        """Every (run, grid point, seed) as a TrainConfig; `overrides` apply to all of them
        (e.g. results_db=..., quiet=true)."""
        keys = list(self.grid)
        points = list(itertools.product(*(self.grid[k] for k in keys))) if keys else [()]
        out = []
        for spec in self.runs:
            for point in points:
                for seed in spec.get("seeds", self.seeds):
                    # a run that states its whole model keeps it: study-wide model.* values skip it
                    own_model = "model" in spec
                    ovr = [f"{k}={_yaml(v)}" for k, v in self.set.items() if not (own_model and k.startswith("model."))]
                    ovr += [f"{k}={_yaml(v)}" for k, v in zip(keys, point) if not (own_model and k.startswith("model."))]
                    ovr += [f"{k}={_yaml(v)}" for k, v in spec.get("set", {}).items()]
                    if spec.get("hooks"):
                        ovr.append(f"model.hooks={','.join(spec['hooks'])}")
                    ovr += [f"seed={seed}", *(overrides or [])]
                    base = TrainConfig.from_preset(self.preset).to_dict()
                    if "model" in spec:
                        base["model"] = dict(spec["model"])
                    label = "-".join([spec["label"], *(f"{k.split('.')[-1]}{v}" for k, v in zip(keys, point))])
                    out.append(StudyRun(label, seed, TrainConfig.from_dict(base, ovr)))
        return out


def _yaml(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def load_study(name_or_path: str | Path) -> Study:
    """ablations/NAME.yaml (or a path to a study YAML), validated."""
    path = Path(name_or_path)
    if not path.suffix:
        path = studies_dir() / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"study {str(name_or_path)!r} not found; choose one of {list_studies()} or give a YAML path")
    d = yaml.safe_load(path.read_text()) or {}
    d.setdefault("name", path.stem)
    unknown = sorted(set(d) - STUDY_FIELDS)
    if unknown:
        raise ConfigError(f"{path.name}: unknown study field(s) {unknown}; allowed: {sorted(STUDY_FIELDS)}")
    for i, spec in enumerate(d.get("runs") or []):
        bad = sorted(set(spec) - RUN_FIELDS)
        if bad or "label" not in spec:
            raise ConfigError(f"{path.name}: runs[{i}] has unknown field(s) {bad} or no label; allowed: {sorted(RUN_FIELDS)}")
    if not d.get("runs"):
        raise ConfigError(f"{path.name}: a study needs at least one entry under runs")
    if "preset" not in d:
        raise ConfigError(f"{path.name}: a study needs a preset (one of the training presets)")
    study = Study(**d)
    labels = [r["label"] for r in study.runs]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{path.name}: run labels must be unique, got {labels}")
    study.expand()  # every run must make a valid config now, not hours into the study
    return study
