"""Where cartlab keeps data: recipes, built token bins and caches.

The data root is the first of:

    $CARTLAB_DATA_DIR        if set (tests point it at a temporary folder)
    $CARTLAB_HOME/data       if CARTLAB_HOME is set
    <repo>/data              when cartlab runs from a checkout (the repository's data/ folder)
    ./data                   installed without a checkout: under the current folder

Inside it:

    recipes/NAME.yaml        your build recipes (the shipped ones, data/recipes of the repository or
                             their copy in the installed package, are always found)
    built/NAME/              outputs of `cartlab data build NAME` (gitignored)
    cache/                   trained / downloaded tokenizers (gitignored)

Every function that writes also takes an explicit directory, so tests never touch these.
"""
from __future__ import annotations

import os
from pathlib import Path

from cartlab import resources


def data_root() -> Path:
    """The data root: `$CARTLAB_DATA_DIR`, else `$CARTLAB_HOME/data`, else the checkout's `data/`,
    else `./data` (see the module docstring)."""
    env = os.environ.get("CARTLAB_DATA_DIR")
    if env:
        return Path(env).expanduser().resolve()
    home = os.environ.get("CARTLAB_HOME")
    if home:
        return (Path(home).expanduser() / "data").resolve()
    repo = resources.checkout()
    return repo / "data" if repo is not None else Path("data").resolve()


def shipped_recipes_dir() -> Path:
    """The recipes cartlab ships (data/recipes in a checkout, the installed copy otherwise)."""
    return resources.recipes_dir()


def recipes_dir() -> Path:
    return data_root() / "recipes"


def recipe_dirs() -> list[Path]:
    """Where recipes are looked up, first match wins: the data root's, then the shipped ones."""
    return list(dict.fromkeys([recipes_dir(), shipped_recipes_dir()]))


def built_dir(recipe_name: str) -> Path:
    return data_root() / "built" / recipe_name


def cache_dir() -> Path:
    return data_root() / "cache"
