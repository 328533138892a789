"""`cartlab export` (issue 17): a checkpoint written as a transformers folder loads with
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` in a process where cartlab
cannot be imported, gives cartlab's logits (fp32, atol 1e-5) and cartlab's greedy tokens through
`generate()` (transformers' cache and no cache, the trained R and another R), for CART and its
ablations, Dense and LRT; and plain `lm_eval --model hf` scores an exported model exactly as the
`cartlab` lm-eval model scores its checkpoint. Offline; tiny random models with the tiny data
build's tokenizer.

    python -m pytest -q tests/test_export.py
"""
from __future__ import annotations

import ast
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import need
import torch

from cartlab.cli import main
from cartlab.export.bundle import module_names
from cartlab.export.write import MODELING, ROOTS, export

# slow: subprocesses that import torch and transformers, lm-eval runs; tiny models on one thread
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread", "hf_offline")]

SHAPE = {"vocab_size": 512, "d_model": 32, "n_heads": 4, "ffn_multiple_of": 16}
CART = {"kind": "cart", "prelude_layers": 2, "n_loops": 3, **SHAPE}
DENSE = {"kind": "dense", "n_layers": 3, **SHAPE}
VARIANTS = {
    "cart": CART,
    "unfreeze_kv": {**CART, "hooks": ["unfreeze_kv"]},
    "unshare_core": {**CART, "hooks": ["unshare_core"]},
    "self_attn_core": {**CART, "hooks": ["self_attn_core"]},
    "no_lti": {**CART, "hooks": ["no_lti"]},
    "combined": {**CART, "hooks": ["no_hyper", "no_lie", "noncausal_cross_attn"]},
    "dense": DENSE,
    "lrt": {**DENSE, "hooks": ["lrt_kv", "lrt_residual"]},
}
PROMPT = "Once upon a time there was a little fox"
NEW_TOKENS = 12
OTHER_R = 2  # a loop count other than the trained R=3 (allowed by the unshared core's 3 blocks)


def write_checkpoint(folder: Path, model_cfg: dict, data_dir: Path, seed: int = 0, seq_len: int = 32) -> Path:
    """A cartlab checkpoint (as training writes it) of a randomly initialised model whose weights
    are all perturbed (so LRT's zero-initialised gains and every gate are active), with the tokenizer
    of the data build `data_dir`."""
    from cartlab.data.meta import load_meta
    from cartlab.model import LMConfig, build_model
    from cartlab.train.checkpoint import save

    torch.manual_seed(seed)
    cfg = LMConfig.from_dict(model_cfg)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    meta = load_meta(data_dir)
    config = {"model": cfg.to_dict(), "train": {"seq_len": seq_len}, "run_id": f"test-{folder.name}"}
    tokenizer = (Path(meta["dir"]) / meta["tokenizer"]["file"], meta["tokenizer"])
    ckpt, _ = save(folder / "checkpoints", 1, model, torch.optim.SGD(model.parameters(), lr=0.1), {}, config, keep=1,
                   tokenizer=tokenizer)
    return ckpt


def no_cartlab_env(tmp: Path) -> dict:
    """Environment of a child process in which `import cartlab` fails: a package of that name that
    refuses to import comes first on the path (the child must not run from the repository root)."""
    fake = tmp / "no_cartlab" / "cartlab"
    fake.mkdir(parents=True, exist_ok=True)
    (fake / "__init__.py").write_text('raise ImportError("cartlab is not installed in this process")\n')
    return {**os.environ, "PYTHONPATH": str(fake.parent), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "HF_MODULES_CACHE": str(tmp / "hf_modules"), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_data):
    """Every variant written as a checkpoint, exported, with cartlab's reference outputs saved
    beside it: {name: (checkpoint, export folder)}."""
    from cartlab.checkpoint import build, load_tokenizer

    root = tmp_path_factory.mktemp("export")
    out = {}
    for i, (name, cfg) in enumerate(VARIANTS.items()):
        ckpt = write_checkpoint(root / name, cfg, tiny_data, seed=i)
        folder = export(ckpt, root / "hf" / name, log=lambda s: None)
        model, _ = build(ckpt)
        model.eval()
        ids = torch.tensor([load_tokenizer(ckpt).encode(PROMPT)])
        settings = {"default": {}}
        if cfg["kind"] == "cart":
            settings["other_r"] = {"n_loops": OTHER_R}
        ref = {"ids": ids[0].tolist()}
        with torch.no_grad():
            for setting, kw in settings.items():
                ref[setting] = {"logits": model(ids, **kw)[0],
                                "tokens": model.generate(ids, NEW_TOKENS, temperature=0, **kw)[0].tolist()}
        torch.save(ref, folder / "reference.pt")
        out[name] = (ckpt, folder)
    return out


