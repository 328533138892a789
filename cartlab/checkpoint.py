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

Loading runs no code from the checkpoint. state.pt holds tensors, plain containers, numbers and
strings only (RNG states as tensors), read with `torch.load(weights_only=True)`; a sharded
checkpoint's `dcp/.metadata` (a pickle) is read by an unpickler that builds only DCP's own
metadata classes, and its non-tensor items with `weights_only=True`. A state.pt written before
this format (it pickles numpy's RNG state), or a file holding anything else, is refused with one
line naming it, unless the caller trusts the checkpoint (`trusting()`, the command line's
`--trust-checkpoint`): then both files are read with plain pickle, which can run any code the
file carries, exactly as torch.load(weights_only=False) does.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import pickle
import warnings
from pathlib import Path

import torch

PREFIX = "step_"
SHARDED = "dcp"  # the torch.distributed.checkpoint folder of a sharded checkpoint
STATE_FORMAT = 2  # state.pt readable with weights_only=True (1, unmarked: pickled numpy RNG state)

_TRUST = contextvars.ContextVar("cartlab_trust_checkpoint", default=False)
TRUST_FLAG = "--trust-checkpoint"


@contextlib.contextmanager
def trusting(trust: bool = True):
    """Within the block, checkpoints are trusted: a state.pt or dcp/.metadata that the safe
    readers refuse is read with plain pickle, which runs whatever code the file carries."""
    token = _TRUST.set(bool(trust))
    try:
        yield
    finally:
        _TRUST.reset(token)


def trusted() -> bool:
    return _TRUST.get()


def _untrusted(file: Path, err: BaseException) -> ValueError:
    why = " ".join(str(err).split())[:160]
    return ValueError(f"{file}: refused to unpickle (it holds objects other than tensors, numbers and strings, "
                      f"so loading it could run code: an older cartlab checkpoint, or a tampered one; {why}); "
                      f"if you trust where it came from, pass {TRUST_FLAG}")


def load_state(path: Path) -> dict:
    """state.pt of checkpoint `path`, read without running code from it (see the module
    docstring); a legacy or tampered file is refused unless trusted."""
    file = Path(path) / "state.pt"
    try:
        return torch.load(file, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        if not trusted():
            raise _untrusted(file, err) from None
    except (RuntimeError, EOFError) as err:  # not a torch file at all, or cut short
        raise ValueError(f"{file}: not a readable checkpoint state ({' '.join(str(err).split())[:160]})") from None
    return torch.load(file, weights_only=False, map_location="cpu")


def is_sharded(path: Path) -> bool:
    """True for a checkpoint written shard by shard with torch.distributed.checkpoint."""
    return (Path(path) / SHARDED / ".metadata").is_file()


def step_of(name: str | Path) -> int | None:
    """The training step a checkpoint folder's name (`step_00000040`, or its path) records; None
    for any other name."""
    digits = Path(name).name[len(PREFIX):]
    return int(digits) if Path(name).name.startswith(PREFIX) and digits.isdigit() else None


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
    """config.json of a checkpoint: {"train": ..., "model": ..., "run_id": ...}; a file that is
    missing, cut short or not a JSON object raises one ValueError naming it."""
    file = Path(path) / "config.json"
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise ValueError(f"{file}: missing; a checkpoint folder holds the config that built its weights") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file}: not valid JSON ({err}); the file is damaged or cut short") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ValueError(f"{file}: not a checkpoint config (a JSON object with a 'model' section)")
    return config


def load_weights(path: Path, model: torch.nn.Module) -> None:
    """Load the weights of checkpoint `path` into `model`, or raise a ValueError saying why
    they do not fit (see `misfit`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    try:
        if is_sharded(path):
            _load_sharded(Path(path), model)
        else:
            load_model(model, str(Path(path) / "model.safetensors"))
    except SafetensorError as err:  # a damaged or truncated file (a header or length that does not add up)
        raise ValueError(f"{Path(path) / 'model.safetensors'}: not a readable safetensors file ({err}); "
                         f"the file is damaged or cut short") from None
    except _misfit():  # size mismatch, missing or unexpected tensors
        raise ValueError(misfit(Path(path), model)) from None


def load(path: Path, model: torch.nn.Module, optimizer=None) -> dict:
    """Load weights (and optimizer state) from a checkpoint folder; returns its state dict
    (step, loader, rng) for the caller to restore. `model` may be sharded with FSDP2 or not,
    whichever layout the checkpoint has (a run may change `parallel` when it resumes)."""
    path = Path(path)
    state = load_state(path)
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
        if trusted():
            dcp.load(state, checkpoint_id=str(path / SHARDED))
        else:
            read_sharded_metadata(path)  # refused here, with the file named, before DCP reads it
            dcp.load(state, storage_reader=_safe_reader(path / SHARDED), planner=_safe_planner())
    set_state_dict(model, optimizers, model_state_dict=state["model"], optim_state_dict=state.get("optim", {}))


# -- dcp/.metadata without pickle's code paths ----------------------------------------------------------------
_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                              "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}
"""What a `.metadata` file written by torch.distributed.checkpoint refers to (plus torch dtypes)."""


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata dataclasses and nothing else: any other global (os.system, eval,
    a class with side effects) is an UnpicklingError before it is looked up."""

    def find_class(self, module: str, name: str):
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if name in _DCP_CLASSES.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not part of DCP's metadata")


def read_sharded_metadata(path: Path):
    """The DCP metadata of sharded checkpoint `path`: read with the restricted unpickler, or, when
    trusted, with plain pickle. A file the restricted reader refuses raises one ValueError."""
    from torch.distributed.checkpoint.metadata import StorageMeta

    file = Path(path) / SHARDED / ".metadata"
    try:
        with open(file, "rb") as f:
            meta = (pickle.load(f) if trusted() else _MetadataUnpickler(f).load())
    except pickle.UnpicklingError as err:
        raise _untrusted(file, err) from None
    except (EOFError, AttributeError, TypeError, ValueError, IndexError) as err:
        raise ValueError(f"{file}: not a readable DCP metadata file ({type(err).__name__}: {err})") from None
    if not hasattr(meta, "state_dict_metadata"):
        raise ValueError(f"{file}: not DCP metadata (it holds a {type(meta).__name__})")
    if getattr(meta, "storage_meta", None) is None:
        meta.storage_meta = StorageMeta()
    return meta


def _safe_reader(folder: Path):
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        """FileSystemReader whose metadata comes from `read_sharded_metadata`."""

        def read_metadata(self, *args, **kwargs):
            if kwargs.get("rank") is not None:  # per-rank metadata files are not written by cartlab
                raise ValueError(f"{folder}: per-rank DCP metadata is not supported")
            meta = read_sharded_metadata(Path(folder).parent)
            meta.storage_meta.load_id = self.load_id
            return meta

    return SafeReader(str(folder))


def _safe_planner():
    """DCP's default load planner, its non-tensor items (optimizer settings) read with
    weights_only=True instead of plain pickle."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            try:
                obj = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as err:
                raise ValueError(f"a non-tensor item {read_item.dest_index.fqn!r} of the DCP checkpoint: {err}") from None
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element

                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafePlanner()


def stored_shapes(path: Path) -> dict[str, list[int]]:
    """Name -> shape of every weight tensor stored in checkpoint `path` (either layout)."""
    path = Path(path)
    if is_sharded(path):
        meta = read_sharded_metadata(path).state_dict_metadata
        return {k.removeprefix("model."): list(v.size) for k, v in meta.items()
                if k.startswith("model.") and hasattr(v, "size")}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except SafetensorError as err:
        raise ValueError(f"{path / 'model.safetensors'}: not a readable safetensors file ({err})") from None


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
