"""What is checked before a run trains: the data it reads, the places it writes, the lock that
keeps a second process off a live run, and that a resumed run is still the run it was."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from cartlab.config import ConfigError, show
from cartlab.data.resolve import resolve_data
from cartlab.filelock import file_lock
from cartlab.results.db import ResultsDB
from cartlab.train.config import TrainConfig, _flatten
from cartlab.train.evaluation import _val_bins


def preflight(cfg: TrainConfig) -> None:
    """What can be known wrong before the run is locked, recorded or built: the data (its build
    exists, or an offline recipe builds; its vocabulary fits the model), then the places the run
    writes. A refusal here leaves no lock, row or file behind."""
    from cartlab.data import load_meta

    meta = load_meta(resolve_data(cfg.data, progress=not cfg.quiet))
    check_vocab(meta, cfg.model_config())
    check_data(meta, cfg)
    if str(cfg.results_db) != ":memory:":
        db = Path(cfg.results_db)
        # a directory, or a file that is not a results database (a new one appears only whole,
        # `ResultsDB._create`; an empty file is one its owner made: the writer gives it a schema)
        if db.is_dir() or (db.exists() and db.stat().st_size > 0):
            ResultsDB(cfg.results_db, readonly=True).close()
        check_writable(Path(cfg.results_db).parent, "results_db", cfg.results_db)
    check_writable(Path(cfg.out_dir), "out_dir", cfg.out_dir)


def check_vocab(meta: dict, model_cfg) -> None:
    """The model's vocabulary must hold every id of the data build's tokenizer."""
    vocab = int(meta["tokenizer"]["vocab_size"])
    if model_cfg.vocab_size < vocab:
        raise ValueError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the data's tokenizer vocabulary "
                         f"({vocab}, {meta['tokenizer']['name']}); set model.vocab_size >= {vocab}")


def check_data(meta: dict, cfg: TrainConfig) -> None:
    """The rest of what the run reads, before it makes anything: the build's tokenizer file (copied
    into every checkpoint), windows of seq_len in train.bin and each validation bin, and every id of
    train.bin inside the vocabulary (one pass over the file)."""
    from cartlab.data import BatchLoader, get_tokenizer, open_bin

    where = f"data.dir={show(meta['dir'])}"
    try:
        get_tokenizer(meta)
        train_bin = open_bin(Path(meta["dir"]) / "train.bin")
        BatchLoader(train_bin, cfg.batch_size, cfg.seq_len, cfg.data.mode, seed=cfg.seed)
        for vbin in _val_bins(meta).values():
            BatchLoader(vbin, cfg.eval_batch_size, cfg.seq_len, "sequential")
        train_bin.check_ids()
    except ValueError as err:
        raise ConfigError(f"{where}: {err}", "data.dir") from None


def check_writable(folder: Path, name: str, value) -> None:
    """Create `folder` and write (and delete) a probe file in it, or raise one ConfigError line
    naming the field `name`: an unwritable place fails before the first step, not at the
    first checkpoint."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".cartlab-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        reason = f"{err.strerror}: {err.filename}" if err.strerror and err.filename else str(err)
        raise ConfigError(f"{name}={show(str(value))} is not writable ({reason})", name) from None


def check_same_identity(stored: dict, cfg: TrainConfig, run_id: str) -> None:
    """A resumed run must be the run it was: its stored identity and `cfg`'s are equal (only
    operational fields may change between launches)."""
    old, new = _flatten(stored), _flatten(cfg.identity())
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
        detail = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:6])
        raise ValueError(f"cannot resume run {run_id!r}: its config changed ({detail}); "
                         f"start a new run instead of resuming")


@contextlib.contextmanager
def _run_lock(results_db: str, run_id: str):
    """One process at a time trains a run: the lock `<results_db>.locks/<run_id>`, held by rank 0
    for the whole run (`cartlab.filelock`). The OS drops it when the process dies, so a killed
    run can be resumed at once; a second launch of a live run is refused instead of writing its
    rows and checkpoints twice. (On Windows nothing stops a second launch.)"""
    if int(os.environ.get("RANK", "0")) != 0 or str(results_db) == ":memory:":
        yield
        return

    def refuse(path: Path) -> None:
        raise ValueError(f"run {run_id!r} is being trained by another process right now ({path} is locked); "
                         f"wait for it, or stop it and `cartlab train --resume {run_id}`")

    with file_lock(Path(f"{results_db}.locks") / run_id.replace(os.sep, "_"), busy=refuse):
        yield
