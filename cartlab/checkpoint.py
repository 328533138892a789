"""Reading checkpoints: what `cartlab.train` writes and `cartlab.eval` (and a resume) reads.

    <run dir>/checkpoints/step_00000120/
        model.safetensors   weights (tied embedding stored once)
        state.pt            optimizer, data-loader position, RNG states, step
        config.json         the TrainConfig and the model config that built the weights
        tokenizer.json      the data build's tokenizer, and tokenizer_meta.json (name, eos, hash)

    model, config = build(latest(run_dir / "checkpoints"))   # the model its config.json describes

Writing (atomic save, pruning) lives in `cartlab.train.checkpoint`; this module sits below both
train and eval and imports neither. Weights that do not fit the model they are loaded into
raise one ValueError naming the checkpoint, the config fields that differ and the tensors that
do not fit, instead of torch's page-long size-mismatch list.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

PREFIX = "step_"


def all_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a `.tmp_step_*` folder being written is not one)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
                  and (p / "state.pt").is_file() and (p / "model.safetensors").is_file())


def latest(ckpt_dir: Path) -> Path | None:
    found = all_checkpoints(ckpt_dir)
    return found[-1] if found else None


def load_config(path: Path) -> dict:
    """config.json of a checkpoint: {"train": ..., "model": ..., "run_id": ...}."""
    return json.loads((Path(path) / "config.json").read_text())


def load_weights(path: Path, model: torch.nn.Module) -> None:
    """Load model.safetensors of checkpoint `path` into `model`, or raise a ValueError saying
    why it does not fit (see `misfit`)."""
    from safetensors.torch import load_model

    try:
        load_model(model, str(Path(path) / "model.safetensors"))
    except RuntimeError:  # size mismatch, missing or unexpected tensors
        raise ValueError(misfit(Path(path), model)) from None


def load(path: Path, model: torch.nn.Module, optimizer=None) -> dict:
    """Load weights (and optimizer state) from a checkpoint folder; returns its state dict
    (step, loader, rng) for the caller to restore."""
    load_weights(path, model)
    state = torch.load(Path(path) / "state.pt", weights_only=False)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    return state


def build(path: Path) -> tuple[torch.nn.Module, dict]:
    """(the model config.json describes with the checkpoint's weights, the config dict)."""
    from cartlab.model import LMConfig, build_model

    config = load_config(path)
    model = build_model(LMConfig.from_dict(config["model"]))
    load_weights(path, model)
    return model, config


def load_tokenizer(path: Path):
    """The tokenizer saved with a checkpoint (hash-checked), as a `cartlab.data` Tokenizer."""
    from cartlab.data import get_tokenizer

    path = Path(path)
    meta = path / "tokenizer_meta.json"
    if not meta.is_file():
        raise ValueError(f"checkpoint {path} has no tokenizer (tokenizer_meta.json); it predates tokenizer saving")
    info = json.loads(meta.read_text())
    return get_tokenizer({"files": {}, "tokenizer": info, "dir": str(path)})


def misfit(path: Path, model: torch.nn.Module, limit: int = 4) -> str:
    """One line: why the weights of checkpoint `path` do not fit `model` — the model config
    fields in which config.json and the model differ, and the tensors whose names or shapes do
    not match."""
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        stored = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    state = model.state_dict()
    want = {k: list(v.shape) for k, v in state.items()}
    stored_ptrs = {state[k].data_ptr() for k in stored if k in state}
    problems = [f"{k} {stored[k]} in the checkpoint, {want[k]} in the model"
                for k in sorted(stored) if k in want and stored[k] != want[k]]
    problems += [f"{k} missing from the checkpoint" for k in sorted(want)
                 if k not in stored and state[k].data_ptr() not in stored_ptrs]  # tied weights are stored once
    problems += [f"{k} {stored[k]} not in the model" for k in sorted(stored) if k not in want]
    more = f" (and {len(problems) - limit} more)" if len(problems) > limit else ""
    tensors = "; ".join(problems[:limit]) + more if problems else "its tensors do not load"

    fields = ""
    try:
        saved = load_config(path).get("model") or {}
    except (OSError, ValueError):
        saved = {}
    built = model.config.to_dict() if hasattr(getattr(model, "config", None), "to_dict") else {}
    changed = sorted(k for k in set(saved) | set(built) if saved and built and saved.get(k) != built.get(k))
    if changed:
        fields = ("model config fields differ (config.json vs the model): "
                  + ", ".join(f"{k}={saved.get(k)!r} vs {built.get(k)!r}" for k in changed) + "; ")
    elif saved and built:
        fields = "its config.json matches the model, so the weights are not the ones config.json describes " \
                 "(was config.json edited?); "
    return f"checkpoint {path} does not fit the model: {fields}tensors: {tensors}"
