"""Guards the package's promises: importing cartlab.analysis (and any analysis module) pulls in
neither torch nor matplotlib, every public function documents its paper section, and in the modules
that compute numbers also the formula it computes (figure functions, `plot_*`, draw those numbers
and are exempt) (issue 5, acceptance 4); the package is arranged by concept, no module over
MAX_LINES lines.
Run: pytest tests/test_analysis_api.py -q
"""
import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

MODULES = ["schema", "published", "runs", "scaling", "joint_law", "scaling_study", "stats", "screen", "decompose",
           "spectral", "loops", "accounting", "synthetic"]  # plots only re-exports
COMPUTING = {"scaling", "joint_law", "scaling_study", "stats", "screen", "decompose", "spectral",
             "accounting"}  # their docstrings state a formula
MAX_LINES = 450
FORMULA = re.compile(r"[=^/*]")


def test_import_is_cheap():
    code = ("import sys, cartlab.analysis, cartlab.analysis.scaling, cartlab.analysis.stats, "
            "cartlab.analysis.decompose, cartlab.analysis.spectral, cartlab.analysis.accounting, "
            "cartlab.analysis.runs, cartlab.analysis.joint_law, cartlab.analysis.scaling_study, "
            "cartlab.analysis.screen, cartlab.analysis.loops, cartlab.analysis.depth, cartlab.analysis.figures; "
            "bad = [m for m in ('torch', 'matplotlib') if m in sys.modules]; assert not bad, bad")
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env={"PYTHONPATH": str(root)})


@pytest.mark.parametrize("name", MODULES)
def test_public_functions_document_section(name):
    mod = importlib.import_module(f"cartlab.analysis.{name}")
    assert mod.__doc__
    funcs = [f for n, f in inspect.getmembers(mod, inspect.isfunction)
             if not n.startswith("_") and f.__module__ == mod.__name__]
    assert funcs
    for cls in (c for n, c in inspect.getmembers(mod, inspect.isclass) if c.__module__ == mod.__name__ and n[0] != "_"):
        funcs += [v.fget if isinstance(v, property) else v for n, v in vars(cls).items()
                  if not n.startswith("_") and (inspect.isfunction(v) or isinstance(v, property))]
    for f in funcs:
        doc = f.__doc__ or ""
        assert doc.strip(), f"{name}.{f.__qualname__} has no docstring"
        assert "section" in doc.lower() or "sec." in doc.lower(), \
            f"{name}.{f.__qualname__}: docstring names no paper section"
        if name in COMPUTING and not f.__name__.startswith("plot_"):
            assert FORMULA.search(doc), f"{name}.{f.__qualname__}: docstring states no formula"


def test_no_analysis_module_is_over_the_line_limit():
    """Analysis by concept: fits apart from study data, each analysis with its own figures, and no
    module long enough to mix several (the old plots.py and scaling.py held 700+ lines each)."""
    root = Path(__file__).resolve().parents[1] / "cartlab" / "analysis"
    long = {p.name: n for p in sorted(root.glob("*.py")) if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_plots_reexports_every_figure_from_its_home():
    """`plots.plot_x` still works for notebooks, and is the very function of the module that owns it."""
    plots = importlib.import_module("cartlab.analysis.plots")
    for name in plots.__all__:
        f = getattr(plots, name)
        assert f.__module__ != "cartlab.analysis.plots", name
        assert f.__module__.split(".")[-1] in plots.__doc__, f"{name}: plots' docstring does not say where it lives"
