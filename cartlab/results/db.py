"""The results database: one SQLite file (WAL) holding every run, its logs and evaluations.

Tables (columns match `cartlab.analysis.schema`, so analyses read runs and published numbers
alike):
    runs        one row per run: identity, config JSON, hooks, seed, status, hardware, versions
    train_log   (run_id, step) -> loss, grad_norm, lr, rho_max, rho_mean, hyper_weights, tokens/s, mfu, memory
    eval_log    (run_id, step, split) -> loss, ppl
    downstream  (run_id, task, metric, num_fewshot, n_loops) -> value, stderr   (lm-eval)
    artifacts   (run_id, kind, path) -> step, created_at                     (checkpoints, notebooks)
    meta        schema_version

Safety: every write is one short `BEGIN IMMEDIATE` transaction (so concurrent writers queue on
the busy timeout instead of failing on a lock upgrade), log rows are keyed by step (re-logging a
step after a resume replaces, never duplicates), and a crash leaves the file consistent because
SQLite commits atomically. Status values: running, completed, interrupted, diverged, failed,
published.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

STATUSES = ("running", "completed", "interrupted", "diverged", "failed", "published")
SCHEMA_VERSION = 1

# Each migration takes the schema from version i-1 to i; never edit a released one, append.
MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE runs (
        run_id TEXT PRIMARY KEY, name TEXT NOT NULL, source TEXT NOT NULL DEFAULT 'local',
        model TEXT, d_model INTEGER, prelude_layers INTEGER, n_loops INTEGER, n_layers INTEGER,
        hooks TEXT NOT NULL DEFAULT '', seed INTEGER, n_seeds INTEGER NOT NULL DEFAULT 1, stage TEXT,
        stored_params INTEGER, effective_params INTEGER, tokens INTEGER, step INTEGER NOT NULL DEFAULT 0,
        status TEXT NOT NULL, message TEXT, config_json TEXT NOT NULL DEFAULT '{}',
        hardware_json TEXT NOT NULL DEFAULT '{}', software_json TEXT NOT NULL DEFAULT '{}',
        git_commit TEXT, created_at TEXT NOT NULL, updated_at TEXT NOT NULL, finished_at TEXT
    );
    CREATE TABLE train_log (
        run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE, step INTEGER NOT NULL,
        loss REAL, grad_norm REAL, lr REAL, rho_max REAL, rho_mean REAL, hyper_weights TEXT,
        tokens_per_s REAL, mfu REAL, memory_mb REAL, PRIMARY KEY (run_id, step)
    );
    CREATE TABLE eval_log (
        run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE, step INTEGER NOT NULL,
        split TEXT NOT NULL, loss REAL, ppl REAL, PRIMARY KEY (run_id, step, split)
    );
    CREATE TABLE downstream (
        run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE, task TEXT NOT NULL,
        metric TEXT NOT NULL, value REAL, stderr REAL, num_fewshot INTEGER NOT NULL DEFAULT 0,
        n_loops INTEGER NOT NULL DEFAULT 0, created_at TEXT,
        PRIMARY KEY (run_id, task, metric, num_fewshot, n_loops)
    );
    CREATE TABLE artifacts (
        run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE, kind TEXT NOT NULL,
        path TEXT NOT NULL, step INTEGER, created_at TEXT NOT NULL, PRIMARY KEY (run_id, kind, path)
    );
    """,
}

RUN_COLUMNS = ("run_id", "name", "source", "model", "d_model", "prelude_layers", "n_loops", "n_layers", "hooks",
               "seed", "n_seeds", "stage", "stored_params", "effective_params", "tokens", "step", "status",
               "message", "config_json", "hardware_json", "software_json", "git_commit", "created_at",
               "updated_at", "finished_at")
TRAIN_COLUMNS = ("step", "loss", "grad_norm", "lr", "rho_max", "rho_mean", "hyper_weights", "tokens_per_s", "mfu",
                 "memory_mb")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class ResultsDB:
    """A results database file. Cheap to open; safe to share between processes."""

    def __init__(self, path: str | os.PathLike, timeout: float = 120.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.timeout = timeout
        self.conn = self._connect()
        self._migrate()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
        deadline = time.monotonic() + self.timeout
        while True:  # switching to WAL needs a moment of exclusive access
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                break
            except sqlite3.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def transaction(self):
        """One write transaction, taken eagerly (BEGIN IMMEDIATE) and rolled back on error."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def _migrate(self) -> None:
        with self.transaction() as c:
            c.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            row = c.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = int(row[0]) if row else 0
            if version > SCHEMA_VERSION:
                raise ValueError(f"{self.path}: schema_version={version} is newer than this cartlab "
                                 f"(supports <= {SCHEMA_VERSION}); upgrade cartlab")
            for v in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[v].split(";"):
                    if statement.strip():
                        c.execute(statement)
            c.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    @property
    def schema_version(self) -> int:
        return int(self.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])

    # -- runs ---------------------------------------------------------------------------------------------------
    def get_run(self, run_id: str) -> dict | None:
        cur = self.conn.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,))
        row = cur.fetchone()
        return None if row is None else dict(zip([d[0] for d in cur.description], row))

    def upsert_run(self, run_id: str, **fields: Any) -> None:
        """Insert a run or update the given fields of an existing one."""
        unknown = sorted(set(fields) - set(RUN_COLUMNS))
        if unknown:
            raise ValueError(f"unknown runs column(s) {unknown}; allowed: {list(RUN_COLUMNS)}")
        if "status" in fields and fields["status"] not in STATUSES:
            raise ValueError(f"status={fields['status']!r} is not allowed; choose one of {list(STATUSES)}")
        fields = {k: json.dumps(v) if k.endswith("_json") and not isinstance(v, str) else v for k, v in fields.items()}
        stamp = now()
        with self.transaction() as c:
            exists = c.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if exists:
                sets = ", ".join(f"{k} = ?" for k in fields)
                c.execute(f"UPDATE runs SET {sets}, updated_at = ? WHERE run_id = ?", (*fields.values(), stamp, run_id))
            else:
                row = {"name": run_id, "status": "running", **fields, "run_id": run_id, "created_at": stamp,
                       "updated_at": stamp}
                c.execute(f"INSERT INTO runs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                          tuple(row.values()))

    def set_status(self, run_id: str, status: str, message: str | None = None, step: int | None = None) -> None:
        fields: dict[str, Any] = {"status": status, "message": message}
        if step is not None:
            fields["step"] = step
        if status in ("completed", "diverged", "failed", "interrupted"):
            fields["finished_at"] = now()
        self.upsert_run(run_id, **fields)

    def delete_run(self, run_id: str) -> None:
        with self.transaction() as c:
            c.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))

    # -- logs ---------------------------------------------------------------------------------------------------
    def log_train(self, run_id: str, rows: Iterable[dict]) -> None:
        rows = [tuple(r.get(k) for k in TRAIN_COLUMNS) for r in rows]
        if rows:
            with self.transaction() as c:
                c.executemany(f"INSERT OR REPLACE INTO train_log (run_id, {', '.join(TRAIN_COLUMNS)}) "
                              f"VALUES (?, {', '.join('?' * len(TRAIN_COLUMNS))})", [(run_id, *r) for r in rows])

    def log_eval(self, run_id: str, step: int, results: dict[str, dict]) -> None:
        """results: {split: {"loss": ..., "ppl": ...}}"""
        with self.transaction() as c:
            c.executemany("INSERT OR REPLACE INTO eval_log VALUES (?, ?, ?, ?, ?)",
                          [(run_id, step, split, r["loss"], r["ppl"]) for split, r in results.items()])

    def log_downstream(self, run_id: str, rows: Iterable[dict]) -> None:
        """rows: dicts with task, metric, value, stderr, num_fewshot, n_loops."""
        stamp = now()
        with self.transaction() as c:
            c.executemany("INSERT OR REPLACE INTO downstream VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                          [(run_id, r["task"], r["metric"], r["value"], r.get("stderr"), r.get("num_fewshot", 0),
                            r.get("n_loops", 0), stamp) for r in rows])

    def add_artifact(self, run_id: str, kind: str, path: str, step: int | None = None) -> None:
        with self.transaction() as c:
            c.execute("INSERT OR REPLACE INTO artifacts VALUES (?, ?, ?, ?, ?)", (run_id, kind, str(path), step, now()))

    def remove_artifact(self, run_id: str, kind: str, path: str) -> None:
        with self.transaction() as c:
            c.execute("DELETE FROM artifacts WHERE run_id = ? AND kind = ? AND path = ?", (run_id, kind, str(path)))

    def truncate_after(self, run_id: str, step: int) -> None:
        """Forget log rows after `step` (a resume from the checkpoint at `step` re-logs them)."""
        with self.transaction() as c:
            c.execute("DELETE FROM train_log WHERE run_id = ? AND step > ?", (run_id, step))
            c.execute("DELETE FROM eval_log WHERE run_id = ? AND step > ?", (run_id, step))

    # -- reading ------------------------------------------------------------------------------------------------
    def frame(self, table: str, run_ids: Iterable[str] | None = None) -> pd.DataFrame:
        if table not in ("runs", "train_log", "eval_log", "downstream", "artifacts"):
            raise ValueError(f"table={table!r} is not allowed; choose one of runs, train_log, eval_log, downstream, artifacts")
        query, params = f"SELECT * FROM {table}", ()
        if run_ids is not None:
            run_ids = list(run_ids)
            query += f" WHERE run_id IN ({', '.join('?' * len(run_ids))})"
            params = tuple(run_ids)
        order = {"runs": "created_at, run_id", "train_log": "run_id, step", "eval_log": "run_id, step, split",
                 "downstream": "run_id, task, metric, num_fewshot, n_loops", "artifacts": "run_id, kind, path"}
        return pd.read_sql_query(f"{query} ORDER BY {order[table]}", self.conn, params=params)
