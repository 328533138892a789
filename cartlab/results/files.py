"""SQLite's files and failures as the results database meets them: the header that marks an SQLite
file, the side files beside a WAL database, which errors mean the disk refused a write, and how
a new database file appears whole."""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path

SQLITE_HEADER = b"SQLite format 3\x00"
WRITE_FAILED = ("SQLITE_FULL", "SQLITE_IOERR", "SQLITE_IOERR_WRITE", "SQLITE_IOERR_FSYNC", "SQLITE_IOERR_TRUNCATE")
"""SQLite's errors for a write the disk refused: full, or past a size limit (an I/O error)."""


def disk_full(err: BaseException) -> bool:
    """Whether `err` is SQLite saying the disk (or the database's max_page_count) is full."""
    return isinstance(err, sqlite3.Error) and (getattr(err, "sqlite_errorname", "") == "SQLITE_FULL"
                                               or "database or disk is full" in str(err))


def write_failed(err: BaseException) -> bool:
    """Whether `err` is SQLite failing to write the disk: full, or an I/O error."""
    return disk_full(err) or (isinstance(err, sqlite3.Error) and
                              (getattr(err, "sqlite_errorname", "") in WRITE_FAILED or "disk I/O error" in str(err)))


def side_files(path: Path) -> list[Path]:
    """The WAL and shared-memory files SQLite keeps beside database `path`."""
    return [path.with_name(path.name + suffix) for suffix in ("-wal", "-shm")]


def link_into_place(made: Path, path: Path) -> None:
    """Put the finished file `made` at `path` unless a file is already there (then the one there
    stays: whoever came first wins). Atomic by a hard link; a filesystem without hard links
    falls back to a rename."""
    try:
        os.link(made, path)
    except FileExistsError:
        pass
    except OSError:
        if not path.exists():
            os.replace(made, path)