LOAD_AND_COMPARE = r"""
import json, sys
import torch
try:
    import cartlab
    sys.exit("cartlab is importable in the child process: the test would prove nothing")
except ImportError:
    pass
from transformers import AutoModelForCausalLM, AutoTokenizer

report = {}
for folder in sys.argv[1:]:
    ref = torch.load(f"{folder}/reference.pt")
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    row = {"ids": tok("PROMPT")["input_ids"] == ref["ids"]}
    ids = torch.tensor([ref["ids"]])
    for setting, kw in (("default", {}), ("other_r", {"n_loops": OTHER_R})):
        if setting not in ref:
            continue
        # R as a config field (set at load time), as a forward argument and as a generate argument
        by_config = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, **kw).eval()
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        model.generation_config.eos_token_id = None  # cartlab's generate does not stop at end-of-text
        want = ref[setting]
        with torch.no_grad():
            row[setting] = {
                "config_logits": (by_config(ids).logits - want["logits"]).abs().max().item(),
                "call_logits": (model(ids, **kw).logits - want["logits"]).abs().max().item(),
                "cached": model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, **kw)[0].tolist()
                          == want["tokens"],
                "uncached": model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=False,
                                           **kw)[0].tolist() == want["tokens"],
            }
    report[folder] = row
report["cartlab_loaded"] = any(m == "cartlab" or m.startswith("cartlab.") for m in sys.modules)
print(json.dumps(report))
""".replace("PROMPT", PROMPT).replace("OTHER_R", str(OTHER_R)).replace("NEW_TOKENS", str(NEW_TOKENS))


