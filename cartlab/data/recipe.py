"""Build recipes: which domains, in what ratio, how many tokens, which tokenizer.

A recipe is a YAML file, `<data root>/recipes/NAME.yaml`, read into `Recipe` with every field
checked: an unknown field or a bad value raises ValueError naming the field and what is allowed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cartlab.config import Config, ConfigError, load_yaml
from cartlab.config import field as cfield
from cartlab.data import paths
from cartlab.data.sources import TOKENIZER_HOLDOUT, SourceConfig
from cartlab.data.tokenizer import TokenizerConfig


@dataclass
class DomainConfig(Config):
    """One domain of the mixture: its share of train.bin and its validation set."""

    name: str
    """Short identifier; the validation bin is `val_<name>.bin`."""
    ratio: float = cfield(gt=0)
    """Share of the training chunks (ratios are normalised to sum to 1)."""
    train: SourceConfig
    """Where training documents come from."""
    val: SourceConfig | None = None
    """Held-out documents (e.g. another split or shard); None: hash-split `train` by `val_fraction`."""
    val_fraction: float = cfield(0.02, gt=0, le=TOKENIZER_HOLDOUT)
    """Without `val`: share of `train`'s documents held out by text hash (at most 0.1)."""
    val_tokens: int = cfield(32_768, ge=0)
    """Tokens written to `val_<name>.bin` (fewer if the held-out documents run out)."""

    def validate(self) -> None:
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise self.reject("name", "must be a non-empty identifier (letters, digits, _ or -)")


@dataclass
class Recipe(Config):
    """Everything `cartlab data build` needs; the build is a pure function of it (and its sources)."""

    name: str
    """Recipe name; outputs go to `<data root>/built/<name>/` by default."""
    domains: list[DomainConfig]
    """The mixture."""
    train_tokens: int = cfield(ge=1)
    """Size of train.bin, rounded down to whole chunks."""
    chunk_size: int = cfield(1024, ge=2)
    """Tokens per single-domain chunk of train.bin; a training window of seq_len+1 tokens
    lies in one chunk when seq_len <= chunk_size - 1."""
    tokenizer: TokenizerConfig = cfield(default_factory=TokenizerConfig)
    """The tokenizer."""
    seed: int = 0
    """Seeds the generated domains and the chunk shuffle."""
    description: str = ""
    """One line for humans."""
    encode_batch_docs: int = cfield(512, ge=1)
    """Documents per call to the parallel encoder (a progress-bar step)."""

    def validate(self) -> None:
        if not 1 <= len(self.domains) <= 255:
            raise self.reject("domains", "must list 1 to 255 domains")
        names = [d.name for d in self.domains]
        if len(set(names)) != len(names):
            raise self.reject("domains", f"domain names must be unique, got {names}")
        if self.train_tokens < self.chunk_size * len(self.domains):
            raise self.reject("train_tokens", f"must be at least chunk_size x number of domains "
                                              f"({self.chunk_size * len(self.domains)})")

    @classmethod
    def from_dict(cls, d, overrides=()) -> "Recipe":
        """A recipe from its dict; errors name `recipe.<field>`."""
        try:
            return super().from_dict(d, overrides)
        except ConfigError as err:
            raise err.within("recipe") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        d = load_yaml(path, "recipe")
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
