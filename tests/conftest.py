"""Shared pytest fixtures. Run the whole suite with `pytest` from the repository root."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def paper_dir(repo) -> Path:
    return repo / "data" / "paper"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, repo) -> Path:
    """A test-sized embedded corpus (tests/fixtures/data/tiny_embedded.yaml, vocab 512), built
    once per session into a temporary data root."""
    import os

    from cartlab.data.build import build
    from cartlab.data.recipe import load_recipe

    root = tmp_path_factory.mktemp("data_root")
    out = root / "built" / "tiny-embedded"
    old = os.environ.get("CARTLAB_DATA_DIR")
    os.environ["CARTLAB_DATA_DIR"] = str(root)
    try:
        build(load_recipe(repo / "tests" / "fixtures" / "data" / "tiny_embedded.yaml"), out, progress=False,
              log=lambda s: None)
    finally:
        if old is None:
            os.environ.pop("CARTLAB_DATA_DIR")
        else:
            os.environ["CARTLAB_DATA_DIR"] = old
    return out