def test_exported_models_equal_cartlabs_without_cartlab(exported, tmp_path):
    folders = [str(folder) for _, folder in exported.values()]
    proc = subprocess.run([sys.executable, "-c", LOAD_AND_COMPARE, *folders], cwd=tmp_path,
                          env=no_cartlab_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report.pop("cartlab_loaded") is False
    for name, (_, folder) in exported.items():
        row = report[str(folder)]
        assert row["ids"], f"{name}: the exported tokenizer encodes the prompt differently"
        settings = ["default", "other_r"] if VARIANTS[name]["kind"] == "cart" else ["default"]
        assert sorted(k for k in row if k != "ids") == sorted(settings)
        for setting in settings:
            got = row[setting]
            assert got["config_logits"] <= 1e-5 and got["call_logits"] <= 1e-5, (name, setting, got)
            assert got["cached"] and got["uncached"], (name, setting, got)


LOAD_WITH_CARTLAB = r"""
import json, sys
import torch
import cartlab
from transformers import AutoModelForCausalLM, AutoTokenizer

report = {}
for folder in sys.argv[1:]:
    ref = torch.load(f"{folder}/reference.pt")
    tok = AutoTokenizer.from_pretrained(folder)  # no trust_remote_code: the config type is cartlab's own
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        diff = (model(torch.tensor([ref["ids"]])).logits - ref["default"]["logits"]).abs().max().item()
    report[folder] = {"ids": tok("PROMPT")["input_ids"] == ref["ids"], "logits": diff,
                      "class": type(model).__module__, "tokenizer": type(tok).__name__}
print(json.dumps(report))
""".replace("PROMPT", PROMPT)


def test_with_cartlab_imported_exports_load_without_remote_code_or_a_prompt(exported, tmp_path):
    """`import cartlab` registers the model type with transformers' auto classes: the model and
    its tokenizer load without trust_remote_code, with cartlab's installed code, and nothing asks
    "Do you wish to run the custom code?" (stdin stays open, as in a headless job: a prompt would
    wait for it and time out into an error)."""
    folders = [str(folder) for _, folder in exported.values()]
    proc = subprocess.Popen([sys.executable, "-c", LOAD_WITH_CARTLAB, *folders], cwd=tmp_path,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "custom code" not in out + err, err[-3000:]
    for folder, row in json.loads(out.strip().splitlines()[-1]).items():
        assert row["ids"] and row["logits"] <= 1e-5 and row["class"] == "cartlab.export.hf", (folder, row)


def test_every_hook_combination_that_builds_runs_the_same_through_the_exported_code(tmp_path):
    """Every combination of every registered hook (CART and Dense) that the config accepts gives,
    through the generated file's transformers wrapper, cartlab's logits and greedy tokens."""
    import itertools

    from cartlab.config import ConfigError
    from cartlab.export.write import import_modeling, modeling_source
    from cartlab.model import LMConfig, build_model
    from cartlab.model.hooks import HOOKS, hooks_for

    (tmp_path / MODELING).write_text(modeling_source())
    hf = import_modeling(tmp_path / MODELING)
    shapes = {"cart": {"prelude_layers": 1, "n_loops": 3}, "dense": {"n_layers": 3}}
    x = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(0))
    built = 0
    for kind, shape in shapes.items():
        # the solver hooks (fixed_point, exit_head) alone and with each other hook; the rest in every combination
        names = [n for n in hooks_for(kind) if HOOKS[n].group != "solver"]
        solver = [n for n in hooks_for(kind) if HOOKS[n].group == "solver"]
        combos = itertools.chain(
            itertools.chain.from_iterable(itertools.combinations(names, k) for k in range(len(names) + 1)),
            ((s,) + other for s in solver for other in [()] + [(n,) for n in names]))
        for combo in combos:
            try:
                cfg = LMConfig.from_dict({"kind": kind, "vocab_size": 64, "d_model": 16, "n_heads": 2,
                                          "ffn_multiple_of": 16, **shape, "hooks": list(combo)})
            except ConfigError:
                continue  # a refused combination (two hooks setting one field, or an invalid result)
            torch.manual_seed(built)
            model = build_model(cfg).eval()
            wrapper = hf.CartlabForCausalLM(hf.CartlabConfig(cartlab=cfg.to_dict(),
                                                             n_loops=getattr(cfg, "n_loops", None))).eval()
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * torch.randn_like(p))
                wrapper.model.load_state_dict(model.state_dict())
                assert (wrapper(x).logits - model(x)[0]).abs().max().item() <= 1e-5, combo
                assert torch.equal(wrapper.generate(x, max_new_tokens=4, do_sample=False),
                                   model.generate(x, 4, temperature=0)), combo
            built += 1
    plain = [n for n in hooks_for("cart") if HOOKS[n].group != "solver"]
    assert built > 2 ** len(plain) // 4  # most combinations train; the refusals are few rules


