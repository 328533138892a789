"""Which data build a training run reads.

    data_dir = resolve_data(cfg.data)   # cfg.data: a TrainConfig's `data` section (recipe, dir)

An explicit `dir` must hold a build (meta.json); otherwise the recipe's build under the data root
is used, and a recipe that needs nothing from the internet (`embedded`, `causal-leak`) is built
there on first use. Any other recipe's build must be made first with `cartlab data build`.
"""
from __future__ import annotations

import sys
from pathlib import Path

from cartlab.data.meta import META_NAME
from cartlab.data.paths import built_dir


def resolve_data(data, progress: bool = False) -> Path:
    """The build folder for `data` (anything with `recipe` and `dir`, e.g. a TrainConfig's
    DataConfig); errors name the fields as `data.dir` and `data.recipe`."""
    if data.dir:
        path = Path(data.dir)
        if not (path / META_NAME).is_file():
            raise ValueError(f"data.dir={data.dir!r} holds no data build (no {META_NAME}); "
                             f"build one with `cartlab data build RECIPE --out DIR`")
        return path
    path = built_dir(data.recipe)
    if (path / META_NAME).is_file():
        return path
    from cartlab.data.recipe import list_recipes

    if data.recipe not in list_recipes():
        raise ValueError(f"data.recipe={data.recipe!r} is not allowed; choose one of {list_recipes()}")
    from cartlab.data.recipe import load_recipe

    if not is_offline_recipe(load_recipe(data.recipe)):
        raise ValueError(f"data for recipe {data.recipe!r} is missing ({path}); build it first with "
                         f"`cartlab data build {data.recipe}` (it needs the internet)")
    from cartlab.data.build import build

    print(f"cartlab: building the {data.recipe} corpus into {path} (first use, offline)", file=sys.stderr)
    build(data.recipe, progress=progress)
    return path


def is_offline_recipe(recipe) -> bool:
    """A recipe whose documents and tokenizer are all generated here (embedded sources and the
    embedded tokenizer): it builds offline, so a run builds it on first use."""
    sources = [d.train for d in recipe.domains] + [d.val for d in recipe.domains if d.val is not None]
    return recipe.tokenizer.name == "embedded" and all(s.type == "embedded" for s in sources)
