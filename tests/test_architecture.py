"""Guards the package's layering (issue 25, acceptance 3): no import cycle among cartlab's modules
(imports inside functions, under `if TYPE_CHECKING:` and relative imports all count), no module
over 450 lines, and storage (`cartlab.results`) and the models (`cartlab.model`) import nothing
from the layers above them. Reads the source with `ast` (nothing is imported), and checks the
checker on a small synthetic package so it can fail.
Run: pytest tests/test_architecture.py -q
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import cartlab

MAX_LINES = 450
LOWER = ("cartlab.results", "cartlab.model")
"""Packages that must not import from `ABOVE`."""
ABOVE = ("cartlab.train", "cartlab.analysis", "cartlab.studies", "cartlab.ablate", "cartlab.report",
         "cartlab.notebooks", "cartlab.demo", "cartlab.cli")


def modules(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package at `root` (`__init__.py` is
    the package itself)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _owner(name: str, known: dict[str, Path]) -> str | None:
    """The module `name` lives in: itself, or the nearest enclosing package or module we know."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(known: dict[str, Path], package: str) -> dict[str, set[str]]:
    """module -> the modules of `package` it imports, anywhere in its body."""
    graph: dict[str, set[str]] = {m: set() for m in known}
    for mod, path in known.items():
        here = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = here.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1])
                    source = f"{base}.{node.module}" if node.module else base
                else:
                    source = node.module or ""
                # `from pkg import sub` imports the submodule when there is one, else a name of pkg
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names]
            for name in targets:
                if name == package or name.startswith(package + "."):
                    target = _owner(name, known)
                    if target and target != mod:
                        graph[mod].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def upward(graph: dict[str, set[str]], lower=LOWER, above=ABOVE) -> list[str]:
    """'a -> b' for each import of a module under `lower` from one under `above` or a `*.cli` module."""
    def under(name, prefixes):
        return any(name == p or name.startswith(p + ".") for p in prefixes)

    return [f"{m} -> {t}" for m in sorted(graph) if under(m, lower)
            for t in sorted(graph[m]) if under(t, above) or t.endswith(".cli")]


def long_modules(known: dict[str, Path], limit: int = MAX_LINES) -> list[str]:
    return [f"{m} ({n} lines)" for m, p in sorted(known.items()) if (n := len(p.read_text().splitlines())) > limit]


CARTLAB = Path(cartlab.__file__).parent
KNOWN = modules(CARTLAB, "cartlab")
GRAPH = import_graph(KNOWN, "cartlab")


def test_no_import_cycle():
    found = cycles(GRAPH)
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_module_over_450_lines():
    assert not long_modules(KNOWN), f"modules over {MAX_LINES} lines: {', '.join(long_modules(KNOWN))}"


def test_storage_and_models_import_nothing_from_above():
    found = upward(GRAPH)
    assert not found, "upward imports: " + "; ".join(found)


# -- the checker itself ----------------------------------------------------------------------------------------
@pytest.fixture
def toy(tmp_path):
    """A package `toy` with a cycle through a function-level import, a TYPE_CHECKING import, a
    relative import of the package's own __init__, an upward import and one long module."""
    root = tmp_path / "toy"
    (root / "results").mkdir(parents=True)
    (root / "train").mkdir()
    files = {
        "__init__.py": "from toy import a\n",
        "a.py": "def f():\n    from toy.b import g\n",
        "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from toy.c import X\n",
        "c.py": "from . import helper\n",
        "helper.py": "x = 1\n",
        "results/__init__.py": "",
        "results/db.py": "from .. import helper\nfrom toy.train.loop import run\n",
        "train/__init__.py": "",
        "train/loop.py": "def run():\n    pass\n" + "\n" * 460,
        "lonely.py": "from . import a\n",
    }
    for name, text in files.items():
        (root / name).write_text(text)
    return root


def test_the_checker_finds_cycles_upward_imports_and_long_modules(toy):
    known = modules(toy, "toy")
    graph = import_graph(known, "toy")
    assert graph["toy.c"] == {"toy.helper"}  # `from . import helper`: the submodule
    assert graph["toy.lonely"] == {"toy.a"}
    assert cycles(graph) == []  # a -> b -> c -> helper: a chain, no cycle yet

    (toy / "helper.py").write_text("import toy\n")  # the package's __init__ imports a: a cycle through it
    graph = import_graph(modules(toy, "toy"), "toy")
    assert cycles(graph) == [["toy", "toy.a", "toy.b", "toy.c", "toy.helper"]]

    assert upward(graph, lower=("toy.results",), above=("toy.train",)) == ["toy.results.db -> toy.train.loop"]
    assert long_modules(known) == ["toy.train.loop (462 lines)"]


def test_a_relative_import_of_the_own_package_counts(toy):
    (toy / "helper.py").write_text("def f():\n    from . import c\n")  # c -> helper -> c
    graph = import_graph(modules(toy, "toy"), "toy")
    assert ["toy.c", "toy.helper"] in cycles(graph)
