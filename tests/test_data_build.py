"""`cartlab data build` on a tiny embedded recipe: determinism, domain purity, shares, held-out
validation, and that bad inputs and interrupted builds leave no complete-looking file.

Guards cartlab/data/build.py, recipe.py, meta.py and cli.py (issue 3, acceptance 1, 4, 5).
Offline: HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1; everything is written under tmp paths.
Run: PYTHONPATH=. .venv/bin/pytest tests/test_data_build.py -q
"""
import itertools
import json
import os
import re
import shutil
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import numpy as np
import pytest
import yaml

from cartlab import cli
from cartlab.data import BatchLoader, get_tokenizer, load_meta, open_bin
from cartlab.data import build as build_mod
from cartlab.data.binfile import BinWriter, file_sha256
from cartlab.data.embedded import story_documents
from cartlab.data.recipe import Recipe, load_recipe

TINY = Path(__file__).parent / "fixtures" / "data" / "tiny_embedded.yaml"
OUTPUTS = {"train.bin", "val_prose.bin", "val_stories.bin", "val_iteration.bin", "meta.json",
           "tokenizer.json", "train_chunk_domains.npy"}


def _build(root: Path, out: Path, **kw) -> dict:
    """Build the tiny recipe with its own data root (own tokenizer cache)."""
    old = os.environ.get("CARTLAB_DATA_DIR")
    os.environ["CARTLAB_DATA_DIR"] = str(root)
    try:
        return build_mod.build(load_recipe(TINY), out, progress=False, log=lambda s: None, **kw)
    finally:
        if old is None:
            os.environ.pop("CARTLAB_DATA_DIR")
        else:
            os.environ["CARTLAB_DATA_DIR"] = old


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    base = tmp_path_factory.mktemp("build")
    return _build(base / "root", base / "out")


@pytest.fixture(autouse=True)
def data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("CARTLAB_DATA_DIR", str(tmp_path / "root"))


def test_offline_mode_is_on():
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "1"


def test_outputs_and_metadata(built):
    out = Path(built["dir"])
    assert {p.name for p in out.iterdir()} == OUTPUTS  # no staging or partial files left
    assert built["dtype"] == "uint16" and built["tokenizer"]["vocab_size"] == 512
    assert built["versions"]["python"] and built["seed"] == 3
    for name, info in built["files"].items():
        assert file_sha256(out / name) == info["sha256"]
    train = open_bin(out / "train.bin", check_ids=True)
    assert train.chunk_size == 257 and train.n_tokens == 311 * 257
    assert load_meta(out, verify_sha256=True)["train_tokens"] == train.n_tokens


def test_two_builds_are_byte_identical(built, tmp_path):
    # A second data root: the tokenizer is trained again from scratch, not read from a cache.
    again = _build(tmp_path / "root2", tmp_path / "out2")
    assert len(list((tmp_path / "root2" / "cache" / "tokenizers").glob("embedded-v512-*.json"))) == 1
    for name in ["meta.json", "tokenizer.json", "train_chunk_domains.npy", *built["files"]]:
        assert file_sha256(Path(built["dir"]) / name) == file_sha256(Path(again["dir"]) / name), name


def test_shares_within_one_percent(built):
    labels = np.load(Path(built["dir"]) / "train_chunk_domains.npy")
    recipe = load_recipe(TINY)
    for i, d in enumerate(recipe.domains):
        share = float((labels == i).mean())
        assert abs(share - d.ratio) < 0.01, (d.name, share)
        assert abs(built["share_per_domain"][d.name] - d.ratio) < 0.01


def _classify(text: str, story_words: set[str]) -> str:
    """Which domain a piece of text is from, judged from the text alone."""
    if len(re.findall(r"Let [a-z] = ", text)) >= 3:
        return "iteration"
    words = [w.strip('.,!?"\'').lower() for w in text.split()]
    words = [w for w in words if w.isalpha()]
    inside = sum(w in story_words for w in words) / max(1, len(words))
    return "stories" if inside > 0.97 else "prose"


