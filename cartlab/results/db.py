"""The results database: one SQLite file (WAL) holding every run, its logs and evaluations.

Tables (their DDL and columns in `cartlab.results.schema`, which `cartlab.analysis.schema` reads,
so analyses read runs and published numbers alike):
    runs        one row per run: identity, config JSON, hooks, seed, status, hardware, versions,
                and its variant (`variant`, `overrides`, `variant_label`: what groups runs as
                seeds of one configuration, `TrainConfig.variant_fields()`)
    train_log   (run_id, step) -> loss, grad_norm, lr, rho_max, rho_mean, hyper_weights, tokens/s, mfu, memory,
                n_loops (the R the step trained with: drawn under `random_loops`), flops (training
                FLOPs spent up to this step), forward_cost (measured wall time of a training forward
                over one plain forward: LRT's interleaved schedule; null for other models)
    eval_log    (run_id, step, split) -> loss, ppl
    findings    (study, analysis, claim, a, b, split, metric) -> effect, its 95% seed-noise interval,
                seeds per side, verdict, note, code_version: what the study's report concluded
                (`cartlab.analysis.findings`), replaced each time the report is rendered
    probes      (run_id, probe, step, split, x, metric) -> value: measurements of a trained model
                (`cartlab.train.measures`): a depth profile (x = inference R), LRT's approximation
                gap (x = S), the per-loop logit lens (x = loop), ... in one long table
    downstream  (run_id, task, metric, num_fewshot, n_loops, protocol) -> value, stderr, the protocol (lm-eval)
    artifacts   (run_id, kind, path) -> step, created_at                     (checkpoints, notebooks)
    meta        schema_version

Safety: every write is one short `BEGIN IMMEDIATE` transaction (so concurrent writers queue on
the busy timeout instead of failing on a lock upgrade), log rows are keyed by step (re-logging a
step after a resume replaces, never duplicates), and a crash leaves the file consistent because
SQLite commits atomically. Status values: running, completed, interrupted, diverged, failed,
published. A status write that fails (a full disk) is kept in `<db>.pending/<run>.json` and
applied by the next writable open, so a run is never left `running` for ever. A write that fails
(a full disk: SQLite's `database or disk is full`, or a disk I/O error) is rolled back and the
WAL it grew is truncated (`PRAGMA wal_checkpoint(TRUNCATE)`), so a failed write does not keep
the disk full. A new database is made whole in a private file and linked into place, so no
process sees it half-made, and one whose creation failed leaves nothing.

Readers open read-only (`ResultsDB(path, readonly=True)`, what `cartlab.results.runs` & co. and
`cartlab report` use): no migration, no file created or changed, so a database on a read-only
disk or of an older schema can be analysed. A path that is not a results database (not SQLite,
another program's SQLite, a directory, a newer schema, a location that cannot be written) is one
`ValueError` naming it, and the file is left as it was.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
import warnings
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd

from cartlab.results import pending
from cartlab.results.files import (SQLITE_HEADER, WRITE_FAILED, disk_full, link_into_place, side_files,  # noqa: F401
                                   write_failed)
from cartlab.results.schema import (FINDING_COLUMNS, MIGRATIONS, ORDER, PROBE_COLUMNS, RUN_COLUMNS,  # noqa: F401
                                    SCHEMA_VERSION, SCORE_COLUMNS, STATUSES, TABLES, TRAIN_COLUMNS, VARIANT_FIELDS)
from cartlab.results.variants import variant_of


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _backfill_variants(c: sqlite3.Connection) -> None:
    """Migration 2's data step: give every existing run its variant fields (`variants.variant_of`)."""
    cur = c.execute("SELECT * FROM runs")
    names = [d[0] for d in cur.description]
    for values in cur.fetchall():
        row = dict(zip(names, values))
        fields = variant_of(row)
        c.execute("UPDATE runs SET variant = ?, overrides = ?, variant_label = ? WHERE run_id = ?",
                  (fields["variant"], fields["overrides"], fields["variant_label"], row["run_id"]))


BACKFILLS: dict[int, Callable[[sqlite3.Connection], None]] = {2: _backfill_variants}
"""Python steps run after a migration's SQL, in the same transaction."""


