"""Executing the parameterized notebooks of notebooks/ with papermill.

Notebooks hold narration and plots; the logic they call lives in tested library code. Each has
one cell tagged `parameters` with typed, commented defaults (`papermill --help-notebook
notebooks/NAME.ipynb` lists them). Executed copies are outputs, written under reports/ and
never committed.

A parameter the notebook does not declare is refused before any work, where papermill itself
only warns and runs the defaults: `execute` checks the names before it starts a kernel, and
every notebook's first cell after its parameters calls `check_parameters(globals())`, which
catches the plain `papermill` command line too. papermill executes the cell it injects (tagged
`injected-parameters`, its source opening with `# Parameters`) right after the `parameters`
cell, so the kernel's input history holds both: the names assigned in the first must be among
those assigned in the second.

A parameter whose name ends in `_yaml` (train_variant's `config_yaml`) holds a YAML mapping as
text: `execute` parses it before the kernel starts, and the notebook reads it with
`yaml_parameter`, so a syntax error is one line naming the parameter and the error's line and
column (`notebook parameter config_yaml:2:9: YAML syntax error: ...`) instead of PyYAML's
ParserError from inside the kernel.
"""
from __future__ import annotations

import ast
import difflib
import functools
import os
from pathlib import Path

from cartlab import resources

KERNEL = "python3"


def notebooks_dir() -> Path:
    """The shipped notebooks: the checkout's notebooks/, else the installed package's copy."""
    return resources.notebooks_dir()


def work_from_project_root() -> Path:
    """Give a notebook's relative paths (db, report_dir, out_dir, ...) the meaning they have for
    `cartlab` commands, which run from the repository root. JupyterLab starts a kernel in the
    notebook's own folder: when that is this repository's notebooks/, move to the repository
    root. Anywhere else (papermill from the root, `cartlab ablate`/`report`, an installed
    cartlab) nothing changes. Returns the working directory."""
    repo = resources.checkout()
    if repo is not None and Path.cwd().resolve() == notebooks_dir().resolve():
        os.chdir(repo)
    return Path.cwd()


def list_notebooks() -> list[str]:
    return sorted(p.stem for p in notebooks_dir().glob("*.ipynb"))


def notebook_path(name: str) -> Path:
    path = notebooks_dir() / f"{name}.ipynb"
    if not path.is_file():
        raise ValueError(f"notebook {name!r} not found; choose one of {list_notebooks()}")
    return path


def assigned_names(source: str) -> list[str]:
    """The names a cell assigns at its top level (`x = 1`, `x: int = 1`), in order."""
    names = []
    for node in ast.parse(source).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
            if isinstance(node, ast.AnnAssign) else []
        names += [t.id for t in targets if isinstance(t, ast.Name) and t.id not in names]
    return names


