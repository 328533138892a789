"""Checkpoints: one folder per step, written atomically, the last N kept.

    <run dir>/checkpoints/step_00000120/
        model.safetensors   weights (tied embedding stored once)
        state.pt            optimizer, data-loader position, RNG states, step
        config.json         the TrainConfig and the model config that built the weights
        tokenizer.json      the data build's tokenizer, and tokenizer_meta.json (name, eos, hash),
                            so a checkpoint is usable on its own (`load_tokenizer`)

A checkpoint is written to a hidden temporary folder and renamed into place, so a crash never
leaves a folder named `step_*` that is incomplete. `latest()` returns the newest complete one.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model

PREFIX = "step_"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(ckpt_dir: Path, step: int, model: torch.nn.Module, optimizer, loader_state: dict, config: dict,
         keep: int, tokenizer: tuple[Path, dict] | None = None) -> Path:
    """Write the checkpoint of `step` under ckpt_dir; delete all but the newest `keep`."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"{PREFIX}{step:08d}"
    tmp = ckpt_dir / f".tmp_{PREFIX}{step:08d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "loader": loader_state, "rng": rng_state()},
               tmp / "state.pt")
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer is not None:
        file, info = tokenizer
        shutil.copyfile(file, tmp / "tokenizer.json")
        (tmp / "tokenizer_meta.json").write_text(json.dumps({**info, "file": "tokenizer.json"}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in all_checkpoints(ckpt_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def all_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
                  and (p / "state.pt").is_file() and (p / "model.safetensors").is_file())


def latest(ckpt_dir: Path) -> Path | None:
    found = all_checkpoints(ckpt_dir)
    return found[-1] if found else None


def load(path: Path, model: torch.nn.Module, optimizer=None) -> dict:
    """Load weights (and optimizer state) from a checkpoint folder; returns its state dict
    (step, loader, rng) for the caller to restore."""
    load_model(model, str(path / "model.safetensors"))
    state = torch.load(path / "state.pt", weights_only=False)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    return state


def load_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def load_tokenizer(path: Path):
    """The tokenizer saved with a checkpoint (hash-checked), as a `cartlab.data` Tokenizer."""
    from cartlab.data import get_tokenizer

    meta = path / "tokenizer_meta.json"
    if not meta.is_file():
        raise ValueError(f"checkpoint {path} has no tokenizer (tokenizer_meta.json); it predates tokenizer saving")
    info = json.loads(meta.read_text())
    return get_tokenizer({"files": {}, "tokenizer": info, "dir": str(path)})