def assert_windows_in_one_domain(meta: dict, seq_len: int) -> None:
    """Each chunk's text, judged on its own, is from the domain the build says it is, and every
    window the loader reads sits inside one chunk, so inside one domain."""
    out = Path(meta["dir"])
    tok = get_tokenizer(meta)
    story_words = {w.strip('.,!?"\'').lower() for s in itertools.islice(story_documents(0), 3000)
                   for w in s.split()}
    labels = np.load(out / "train_chunk_domains.npy")
    train = open_bin(out / "train.bin")
    c = train.chunk_size
    for i, label in enumerate(labels):
        text = tok.decode(train.tokens[i * c:(i + 1) * c].tolist())
        assert _classify(text, story_words) == meta["domains"][label], text[:200]
    loader = BatchLoader(train, batch_size=8, seq_len=seq_len)
    assert loader.windows_per_chunk == (c - 1) // seq_len
    for _ in range(loader.steps_per_epoch):
        loader.next_batch()
        first, last = loader.last_offsets // c, (loader.last_offsets + seq_len) // c
        assert (first == last).all()


def test_every_training_window_lies_in_one_domain(built):
    assert_windows_in_one_domain(built, seq_len=128)


@pytest.mark.slow
def test_the_shipped_embedded_recipe_builds_offline_the_same_bytes_twice(smoke_run, tmp_path):
    """Acceptance 1 and 4 on data/recipes/embedded.yaml itself, built twice with the network
    refused: on first use by `cartlab train --preset smoke` (the fixture), and by `cartlab data
    build embedded` in a process with another hash seed and its own tokenizer training. The files
    are byte-identical; shares are within 1% of the ratios; windows lie in one domain; the command
    prints where it wrote what."""
    from conftest import run_offline_cli

    first = load_meta(smoke_run.data_root / "built" / "embedded", verify_sha256=True)
    proc = run_offline_cli("data", "build", "embedded", "--no-progress", data_root=tmp_path, hash_seed="12345")
    assert proc.returncode == 0, proc.stderr[-3000:]
    second = load_meta(tmp_path / "built" / "embedded")
    assert second["dir"] in proc.stdout
    for name in second["files"]:
        assert re.search(rf"{re.escape(name)}\s+[\d,]+ tokens", proc.stdout), (name, proc.stdout)
    for name in ["meta.json", "tokenizer.json", "train_chunk_domains.npy", *first["files"]]:
        assert file_sha256(Path(first["dir"]) / name) == file_sha256(Path(second["dir"]) / name), name
    labels = np.load(Path(first["dir"]) / "train_chunk_domains.npy")
    for i, d in enumerate(load_recipe("embedded").domains):
        assert abs(float((labels == i).mean()) - d.ratio) < 0.01, d.name
    assert_windows_in_one_domain(first, seq_len=256)


def _whole_docs(ids: np.ndarray, eos: int) -> set[bytes]:
    """Documents that lie wholly between two end-of-text ids, as bytes."""
    cuts = np.flatnonzero(ids == eos)
    return {ids[a + 1:b].tobytes() for a, b in zip(cuts, cuts[1:]) if b - a > 8}


def test_validation_text_never_appears_in_train(built):
    out = Path(built["dir"])
    eos = built["tokenizer"]["eos_id"]
    train = open_bin(out / "train.bin")
    c = train.chunk_size
    chunks = np.asarray(train.tokens).reshape(-1, c)
    train_docs = set().union(*(_whole_docs(ch, eos) for ch in chunks))
    train_bytes = np.asarray(train.tokens).tobytes()
    for d in built["domains"]:
        val = np.asarray(open_bin(out / f"val_{d}.bin").tokens)
        val_docs = _whole_docs(np.concatenate([np.array([eos], val.dtype), val]), eos)
        assert len(val_docs) >= 2, d
        assert not val_docs & train_docs, d
        for doc in val_docs:  # also not inside a chunk, cut differently
            if len(doc) >= 80:  # 40 tokens
                pos = train_bytes.find(doc[:80])
                assert pos < 0 or pos % 2, d
    assert len(train_docs) > 100


def test_build_is_refused_or_skipped_when_output_exists(built, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(built["dir"], out)
    again = _build(tmp_path / "root", out)  # same recipe: nothing to do, nothing rewritten
    assert again["files"] == built["files"]
    d = yaml.safe_load(TINY.read_text())
    d["seed"] = 4
    with pytest.raises(ValueError, match="different recipe.*force"):
        build_mod.build(Recipe.from_dict(d), out, progress=False, log=lambda s: None)


def test_interrupted_build_leaves_no_complete_looking_file(built, tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_mod, "_interleave", crash)
    fresh = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt):
        _build(tmp_path / "root", fresh)
    assert list(fresh.iterdir()) == []  # no bins, no meta, no staging folder
    with pytest.raises(ValueError, match="not a completed build"):
        load_meta(fresh)
    # Interrupting a rebuild over a complete build leaves the old build complete and valid.
    old = tmp_path / "old"
    shutil.copytree(built["dir"], old)
    with pytest.raises(KeyboardInterrupt):
        _build(tmp_path / "root", old, force=True)
    assert {p.name for p in old.iterdir()} == OUTPUTS
    assert load_meta(old, verify_sha256=True)["files"] == built["files"]


