"""Which packages and files the wheel carries; everything else is in pyproject.toml.

The notebooks, study files, paper tables, data recipes and eval tasks stay in the repository's
top-level folders; the wheel carries each as `cartlab/_shipped/<kind>/`, so an installed cartlab
finds them (cartlab/resources.py). The kind -> folder table is resources.SHIPPED, read here
without importing cartlab (a build must not need torch).
"""
import ast
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent


def shipped_folders() -> dict[str, str]:
    """resources.SHIPPED: kind -> the repository folder shipped as cartlab._shipped.<kind>."""
    tree = ast.parse((HERE / "cartlab" / "resources.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["SHIPPED"]:
            return ast.literal_eval(node.value)
    raise RuntimeError("cartlab/resources.py: no SHIPPED table")


SHIPPED = {f"cartlab._shipped.{kind}": folder for kind, folder in shipped_folders().items()}

setup(
    packages=find_packages(include=["cartlab", "cartlab.*"]) + list(SHIPPED),
    package_dir=SHIPPED,
    package_data={name: ["*"] for name in SHIPPED},
)
