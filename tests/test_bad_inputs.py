"""Malformed input is refused at the edge: one line on stderr naming the field or the file, a
non-zero exit code, no traceback, and nothing that existed before is changed.

Each case runs `cartlab ...` (in process, through the same `main` as the console script) against
a lab folder holding a results database with one completed run and its files; a manifest of the
folder (every path and the SHA-256 of its bytes, SQLite's -wal and -shm files included) and the
database's rows are compared before and after, and so is the folder of malformed inputs. No
staging leftover (`.tmp_*`, `*.partial*`, `*-wal`, `*-shm`) may remain anywhere the case wrote.
A few cases run in a real subprocess to check the exit code and stderr a user sees.

Some cases run with a patch in place (`P`): a disk that fills (SQLite's own SQLITE_FULL, made by
pinning `max_page_count`; torch's writer failing as it does on a full disk), a machine without
the Hugging Face hub (offline switches, or a host name that does not resolve). The two training
runs whose checkpoint hits the full disk are not refusals at the edge: they write into a scratch
folder beside the lab, where the run is recorded as failed and no partial checkpoint may remain.
Run: pytest tests/test_bad_inputs.py
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from cartlab.cli import main, run_guarded

LAB_FILES = {
    # name -> text; written into the inputs folder, which the lab snapshot does not include
    "syntax.yaml": "preset: smoke\nsteps: [1,\n",
    "list.yaml": "- steps: 3\n- seed: 2\n",
    "scalar.yaml": "just a string\n",
    "unknown.yaml": "preset: smoke\nstepz: 3\n",
    "nested_unknown.yaml": "preset: smoke\noptim: {lr: 1.0e-3, gradclip: 1}\n",
    "bad_preset.yaml": "preset: nope\n",
    "bad_model.yaml": "preset: smoke\nmodel: {kind: cart, d_model: 64, n_heads: 5}\n",
    "bad_kind.yaml": "preset: smoke\nmodel: {kind: mamba}\n",
    "model_list.yaml": "preset: smoke\nmodel: [cart]\n",
    "optim_scalar.yaml": "preset: smoke\noptim: 3\n",
    "study_syntax.yaml": "name: s\npreset: smoke\nruns: [{label: a}\n",
    "study_hooks_string.yaml": "preset: smoke\nruns: [{label: a, hooks: no_lti}]\n",
    "study_unknown.yaml": "preset: smoke\nruns: [{label: a}]\nbogus: 1\n",
    "study_run_unknown.yaml": "preset: smoke\nruns: [{label: a, hook: [no_lti]}]\n",
    "study_no_preset.yaml": "runs: [{label: a}]\n",
    "study_bad_preset.yaml": "preset: huge\nruns: [{label: a}]\n",
    "study_no_runs.yaml": "preset: smoke\nruns: []\n",
    "study_dup_labels.yaml": "preset: smoke\nruns: [{label: a}, {label: a}]\n",
    "study_no_label.yaml": "preset: smoke\nruns: [{hooks: [no_lti]}]\n",
    "study_seeds_string.yaml": "preset: smoke\nseeds: one\nruns: [{label: a}]\n",
    "study_negative_seed.yaml": "preset: smoke\nseeds: [-1]\nruns: [{label: a}]\n",
    "study_grid_scalar.yaml": "preset: smoke\ngrid: {model.d_model: 64}\nruns: [{label: a}]\n",
    "study_bad_set.yaml": "preset: smoke\nset: {optim.grad_clip: -1}\nruns: [{label: a}]\n",
    "study_bad_run_set.yaml": "preset: smoke\nruns: [{label: a, set: {optim.lr: 0}}]\n",
    "study_unknown_hook.yaml": "preset: smoke\nruns: [{label: a, hooks: [no_ltii]}]\n",
    "study_hook_conflict.yaml": "preset: smoke\nruns: [{label: a, hooks: [unfreeze_kv, self_attn_core]}]\n",
    "study_list.yaml": "- preset: smoke\n",
    "study_grid_path.yaml": "preset: smoke\ngrid: {model.d_modl: [64]}\nruns: [{label: a}]\n",
    "study_budget_negative.yaml": "preset: smoke\ngrid: {tokens: [1.0e+5, -3]}\nruns: [{label: a}]\n",
    "study_budget_and_steps.yaml": "preset: smoke\nruns: [{label: a, tokens: 1.0e+5, set: {steps: 3}}]\n",
    "study_budget_below_a_step.yaml": "preset: smoke\nruns: [{label: a, flops: 1.0e+6}]\n",
    "recipe_syntax.yaml": "name: r\ndomains: [\n",
    "recipe_ratio.yaml": ("name: r\ntrain_tokens: 100000\ndomains:\n  - {name: a, ratio: -1, train: {type: embedded, "
                          "name: prose}}\n"),
    "recipe_unknown.yaml": ("name: r\ntrain_tokens: 100000\ntokens: 3\ndomains:\n  - {name: a, ratio: 1, train: "
                            "{type: embedded, name: prose}}\n"),
    "recipe_source.yaml": ("name: r\ntrain_tokens: 100000\ndomains:\n  - {name: a, ratio: 1, train: {type: ftp}}\n"),
    "recipe_list.yaml": "- name: r\n",
    "not_a_db.db": "this is not a SQLite database\n" * 20,
    "study_name_traversal.yaml": "name: ../../../x\npreset: smoke\nruns: [{label: a}]\n",
    "study_name_absolute.yaml": "name: /tmp/x\npreset: smoke\nruns: [{label: a}]\n",
    "study_label_slash.yaml": "preset: smoke\nruns: [{label: a/b}]\n",
    "study_label_dotdot.yaml": "preset: smoke\nruns: [{label: ..}]\n",
}


def _snapshot(root: Path) -> dict[str, str]:
    """The manifest of `root`: relative path -> SHA-256 of the file's bytes ('' for a folder)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir():
            out[str(p.relative_to(root)) + "/"] = ""
    return out