@pytest.mark.slow
def test_two_builds_of_one_folder_at_once_build_it_once_and_clear_killed_staging(tmp_path):
    """Two `cartlab data build` processes on one fresh folder (two first-use trainings): the
    second waits for the first and finds its build; a killed build's staging folder is removed."""
    import subprocess
    import sys

    out = tmp_path / "out"
    (out / ".staging-1").mkdir(parents=True)  # what a SIGKILLed build leaves
    (out / ".staging-1" / "train.bin").write_bytes(b"\0" * 4096)
    env = {**os.environ, "CARTLAB_DATA_DIR": str(tmp_path / "root")}
    cmd = [sys.executable, "-m", "cartlab.cli", "data", "build", str(TINY), "--out", str(out), "--quiet"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert sum(bool(re.search(r"^built '", log, re.M)) for log in logs) == 1, logs
    assert sum("is already built from this recipe" in log for log in logs) == 1, logs
    assert {p.name for p in out.iterdir()} == OUTPUTS
    load_meta(out, verify_sha256=True)


def test_metadata_mismatch_is_detected(built, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(built["dir"], out)
    # A validation bin from another tokenizer (same vocabulary size) swapped in.
    with BinWriter(out / "val_stories.bin", vocab_size=512, tokenizer_hash="ee" * 32) as w:
        w.write(open_bin(Path(built["dir"]) / "val_stories.bin").tokens)
    with pytest.raises(ValueError, match="tokenizer mismatch: val_stories.bin"):
        load_meta(out)
    shutil.copy(Path(built["dir"]) / "val_stories.bin", out / "val_stories.bin")
    meta = json.loads((out / "meta.json").read_text())
    meta["files"]["val_prose.bin"]["n_tokens"] += 1
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="metadata mismatch: val_prose.bin holds"):
        load_meta(out)
    shutil.copy(Path(built["dir"]) / "meta.json", out / "meta.json")
    (out / "train.bin").write_bytes((out / "train.bin").read_bytes()[:-10])
    with pytest.raises(ValueError, match="train.bin is truncated"):
        load_meta(out)


def test_tokenizer_from_metadata_must_match(built, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(built["dir"], out)
    tok = get_tokenizer(load_meta(out))
    assert tok.hash == built["tokenizer"]["hash"] and tok.vocab_size == 512
    text = "Let a = 5. Once upon a time, there was a little girl named Lily."
    assert tok.decode(tok.encode(text)) == text
    other = json.loads((out / "tokenizer.json").read_text())
    other["model"]["merges"] = other["model"]["merges"][:-1]
    (out / "tokenizer.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        get_tokenizer(load_meta(out))


def _tiny_dict():
    return yaml.safe_load(TINY.read_text())


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(shuffle=True), r"recipe.shuffle is not a field: allowed: "),
    (lambda d: d["domains"][0].update(weight=2), r"recipe.domains\[0\].weight is not a field"),
    (lambda d: d["domains"][1]["train"].update(name="poems"),
     r"recipe.domains\[1\].train.name='.*' is not allowed: an embedded source is one of iteration, prose, stories, uniform"),
    (lambda d: d["domains"][0]["train"].update(type="csv"), r"train.type='csv' is not allowed: choose one of 'embedded', 'hf'"),
    (lambda d: d["tokenizer"].update(name="gpt2"), r"recipe.tokenizer.name='gpt2' is not allowed: choose one of embedded, llama2"),
    (lambda d: d["domains"][0].update(val_fraction=0.5), r"recipe.domains\[0\].val_fraction=0.5 is not allowed: must be > 0 and <= 0.1"),
    (lambda d: d.update(chunk_size="big"), r"recipe.chunk_size='big' is not allowed: must be an integer"),
])
def test_bad_recipe_fields(edit, message):
    d = _tiny_dict()
    edit(d)
    with pytest.raises(ValueError, match=message):
        Recipe.from_dict(d)


def test_finite_domain_running_out_is_an_error(tmp_path):
    d = _tiny_dict()
    d["train_tokens"] = 3_000_000
    d["domains"][0]["ratio"] = 0.9  # far more prose than ships with Python
    with pytest.raises(ValueError, match="domain 'prose' ran out of documents"):
        build_mod.build(Recipe.from_dict(d), tmp_path / "out", progress=False, log=lambda s: None)
    assert list((tmp_path / "out").iterdir()) == []


