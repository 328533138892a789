"""One advisory file lock, shared by the data builds and the trainer.

    with file_lock(path, busy=lambda p: print(f"{p} is held; waiting")):
        ...   # no other process holds `path` here

The lock is an exclusive `flock` on `path` (created if missing); the OS releases it when the
holder dies, so a SIGKILLed process never leaves a stale lock behind. When another process holds
it, `busy(path)` is called first: raise there to refuse, or return to wait for the lock. Where
there is no fcntl (Windows) nothing is locked, and the caller's block runs unguarded.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator


@contextlib.contextmanager
def file_lock(path: Path, busy: Callable[[Path], None] = lambda path: None) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            busy(path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield
