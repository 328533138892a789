"""Fold run shards into a study's results database: `cartlab results merge SHARD... --db STUDY_DB`.

Why shards: a study spread over a cluster has many nodes writing results at once, and SQLite's
locking is unreliable over NFS, so the nodes must not share one database file. Each cluster job
writes its run into its own database in its run folder (`<out_dir>/<run_id>/results.db`, a
*shard*), and the shards are folded into the study's database here, by one process.

Merging is idempotent and refuses to guess:
- a row the database lacks is copied; a row it holds identically is skipped, so merging the
  same shard twice adds nothing;
- a row with the same key and a different value is a conflict (two different trainings of one
  run, say): the merge is refused with one line naming the shard, table, key and column, and
  the database is left as it was (all shards are one transaction: all or nothing);
- except a run that advanced: a shard merged while its run was going, then again after the run
  resumed and finished. A runs row that differs only in what training rewrites as it goes
  (`ADVANCING` columns) is replaced when the shard's is newer (`progress`: later updated_at,
  then status order running < interrupted < failed, diverged < completed, then step); the run's
  step-keyed logs (train_log, eval_log, probes) and artifacts are then replaced by the shard's (a
  resume drops and re-logs the steps after its checkpoint, with new wall-clock timings), its
  downstream rows upserted. A shard older than the database's row is skipped.

A disk that fills during the merge is one line naming the database (`no space left on the disk
to merge into ...`); the transaction is rolled back and its WAL truncated, so a database that
existed is left as it was and one the merge created is removed, -wal and -shm included.
"""
from __future__ import annotations

import math
import os
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

from cartlab.results.db import TABLES, ResultsDB, disk_full, side_files, write_failed

KEYS = {"runs": ("run_id",), "train_log": ("run_id", "step"), "eval_log": ("run_id", "step", "split"),
        "downstream": ("run_id", "task", "metric", "num_fewshot", "n_loops", "protocol"), "artifacts": ("run_id", "kind", "path"),
        "probes": ("run_id", "probe", "step", "split", "x", "metric")}
"""Each table's primary key (the schema's)."""

ADVANCING = ("status", "message", "step", "tokens", "updated_at", "finished_at", "config_json", "hardware_json",
             "software_json", "git_commit")
"""The runs columns a run rewrites as it trains and resumes (`_Run.record_start`, `set_status`):
a resumed job on another node records its own hardware, software and operational config."""

STATUS_ORDER = {"running": 0, "interrupted": 1, "failed": 2, "diverged": 2, "completed": 3, "published": 3}
REPLACED = ("train_log", "eval_log", "probes", "artifacts")
"""The child tables whose rows of an advanced run are the shard's (downstream rows are upserted:
evaluations may have been added to the study database since)."""


@dataclass
class Merged:
    """What merging one shard did."""

    shard: Path
    added: dict[str, int] = field(default_factory=dict)
    """Rows copied (or replaced, for advanced runs) per table."""
    advanced: list[str] = field(default_factory=list)
    """Runs whose newer shard replaced the database's row."""
    older: list[str] = field(default_factory=list)
    """Runs the database already holds in a newer state (the shard's rows skipped)."""

    def summary(self) -> str:
        rows = sum(self.added.values())
        parts = [f"{rows} rows added" + (f" ({', '.join(f'{t} {n}' for t, n in self.added.items() if n)})"
                                         if rows else "")]
        if self.advanced:
            parts.append(f"{len(self.advanced)} runs advanced")
        if self.older:
            parts.append(f"{len(self.older)} runs older than the database's, skipped")
        return f"{self.shard}: " + ", ".join(parts)


def progress(row: dict) -> tuple:
    """How far a runs row has got: (updated_at, status order, step); larger is newer."""
    return row["updated_at"] or "", STATUS_ORDER.get(row["status"], 0), row["step"] or 0


