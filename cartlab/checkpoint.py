"""Reading checkpoints: what `cartlab.train` writes and `cartlab.eval` (and a resume) reads.

    <run dir>/checkpoints/step_00000120/
        model.safetensors   weights (tied embedding stored once)
        state.pt            optimizer, data-loader position, RNG states, step
        -- or, written by a sharded run (parallel=fsdp, `cartlab.train.parallel`):
        dcp/                weights and optimizer state in torch.distributed.checkpoint's format,
                            written shard by shard by the ranks; loads into any number of ranks
        state.pt            data-loader positions, RNG states, step
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
import warnings
from pathlib import Path

import torch

PREFIX = "step_"
SHARDED = "dcp"  # the torch.distributed.checkpoint folder of a sharded checkpoint


def is_sharded(path: Path) -> bool:
    """True for a checkpoint written shard by shard with torch.distributed.checkpoint."""
    return (Path(path) / SHARDED / ".metadata").is_file()


def is_checkpoint(path: Path) -> bool:
    """A complete checkpoint folder: its state and its weights, in either layout."""
    path = Path(path)
    return (path / "state.pt").is_file() and ((path / "model.safetensors").is_file() or is_sharded(path))


def all_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a `.tmp_step_*` folder being written is not one)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and is_checkpoint(p))


def latest(ckpt_dir: Path) -> Path | None:
    found = all_checkpoints(ckpt_dir)
    return found[-1] if found else None


def load_config(path: Path) -> dict:
    """config.json of a checkpoint: {"train": ..., "model": ..., "run_id": ...}."""
    return json.loads((Path(path) / "config.json").read_text())


def load_weights(path: Path, model: torch.nn.Module) -> None:
    """Load the weights of checkpoint `path` into `model`, or raise a ValueError saying why
    they do not fit (see `misfit`)."""
    from safetensors.torch import load_model

    try:
        if is_sharded(path):
            _load_sharded(Path(path), model)
        else:
            load_model(model, str(Path(path) / "model.safetensors"))
    except _misfit():  # size mismatch, missing or unexpected tensors
        raise ValueError(misfit(Path(path), model)) from None


def load(path: Path, model: torch.nn.Module, optimizer=None) -> dict:
    """Load weights (and optimizer state) from a checkpoint folder; returns its state dict
    (step, loader, rng) for the caller to restore. `model` may be sharded with FSDP2 or not,
    whichever layout the checkpoint has (a run may change `parallel` when it resumes)."""
    path = Path(path)
    state = torch.load(path / "state.pt", weights_only=False)
    if is_sharded(path):
        try:
            _load_sharded(path, model, optimizer)
        except _misfit():
            raise ValueError(misfit(path, model)) from None
        return state
    if _is_fsdp(model):
        _shard_plain(path, model, optimizer, state)
        return state
    load_weights(path, model)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    return state


def _misfit() -> tuple[type[BaseException], ...]:
    """The errors of weights that do not fit (evaluated only when an error is raised: DCP's module
    is slow to import, and its error is a BaseException)."""
    from torch.distributed.checkpoint.api import CheckpointException

    return RuntimeError, CheckpointException


def _is_fsdp(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6 has no public FSDP2, so no model is sharded with it
        return False
    return isinstance(model, FSDPModule)


def _shard_plain(path: Path, model: torch.nn.Module, optimizer, state: dict) -> None:
    """An unsharded checkpoint into a model sharded with FSDP2: load it into a plain copy of the
    model (and of the optimizer, parameter by parameter) on the CPU, then let set_state_dict
    shard the full tensors, the optimizer state matched to the parameters by name."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    from cartlab.model import build_model

    plain = build_model(model.config)
    load_weights(path, plain)
    optimizers, copies = ([optimizer], [_plain_copy(optimizer, model, plain)]) if optimizer is not None else ([], [])
    for copy in copies:
        copy.load_state_dict(state["optimizer"])
    model_state, optim_state = get_state_dict(plain, copies, options=StateDictOptions(full_state_dict=True))
    set_state_dict(model, optimizers, model_state_dict=model_state, optim_state_dict=optim_state if copies else {},
                   options=StateDictOptions(full_state_dict=True))


def _plain_copy(optimizer, sharded: torch.nn.Module, plain: torch.nn.Module):
    """`optimizer` rebuilt over `plain`'s parameters: the same groups and settings, the
    parameters of `sharded` replaced by `plain`'s of the same name (the ids a state dict of
    `optimizer`'s layout refers to)."""
    name_of = {id(p): n for n, p in sharded.named_parameters()}
    by_name = dict(plain.named_parameters())
    groups = [{**{k: v for k, v in g.items() if k not in ("params", "fused")},
               "params": [by_name[name_of[id(p)]] for p in g["params"]]} for g in optimizer.param_groups]
    return type(optimizer)(groups)


def _load_sharded(path: Path, model: torch.nn.Module, optimizer=None) -> None:
    """torch.distributed.checkpoint into `model` (and `optimizer`), resharded for however many
    ranks load it; on one process without a process group it reads every shard itself."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    optimizers = [optimizer] if optimizer is not None else []
    model_state, optim_state = get_state_dict(model, optimizers)  # templates in this model's layout
    state = {"model": model_state, **({"optim": optim_state} if optimizer is not None else {})}
    with warnings.catch_warnings():  # on one process DCP warns that it reads every shard itself: the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path / SHARDED))
    set_state_dict(model, optimizers, model_state_dict=state["model"], optim_state_dict=state.get("optim", {}))


def stored_shapes(path: Path) -> dict[str, list[int]]:
    """Name -> shape of every weight tensor stored in checkpoint `path` (either layout)."""
    path = Path(path)
    if is_sharded(path):
        from torch.distributed.checkpoint import FileSystemReader

        meta = FileSystemReader(str(path / SHARDED)).read_metadata().state_dict_metadata
        return {k.removeprefix("model."): list(v.size) for k, v in meta.items()
                if k.startswith("model.") and hasattr(v, "size")}
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}


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
    stored = stored_shapes(path)
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
