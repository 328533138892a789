"""Build recipes: which domains, in what ratio, how many tokens, which tokenizer.

A recipe is a YAML file, `<data root>/recipes/NAME.yaml`, read into `Recipe` with every field
checked: an unknown field or a bad value raises ValueError naming the field and what is allowed.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cartlab.data import paths
from cartlab.data.sources import TOKENIZER_HOLDOUT, SourceConfig
from cartlab.data.tokenizer import TokenizerConfig


@dataclass
class DomainConfig:
    """One domain of the mixture: its share of train.bin and its validation set."""

    name: str
    """Short identifier; the validation bin is `val_<name>.bin`."""
    ratio: float
    """Share of the training chunks (ratios are normalised to sum to 1)."""
    train: SourceConfig
    """Where training documents come from."""
    val: SourceConfig | None = None
    """Held-out documents (e.g. another split or shard); None: hash-split `train` by `val_fraction`."""
    val_fraction: float = 0.02
    """Without `val`: share of `train`'s documents held out by text hash (at most 0.1)."""
    val_tokens: int = 32_768
    """Tokens written to `val_<name>.bin` (fewer if the held-out documents run out)."""

    def validate(self, where: str) -> None:
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"{where}.name must be a non-empty identifier (letters, digits, _ or -), "
                             f"got {self.name!r}")
        if not self.ratio > 0:
            raise ValueError(f"{where}.ratio must be > 0, got {self.ratio}")
        self.train.validate(f"{where}.train")
        if self.val is not None:
            self.val.validate(f"{where}.val")
        elif not 0 < self.val_fraction <= TOKENIZER_HOLDOUT:
            raise ValueError(f"{where}.val_fraction must be in (0, {TOKENIZER_HOLDOUT}], got {self.val_fraction}")
        if self.val_tokens < 0:
            raise ValueError(f"{where}.val_tokens must be >= 0, got {self.val_tokens}")


@dataclass
class Recipe:
    """Everything `cartlab data build` needs; the build is a pure function of it (and its sources)."""

    name: str
    """Recipe name; outputs go to `<data root>/built/<name>/` by default."""
    domains: list[DomainConfig]
    """The mixture."""
    train_tokens: int
    """Size of train.bin, rounded down to whole chunks."""
    chunk_size: int = 1024
    """Tokens per single-domain chunk of train.bin; a training window of seq_len+1 tokens
    lies in one chunk when seq_len <= chunk_size - 1."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """The tokenizer."""
    seed: int = 0
    """Seeds the generated domains and the chunk shuffle."""
    description: str = ""
    """One line for humans."""
    encode_batch_docs: int = 512
    """Documents per call to the parallel encoder (a progress-bar step)."""

    def validate(self) -> None:
        if not 1 <= len(self.domains) <= 255:
            raise ValueError(f"recipe.domains must list 1 to 255 domains, got {len(self.domains)}")
        for i, d in enumerate(self.domains):
            d.validate(f"recipe.domains[{i}]")
        names = [d.name for d in self.domains]
        if len(set(names)) != len(names):
            raise ValueError(f"recipe.domains[].name must be unique, got {names}")
        if self.chunk_size < 2:
            raise ValueError(f"recipe.chunk_size must be >= 2, got {self.chunk_size}")
        if self.train_tokens < self.chunk_size * len(self.domains):
            raise ValueError(f"recipe.train_tokens must be at least chunk_size x number of domains "
                             f"({self.chunk_size * len(self.domains)}), got {self.train_tokens}")
        if self.encode_batch_docs < 1:
            raise ValueError(f"recipe.encode_batch_docs must be >= 1, got {self.encode_batch_docs}")
        self.tokenizer.validate()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        recipe = from_dict(cls, d, "recipe")
        recipe.validate()
        return recipe

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        with open(path, encoding="utf-8") as f:
            d = yaml.safe_load(f)
        if not isinstance(d, dict):
            raise ValueError(f"{path}: a recipe must be a YAML mapping")
        d.setdefault("name", path.stem)
        return cls.from_dict(d)


def list_recipes() -> list[str]:
    return sorted({p.stem for d in paths.recipe_dirs() for p in d.glob("*.yaml")})


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A recipe by name (`<data root>/recipes/NAME.yaml`, else the shipped `data/recipes/NAME.yaml`)
    or by path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise ValueError(f"recipe file {p} does not exist")
        return Recipe.from_yaml(p)
    for d in paths.recipe_dirs():
        if (d / f"{name_or_path}.yaml").is_file():
            return Recipe.from_yaml(d / f"{name_or_path}.yaml")
    raise ValueError(f"unknown recipe {str(name_or_path)!r}; available: {list_recipes()} "
                     f"(in {', '.join(map(str, paths.recipe_dirs()))})")


def from_dict(cls, d, where: str):
    """Build dataclass `cls` from a plain dict, refusing unknown fields (nested dataclasses too)."""
    if isinstance(d, cls):
        return d
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} in {where}; allowed: {sorted(fields)}")
    missing = [n for n, f in fields.items() if n not in d and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"missing field(s) {missing} in {where}")
    kwargs = {}
    for name, value in d.items():
        kwargs[name] = _convert(hints[name], value, f"{where}.{name}")
    return cls(**kwargs)


def _convert(tp, value, where: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if dataclasses.is_dataclass(a):
                return from_dict(a, value, where)
        for a in args:  # e.g. list[int] | str: keep the value if it already has a listed shape
            if a is not type(None) and _matches(a, value):
                return _convert(a, value, where)
        raise ValueError(f"{where} has type {type(value).__name__}; expected {tp}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{where} must be a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and not (isinstance(value, tp) and (tp is bool or not isinstance(value, bool))):
        raise ValueError(f"{where} must be {tp.__name__}, got {value!r}")
    return value


def _matches(tp, value) -> bool:
    origin = typing.get_origin(tp) or tp
    try:
        return isinstance(value, origin)
    except TypeError:
        return True
