"""Executing the parameterized notebooks of notebooks/ with papermill.

Notebooks hold narration and plots; the logic they call lives in tested library code. Each has
one cell tagged `parameters` with typed, commented defaults (`papermill --help-notebook
notebooks/NAME.ipynb` lists them). Executed copies are outputs, written under reports/ and
never committed.
"""
from __future__ import annotations

import os
from pathlib import Path

KERNEL = "python3"


def notebooks_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "notebooks"


def work_from_project_root() -> Path:
    """Give a notebook's relative paths (db, report_dir, out_dir, ...) the meaning they have for
    `cartlab` commands, which run from the repository root. JupyterLab starts a kernel in the
    notebook's own folder: when that is this repository's notebooks/, move to the repository
    root. Anywhere else (papermill from the root, `cartlab ablate`/`report`) nothing changes.
    Returns the working directory."""
    if Path.cwd().resolve() == notebooks_dir():
        os.chdir(notebooks_dir().parent)
    return Path.cwd()


def list_notebooks() -> list[str]:
    return sorted(p.stem for p in notebooks_dir().glob("*.ipynb"))


def notebook_path(name: str) -> Path:
    path = notebooks_dir() / f"{name}.ipynb"
    if not path.is_file():
        raise ValueError(f"notebook {name!r} not found; choose one of {list_notebooks()}")
    return path


def _remove_stale_partials(output: Path) -> None:
    """Delete half-written copies of `output` left by processes that were killed."""
    for old in output.parent.glob(f".{output.stem}.partial-*.ipynb"):
        try:
            os.kill(int(old.name.rsplit("-", 1)[1].split(".")[0]), 0)
        except ProcessLookupError:
            old.unlink(missing_ok=True)
        except (ValueError, PermissionError):
            pass


def execute(name: str, output: str | os.PathLike, parameters: dict, cwd: str | os.PathLike | None = None,
            timeout: int | None = None) -> Path:
    """Run notebooks/NAME.ipynb with `parameters` (headless, kernel python3) into `output`.
    The copy is written to a temporary name and renamed when execution succeeds; a failed run
    leaves `<output>.failed.ipynb` with the error for inspection. Raises on a failing cell."""
    import papermill as pm

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(output)
    partial = output.with_name(f".{output.stem}.partial-{os.getpid()}.ipynb")
    env_backend = os.environ.get("MPLBACKEND")
    os.environ["MPLBACKEND"] = "Agg"  # the kernel inherits it: figures render headless
    try:
        pm.execute_notebook(str(notebook_path(name)), str(partial), parameters=parameters, kernel_name=KERNEL,
                            progress_bar=False, cwd=str(cwd) if cwd else None, execution_timeout=timeout)
    except BaseException:
        if partial.exists():
            os.replace(partial, output.with_name(f"{output.stem}.failed.ipynb"))
        raise
    finally:
        if env_backend is None:
            os.environ.pop("MPLBACKEND", None)
        else:
            os.environ["MPLBACKEND"] = env_backend
    os.replace(partial, output)
    return output
