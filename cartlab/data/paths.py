"""Where cartlab keeps data: recipes, built token bins and caches.

The data root is `$CARTLAB_DATA_DIR` if set, else the repository's `data/` folder. Inside it:

    recipes/NAME.yaml        build recipes (committed)
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


def recipes_dir() -> Path:
    return data_root() / "recipes"


def built_dir(recipe_name: str) -> Path:
    return data_root() / "built" / recipe_name


def cache_dir() -> Path:
    return data_root() / "cache"
