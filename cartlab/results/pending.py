"""Statuses that could not be written: a run's final status kept beside the database until it can be.

A status write that fails (a full disk, an I/O error) is saved as `<db>.pending/<run>.json`,
written atomically, and applied by the next writable open of the database (`ResultsDB` calls
`apply`), so a run is never left `running` for ever.
"""
from __future__ import annotations

import json
import os
import urllib.parse
import warnings
from pathlib import Path


def folder(db_path: Path) -> Path:
    """Where the failed status writes of database `db_path` wait: `<db>.pending/`."""
    return db_path.with_name(db_path.name + ".pending")


def _file(db_path: Path, run_id: str) -> Path:
    return folder(db_path) / (urllib.parse.quote(run_id, safe="") + ".json")


def save(db_path: Path, run_id: str, fields: dict) -> Path:
    """Keep `fields` (with their `updated_at`) of run `run_id` for the next writable open."""
    folder(db_path).mkdir(exist_ok=True)
    path = _file(db_path, run_id)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"run_id": run_id, "fields": fields}))
    os.replace(tmp, path)  # atomic: a crash leaves the old sidecar or the new one, never half of one
    return path


def forget(db_path: Path, run_id: str) -> None:
    """Drop a kept status of `run_id` (a newer one was written)."""
    stale = _file(db_path, run_id)
    if stale.exists():
        stale.unlink(missing_ok=True)


def apply(db) -> None:
    """Write the statuses earlier writes failed to record into `db` (a writable `ResultsDB`), then
    forget them. A sidecar older than the run's row (the run was written since) or for a run not in
    the database is dropped."""
    where = folder(db.path)
    if not where.is_dir():
        return
    for path in sorted(where.glob("*.json")):
        try:
            saved = json.loads(path.read_text())
            run_id, fields = saved["run_id"], saved["fields"]
        except FileNotFoundError:
            continue  # another process applied it first
        except (OSError, ValueError, KeyError, TypeError) as err:
            warnings.warn(f"{path}: unreadable pending status ({err}); left in place", stacklevel=3)
            continue
        row = db.get_run(run_id)
        if row is not None and row["updated_at"] <= fields["updated_at"]:
            with db.transaction() as c:
                sets = ", ".join(f"{k} = ?" for k in fields)
                c.execute(f"UPDATE runs SET {sets} WHERE run_id = ?", (*fields.values(), run_id))
        path.unlink(missing_ok=True)
    try:
        where.rmdir()
    except OSError:
        pass  # not empty (an unreadable sidecar) or already gone