def test_the_generated_modeling_file_imports_no_cartlab(exported):
    _, folder = exported["cart"]
    tree = ast.parse((folder / MODELING).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not [m for m in imported if m.split(".")[0] == "cartlab"]
    assert {"torch", "transformers"} <= {m.split(".")[0] for m in imported}
    # the model's code is cartlab's, verbatim: one source of truth, nothing to drift
    from cartlab.export.hf import CartlabForCausalLM
    from cartlab.model import CART, CARTConfig, Dense
    from cartlab.model.layers import SelfAttention
    from cartlab.model.memory import LatentMemory

    text = (folder / MODELING).read_text()
    for cls in (CART, CARTConfig, Dense, LatentMemory, SelfAttention, CartlabForCausalLM):
        assert inspect.getsource(cls) in text, cls.__name__
    assert {"cartlab.model.cart", "cartlab.model.dense", "cartlab.model.memory"} <= set(module_names(ROOTS))


def test_the_bundler_merges_modules_into_one_namespace_and_refuses_shadowing(tmp_path, monkeypatch):
    import importlib
    import types

    from cartlab.export import bundle as bundler

    pkg = tmp_path / "bundletest"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from __future__ import annotations\n\nSCALE = 2\n\n\ndef double(x):\n"
                              "    return SCALE * x\n")
    (pkg / "b.py").write_text(
        '"""b: every kind of import the bundler rewrites."""\nfrom __future__ import annotations\n\n'
        "from typing import TYPE_CHECKING\n\nfrom bundletest import a as alias\n"
        "from bundletest.a import double as twice\n\nif TYPE_CHECKING:\n    from bundletest.c import SCALE\n\n\n"
        "def quadruple(x):\n    from bundletest.a import double\n    return twice(double(x)) * alias.SCALE // 2\n")
    (pkg / "c.py").write_text("SCALE = 3\n")
    (pkg / "d.py").write_text("from bundletest.a import double\nfrom bundletest.c import SCALE\n")
    importlib.invalidate_caches()
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(bundler, "PACKAGE", "bundletest")

    assert bundler.module_names(["bundletest.b"]) == ["bundletest.a", "bundletest.b"]  # c: a type only
    text = bundler.bundle(["bundletest.b"], '"""one file"""')
    tree = ast.parse(text)
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and "bundletest" in (n.module or "")]
    module = types.ModuleType("bundled_for_test")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(text, "bundled", "exec"), module.__dict__)
    assert module.__doc__ == "one file" and module.quadruple(3) == 12 and module.alias is module
    with pytest.raises(ValueError, match="bundletest.a and bundletest.c both bind the top-level name 'SCALE'"):
        bundler.bundle(["bundletest.d"])


def test_config_and_tokenizer_files(exported):
    from transformers import PreTrainedTokenizerFast

    from cartlab.checkpoint import load_tokenizer

    ckpt, folder = exported["unshare_core"]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "cartlab" and cfg["n_loops"] == 3 and cfg["max_position_embeddings"] == 32
    assert cfg["auto_map"] == {"AutoConfig": "modeling_cartlab.CartlabConfig",
                               "AutoModelForCausalLM": "modeling_cartlab.CartlabForCausalLM"}
    assert cfg["cartlab"]["hooks"] == ["unshare_core"] and cfg["cartlab"]["share_core"] is False
    assert json.loads((exported["dense"][1] / "config.json").read_text())["n_loops"] is None
    files = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json", MODELING} <= files
    # the class AutoTokenizer loads (it does so in the child process above; here it would copy the
    # modeling file into the user's transformers module cache)
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    theirs, ours = PreTrainedTokenizerFast.from_pretrained(folder), load_tokenizer(ckpt)
    text = "Twice 2 + 2 = 4, said the owl.\nThe end."
    assert theirs(text)["input_ids"] == ours.encode(text)  # no special tokens added
    assert theirs.eos_token_id == theirs.bos_token_id == theirs.pad_token_id == ours.eos_id
    assert theirs.decode(ours.encode(text)) == text


