"""Writing checkpoints: one folder per step, written atomically, the last N kept.

    <run dir>/checkpoints/step_00000120/   (layout: `cartlab.checkpoint`, which also reads them)

A checkpoint is written to a hidden temporary folder `.tmp_step_<step>_<pid>` and renamed into
place, so a crash never leaves a folder named `step_*` that is incomplete. A save that fails
(a full disk, say) removes its temporary folder and leaves the earlier checkpoints as they were;
the temporary folders of processes killed mid-save are removed when the next run starts
(`remove_stale_tmp`). `save` returns the folders it pruned, so the caller can forget them.
A save that fails for lack of space (torch's writer says `unexpected pos`, safetensors and Python
say ENOSPC, or EFBIG past a file size limit) raises `NoSpace`, one line: `no space left on
<checkpoints folder> (checkpoint of about N MB)`.
A sharded run (parallel=fsdp) writes its weights and optimizer state with
torch.distributed.checkpoint, every rank its shards, into the same temporary folder.
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_model

from cartlab.checkpoint import (PREFIX, SHARDED, STATE_FORMAT, all_checkpoints, latest, load,  # noqa: F401
                                load_config, load_tokenizer, trusting)

TMP_PREFIX = f".tmp_{PREFIX}"
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
"""A write refused for lack of space: a full disk, a full quota, a file size limit (`ulimit -f`)."""
FULL_TEXTS = ("unexpected pos", "failed writing file", "no space left", "os error 28", "storagefull",
              "quota exceeded", "os error 122", "file too large", "os error 27")
"""How a full disk reads where no errno survives: torch's zip writer (`[enforce fail at
inline_container.cc] . unexpected pos`), safetensors' Rust I/O error."""


class NoSpace(OSError):
    """A checkpoint that could not be written for lack of space; its text is the one line shown."""

    def __init__(self, path: Path, size: int):
        self.text = f"no space left on {path} (checkpoint of about {max(1, round(size / 1e6)):,} MB)"
        super().__init__(errno.ENOSPC, self.text, str(path))

    def __str__(self) -> str:
        return self.text


def out_of_space(err: BaseException) -> bool:
    """Whether `err` (or what it was raised from) is a write refused for lack of space."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in FULL_ERRNOS:
            return True
        if not isinstance(err, OSError) and any(t in str(err).lower() for t in FULL_TEXTS):
            return True
        err = err.__cause__ or err.__context__
    return False


def checkpoint_bytes(model: torch.nn.Module, optimizer=None) -> int:
    """About how many bytes a checkpoint of `model` (and `optimizer`'s state) takes."""
    tensors = list(model.state_dict().values())
    if optimizer is not None:
        tensors += [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)


def rng_state() -> dict:
    """Every RNG's state as tensors, numbers and strings (what torch.load(weights_only=True) reads)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore `rng_state()`'s dict, or the pickled tuples of a checkpoint written before it."""
    torch.set_rng_state(state["torch"])
    py, npy = state["python"], state["numpy"]
    if isinstance(py, dict):
        py = (py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"])
    random.setstate(py)
    if isinstance(npy, dict):
        npy = (npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
               npy["cached_gaussian"])
    np.random.set_state(npy)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def replacing_dir(final: Path, tmp: Path):
    """Yield the empty folder `tmp` to fill; when the block succeeds `tmp` replaces `final` in one
    rename (a reader sees the old folder or the new one, never half of one), and when it fails
    `tmp` is removed. Checkpoints and `cartlab export` folders are written this way."""
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save(ckpt_dir: Path, step: int, model: torch.nn.Module, optimizer, loader_state, config: dict,
         keep: int, tokenizer: tuple[Path, dict] | None = None, sharded: bool = False,
         world: int = 1) -> tuple[Path, list[Path]]:
    """Write the checkpoint of `step` under ckpt_dir and delete all but the newest `keep`.
    Returns (the new checkpoint, the checkpoints deleted). `world`: the number of ranks the
    run's global batch is defined on (a resume on another number keeps that batch). `sharded` (a model sharded with
    FSDP2): every rank calls this, each writes its own shards with torch.distributed.checkpoint
    into rank 0's temporary folder, and rank 0 completes it; the others get (path, [])."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"{PREFIX}{step:08d}"
    try:
        if sharded:
            return final, _save_sharded(ckpt_dir, final, step, model, optimizer, loader_state, config, keep,
                                        tokenizer, world)
        with replacing_dir(final, ckpt_dir / f"{TMP_PREFIX}{step:08d}_{os.getpid()}") as tmp:
            save_model(model, str(tmp / "model.safetensors"))
            _write_state(tmp, {"step": step, "world": world, "optimizer": optimizer.state_dict(),
                               "loader": loader_state}, config, tokenizer)
    except Exception as err:  # the temporary folder is gone already (replacing_dir)
        if out_of_space(err):
            raise NoSpace(ckpt_dir, checkpoint_bytes(model, optimizer)) from err
        raise
    return final, _prune(ckpt_dir, keep)


def _save_sharded(ckpt_dir: Path, final: Path, step: int, model, optimizer, loader_state, config: dict, keep: int,
                  tokenizer, world: int) -> list[Path]:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    main = dist.get_rank() == 0
    name = [f"{TMP_PREFIX}{step:08d}_{os.getpid()}"]
    dist.broadcast_object_list(name)  # rank 0's folder, the one every rank writes into
    tmp = ckpt_dir / name[0]
    model_state, optim_state = get_state_dict(model, [optimizer])  # this rank's shards
    failed = None
    try:
        with replacing_dir(final, tmp) if main else nullcontext(tmp):
            dist.barrier()  # rank 0 has made the folder
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp / SHARDED))
            if main:
                _write_state(tmp, {"step": step, "world": world, "loader": loader_state}, config, tokenizer)
    except Exception as err:  # rank 0's own files or rename (a full disk); DCP's errors reach every rank
        failed = err
    outcome = [None] * dist.get_world_size()
    dist.all_gather_object(outcome, failed is None)  # every rank learns whether the save is in place
    if failed is not None:
        raise failed
    if not all(outcome):
        raise RuntimeError(f"the checkpoint of step {step} failed on rank {outcome.index(False)}")
    return _prune(ckpt_dir, keep) if main else []


def _write_state(folder: Path, state: dict, config: dict, tokenizer: tuple[Path, dict] | None) -> None:
    """state.pt (`state` with the RNG states), config.json, and the data build's tokenizer."""
    torch.save({**state, "format": STATE_FORMAT, "rng": rng_state()}, folder / "state.pt")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer is not None:
        file, info = tokenizer
        shutil.copyfile(file, folder / "tokenizer.json")
        (folder / "tokenizer_meta.json").write_text(json.dumps({**info, "file": "tokenizer.json"}, indent=2))


def _prune(ckpt_dir: Path, keep: int) -> list[Path]:
    pruned = all_checkpoints(ckpt_dir)[:-keep]
    for old in pruned:
        shutil.rmtree(old, ignore_errors=True)
    return pruned


def remove_stale_tmp(ckpt_dir: Path) -> list[Path]:
    """Delete the temporary folders of saves whose process is gone (killed mid-save); a live
    process's folder is left alone. Returns the folders removed."""
    removed = []
    if not Path(ckpt_dir).is_dir():
        return removed
    for tmp in Path(ckpt_dir).glob(f"{TMP_PREFIX}*_*"):
        try:
            pid = int(tmp.name.rsplit("_", 1)[1])
        except ValueError:
            continue
        if pid != os.getpid() and _alive(pid):
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
