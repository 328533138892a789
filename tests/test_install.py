"""cartlab works installed, outside any checkout: the wheel carries every module and every
shipped notebook, study, paper table, recipe and task file, and a non-editable `pip install`
into a fresh virtualenv trains, runs the notebooks and renders the paper report in an empty
folder, writing only there; the report shows what the paper report should
(`test_notebooks.assert_paper_report`).

The fresh virtualenv reuses this interpreter's packages (a .pth file names its site-packages),
so nothing is downloaded and torch is not installed again; cartlab itself is built and
installed from a copy of the sources, and every command runs from an empty folder, so the
checkout is never on the path.
Run: pytest tests/test_install.py
"""
import csv
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from cartlab import __version__
from cartlab.resources import SHIPPED, SHIPPED_PACKAGE

BUILD_FILES = ("pyproject.toml", "setup.py", "README.md")
"""What a build reads besides the package and the shipped folders."""
PIP = [sys.executable, "-m", "pip"]
OFFLINE_PIP = ["--no-deps", "--no-build-isolation", "--no-index"]


def is_source(path: Path) -> bool:
    """A file the checkout means to ship (no caches, no hidden files, no build metadata)."""
    return not any(part.startswith(".") or part == "__pycache__" or part.endswith(".egg-info") for part in path.parts)


def copy_sources(repo: Path, dest: Path) -> Path:
    """The files a build needs, copied out of the checkout (a build writes build/ beside them)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", ".*")
    for name in BUILD_FILES:
        shutil.copy(repo / name, dest / name)
    shutil.copytree(repo / "cartlab", dest / "cartlab", ignore=ignore)
    for folder in SHIPPED.values():
        shutil.copytree(repo / folder, dest / folder, ignore=ignore)
    return dest


def pip(*args: str, timeout: int = 300) -> None:
    out = subprocess.run([*PIP, *args], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


@pytest.fixture(scope="module")
def sources(repo, tmp_path_factory) -> Path:
    return copy_sources(repo, tmp_path_factory.mktemp("cartlab_src"))


@pytest.fixture(scope="module")
def wheel(sources, tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    pip("wheel", *OFFLINE_PIP, "--quiet", "-w", str(dist), str(sources))
    (built,) = dist.glob("cartlab-*.whl")
    return built


def expected_wheel_files(repo: Path) -> set[str]:
    """Every module of cartlab/ and every file of the shipped folders, as the wheel names them."""
    files = {p.relative_to(repo).as_posix() for p in (repo / "cartlab").rglob("*.py")
             if is_source(p.relative_to(repo))}
    for kind, folder in SHIPPED.items():
        files |= {f"cartlab/{SHIPPED_PACKAGE}/{kind}/{p.relative_to(repo / folder).as_posix()}"
                  for p in (repo / folder).rglob("*") if p.is_file() and is_source(p.relative_to(repo))}
    return files


def test_wheel_carries_every_module_and_shipped_file(repo, wheel):
    names = {n for n in zipfile.ZipFile(wheel).namelist() if not n.startswith("cartlab-")}
    expected = expected_wheel_files(repo)
    assert not expected - names, f"missing from the wheel: {sorted(expected - names)}"
    assert not names - expected, f"in the wheel but not in the checkout: {sorted(names - expected)}"
    assert f"cartlab/{SHIPPED_PACKAGE}/notebooks/train_variant.ipynb" in names  # the table is not empty


def fresh_venv(root: Path) -> Path:
    """A virtualenv without pip whose interpreter also sees this interpreter's packages; returns
    its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "_outer_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def installed_env(venv: Path) -> dict:
    """The environment of a user of the venv: its bin/ first, offline hubs, no cartlab variables,
    and the outer prefix's Jupyter data (nbconvert's templates live with the packages reused)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "CARTLAB_DATA_DIR", "CARTLAB_HOME", "CARTLAB_PAPER_DIR")}
    jupyter = [str(Path(sys.prefix) / "share" / "jupyter"), env.get("JUPYTER_PATH", "")]
    return {**env, "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "JUPYTER_PATH": os.pathsep.join(p for p in jupyter if p),
            "MPLBACKEND": "Agg"}


LOOKUP = """
import json, cartlab
from cartlab import provenance, resources
from cartlab.data import paths
print(json.dumps({"file": cartlab.__file__, "checkout": resources.checkout(), "notebooks": str(resources.notebooks_dir()),
                  "version": provenance.code_version(), "commit": provenance.git_commit(),
                  "data_root": str(paths.data_root())}))
"""


@pytest.mark.slow
@pytest.mark.skipif(os.name == "nt", reason="the virtualenv layout (bin/) is POSIX's")
def test_installed_cartlab_trains_and_reports_in_an_empty_folder(sources, tmp_path, repo):
    pytest.importorskip("papermill", reason="the report runs notebooks (pip install -e '.[notebooks]')")
    from test_notebooks import assert_paper_report
    venv = tmp_path / "venv"
    python = fresh_venv(venv)
    pip("--python", str(python), "install", *OFFLINE_PIP, "--ignore-installed", "--quiet", str(sources))
    work = tmp_path / "work"
    work.mkdir()
    env = installed_env(venv)

    def run(*cmd: str, timeout: int = 600) -> subprocess.CompletedProcess:
        out = subprocess.run(list(cmd), cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        assert out.returncode == 0, f"{' '.join(cmd)}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        return out

    site = venv.resolve()
    found = json.loads(run(str(python), "-c", LOOKUP).stdout)
    assert Path(found["file"]).resolve().is_relative_to(site), found
    assert found["checkout"] is None and Path(found["notebooks"]).resolve().is_relative_to(site), found
    assert found["commit"] is None and found["version"] == f"cartlab {__version__}", found
    assert Path(found["data_root"]) == work.resolve() / "data", found

    cartlab = str(venv / "bin" / "cartlab")
    run(cartlab, "train", "--preset", "smoke", "--quiet")
    assert (work / "data" / "built" / "embedded" / "train.bin").is_file()
    assert (work / "runs" / "results.db").is_file()

    run(cartlab, "report", "paper")
    report = work / "reports" / "paper"
    assert (report / "index.html").is_file() and (report / "summary.md").is_file()
    assert_paper_report(report / "index.html", repo)  # what it shows, as a checkout's report shows it
    assert (report / "notebooks" / "report.ipynb").is_file()  # executed by papermill in the venv's kernel

    package = Path(found["file"]).parent
    (record,) = package.parent.glob("cartlab-*.dist-info/RECORD")
    installed = {row[0] for row in csv.reader(record.read_text().splitlines()) if row[0].startswith("cartlab/") and "__pycache__" not in row[0]}
    now = {p.relative_to(package.parent).as_posix() for p in package.rglob("*")
           if p.is_file() and "__pycache__" not in p.parts}
    assert now == installed, f"written into the installed package: {sorted(now - installed)}"
