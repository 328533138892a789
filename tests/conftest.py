"""Shared pytest fixtures. Run the whole suite with `pytest` from the repository root."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def paper_dir(repo) -> Path:
    return repo / "data" / "paper"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, repo) -> Path:
    """A test-sized embedded corpus (tests/fixtures/data/tiny_embedded.yaml, vocab 512), built
    once per session into a temporary data root."""
    import os

    from cartlab.data.build import build
    from cartlab.data.recipe import load_recipe

    root = tmp_path_factory.mktemp("data_root")
    out = root / "built" / "tiny-embedded"
    old = os.environ.get("CARTLAB_DATA_DIR")
    os.environ["CARTLAB_DATA_DIR"] = str(root)
    try:
        build(load_recipe(repo / "tests" / "fixtures" / "data" / "tiny_embedded.yaml"), out, progress=False,
              log=lambda s: None)
    finally:
        if old is None:
            os.environ.pop("CARTLAB_DATA_DIR")
        else:
            os.environ["CARTLAB_DATA_DIR"] = old
    return out


OFFLINE_CLI = """
import socket, sys
def refuse(*args, **kwargs):
    raise OSError("network access attempted during an offline test")
socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = refuse
from cartlab.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_offline_cli(*args: str, data_root: Path, hash_seed: str = "0", timeout: int = 600):
    """`cartlab ARGS` in a fresh process with sockets refused and the hubs set offline, under its
    own data root: what a user on a machine without the internet runs."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "CARTLAB_DATA_DIR": str(data_root), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONHASHSEED": hash_seed}
    return subprocess.run([sys.executable, "-c", OFFLINE_CLI, *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """`cartlab train --preset smoke` as on a fresh clone, offline: no corpus and no tokenizer cache
    in its data root, so it builds the shipped `embedded` recipe on first use, then trains CART."""
    from types import SimpleNamespace

    root = tmp_path_factory.mktemp("fresh_clone")
    run = SimpleNamespace(data_root=root / "data", db=root / "results.db", out=root / "runs")
    proc = run_offline_cli("train", "--preset", "smoke", "--quiet", f"results_db={run.db}", f"out_dir={run.out}",
                           data_root=run.data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "building the embedded corpus" in proc.stderr
    return run
