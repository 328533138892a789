"""Packaging stays coherent: environment.yml agrees with pyproject.toml, .ci/run runs the
README's install and test commands, the README example runs, and shipped files and writable
folders are found the same way from a checkout and from an installed package
(tests/test_install.py installs one).
Run: pytest tests/test_packaging.py
"""
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

CONDA_TO_PIP = {"pytorch": "torch"}
NOT_PACKAGES = {"python", "pip"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject_requirements(repo) -> dict[str, SpecifierSet]:
    meta = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    reqs = list(meta["dependencies"])
    for extra in meta["optional-dependencies"].values():
        reqs += [r for r in extra if not r.startswith("cartlab")]
    return {norm(Requirement(r).name): Requirement(r).specifier for r in reqs}


def environment_requirements(repo) -> tuple[dict[str, str], str]:
    env = yaml.safe_load((repo / "environment.yml").read_text())
    out, python = {}, None
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            for item in dep["pip"]:
                if not item.startswith("-e"):
                    r = Requirement(item)
                    out[norm(r.name)] = str(r.specifier)
            continue
        name, spec = re.match(r"([A-Za-z0-9_.\-]+)\s*(.*)", dep).groups()
        if name == "python":
            python = spec.lstrip("=")
        elif name not in NOT_PACKAGES:
            out[norm(CONDA_TO_PIP.get(name, name))] = spec
    return out, python


def test_environment_yml_agrees_with_pyproject(repo):
    py, (env, python) = pyproject_requirements(repo), environment_requirements(repo)
    assert set(env) == set(py), f"only in environment.yml: {set(env) - set(py)}; only in pyproject: {set(py) - set(env)}"
    for name, spec in env.items():
        if spec.startswith("=="):  # a pin must satisfy the range pyproject allows
            assert spec[2:] in py[name], (name, spec, str(py[name]))
        else:
            assert SpecifierSet(spec) == py[name], (name, spec, str(py[name]))
    requires = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["requires-python"]
    assert f"{python}.0" in SpecifierSet(requires)
    assert env["torch"] == "==2.13.0"


def readme_shell_lines(repo) -> list[str]:
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", (repo / "README.md").read_text(), flags=re.S)
    return [line.split("#")[0].strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_install_and_test_commands(repo):
    ci = [line.strip() for line in (repo / ".ci" / "run").read_text().splitlines()]
    lines = readme_shell_lines(repo)
    install = [line for line in lines if line.startswith("pip install")]
    assert install == ['pip install torch==2.13.0 -e ".[all]"']
    assert install[0] in ci
    assert "pytest" in lines and ci[-1] == "pytest"


def test_readme_example_runs(repo):
    blocks = re.findall(r"```python\n(.*?)```", (repo / "README.md").read_text(), flags=re.S)
    code = next(b for b in blocks if "build_model" in b)  # the "Build a variant" example
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "stored" in out.stdout and "effective" in out.stdout


def test_a_checkout_reads_its_own_folders(repo):
    from cartlab import resources

    assert resources.checkout() == repo
    found = {"notebooks": resources.notebooks_dir(), "studies": resources.studies_dir(),
             "paper": resources.paper_dir(), "recipes": resources.recipes_dir(), "tasks": resources.tasks_dir(),
                 "protocols": resources.protocols_dir()}
    assert found == {kind: repo / folder for kind, folder in resources.SHIPPED.items()}
    assert all(path.is_dir() for path in found.values())


def test_installed_resources_are_the_package_copies(monkeypatch):
    from cartlab import resources

    monkeypatch.setattr(resources, "checkout", lambda: None)
    package = Path(resources.__file__).resolve().parent
    assert resources.notebooks_dir() == package / "_shipped" / "notebooks"
    assert resources.paper_dir() == package / "_shipped" / "paper"


def test_an_unknown_resource_kind_is_one_line():
    from cartlab import resources

    with pytest.raises(ValueError, match=r"resource kind 'nope' is not allowed; allowed: notebooks, studies"):
        resources.shipped("nope")


def test_data_root_order(repo, tmp_path, monkeypatch):
    from cartlab import resources
    from cartlab.data import paths

    monkeypatch.delenv("CARTLAB_DATA_DIR", raising=False)
    monkeypatch.delenv("CARTLAB_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    assert paths.data_root() == repo / "data"  # a checkout keeps its data/
    monkeypatch.setattr(resources, "checkout", lambda: None)
    assert paths.data_root() == tmp_path.resolve() / "data"  # installed: under the current folder
    assert paths.shipped_recipes_dir() == resources.recipes_dir()
    monkeypatch.setenv("CARTLAB_HOME", str(tmp_path / "home"))
    assert paths.data_root() == (tmp_path / "home" / "data").resolve()
    monkeypatch.setenv("CARTLAB_DATA_DIR", str(tmp_path / "d"))
    assert paths.data_root() == (tmp_path / "d").resolve()  # the data root itself wins


def test_installed_tasks_read_their_files_from_the_package(tmp_path, monkeypatch):
    from cartlab import resources
    from cartlab.eval import run

    assert run.task_file("data/tasks/cartlab_mc.jsonl") == str(resources.checkout() / "data/tasks/cartlab_mc.jsonl")
    monkeypatch.setattr(resources, "checkout", lambda: None)
    monkeypatch.setattr(run, "TASKS_DIR", tmp_path)
    assert run.task_file("data/tasks/cartlab_mc.jsonl") == str(tmp_path / "cartlab_mc.jsonl")
    assert run.task_file("extra/x.jsonl") == str(tmp_path / "extra" / "x.jsonl")


def test_code_version_asks_git_only_about_cartlabs_own_repository(tmp_path, monkeypatch):
    import cartlab
    from cartlab import provenance

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    other = tmp_path / "other"  # some repository that happens to hold an unpacked cartlab
    inside = other / "vendor" / "cartlab-src"
    inside.mkdir(parents=True)
    git = ["git", "-C", str(other), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    version = f"cartlab {cartlab.__version__}"
    for root in (None, inside):
        monkeypatch.setattr(provenance, "checkout", lambda root=root: root)
        assert provenance.git_commit() is None and provenance.code_version() == version, root
    monkeypatch.setattr(provenance, "checkout", lambda: other)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert provenance.git_commit() == head and provenance.code_version() == head