def test_plain_lm_eval_scores_an_export_as_the_cartlab_model_scores_its_checkpoint(exported, tmp_path, repo):
    lm_eval = need("lm_eval")
    need("accelerate", "lm-eval's hf model needs accelerate (pip install -e '.[eval]')")
    from cartlab.eval.lm import CartlabLM
    from cartlab.eval.run import local_tasks, task_manager
    ckpt, folder = exported["cart"]
    lm_eval_bin = Path(sys.executable).with_name("lm_eval")
    command = [str(lm_eval_bin)] if lm_eval_bin.is_file() else [sys.executable, "-m", "lm_eval"]
    proc = subprocess.run([*command, "--model", "hf", "--model_args",
                           f"pretrained={folder},trust_remote_code=True,n_loops={OTHER_R}",
                           "--tasks", "cartlab_mc", "--include_path", "data/tasks", "--limit", "4", "--device", "cpu",
                           "--batch_size", "2", "--output_path", str(tmp_path / "out"), "--log_samples"],
                          cwd=repo, env=no_cartlab_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [samples] = (tmp_path / "out").rglob("samples_cartlab_mc_*.jsonl")
    theirs = {json.loads(line)["doc_id"]: json.loads(line)["resps"] for line in samples.read_text().splitlines()}
    assert len(theirs) == 4
    tasks = [local_tasks()["cartlab_mc"]]
    ours = lm_eval.simple_evaluate(model=CartlabLM(checkpoint=str(ckpt), n_loops=OTHER_R), limit=4, log_samples=True,
                                   tasks=tasks, task_manager=task_manager(tasks),
                                   bootstrap_iters=0)["samples"]["cartlab_mc"]
    for sample in ours:
        got = [float(r[0][0]) for r in theirs[sample["doc_id"]]]
        assert got == pytest.approx([r[0][0] for r in sample["resps"]], abs=1e-4)


def test_export_refusals_are_one_line(exported, tmp_path, capsys):
    ckpt, _ = exported["cart"]
    folder = tmp_path / "again"
    assert main(["export", str(ckpt.parent.parent), "--out", str(folder)]) == 0  # a run folder: its newest checkpoint
    assert "max |logit diff| 0.0e+00" in capsys.readouterr().out
    for args, message in (
        (["export", str(tmp_path / "none"), "--out", str(tmp_path / "x")], "does not exist"),
        (["export", str(ckpt), "--out", str(folder)], f"--out: {folder} exists and is not empty; pass --force"),
    ):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("cartlab: error: ") and message in err and len(err.splitlines()) == 1
    (folder / "stale.txt").write_text("from an earlier export")
    assert main(["export", str(ckpt), "--out", str(folder), "--force"]) == 0
    assert not (folder / "stale.txt").exists() and (folder / MODELING).is_file()
    assert not list(tmp_path.glob(".again.partial-*"))


def test_the_model_card_states_architecture_training_and_each_score_with_its_protocol(tiny_run, tmp_path):
    """README.md: family, hooks, parameters, tokens seen, and the run's downstream scores in one
    column per protocol with each protocol written out; without scores it says how to get them."""
    from conftest import copy_db

    from cartlab.eval.protocol import Protocol
    from cartlab.results.db import ResultsDB

    db = tmp_path / "results.db"
    copy_db(tiny_run.db, db)
    store = ResultsDB(db)
    for limit, value in ((None, 0.5), (3.0, 0.25)):
        protocol = Protocol("0.4.13", 0, 1234, "none", "none", 8, limit, "float32", 3, "fixed", 12).row()
        store.log_downstream(tiny_run.run_id, [{**protocol, "task": "cartlab_mc", "metric": "acc", "value": value,
                                                "stderr": 0.1, "num_fewshot": 0, "n_loops": 3}])
    store.close()
    card = (export(tiny_run.run_dir, tmp_path / "hf", db=db, log=lambda s: None) / "README.md").read_text()
    cfg = tiny_run.config.model_config()
    assert card.startswith("---\nlibrary_name: transformers\n") and f"family: `{cfg.kind}`" in card
    steps = int(tiny_run.checkpoint.name[5:])
    assert f"tokens seen: {steps * tiny_run.config.tokens_per_step:,} ({steps} steps" in card
    header = next(line for line in card.splitlines() if line.startswith("| task"))
    assert "0-shot R=3 (whole tasks)" in header and "0-shot R=3 (limit 3)" in header, header
    assert "- **0-shot R=3 (limit 3)**: 0-shot, R=3, exit fixed, fewshot seed 1234" in card
    bare = (export(tiny_run.run_dir, tmp_path / "bare", log=lambda s: None) / "README.md").read_text()
    assert "No downstream scores were stored for this run" in bare