def declared_parameters(name: str) -> list[str]:
    """The parameters notebooks/NAME.ipynb declares in its cell tagged `parameters`."""
    import nbformat

    nb = nbformat.read(notebook_path(name), as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    return assigned_names(cells[0].source) if cells else []


def refuse_unknown(given, declared, where: str = "this notebook") -> None:
    """Raise one ValueError line naming the first parameter of `given` not in `declared`."""
    unknown = [n for n in given if n not in declared]
    if unknown:
        close = difflib.get_close_matches(unknown[0], declared, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        others = f" (also unknown: {', '.join(unknown[1:])})" if unknown[1:] else ""
        raise ValueError(f"notebook parameter {unknown[0]!r} is not one {where} takes{hint}{others}; "
                         f"allowed: {', '.join(sorted(declared)) or 'none'}")


YAML_SUFFIX = "_yaml"
"""A parameter named `*_yaml` holds YAML text (a mapping, or empty)."""


def yaml_parameter(name: str, text: str) -> dict:
    """The mapping that notebook parameter `name` holds as YAML text ({} when empty). A syntax
    error, or YAML that is not a mapping, is one ConfigError line naming the parameter (and the
    error's line and column)."""
    import yaml

    from cartlab.config import ConfigError

    where = f"notebook parameter {name}"
    if not isinstance(text, str):
        raise ConfigError(f"{where}={text!r} is not allowed: must be YAML text (a string)", name)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark else where
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{at}: YAML syntax error: {problem}", name) from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must be a YAML mapping of field: value, got a {type(value).__name__}", name)
    return value


INJECTED_COMMENT = "# Parameters"
"""How papermill's Python translator opens the cell of injected parameters."""


def check_parameters(namespace: dict) -> None:
    """Call as `check_parameters(globals())` first thing in the cell after `parameters`: under
    papermill, refuse a parameter that the `parameters` cell does not declare (one ValueError
    line with the allowed names). Run by hand (nothing injected) it does nothing."""
    history = list(namespace.get("_ih") or [])
    if len(history) < 2 or not history[-2].lstrip().startswith(INJECTED_COMMENT):
        return  # not run by papermill, or run without parameters
    declared = assigned_names(history[-3]) if len(history) >= 3 else []
    refuse_unknown(assigned_names(history[-2]), declared)


def _remove_stale_partials(output: Path) -> None:
    """Delete half-written copies of `output` left by processes that were killed."""
    for old in output.parent.glob(f".{output.stem}.partial-*.ipynb"):
        try:
            os.kill(int(old.name.rsplit("-", 1)[1].split(".")[0]), 0)
        except ProcessLookupError:
            old.unlink(missing_ok=True)
        except (ValueError, PermissionError):
            pass


KERNEL_ARGS = ["--IPKernelApp.log_level=ERROR"]
"""The kernel's own log shows errors only: ipykernel warns on every start that its localhost TCP
sockets are unencrypted (messages are HMAC-signed all the same), once per notebook a study runs."""


@functools.cache
def kernel_manager() -> type:
    """`FinishedKernelManager`, made on first use (jupyter_client is imported by papermill runs only)."""
    from jupyter_client.manager import AsyncKernelManager

    class FinishedKernelManager(AsyncKernelManager):
        """Shuts a kernel down without interrupting it first. jupyter_client sends SIGINT before
        every shutdown request; a kernel that has run the whole notebook is idle, and the signal
        can land while it handles that request, which ipykernel logs on the console as "ERROR |
        KeyboardInterrupt caught in kernel." (about one report in two). A kernel still busy is
        terminated after `shutdown_wait_time` all the same, and a cell timeout still interrupts."""

        async def _async_interrupt_kernel(self) -> None:
            if not self.shutting_down:
                await super()._async_interrupt_kernel()

    return FinishedKernelManager


def execute(name: str, output: str | os.PathLike, parameters: dict, cwd: str | os.PathLike | None = None,
            timeout: int | None = None) -> Path:
    """Run notebooks/NAME.ipynb with `parameters` (headless, kernel python3) into `output`.
    The copy is written to a temporary name and renamed when execution succeeds; a failed run
    leaves `<output>.failed.ipynb` with the error for inspection. Raises on a failing cell."""
    import papermill as pm

    refuse_unknown(parameters, declared_parameters(name), f"notebooks/{name}.ipynb")
    for key, value in parameters.items():
        if key.endswith(YAML_SUFFIX) and value:
            yaml_parameter(key, value)  # a syntax error is refused here, before a kernel starts
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(output)
    partial = output.with_name(f".{output.stem}.partial-{os.getpid()}.ipynb")
    env_backend = os.environ.get("MPLBACKEND")
    os.environ["MPLBACKEND"] = "Agg"  # the kernel inherits it: figures render headless
    try:
        pm.execute_notebook(str(notebook_path(name)), str(partial), parameters=parameters, kernel_name=KERNEL,
                            progress_bar=False, cwd=str(cwd) if cwd else None, execution_timeout=timeout,
                            extra_arguments=KERNEL_ARGS, kernel_manager_class=kernel_manager())
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


def execute_many(jobs: list[dict], workers: int = 1, then=None):
    """Execute several notebooks, `workers` at a time (each job: `execute`'s arguments as a
    dict), yielding (name, path of the executed copy, seconds) as each finishes. `then(path)`
    runs in the same process right after a notebook executes (e.g. its HTML rendering). With
    workers > 1 the notebooks run in spawned processes, each kernel given an equal share of the
    CPU threads; the first failure is raised once the notebooks already started have finished."""
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield _execute_timed(job, then)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = str(max(1, (os.cpu_count() or 1) // workers))
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=mp.get_context("spawn"),
                             initializer=_share_threads, initargs=(threads,)) as pool:
        for done in as_completed([pool.submit(_execute_timed, job, then) for job in jobs]):
            yield done.result()


def _share_threads(threads: str) -> None:
    os.environ["OMP_NUM_THREADS"] = threads  # the kernels this worker starts inherit it


def _execute_timed(job: dict, then=None) -> tuple[str, Path, float]:
    import time

    t0 = time.time()
    path = execute(**job)
    if then is not None:
        then(path)
    return job["name"], path, time.time() - t0
