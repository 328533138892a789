"""Guards the package's promises: importing cartlab.analysis pulls in neither torch nor
matplotlib, and every public function documents its paper section, and in the modules that
compute figures also the formula it computes (issue 5, acceptance 4).
Run: cd /work/main && PYTHONPATH=. .venv/bin/pytest tests/test_analysis_api.py -q
"""
import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

MODULES = ["schema", "published", "scaling", "stats", "decompose", "spectral", "accounting", "plots", "synthetic"]
COMPUTING = {"scaling", "stats", "decompose", "spectral", "accounting"}  # their docstrings state a formula
FORMULA = re.compile(r"[=^/*]")


def test_import_is_cheap():
    code = ("import sys, cartlab.analysis, cartlab.analysis.scaling, cartlab.analysis.stats, "
            "cartlab.analysis.decompose, cartlab.analysis.spectral, cartlab.analysis.accounting; "
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
        if name in COMPUTING:
            assert FORMULA.search(doc), f"{name}.{f.__qualname__}: docstring states no formula"