LEFTOVERS = (".tmp_*", "*.partial*", "*-wal", "*-shm", "*.tmp")
"""What a write that failed half-way could leave: staging folders and files, SQLite's WAL."""


def _leftovers(*roots: Path) -> list[str]:
    return sorted(str(p) for root in roots if root.exists() for pattern in LEFTOVERS for p in root.rglob(pattern))


def _rows(db: Path) -> dict[str, list]:
    # read as immutable (no WAL to read through): a plain `mode=ro` reader leaves -wal and -shm files
    wal = db.with_name(db.name + "-wal").exists()
    conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro{'' if wal else '&immutable=1'}", uri=True)
    try:
        tables = [t for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        return {t: conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in tables}
    finally:
        conn.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory, tiny_data):
    """A lab folder with a results database holding one completed smoke run (trained here on
    the tiny corpus), its checkpoints, and a folder of malformed input files beside it."""
    from cartlab.train import TrainConfig, train

    root = tmp_path_factory.mktemp("lab")
    cfg = TrainConfig.from_preset("smoke", [
        f"data.dir={tiny_data}", "model.vocab_size=512", "steps=4", "eval_every=4", "checkpoint_every=2",
        "log_every=2", "eval_batches=1", f"results_db={root / 'runs' / 'results.db'}", f"out_dir={root / 'runs'}",
        "quiet=true"])
    run_id = train(cfg)
    inputs = tmp_path_factory.mktemp("inputs")
    for name, text in LAB_FILES.items():
        (inputs / name).write_text(text)
    (inputs / "a_dir.db").mkdir()
    shutil.copytree(tiny_data, inputs / "truncated_build")
    with open(inputs / "truncated_build" / "train.bin", "r+b") as f:
        f.truncate(1000)
    misfit = inputs / "misfit_checkpoint"
    shutil.copytree(sorted((root / "runs" / run_id / "checkpoints").iterdir())[-1], misfit)
    config = json.loads((misfit / "config.json").read_text())
    config["model"]["prelude_layers"] += 1  # config.json edited: the weights no longer fit it
    (misfit / "config.json").write_text(json.dumps(config))
    ckpt = sorted((root / "runs" / run_id / "checkpoints").iterdir())[-1]
    _damaged_inputs(inputs, ckpt, tiny_data)
    _tampered_resume(inputs, root / "runs", run_id)
    _renamed_shard(inputs, root / "runs" / "results.db", run_id)
    (inputs / "recipe_tokenizer_dir.yaml").write_text(
        f"name: r\ntrain_tokens: 100000\ntokenizer: {{name: llama2, path: {inputs / 'a_dir.db'}}}\n"
        f"domains:\n  - {{name: a, ratio: 1, train: {{type: embedded, name: prose}}}}\n")
    scratch = tmp_path_factory.mktemp("scratch")
    (scratch / "hf_cache").mkdir()
    return {"root": root, "db": root / "runs" / "results.db", "run": run_id, "ckpt": ckpt, "inputs": inputs,
            "data": tiny_data, "scratch": scratch}


class _Payload:
    """Unpickling this runs `touch <inputs>/pwned` (a tampered checkpoint's payload)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _damaged_inputs(inputs: Path, ckpt: Path, data: Path) -> None:
    """Damaged copies of the lab's checkpoint and data build, and a sharded checkpoint whose
    dcp/.metadata carries a payload."""
    import pickle

    import torch
    import torch.distributed.checkpoint as dcp

    from cartlab.checkpoint import build

    for name, damage in {"cut_weights": lambda d: os.truncate(d / "model.safetensors", 3000),
                         "garbage_weights": lambda d: (d / "model.safetensors").write_bytes(b"\xff" * 4000),
                         "cut_config": lambda d: (d / "config.json").write_text((d / "config.json").read_text()[:21]),
                         }.items():
        shutil.copytree(ckpt, inputs / name)
        damage(inputs / name)
    sharded = inputs / "tampered_dcp"
    shutil.copytree(ckpt, sharded)
    model, _ = build(ckpt)
    (sharded / "model.safetensors").unlink()
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(sharded / "dcp"))
    (sharded / "dcp" / ".metadata").write_bytes(pickle.dumps(_Payload(inputs / "pwned")))
    for name, damage in {"no_tokenizer_build": lambda d: (d / "tokenizer.json").unlink(),
                         "dir_tokenizer_build": lambda d: ((d / "tokenizer.json").unlink(),
                                                           (d / "tokenizer.json").mkdir()),
                         "bad_tokenizer_build": lambda d: (d / "tokenizer.json").write_text('{"model": '),
                         "bad_ids_build": _poke_id}.items():
        shutil.copytree(data, inputs / name)
        damage(inputs / name)
    del torch


def _tampered_resume(inputs: Path, runs: Path, run_id: str) -> None:
    """inputs/resume: a copy of the lab's run marked interrupted (its own database and run folder),
    whose newest checkpoint's state.pt carries a payload writing inputs/pwned when unpickled."""
    import torch

    out = inputs / "resume"
    shutil.copytree(runs / run_id, out / run_id)
    shutil.copyfile(runs / "results.db", out / "results.db")
    shutil.copytree(runs / "results.db.locks", out / "results.db.locks")  # the run's lock file, kept by design
    conn = sqlite3.connect(out / "results.db")
    conn.execute("UPDATE runs SET status = 'interrupted' WHERE run_id = ?", (run_id,))
    conn.commit()
    conn.close()
    state_file = sorted((out / run_id / "checkpoints").iterdir())[-1] / "state.pt"
    state = torch.load(state_file, weights_only=True)
    torch.save({**state, "note": _Payload(inputs / "pwned")}, state_file)


