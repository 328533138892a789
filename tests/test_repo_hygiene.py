"""The repository carries nothing tied to one developer's machine: no absolute home or checkout
paths in any tracked text file (docstrings, notebooks, YAML, README)."""
from __future__ import annotations

import re
import subprocess

import pytest

MACHINE_PATH = re.compile(r"(?<![\w.~])/(?:home|Users|work|root)/[\w.-]+|[A-Z]:\\\\Users\\\\")


def tracked_files(repo):
    try:
        out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [repo / name for name in out.stdout.decode().split("\0") if name]


def test_the_pattern_finds_machine_paths():
    home, checkout = "/" + "home/ana", "/" + "work/main"  # split, so this file does not name them itself
    assert MACHINE_PATH.search(f"Run: cd {checkout} && pytest")
    assert MACHINE_PATH.search(f'"input_path": "{home}/cartlab/notebooks/x.ipynb"')
    assert not MACHINE_PATH.search("pytest tests/test_x.py  # writes runs/work/ and data/home/")


def test_no_tracked_file_names_an_absolute_machine_path(repo):
    found = []
    for path in tracked_files(repo):
        if not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue  # binary fixtures (databases, weights)
        for n, line in enumerate(text.splitlines(), 1):
            if MACHINE_PATH.search(line):
                found.append(f"{path.relative_to(repo)}:{n}: {line.strip()[:120]}")
    assert not found, "absolute machine paths:\n" + "\n".join(found)
