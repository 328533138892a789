"""Packaging stays coherent: environment.yml agrees with pyproject.toml, .ci/run runs the
README's install and test commands, and the README example runs.
Run: pytest tests/test_packaging.py
"""
import re
import subprocess
import sys
import tomllib

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