def _renamed_shard(inputs: Path, db: Path, run_id: str) -> None:
    """inputs/other_shard.db: the lab's database with its run renamed (a run the lab lacks), its
    message long enough that merging it needs new pages."""
    shard = inputs / "other_shard.db"
    shutil.copyfile(db, shard)
    conn = sqlite3.connect(shard)
    tables = [t for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
              if "run_id" in [c[1] for c in conn.execute(f"PRAGMA table_info({t})")]]
    for table in tables:
        conn.execute(f"UPDATE {table} SET run_id = ? WHERE run_id = ?", ("other-run", run_id))
    conn.execute("UPDATE runs SET message = ? WHERE run_id = 'other-run'", ("x" * 20000,))
    conn.commit()
    conn.execute("PRAGMA journal_mode = DELETE")
    conn.close()


def _poke_id(build_dir: Path) -> None:
    """Write token id 600 (the vocabulary is 512) into train.bin, its header left as it was."""
    import numpy as np

    from cartlab.data.binfile import read_header

    path = build_dir / "train.bin"
    n = read_header(path).n_tokens
    tokens = np.memmap(path, dtype=np.uint16, mode="r+", offset=path.stat().st_size - 2 * n)
    tokens[100] = 600
    tokens.flush()


def _execute(lab, notebook: str, parameters: dict):
    from cartlab.notebooks import execute

    return execute(notebook, lab["root"] / "executed.ipynb", parameters)


def T(*args):
    """A `cartlab train --preset smoke ...` case writing (if it ever got that far) into the lab."""
    return lambda lab: ["train", "--preset", "smoke", f"--db={lab['db']}", f"out_dir={lab['root'] / 'runs'}",
                        f"data.dir={lab['data']}", "model.vocab_size=512", *args]


def E(*args):
    """A `cartlab eval` case on the lab run's checkpoint."""
    return lambda lab: ["eval", str(lab["ckpt"]), "--tasks", "cartlab_mc", *args]


def F(command, name, *rest):
    """A command given one of the malformed input files."""
    return lambda lab: [*command, str(lab["inputs"] / name), *rest]


def P(setup, argv):
    """A case run with `setup(monkeypatch, lab)` in place (a full disk, an offline machine),
    undone when the command returns."""
    def case(lab):
        def run():
            from cartlab.cli import _dispatch

            with pytest.MonkeyPatch.context() as mp:
                setup(mp, lab)
                return _dispatch(argv(lab))
        return run
    return case


def _sqlite_full_in_merge(mp, lab):
    """SQLite's own SQLITE_FULL ("database or disk is full") at the first page the merge needs:
    the target's max_page_count pinned to its size once the merge's transaction has begun."""
    from cartlab.results import merge

    real = merge._merge_one

    def full(source, target, c):
        c.execute(f"PRAGMA max_page_count = {c.execute('PRAGMA page_count').fetchone()[0]}")
        return real(source, target, c)

    mp.setattr(merge, "_merge_one", full)


def _torch_save_full(mp, lab):
    """torch.save failing as it does on a full disk: part of the file written, then torch's
    zip writer's `unexpected pos`."""
    import torch

    def full(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04" + b"\0" * 4092)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 3910")

    mp.setattr(torch, "save", full)


def _safetensors_enospc(mp, lab):
    """The weights' write failing with ENOSPC (what Python and safetensors see on a full disk)."""
    import errno

    from cartlab.train import checkpoint

    def full(model, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    mp.setattr(checkpoint, "save_model", full)


def _hub_cache_empty(mp, lab):
    import datasets.config
    import huggingface_hub.constants

    mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(lab["scratch"] / "hf_cache"))
    mp.setattr(datasets.config, "HF_DATASETS_CACHE", lab["scratch"] / "hf_cache")


def _offline(mp, lab):
    """HF_HUB_OFFLINE and HF_DATASETS_OFFLINE set (the conftest `hf_offline` fixture's switches)."""
    _hub_cache_empty(mp, lab)
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    mp.setenv("HF_HUB_OFFLINE", "1")