def test_cli_reports_bad_recipe_and_writes_nothing(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    d = _tiny_dict()
    d["domains"][0]["weight"] = 2
    bad.write_text(yaml.safe_dump(d))
    assert cli.main(["data", "build", str(bad), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cartlab: error: recipe.domains[0].weight is not a field")
    assert not (tmp_path / "out").exists()


def test_cli_build_prints_what_it_wrote(built, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(built["dir"], out)
    assert cli.main(["data", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "train.bin" in text and "val_iteration.bin" in text and "share of train" in text
    assert cli.main(["data", "build", str(TINY), "--out", str(out), "--quiet"]) == 0
    assert "already built" in capsys.readouterr().out


def test_shipped_recipes_parse():
    from cartlab.data.paths import recipes_dir

    os.environ.pop("CARTLAB_DATA_DIR", None)
    names = sorted(p.stem for p in recipes_dir().glob("*.yaml"))
    assert {"embedded", "paper-stage1", "paper-stage2"} <= set(names)
    for name in names:
        r = load_recipe(name)
        assert abs(sum(d.ratio for d in r.domains) - 1) < 1e-9, name
    assert load_recipe("paper-stage2").tokenizer.name == "llama2"
    assert load_recipe("embedded").tokenizer.name == "embedded"


def test_shipped_recipes_are_found_when_the_data_root_moves(tmp_path, monkeypatch):
    from cartlab.data.recipe import list_recipes, load_recipe

    monkeypatch.setenv("CARTLAB_DATA_DIR", str(tmp_path))
    assert {"embedded", "paper-stage1", "paper-stage2"} <= set(list_recipes())
    assert load_recipe("embedded").name == "embedded"
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "embedded.yaml").write_text("name: bogus_field_only\nnot_a_field: 1\n")
    with pytest.raises(ValueError):  # the data root's own recipe wins over the shipped one
        load_recipe("embedded")


def _data_imports() -> dict[str, set[str]]:
    """For every module of cartlab/data, the cartlab.data modules it imports, at the top or
    inside a function (a lazy import still makes a circle), through `cartlab.data`'s lazy
    names too."""
    import ast

    import cartlab.data as data_pkg

    folder = Path(data_pkg.__file__).parent
    modules = {p.stem for p in folder.glob("*.py")} - {"__init__"}
    graph = {}
    for name in modules:
        edges = set()
        for node in ast.walk(ast.parse((folder / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cartlab.data"):
                if node.module == "cartlab.data":
                    edges |= {a.name if a.name in modules else data_pkg._EXPORTS.get(a.name) for a in node.names}
                else:
                    edges.add(node.module.split(".")[2])
            elif isinstance(node, ast.Import):
                edges |= {a.name.split(".")[2] for a in node.names if a.name.startswith("cartlab.data.")}
        graph[name] = edges - {None, name}
    return graph


def test_data_modules_import_one_way():
    """No import circle in cartlab/data (recipe, sources and tokenizer were one): the graph of
    imports between its modules has no cycle, and each module imports alone in a fresh process."""
    import subprocess
    import sys

    graph = _data_imports()
    assert graph["sources"] & {"tokenizer", "recipe"} == set()
    assert "recipe" not in graph["tokenizer"]
    done, path = set(), []

    def visit(node):
        assert node not in path, f"import circle: {' -> '.join(path[path.index(node):] + [node])}"
        if node in done:
            return
        path.append(node)
        for nxt in sorted(graph[node]):
            visit(nxt)
        path.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)
    for name in ("tokenizer", "sources", "recipe"):
        subprocess.run([sys.executable, "-c", f"import cartlab.data.{name}"], check=True)


def test_resolve_data_names_the_field(tmp_path):
    from types import SimpleNamespace

    from cartlab.data import resolve_data

    with pytest.raises(ValueError, match=r"data.dir='.*' holds no data build \(no meta.json\)"):
        resolve_data(SimpleNamespace(dir=str(tmp_path), recipe="embedded"))
    with pytest.raises(ValueError, match=r"data for recipe 'paper-stage1' is missing .*cartlab data build"):
        os.environ["CARTLAB_DATA_DIR"] = str(tmp_path / "root")
        try:
            resolve_data(SimpleNamespace(dir=None, recipe="paper-stage1"))
        finally:
            os.environ.pop("CARTLAB_DATA_DIR")
