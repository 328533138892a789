"""Where the files cartlab ships are found: notebooks, study files, the paper's tables, data
recipes, offline eval tasks and eval protocols. Every module asks here instead of walking up from
its own file, so the package finds them both in a checkout and when installed from a wheel.

    from cartlab import resources
    resources.notebooks_dir() / "report.ipynb"

The files live in the repository's top-level folders (notebooks/, ablations/, data/paper,
data/recipes, data/tasks, data/protocols). A wheel carries copies of them as
`cartlab/_shipped/<kind>/` (setup.py maps the folders into the package; SHIPPED is the table
both sides read). The checkout wins: run from a clone (editable install or not), cartlab reads and edits the
repository's folders; installed without one, it reads the copies inside the package.
"""
from __future__ import annotations

import functools
from importlib import resources as _resources
from pathlib import Path

SHIPPED = {
    "notebooks": "notebooks",
    "studies": "ablations",
    "paper": "data/paper",
    "recipes": "data/recipes",
    "tasks": "data/tasks",
    "protocols": "data/protocols",
}
"""kind -> its folder in the repository; the wheel holds it as cartlab/_shipped/<kind>/."""

SHIPPED_PACKAGE = "_shipped"
"""The folder inside the installed package that holds the shipped copies."""


@functools.lru_cache(maxsize=None)
def checkout() -> Path | None:
    """The repository root when cartlab is imported from a source checkout (the folder above the
    package holds cartlab's pyproject.toml), else None: installed into site-packages."""
    root = Path(__file__).resolve().parents[1]
    try:
        text = (root / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return None
    return root if 'name = "cartlab"' in text else None


def shipped(kind: str) -> Path:
    """The folder of one kind of shipped file: the checkout's, else the installed package's copy."""
    if kind not in SHIPPED:
        raise ValueError(f"resource kind {kind!r} is not allowed; allowed: {', '.join(SHIPPED)}")
    root = checkout()
    if root is not None:
        return root / SHIPPED[kind]
    return Path(str(_resources.files("cartlab").joinpath(SHIPPED_PACKAGE, kind)))


def notebooks_dir() -> Path:
    """The parameterized notebooks (notebooks/*.ipynb)."""
    return shipped("notebooks")


def studies_dir() -> Path:
    """The shipped study files (ablations/*.yaml)."""
    return shipped("studies")


def paper_dir() -> Path:
    """The paper's published tables as CSV (data/paper)."""
    return shipped("paper")


def recipes_dir() -> Path:
    """The shipped data recipes (data/recipes/*.yaml)."""
    return shipped("recipes")


def tasks_dir() -> Path:
    """The offline lm-eval tasks (data/tasks/*.yaml and the files they name)."""
    return shipped("tasks")


def protocols_dir() -> Path:
    """The pinned evaluation protocols (data/protocols/*.yaml: `cartlab eval --preset NAME`)."""
    return shipped("protocols")