class ResultsDB:
    """A results database file. Cheap to open; safe to share between processes.

    `readonly=True` opens an existing database without writing anything (no migration, no WAL
    switch, no -wal/-shm files when no writer has it open); an older schema still reads, its
    missing columns filled in `frame`."""

    def __init__(self, path: str | os.PathLike, timeout: float = 120.0, *, readonly: bool = False):
        self.path = Path(path)
        self.timeout = timeout
        self.readonly = readonly
        self.conn = None
        self._check_file()
        try:
            if readonly:
                self.conn = self._connect_readonly()
                self._version = self._check_schema()
            else:
                if not self.path.exists():
                    self._create()
                self.conn = self._connect()
                self._check_schema()  # before anything is written
                self._set_wal()
                self._migrate()
                self._version = SCHEMA_VERSION
                self._apply_pending()
        except sqlite3.Error as err:
            self._fail(self._explain(err))
        except ValueError:
            self.close()
            raise

    # -- opening ------------------------------------------------------------------------------------------------
    def _fail(self, message: str):
        self.close()
        raise ValueError(message) from None

    def _explain(self, err: sqlite3.Error) -> str:
        text = str(err)
        if "not a database" in text or "malformed" in text:
            return f"{self.path}: not a results database (SQLite says: {text})"
        if disk_full(err):
            return self.full_message(err)
        if self.readonly:
            return f"{self.path}: cannot read this results database ({text})"
        return (f"{self.path}: cannot write this results database ({text}); check the file and its folder are "
                f"writable and the disk has space, or read it with ResultsDB(path, readonly=True)")

    def full_message(self, err: sqlite3.Error, doing: str = "write this results database") -> str:
        """One line for a write the disk refused (`disk_full` or `write_failed`), naming the file."""
        return (f"{self.path}: no space left on the disk to {doing} (SQLite says: {err}); free space in "
                f"{self.path.parent} and run again")

    def _create(self) -> None:
        """Make a new database whole in a private file, then link it into place: no process ever
        opens it half-made (trainers starting at once into one new database would refuse an empty
        one). The first link wins, the others open what it made; a failed creation leaves nothing."""
        made = ResultsDB.__new__(ResultsDB)
        made.path, made.timeout, made.readonly, made.conn = \
            self.path.with_name(f".{self.path.name}.{os.getpid()}.new"), self.timeout, False, None
        try:
            made.conn = made._connect()
            made._set_wal()
            made._migrate()
            made.close()  # the last connection checkpoints: the whole database is in the file
            link_into_place(made.path, self.path)
        finally:
            made.close()
            for leftover in (made.path, *side_files(made.path)):
                leftover.unlink(missing_ok=True)

    def release_wal(self) -> None:
        """After a failed write: copy what is committed into the database and truncate the WAL to
        zero bytes (it holds the failed transaction's pages, which would keep a full disk full).
        Does nothing when it cannot (another connection is reading)."""
        if self.conn is None or self.readonly:
            return
        try:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error:
            pass

    def _check_file(self) -> None:
        """Refuse what cannot be a results database before SQLite touches it."""
        p = self.path
        if p.is_dir():
            raise ValueError(f"{p}: is a directory, not a results database file")
        if not p.exists():
            if self.readonly:
                raise ValueError(f"{p}: no such results database")
            try:
                p.parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise ValueError(f"{p}: cannot create the results database's folder {p.parent} "
                                 f"({err.strerror or err})") from None
            return
        try:
            with open(p, "rb") as f:
                head = f.read(len(SQLITE_HEADER))
        except OSError as err:
            raise ValueError(f"{p}: cannot read the results database ({err.strerror or err})") from None
        if head and head != SQLITE_HEADER:
            raise ValueError(f"{p}: not a results database (not an SQLite file)")
        if not head and self.readonly:
            raise ValueError(f"{p}: an empty file, not a results database")

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    def _set_wal(self) -> None:
        deadline = time.monotonic() + self.timeout
        while True:  # switching to WAL needs a moment of exclusive access
            try:
                self.conn.execute("PRAGMA journal_mode = WAL")
                break
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) and "busy" not in str(err):
                    raise
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.conn.execute("PRAGMA synchronous = NORMAL")

    def _connect_readonly(self) -> sqlite3.Connection:
        # `mode=ro` on a WAL database creates -wal and -shm files (and fails in a read-only folder).
        # Without a -wal file no connection has the database open and the file holds every commit,
        # so it is read as immutable: no locks, no side files. With one, a writer may be active: read
        # through its WAL with ordinary locking.
        uri = self.path.resolve().as_uri()
        wal = self.path.with_name(self.path.name + "-wal")
        query = "mode=ro" if wal.exists() else "mode=ro&immutable=1"
        conn = sqlite3.connect(f"{uri}?{query}", uri=True, timeout=self.timeout, isolation_level=None,
                               check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
        return conn

    def _check_schema(self) -> int:
        """The file's schema version (0 for a new, empty database), read without writing; a file
        that is another program's database or of a newer schema is refused."""
        tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            if self.readonly:
                raise ValueError(f"{self.path}: an empty SQLite database, not a results database")
            return 0
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() \
            if "meta" in tables else None
        if row is None or "runs" not in tables:
            shown = ", ".join(sorted(tables)[:6]) + (" ..." if len(tables) > 6 else "")
            raise ValueError(f"{self.path}: an SQLite database but not a cartlab results database "
                             f"(no schema_version; tables: {shown})")
        version = int(row[0])
        if version > SCHEMA_VERSION:
            raise ValueError(f"{self.path}: schema_version={version} is newer than this cartlab "
                             f"(supports <= {SCHEMA_VERSION}); upgrade cartlab")
        return version

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    @contextmanager
    def transaction(self):
        """One write transaction, taken eagerly (BEGIN IMMEDIATE) and rolled back on error."""
        if self.readonly:
            raise ValueError(f"{self.path}: opened read-only; open it with ResultsDB(path) to write")
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException as err:
            if self.conn.in_transaction:  # SQLite itself rolls back on a full disk
                self.conn.execute("ROLLBACK")
            if write_failed(err):
                self.release_wal()
            raise
        try:
            self.conn.execute("COMMIT")
        except sqlite3.Error as err:  # e.g. a full disk: never leave the transaction open for the next write
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            if write_failed(err):
                self.release_wal()
            raise

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
                if v in BACKFILLS:
                    BACKFILLS[v](c)
            if version != SCHEMA_VERSION:
                c.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    # -- statuses that could not be written (`cartlab.results.pending`) ---------------------------------------
    @property
    def pending_dir(self) -> Path:
        """Where status writes that failed wait for the next writable open: `<db>.pending/`."""
        return pending.folder(self.path)

    def _apply_pending(self) -> None:
        pending.apply(self)

    @property
    def schema_version(self) -> int:
        """The schema the file is at (a read-only reader may see an older one than SCHEMA_VERSION)."""
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
                if not row.get("variant"):  # every row has a variant: the analyses group by it
                    row.update({k: v for k, v in variant_of(row).items() if not row.get(k)})
                c.execute(f"INSERT INTO runs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                          tuple(row.values()))

    def set_status(self, run_id: str, status: str, message: str | None = None, step: int | None = None) -> bool:
        """Record a run's status; True when written. If the write fails (a full disk, an I/O
        error), the status is kept in `<db>.pending/<run>.json`, written atomically, and applied by
        the next writable open of this database; a warning says so and False is returned, so the
        caller can finish (or exit) without the run staying `running` for ever. Raises only if the
        sidecar cannot be written either."""
        if status not in STATUSES:
            raise ValueError(f"status={status!r} is not allowed; choose one of {list(STATUSES)}")
        fields: dict[str, Any] = {"status": status, "message": message}
        if step is not None:
            fields["step"] = step
        if status in ("completed", "diverged", "failed", "interrupted"):
            fields["finished_at"] = now()
        try:
            self.upsert_run(run_id, **fields)
        except sqlite3.OperationalError as err:
            try:
                saved = pending.save(self.path, run_id, {**fields, "updated_at": now()})
            except OSError as err2:
                raise ValueError(f"{self.path}: could not record status {status!r} of run {run_id} ({err}), nor "
                                 f"keep it for later in {self.pending_dir} ({err2.strerror or err2})") from err
            warnings.warn(f"{self.path}: could not record status {status!r} of run {run_id} ({err}); kept in "
                          f"{saved}, written when the database is next opened", RuntimeWarning, stacklevel=2)
            return False
        pending.forget(self.path, run_id)  # a newer status was written: an older pending one must never overwrite it
        return True

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
        """rows: dicts with task, metric, value, stderr, num_fewshot, n_loops and the fields of the
        protocol that produced them (`PROTOCOL_COLUMNS`: absent ones null, an absent protocol '')."""
        columns, blank = ("run_id", *SCORE_COLUMNS, "created_at"), {"num_fewshot": 0, "n_loops": 0, "protocol": ""}
        with self.transaction() as c:
            c.executemany(f"INSERT OR REPLACE INTO downstream ({', '.join(columns)}) VALUES "
                          f"({', '.join('?' * len(columns))})",
                          [(run_id, *(r.get(k, blank.get(k)) for k in SCORE_COLUMNS), now()) for r in rows])

    def log_probes(self, run_id: str, rows: Iterable[dict]) -> None:
        """rows: dicts with probe, step, metric, value and optionally split ('' when the probe is
        not per domain) and x (the probe's axis: inference R, S, loop index; 0 when it has none).
        Re-measuring replaces the rows of the same key."""
        rows = [(run_id, r["probe"], int(r["step"]), r.get("split") or "", float(r.get("x") or 0.0), r["metric"],
                 None if r["value"] is None else float(r["value"])) for r in rows]
        if rows:
            with self.transaction() as c:
                c.executemany("INSERT OR REPLACE INTO probes VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

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
            c.execute("DELETE FROM probes WHERE run_id = ? AND step > ?", (run_id, step))

    def replace_findings(self, study: str, rows: Iterable[dict], code_version: str | None) -> int:
        """Store what the report of `study` concluded (`cartlab.analysis.findings`), replacing the
        study's earlier findings in one transaction; returns the rows written."""
        rows = [tuple(r[k] for k in FINDING_COLUMNS) for r in rows]
        created = now()
        with self.transaction() as c:
            c.execute("DELETE FROM findings WHERE study = ?", (study,))
            c.executemany(f"INSERT INTO findings (study, {', '.join(FINDING_COLUMNS)}, code_version, created_at) "
                          f"VALUES ({', '.join('?' * (len(FINDING_COLUMNS) + 3))})",
                          [(study, *r, code_version, created) for r in rows])
        return len(rows)

    def findings(self, study: str | None = None) -> pd.DataFrame:
        """The stored findings (of `study`, or all), in the order they were written."""
        columns = ["study", *FINDING_COLUMNS, "code_version", "created_at"]
        if self._version < 4:  # an older file has none
            return pd.DataFrame(columns=columns)
        query, params = "SELECT * FROM findings", ()
        if study is not None:
            query, params = query + " WHERE study = ?", (study,)
        return pd.read_sql_query(query + " ORDER BY study, rowid", self.conn, params=params)[columns]

    # -- reading ------------------------------------------------------------------------------------------------
    def frame(self, table: str, run_ids: Iterable[str] | None = None) -> pd.DataFrame:
        if table not in TABLES:
            raise ValueError(f"table={table!r} is not allowed; choose one of {', '.join(TABLES)}")
        if table == "probes" and self._version < 3:  # an older file has none: an empty frame
            return pd.DataFrame(columns=["run_id", *PROBE_COLUMNS])
        query, params = f"SELECT * FROM {table}", ()
        if run_ids is not None:
            run_ids = list(run_ids)
            query += f" WHERE run_id IN ({', '.join('?' * len(run_ids))})"
            params = tuple(run_ids)
        by = ORDER[table] if self._version >= 5 else ORDER[table].replace(", protocol", "")  # older file
        frame = pd.read_sql_query(f"{query} ORDER BY {by}", self.conn, params=params)
        if table == "runs" and self._version < 2:  # a read-only reader of an older file: fill, don't migrate
            fields = [variant_of(r) for r in frame.to_dict("records")]
            for k in VARIANT_FIELDS:
                frame[k] = pd.Series([f[k] for f in fields], index=frame.index, dtype=object)
        for k in {"train_log": TRAIN_COLUMNS, "downstream": SCORE_COLUMNS}.get(table, ()):  # an older file's
            if k not in frame.columns:
                frame[k] = pd.Series("" if k == "protocol" else None, index=frame.index, dtype=object)
        return frame
