"""What code produced a result: the git commit of the cartlab checkout, or the package version
when cartlab is installed without one.

Git is asked only about cartlab's own checkout (`resources.checkout()`), and only when that
folder is the top of its git work tree: an installed cartlab (site-packages), or an unpacked
source archive that happens to sit inside some other repository, has no commit of its own.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import cartlab
from cartlab.resources import checkout


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)


def _own_repository() -> Path | None:
    """cartlab's checkout when it is a git work tree's top folder, else None."""
    root = checkout()
    if root is None:
        return None
    try:
        top = _git(root, "rev-parse", "--show-toplevel")
    except (OSError, subprocess.SubprocessError):
        return None
    if top.returncode != 0 or not top.stdout.strip():
        return None
    return root if Path(top.stdout.strip()).resolve() == root.resolve() else None


def git_commit() -> str | None:
    """The commit of the checkout cartlab runs from, or None (installed, no git, no commit)."""
    root = _own_repository()
    if root is None:
        return None
    try:
        return _git(root, "rev-parse", "HEAD").stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def code_version() -> str:
    """The git commit of the cartlab checkout (with `+dirty` for uncommitted changes), else the
    package version: what a stored finding was computed with."""
    root = _own_repository()
    if root is None:
        return f"cartlab {cartlab.__version__}"
    try:
        head = _git(root, "rev-parse", "HEAD")
        dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return f"cartlab {cartlab.__version__}"
    if head.returncode != 0:
        return f"cartlab {cartlab.__version__}"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
