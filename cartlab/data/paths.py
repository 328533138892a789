"""Where cartlab keeps data: recipes, built token bins and caches.

The data root is `$CARTLAB_DATA_DIR` if set, else the repository's `data/` folder. Inside it:

    recipes/NAME.yaml        build recipes (the shipped ones in <repo>/data/recipes are always found)
    built/NAME/              outputs of `cartlab data build NAME` (gitignored)
    cache/                   trained / downloaded tokenizers (gitignored)

Every function that writes also takes an explicit directory, so tests never touch these.
"""
from __future__ import annotations

import os
from pathlib import Path

import cartlab


def data_root() -> Path:
    """The data root: `$CARTLAB_DATA_DIR`, else `<repo>/data`."""
    env = os.environ.get("CARTLAB_DATA_DIR")
    if env:
        return Path(env).expanduser().resolve()
    return Path(cartlab.__file__).resolve().parents[1] / "data"


def shipped_recipes_dir() -> Path:
    return Path(cartlab.__file__).resolve().parents[1] / "data" / "recipes"


def recipes_dir() -> Path:
    return data_root() / "recipes"


def recipe_dirs() -> list[Path]:
    """Where recipes are looked up, first match wins: the data root's, then the shipped ones."""
    return list(dict.fromkeys([recipes_dir(), shipped_recipes_dir()]))


def built_dir(recipe_name: str) -> Path:
    return data_root() / "built" / recipe_name


def cache_dir() -> Path:
    return data_root() / "cache"