def _no_network(mp, lab):
    """No offline switch, no proxy, and no name resolves (what a machine without a network sees)."""
    import socket

    _hub_cache_empty(mp, lab)
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy",
                "ALL_PROXY", "all_proxy"):
        mp.delenv(var, raising=False)

    def unresolvable(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    mp.setattr(socket, "getaddrinfo", unresolvable)


def S(name, *args):
    """A smoke run into the scratch folder `name` beside the lab (db and out_dir), checkpointing
    every step."""
    return lambda lab: ["train", "--preset", "smoke", f"--db={lab['scratch'] / name / 'results.db'}",
                        f"out_dir={lab['scratch'] / name}", f"data.dir={lab['data']}", "model.vocab_size=512",
                        "steps=2", "eval_every=2", "checkpoint_every=1", "eval_batches=1", "quiet=true", *args]


def H(lab):
    """`cartlab eval` of the lab's checkpoint on hellaswag, a task whose data is on the hub only."""
    return ["eval", str(lab["ckpt"]), "--tasks", "hellaswag", "--db", str(lab["db"])]


CASES = [
    # -- the five silent acceptances of the issue, and their neighbours ------------------------------
    ("grad_clip_negative", T("optim.grad_clip=-1"), "optim.grad_clip=-1 is not allowed: must be > 0, or null"),
    ("grad_clip_zero", T("optim.grad_clip=0"), "optim.grad_clip=0 is not allowed"),
    ("weight_decay_negative", T("optim.weight_decay=-1"), "optim.weight_decay=-1 is not allowed: must be >= 0"),
    ("lr_inf", T("optim.lr=.inf"), "optim.lr=.inf is not allowed: must be a finite number"),
    ("lr_nan", T("optim.lr=.nan"), "optim.lr=.nan is not allowed"),
    ("lr_zero", T("optim.lr=0"), "optim.lr=0 is not allowed: must be > 0"),
    ("lr_negative", T("optim.lr=-3e-4"), "optim.lr=-0.0003 is not allowed"),
    ("lr_string", T("optim.lr=fast"), "optim.lr='fast' is not allowed: must be a number"),
    ("min_lr_ratio", T("optim.min_lr_ratio=1.5"), "optim.min_lr_ratio=1.5 is not allowed: must be >= 0 and <= 1"),
    ("beta1_high", T("optim.beta1=1.5"), "optim.beta1=1.5 is not allowed: must be >= 0 and < 1"),
    ("beta1_one", T("optim.beta1=1"), "optim.beta1=1 is not allowed"),
    ("beta2_negative", T("optim.beta2=-0.1"), "optim.beta2=-0.1 is not allowed"),
    ("eps_negative", T("optim.eps=-1"), "optim.eps=-1 is not allowed: must be > 0"),
    ("eps_zero", T("optim.eps=0"), "optim.eps=0 is not allowed"),
    ("warmup_string", T("optim.warmup_steps=abc"), "optim.warmup_steps='abc' is not allowed: must be an integer"),
    ("warmup_negative", T("optim.warmup_steps=-5"), "optim.warmup_steps=-5 is not allowed: must be >= 0"),
    ("warmup_fraction", T("optim.warmup_steps=2.5"), "optim.warmup_steps=2.5 is not allowed: must be an integer"),
    ("optimizer_name", T("optim.name=sgd"), "optim.name='sgd' is not allowed: choose one of"),
    ("optim_unknown", T("optim.gradclip=1"), "optim.gradclip is not a field: did you mean 'grad_clip'?"),
    ("optim_scalar", T("optim=3"), "optim=3 is not allowed: must be a mapping"),
    # -- top-level training fields ---------------------------------------------------------------------
    ("seed_string", T("seed=abc"), "seed='abc' is not allowed: must be an integer"),
    ("seed_negative", T("seed=-1"), "seed=-1 is not allowed: must be >= 0"),
    ("seed_list", T("seed=[1,2]"), "seed=[1, 2] is not allowed: must be an integer"),
    ("stage_list", T("stage=[1,2]"), "stage=[1, 2] is not allowed: must be a string"),
    ("stage_mapping", T("stage={a: 1}"), "stage={'a': 1} is not allowed: must be a string"),
    ("steps_zero", T("steps=0"), "steps=0 is not allowed: must be >= 1"),
    ("steps_string", T("steps=many"), "steps='many' is not allowed: must be an integer"),
    ("steps_bool", T("steps=true"), "steps=true is not allowed: must be an integer"),
    ("batch_size_zero", T("batch_size=0"), "batch_size=0 is not allowed: must be >= 1"),
    ("batch_size_negative", T("batch_size=-8"), "batch_size=-8 is not allowed"),
    ("grad_accum_zero", T("grad_accum=0"), "grad_accum=0 is not allowed"),
    ("seq_len_zero", T("seq_len=0"), "seq_len=0 is not allowed: must be >= 1"),
    ("seq_len_float", T("seq_len=64.5"), "seq_len=64.5 is not allowed: must be an integer"),
    ("eval_every_zero", T("eval_every=0"), "eval_every=0 is not allowed"),
    ("eval_batches_negative", T("eval_batches=-1"), "eval_batches=-1 is not allowed"),
    ("log_every_zero", T("log_every=0"), "log_every=0 is not allowed"),
    ("checkpoint_every_zero", T("checkpoint_every=0"), "checkpoint_every=0 is not allowed"),
    ("keep_checkpoints_zero", T("keep_checkpoints=0"), "keep_checkpoints=0 is not allowed"),
    ("device", T("device=tpu"), "device='tpu' is not allowed: choose one of"),
    ("precision", T("precision=fp8"), "precision='fp8' is not allowed: choose one of"),
    ("compile_string", T("compile=maybe"), "compile='maybe' is not allowed: must be true or false"),
    ("quiet_number", T("quiet=2"), "quiet=2 is not allowed: must be true or false"),
    ("dense_match", T("dense_match=params"), "dense_match='params' is not allowed: choose one of"),
    ("dense_match_dense", T("model.kind=dense", "model.prelude_layers=null", "model.n_loops=null",
                            "dense_match=stored"), "model.prelude_layers is not a field"),
    ("data_mode", T("data.mode=shuffled"), "data.mode='shuffled' is not allowed: choose one of"),
    ("data_unknown", T("data.recipes=embedded"), "data.recipes is not a field: did you mean 'recipe'?"),
    ("unknown_top", T("stepz=3"), "stepz is not a field: did you mean 'steps'?"),
    ("unknown_deep", T("optim.lr.peak=3"), "optim.lr is a float, not a section"),
    ("override_form", T("steps"), "override 'steps' is not of the form field=value"),
    ("override_empty_key", T("=3"), "override '=3' is not of the form field=value"),
    ("name_slash", T("name=a/b"), "name='a/b' is not allowed"),
    ("preset_field", T("preset=huge"), "preset='huge' is not allowed: choose one of"),
    # -- the model section -------------------------------------------------------------------------------
    ("model_hooks_unknown", T("model.hooks=no_lti,no_loop"), "model.hooks=['no_lti', 'no_loop'] is not allowed: unknown"),
    ("model_hooks_twice", T("model.hooks=no_lti,no_lti"), "names a hook twice"),
    ("model_hooks_conflict", T("model.hooks=unfreeze_kv,self_attn_core"), "cannot be combined"),
    ("model_noncausal_self", T("model.hooks=self_attn_core,noncausal_cross_attn"),
     "model.hooks=['self_attn_core', 'noncausal_cross_attn'] is not allowed: 'self_attn_core' and "
     "'noncausal_cross_attn' cannot be combined: self_attn_core sets core_attention='self' and noncausal_cross_attn "
     "sets causal_cross_attn=false"),
    ("model_heads", T("model.n_heads=5"), "model.n_heads=5 is not allowed: it does not divide d_model=64"),
    ("model_heads_odd", T("model.n_heads=64"), "model.n_heads=64 is not allowed: it gives heads of odd width 1"),
    ("model_d_model", T("model.d_model=0"), "model.d_model=0 is not allowed: must be >= 1"),
    ("model_loops", T("model.n_loops=0"), "model.n_loops=0 is not allowed: must be >= 1"),
    ("model_loops_string", T("model.n_loops=six"), "model.n_loops='six' is not allowed: must be an integer"),
    ("model_gate", T("model.state_gate=zoh"), "model.state_gate='zoh' is not allowed: choose one of"),
    ("model_gate_init", T("model.gate_init=1.0"), "model.gate_init=1.0 is not allowed: must be > 0 and < 1"),
    ("model_init_std", T("model.init_std=-0.02"), "model.init_std=-0.02 is not allowed: must be > 0"),
    ("model_kind", T("model.kind=mamba"), "model.kind='mamba' is not allowed: choose one of cart, dense"),
    ("model_unknown", T("model.n_loop=3"), "model.n_loop is not a field: did you mean 'n_loops'?"),
    ("model_vocab", T("model.vocab_size=1"), "model.vocab_size=1 is not allowed: must be >= 2"),
    ("model_vocab_small", T("model.vocab_size=100"), "model.vocab_size=100 is smaller than the data's tokenizer"),
    ("model_share_core", T("model.share_core=nope"), "model.share_core='nope' is not allowed: must be true or false"),
    ("model_info_override", lambda lab: ["model", "info", "cart", "init_std=-1"], "init_std=-1 is not allowed"),
    ("model_info_unknown", lambda lab: ["model", "info", "cart", "d_modle=3"], "d_modle is not a field"),
    ("model_info_hooks", lambda lab: ["model", "info", "dense", "--hooks", "no_lti"], "'no_lti' is a hook of the cart family, not of dense"),
    ("model_info_seq_len", lambda lab: ["model", "info", "cart", "--seq-len", "0"], "seq_len=0 is not allowed"),
    # -- YAML config files ---------------------------------------------------------------------------------
    ("yaml_syntax", F(["train", "--config"], "syntax.yaml"), "syntax.yaml:3:1: YAML syntax error"),
    ("yaml_list", F(["train", "--config"], "list.yaml"), "list.yaml: a training config must be a mapping"),
    ("yaml_scalar", F(["train", "--config"], "scalar.yaml"), "scalar.yaml: a training config must be a mapping"),
    ("yaml_unknown", F(["train", "--config"], "unknown.yaml"), "unknown.yaml: stepz is not a field"),
    ("yaml_nested_unknown", F(["train", "--config"], "nested_unknown.yaml"), "optim.gradclip is not a field"),
    ("yaml_bad_preset", F(["train", "--config"], "bad_preset.yaml"), "bad_preset.yaml: preset='nope' is not allowed"),
    ("yaml_bad_model", F(["train", "--config"], "bad_model.yaml"), "bad_model.yaml: model.n_heads=5 is not allowed"),
    ("yaml_bad_kind", F(["train", "--config"], "bad_kind.yaml"), "model.kind='mamba' is not allowed"),
    ("yaml_model_list", F(["train", "--config"], "model_list.yaml"), "model=['cart'] is not allowed: must be a mapping"),
    ("yaml_optim_scalar", F(["train", "--config"], "optim_scalar.yaml"), "optim=3 is not allowed: must be a mapping"),
    ("yaml_missing", lambda lab: ["train", "--config", str(lab["inputs"] / "nope.yaml")], "nope.yaml: no such training config file"),
    ("yaml_directory", lambda lab: ["train", "--config", str(lab["inputs"])], "is a directory, not a training config"),
    # -- studies -------------------------------------------------------------------------------------------
    ("study_syntax", F(["ablate"], "study_syntax.yaml", "--list"), "study_syntax.yaml:4:1: YAML syntax error"),
    ("study_hooks_string", F(["ablate"], "study_hooks_string.yaml", "--list"),
     "runs[0].hooks='no_lti' is not allowed: must be a list (e.g. [no_lti])"),
    ("study_unknown", F(["ablate"], "study_unknown.yaml", "--list"), "study_unknown.yaml: bogus is not a field"),
    ("study_run_unknown", F(["ablate"], "study_run_unknown.yaml", "--list"), "runs[0].hook is not a field: did you mean 'hooks'?"),
    ("study_no_preset", F(["ablate"], "study_no_preset.yaml", "--list"), "preset is missing"),
    ("study_bad_preset", F(["ablate"], "study_bad_preset.yaml", "--list"), "preset='huge' is not allowed"),
    ("study_no_runs", F(["ablate"], "study_no_runs.yaml", "--list"), "runs=[] is not allowed: a study needs at least one"),
    ("study_dup_labels", F(["ablate"], "study_dup_labels.yaml", "--list"), "run labels must be unique"),
    ("study_no_label", F(["ablate"], "study_no_label.yaml", "--list"), "runs[0].label is missing"),
    ("study_seeds_string", F(["ablate"], "study_seeds_string.yaml", "--list"), "seeds='one' is not allowed: must be a list"),
    ("study_negative_seed", F(["ablate"], "study_negative_seed.yaml", "--list"), "seeds=-1 is not allowed: every seed must be >= 0"),
    ("study_grid_scalar", F(["ablate"], "study_grid_scalar.yaml", "--list"), "grid.model.d_model=64 is not allowed"),
    ("study_bad_set", F(["ablate"], "study_bad_set.yaml", "--list"), "optim.grad_clip=-1 is not allowed"),
    ("study_bad_run_set", F(["ablate"], "study_bad_run_set.yaml", "--list"), "runs[0] (a): optim.lr=0 is not allowed"),
    ("study_unknown_hook", F(["ablate"], "study_unknown_hook.yaml", "--list"), "unknown hook(s) ['no_ltii']"),
    ("study_hook_conflict", F(["ablate"], "study_hook_conflict.yaml", "--list"), "cannot be combined"),
    ("study_list", F(["ablate"], "study_list.yaml", "--list"), "study_list.yaml: a study must be a mapping"),
    ("study_grid_path", F(["ablate"], "study_grid_path.yaml", "--list"), "grid.model.d_modl is not a field"),
    ("study_budget_negative", F(["ablate"], "study_budget_negative.yaml", "--list"),
     "grid.tokens=-3 is not allowed: every budget must be a number > 0"),
    ("study_budget_and_steps", F(["ablate"], "study_budget_and_steps.yaml", "--list"),
     "runs[0] (a): steps=3 is not allowed: this run's length is its budget tokens=100000"),
    ("study_budget_below_a_step", F(["ablate"], "study_budget_below_a_step.yaml", "--list"),
     "runs[0] (a): flops=1000000.0 is not allowed: less than one step of this run"),
    ("study_missing", lambda lab: ["ablate", "no-such-study", "--list"], "study 'no-such-study' not found"),
    ("study_override", lambda lab: ["ablate", "cpu-demo", "--list", "optim.grad_clip=-1"], "optim.grad_clip=-1 is not allowed"),
    ("report_missing", lambda lab: ["report", "no-such-study", "--db", str(lab["db"])], "study 'no-such-study' not found"),
    # -- recipes ------------------------------------------------------------------------------------------
    ("recipe_syntax", F(["data", "build"], "recipe_syntax.yaml"), "recipe_syntax.yaml:3:1: YAML syntax error"),
    ("recipe_ratio", F(["data", "build"], "recipe_ratio.yaml"), "recipe.domains[0].ratio=-1 is not allowed: must be > 0"),
    ("recipe_unknown", F(["data", "build"], "recipe_unknown.yaml"), "recipe.tokens is not a field: did you mean 'train_tokens'?"),
    ("recipe_source", F(["data", "build"], "recipe_source.yaml"), "recipe.domains[0].train.type='ftp' is not allowed: choose one of"),
    ("recipe_list", F(["data", "build"], "recipe_list.yaml"), "recipe_list.yaml: a recipe must be a YAML mapping"),
    ("recipe_missing", lambda lab: ["data", "build", "no-such-recipe"], "unknown recipe 'no-such-recipe'"),
    ("data_info_not_a_build", lambda lab: ["data", "info", str(lab["inputs"])], "not a completed build"),
    ("data_dir_not_a_build", T(f"data.dir=/nonexistent/build"), "data.dir='/nonexistent/build' holds no data build"),
    # -- token bins, results databases, checkpoints ------------------------------------------------
    ("bin_truncated", lambda lab: T(f"data.dir={lab['inputs'] / 'truncated_build'}")(lab), "train.bin is truncated"),
    ("bin_info_truncated", lambda lab: ["data", "info", str(lab["inputs"] / "truncated_build"), "--verify"],
     "train.bin is truncated"),
    ("db_not_sqlite_train", lambda lab: ["train", "--preset", "smoke", f"--db={lab['inputs'] / 'not_a_db.db'}",
                                         f"data.dir={lab['data']}", "model.vocab_size=512", f"out_dir={lab['root'] / 'runs'}"],
     "not_a_db.db: not a results database"),
    ("db_not_sqlite_resume", lambda lab: ["train", "--resume", lab["run"], f"--db={lab['inputs'] / 'not_a_db.db'}"],
     "not_a_db.db: not a results database"),
    ("db_not_sqlite_report", lambda lab: ["report", "cpu-demo", "--db", str(lab["inputs"] / "not_a_db.db")],
     "not_a_db.db: not a results database"),
    ("db_not_sqlite_list", lambda lab: ["ablate", "cpu-demo", "--list", "--db", str(lab["inputs"] / "not_a_db.db")],
     "not_a_db.db: not a results database"),
    ("db_directory_train", lambda lab: ["train", "--preset", "smoke", f"--db={lab['inputs'] / 'a_dir.db'}",
                                        f"data.dir={lab['data']}", "model.vocab_size=512", f"out_dir={lab['root'] / 'runs'}"],
     "a_dir.db: is a directory, not a results database file"),
    ("db_directory_report", lambda lab: ["report", "cpu-demo", "--db", str(lab["inputs"] / "a_dir.db")],
     "a_dir.db: is a directory, not a results database file"),
    ("db_missing_report", lambda lab: ["report", "cpu-demo", "--db", str(lab["inputs"] / "none.db")],
     "none.db does not exist"),
    ("checkpoint_misfit", lambda lab: ["eval", str(lab["inputs"] / "misfit_checkpoint"), "--tasks", "cartlab_mc",
                                       "--db", str(lab["db"])],
     "misfit_checkpoint does not fit the model"),
    # -- notebook parameters (papermill itself only warns) ------------------------------------------
    ("notebook_misspelt", lambda lab: lambda: _execute(lab, "train_variant", {"overides": "seed=2"}),
     "notebook parameter 'overides' is not one notebooks/train_variant.ipynb takes (did you mean 'overrides'?)"),
    ("notebook_unknown", lambda lab: lambda: _execute(lab, "spectral_radius", {"studdy": "cpu-demo"}),
     "notebook parameter 'studdy'"),
    ("notebook_report_unknown", lambda lab: lambda: _execute(lab, "report", {"dbb": "x.db"}), "notebook parameter 'dbb'"),
    # -- command-line arguments -------------------------------------------------------------------------
    ("cli_unknown_flag", lambda lab: ["train", "--bogus"], "unrecognized arguments: --bogus"),
    ("cli_unknown_command", lambda lab: ["trian"], "invalid choice: 'trian'"),
    ("cli_workers", lambda lab: ["ablate", "cpu-demo", "--workers", "x"], "argument --workers: invalid int value"),
    ("cli_preset_and_config", lambda lab: ["train", "--preset", "smoke", "--config", "x.yaml"], "not allowed with argument"),
    ("cli_resume_unknown", lambda lab: ["train", "--resume", "no-such-run", f"--db={lab['db']}"], "no such run"),
    ("eval_fewshot", E("--num-fewshot", "0,-1"),
     "num_fewshot[1]=-1 is not allowed: must be >= 0"),
    ("eval_loops", E("--n-loops", "2,x"),
     "n_loops[1]='x' is not allowed: must be an integer"),
    ("eval_loops_zero", E("--n-loops", "0"),
     "n_loops[0]=0 is not allowed: must be >= 1"),
    ("eval_batch", E("--batch-size", "0"),
     "batch_size=0 is not allowed"),
    ("eval_limit", E("--limit", "-2"),
     "limit=-2 is not allowed: must be >= 1"),
    ("eval_device", E("--device", "tpu"),
     "device='tpu' is not allowed"),
    ("eval_checkpoint_missing", lambda lab: ["eval", "/nonexistent/run", "--tasks", "cartlab_mc"],
     "checkpoint='/nonexistent/run' is not allowed: no such checkpoint"),
    # -- variable-depth training (hooks random_loops, truncated_bptt) ---------------------------------------
    ("model_train_loops_no_hook", T("model.train_loops=uniform"),
     "model.train_loops='uniform' is not allowed: a random loop count is the hook random_loops"),
    ("model_train_loops_choice", T("model.hooks=random_loops", "model.train_loops=gamma"),
     "model.train_loops='gamma' is not allowed: choose one of"),
    ("model_bptt_no_hook", T("model.bptt_loops=2"),
     "model.bptt_loops=2 is not allowed: truncated backpropagation is the hook truncated_bptt"),
    ("model_bptt_zero", T("model.hooks=truncated_bptt", "model.bptt_loops=0"),
     "model.bptt_loops=0 is not allowed: must be >= 1, or null to backpropagate through every loop"),
    ("model_loops_max_below_mean", T("model.hooks=random_loops", "model.loops_max=2"),
     "model.loops_max=2 is not allowed: it must be >= n_loops=3"),
    ("model_single_loop_random", T("model.hooks=single_loop,random_loops"),
     "model.hooks=['single_loop', 'random_loops'] is not allowed: random_loops would draw R from 1..1"),
    # -- issue 28: names are names -------------------------------------------------------------------
    ("study_name_traversal", F(["ablate"], "study_name_traversal.yaml", "--list"), "name='../../../x' is not allowed"),
    ("study_name_absolute", F(["ablate"], "study_name_absolute.yaml", "--list"), "name='/tmp/x' is not allowed"),
    ("study_label_slash", F(["ablate"], "study_label_slash.yaml", "--list"), "runs[0].label='a/b' is not allowed"),
    ("study_label_dotdot", F(["ablate"], "study_label_dotdot.yaml", "--list"), "runs[0].label='..' is not allowed"),
    ("study_arg_traversal", lambda lab: ["ablate", "../../x", "--list"], "study '../../x' is not allowed"),
    ("study_arg_absolute", lambda lab: ["ablate", "/etc/passwd", "--list"], "study '/etc/passwd' is not allowed"),
    ("study_arg_missing_yaml", lambda lab: ["ablate", str(lab["inputs"] / "nope.yaml"), "--list"], "nope.yaml' not found"),
    ("study_did_you_mean", lambda lab: ["ablate", "cpu-dem", "--list"], "study 'cpu-dem' not found (did you mean 'cpu-demo'?)"),
    ("report_traversal", lambda lab: ["report", "../x", "--db", str(lab["db"])], "study '../x' is not allowed"),
    ("run_name_dotdot", T("name=.."), "name='..' is not allowed"),
    ("run_name_absolute", T("name=/tmp/x"), "name='/tmp/x' is not allowed"),
    # -- issue 28: the data is checked before any database, lock, row or folder is made ------------
    ("seq_len_beyond_chunks", T("seq_len=100000"), "seq_len=100000 needs windows of 100001 tokens"),
    ("data_no_tokenizer", lambda lab: T(f"data.dir={lab['inputs'] / 'no_tokenizer_build'}")(lab),
     "no_tokenizer_build/tokenizer.json is missing"),
    ("data_bad_tokenizer", lambda lab: T(f"data.dir={lab['inputs'] / 'bad_tokenizer_build'}")(lab),
     "bad_tokenizer_build/tokenizer.json' is not a readable tokenizer JSON"),
    ("data_bad_ids", lambda lab: T(f"data.dir={lab['inputs'] / 'bad_ids_build'}")(lab),
     "token id 600 at position 100 is beyond the vocabulary"),
    ("data_build_out_foreign", lambda lab: ["data", "build", str(Path(__file__).parent / "fixtures" / "data" / "tiny_embedded.yaml"),
                                            "--out", str(lab["inputs"])], "holds files that are not a data build"),
    # -- issue 28: merges are checked whole before the target is made -----------------------------------
    ("merge_missing_shard", lambda lab: ["results", "merge", str(lab["db"]), str(lab["inputs"] / "missing.db"),
                                         "--db", str(lab["root"] / "merged.db")], "missing.db: no such results database"),
    ("merge_not_a_db", lambda lab: ["results", "merge", str(lab["inputs"] / "not_a_db.db"),
                                    "--db", str(lab["root"] / "merged.db")], "not_a_db.db: not a results database"),
    ("merge_into_a_dir", lambda lab: ["results", "merge", str(lab["db"]), "--db", str(lab["inputs"] / "a_dir.db")],
     "a_dir.db: is a directory"),
    ("merge_into_not_a_db", lambda lab: ["results", "merge", str(lab["db"]), "--db", str(lab["inputs"] / "not_a_db.db")],
     "not_a_db.db: not a results database"),
    # -- issue 28: damaged and tampered checkpoints ----------------------------------------------------------
    ("export_cut_weights", lambda lab: ["export", str(lab["inputs"] / "cut_weights"), "--out", str(lab["root"] / "x")],
     "cut_weights/model.safetensors: not a readable safetensors file"),
    ("export_garbage_weights", lambda lab: ["export", str(lab["inputs"] / "garbage_weights"), "--out",
                                            str(lab["root"] / "x")], "garbage_weights/model.safetensors: not a readable"),
    ("export_cut_config", lambda lab: ["export", str(lab["inputs"] / "cut_config"), "--out", str(lab["root"] / "x")],
     "cut_config/config.json: not valid JSON"),
    ("eval_cut_weights", lambda lab: ["eval", str(lab["inputs"] / "cut_weights"), "--tasks", "cartlab_mc", "--db",
                                      str(lab["db"])], "cut_weights/model.safetensors: not a readable safetensors file"),
    ("eval_cut_config", lambda lab: ["eval", str(lab["inputs"] / "cut_config"), "--tasks", "cartlab_mc", "--db",
                                     str(lab["db"])], "cut_config/config.json: not valid JSON"),
    ("export_tampered_dcp", lambda lab: ["export", str(lab["inputs"] / "tampered_dcp"), "--out", str(lab["root"] / "x")],
     "tampered_dcp/dcp/.metadata: refused to unpickle"),
    ("resume_tampered_state", lambda lab: ["train", "--resume", lab["run"], f"--db={lab['inputs'] / 'resume' / 'results.db'}",
                                           f"out_dir={lab['inputs'] / 'resume'}"],
     "state.pt: refused to unpickle"),
    # -- issue 28: tokenizer paths that are folders ----------------------------------------------------------
    ("data_tokenizer_is_a_dir", lambda lab: T(f"data.dir={lab['inputs'] / 'dir_tokenizer_build'}")(lab),
     "dir_tokenizer_build/tokenizer.json is a directory, not a tokenizer file"),
    ("recipe_tokenizer_is_a_dir", F(["data", "build"], "recipe_tokenizer_dir.yaml"),
     "a_dir.db' is a directory, not a file"),
    # -- issue 28: a full disk ---------------------------------------------------------------------------------
    ("merge_disk_full_new_target", P(_sqlite_full_in_merge, lambda lab: ["results", "merge", str(lab["db"]), "--db",
                                                                         str(lab["root"] / "merged.db")]),
     "merged.db: no space left on the disk to merge 1 shard(s)"),
    ("merge_disk_full_existing_target", P(_sqlite_full_in_merge, lambda lab: [
        "results", "merge", str(lab["inputs"] / "other_shard.db"), "--db", str(lab["db"])]),
     "results.db: no space left on the disk to merge 1 shard(s) of about 1 MB into this results database (SQLite "
     "says: database or disk is full); nothing merged, the database is as it was"),
    ("train_checkpoint_disk_full", P(_torch_save_full, S("torch_full")),
     "/checkpoints (checkpoint of about 3 MB)"),
    ("train_checkpoint_enospc", P(_safetensors_enospc, S("enospc")),
     "/checkpoints (checkpoint of about 3 MB)"),
    # -- issue 28: messages that name what the user typed ------------------------------------------------------
    ("model_noncausal_self_typed_order", T("model.hooks=noncausal_cross_attn,self_attn_core"),
     "model.hooks=['noncausal_cross_attn', 'self_attn_core'] is not allowed: 'self_attn_core' and "
     "'noncausal_cross_attn' cannot be combined"),
    ("notebook_config_yaml_syntax", lambda lab: lambda: _execute(lab, "train_variant", {
        "config_yaml": "preset: smoke\nsteps: [1,\n"}),
     "notebook parameter config_yaml:3:1: YAML syntax error"),
    ("notebook_config_yaml_list", lambda lab: lambda: _execute(lab, "train_variant", {"config_yaml": "- steps: 3\n"}),
     "notebook parameter config_yaml: must be a YAML mapping of field: value, got a list"),
    ("eval_hub_task_offline", P(_offline, H), "--tasks: task 'hellaswag' reads the Hugging Face hub dataset "
                                                "'Rowan/hellaswag', which is not cached, and HF_HUB_OFFLINE is set"),
    ("eval_hub_task_no_network", P(_no_network, H), "the hub's host huggingface.co cannot be resolved"),
]


@pytest.mark.parametrize("argv, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_input_is_refused_in_one_line_and_changes_nothing(argv, message, lab, capsys):
    before, rows = _snapshot(lab["root"]), _rows(lab["db"])
    inputs_before = _snapshot(lab["inputs"])
    command = argv(lab)
    code = main(command) if isinstance(command, list) else run_guarded(command)
    err = capsys.readouterr().err.strip()
    after = _snapshot(lab["root"])
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert code not in (0, None), f"accepted: {err!r}"
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err and "internal error" not in err, err
    assert message in err, err
    assert not changed, f"the lab folder changed: {changed}"
    assert _rows(lab["db"]) == rows, "the results database changed"
    assert _snapshot(lab["inputs"]) == inputs_before, "an input file changed"
    assert not (lab["inputs"] / "pwned").exists(), "a tampered checkpoint ran its payload"
    assert not _leftovers(lab["root"], lab["inputs"], lab["scratch"]), "a failed write left files behind"


def test_the_corpus_is_large_and_names_no_case_twice():
    assert len(CASES) >= 120
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("args, message", [
    (["train", "--preset", "smoke", "optim.grad_clip=-1"], "optim.grad_clip=-1 is not allowed"),
    (["train", "--preset", "smoke", "stage=[1,2]"], "stage=[1, 2] is not allowed"),
])
def test_a_user_sees_one_line_and_a_nonzero_exit(args, message, tmp_path):
    env = {**os.environ, "CARTLAB_DEBUG": ""}
    proc = subprocess.run([sys.executable, "-m", "cartlab.cli", *args, f"--db={tmp_path / 'r.db'}"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"cartlab: error: {proc.stderr.strip().removeprefix('cartlab: error: ')}"]
    assert message in proc.stderr
    assert not (tmp_path / "r.db").exists() and not (tmp_path / "runs").exists()


def test_debug_shows_the_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cartlab.cli", "train", "--preset", "smoke", "seed=abc", "--debug"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "seed='abc' is not allowed" in proc.stderr


def test_config_errors_carry_the_dotted_path():
    from cartlab.config import ConfigError
    from cartlab.train import TrainConfig

    with pytest.raises(ConfigError) as err:
        TrainConfig.from_preset("smoke", ["optim.beta2=1"])
    assert err.value.path == "optim.beta2"
    assert json.dumps(str(err.value)).count("\\n") == 0