def same(a, b) -> bool:
    """Equal values, NaN equal to NaN (a diverged run's loss is merged like any other)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def merge(shards: list[str | os.PathLike], into: str | os.PathLike) -> list[Merged]:
    """Fold every shard into the results database `into` (created if missing), all or nothing:
    every shard is opened and checked before `into` is created or written, and all of them are
    merged in one transaction. Returns what each merge did. Raises ValueError (one line) on a shard
    that is missing or not a results database, or on a conflicting row, leaving `into` as it was
    (not created, when it did not exist)."""
    into = Path(into)
    shards = [Path(s) for s in shards]
    if not shards:
        raise ValueError("results merge: give at least one shard")
    sources: list[ResultsDB] = []
    try:
        for shard in shards:
            if shard.resolve() == into.resolve():
                raise ValueError(f"{shard}: is the database merged into; give the run shards")
            sources.append(ResultsDB(shard, readonly=True))  # missing, a folder, not a database: refused here
        existed = into.exists()
        if existed:
            ResultsDB(into, readonly=True).close()  # a folder or a foreign file is refused before it is opened to write
        target = None
        try:
            target = ResultsDB(into)
            with target.transaction() as c:
                return [_merge_one(source, target, c) for source in sources]
        except BaseException as err:
            if target is not None:
                target.close()
            if not existed:  # the database this merge created holds nothing: it goes
                for leftover in (into, *side_files(into)):
                    leftover.unlink(missing_ok=True)
            if write_failed(err):
                size = max(1, round(sum(s.path.stat().st_size for s in sources) / 1e6))
                why = ("no space left on the disk" if disk_full(err)
                       else "the disk refused a write (full, or a file size limit)")
                raise ValueError(f"{into}: {why} to merge {len(sources)} shard(s) of about {size:,} MB into this "
                                 f"results database (SQLite says: {err}); nothing merged, "
                                 f"{'the database is as it was' if existed else 'nothing created'}; free space in "
                                 f"{into.parent} and run again") from None
            raise
        finally:
            if target is not None:
                target.close()
    finally:
        for source in sources:
            source.close()


def _rows(conn, table: str, where: str, params: tuple) -> list[dict]:
    cur = conn.execute(f"SELECT * FROM {table} WHERE {where}", params)
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]


def _key(table: str, row: dict) -> tuple:
    return tuple(row.get(k, "") if k == "protocol" else row[k] for k in KEYS[table])  # a shard before schema 5: ''



def _differing(a: dict, b: dict, columns) -> str | None:
    """The first of `columns` whose values differ between rows a and b (None: none)."""
    return next((c for c in columns if not same(a.get(c), b.get(c))), None)


def _merge_one(source: ResultsDB, target: ResultsDB, c) -> Merged:
    """One shard into `target`, within the merge's transaction (connection `c`)."""
    out = Merged(source.path, {t: 0 for t in TABLES})

    def conflict(table, row, theirs, column):
        raise ValueError(f"{source.path}: conflicting row in {table} {dict(zip(KEYS[table], _key(table, row)))}: "
                         f"{column}={row[column]!r} in the shard but {theirs[column]!r} in {target.path}; "
                         f"nothing merged")

    tables = [t for t in TABLES if t == "runs" or source._version >= 3 or t != "probes"]
    for run in _rows(source.conn, "runs", "1", ()):
        rid = run["run_id"]
        have = _rows(c, "runs", "run_id = ?", (rid,))
        mode = "new" if not have else "same"
        if have:
            theirs = have[0]
            column = _differing(run, theirs, run)
            if column is not None:
                fixed = _differing(run, theirs, [k for k in run if k not in ADVANCING])
                if fixed is not None or progress(run) == progress(theirs):
                    conflict("runs", run, theirs, fixed or column)
                if progress(run) < progress(theirs):
                    out.older.append(rid)
                    continue
                mode = "advanced"
                out.advanced.append(rid)
        if mode == "new":
            _write(c, "runs", [run], replace=False)
        elif mode == "advanced":  # an UPDATE: a REPLACE would delete the row, and with it its logs
            c.execute(f"UPDATE runs SET {', '.join(f'{k} = ?' for k in run)} WHERE run_id = ?",
                      (*run.values(), rid))
        out.added["runs"] += mode != "same"
        for table in tables[1:]:
            rows = _rows(source.conn, table, "run_id = ?", (rid,))
            if mode == "advanced":
                if table in REPLACED:
                    c.execute(f"DELETE FROM {table} WHERE run_id = ?", (rid,))
                _write(c, table, rows, replace=True)
                out.added[table] += len(rows)
                continue
            existing = {_key(table, r): r for r in _rows(c, table, "run_id = ?", (rid,))} if mode == "same" else {}
            fresh = []
            for row in rows:
                theirs = existing.get(_key(table, row))
                if theirs is None:
                    fresh.append(row)
                elif (column := _differing(row, theirs, row)) is not None:
                    conflict(table, row, theirs, column)
            _write(c, table, fresh, replace=False)
            out.added[table] += len(fresh)
    return out


def _write(conn, table: str, rows: list[dict], replace: bool) -> None:
    if not rows:
        return
    columns = list(rows[0])
    verb = "INSERT OR REPLACE" if replace else "INSERT"
    conn.executemany(f"{verb} INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                     [tuple(r[k] for k in columns) for r in rows])
