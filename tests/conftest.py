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
