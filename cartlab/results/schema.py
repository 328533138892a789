"""The results database's schema, in one place: its tables' DDL and migrations, the status values,
and every column list the database and the analyses use.

`cartlab.results.db` creates and migrates the tables from `MIGRATIONS`; `cartlab.analysis.schema`
reads its frames' columns from here (a frame is a table's analysed columns: `FRAMES`). Imports
nothing from cartlab, so any layer may read it.
"""
from __future__ import annotations

STATUSES = ("running", "completed", "interrupted", "diverged", "failed", "published")
SCHEMA_VERSION = 5

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
    # the variant: what groups runs as seeds of one configuration (the identity minus the seed)
    2: """
    ALTER TABLE runs ADD COLUMN variant TEXT;
    ALTER TABLE runs ADD COLUMN overrides TEXT NOT NULL DEFAULT '';
    ALTER TABLE runs ADD COLUMN variant_label TEXT;
    CREATE INDEX runs_variant ON runs (variant);
    """,
    # what a step trained with and spent; measurements of trained models (cartlab.train.measures)
    3: """
    ALTER TABLE train_log ADD COLUMN n_loops INTEGER;
    ALTER TABLE train_log ADD COLUMN flops REAL;
    ALTER TABLE train_log ADD COLUMN forward_cost REAL;
    CREATE TABLE probes (
        run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE, probe TEXT NOT NULL,
        step INTEGER NOT NULL, split TEXT NOT NULL DEFAULT '', x REAL NOT NULL DEFAULT 0,
        metric TEXT NOT NULL, value REAL, PRIMARY KEY (run_id, probe, step, split, x, metric)
    );
    """,
    # what a study's report concluded (cartlab.analysis.findings): one row per claim and domain
    4: """
    CREATE TABLE findings (
        study TEXT NOT NULL, analysis TEXT NOT NULL, claim TEXT NOT NULL, a TEXT NOT NULL,
        b TEXT NOT NULL DEFAULT '', split TEXT NOT NULL, metric TEXT NOT NULL, effect REAL, low REAL,
        high REAL, n_a INTEGER NOT NULL, n_b INTEGER NOT NULL, verdict TEXT NOT NULL,
        note TEXT NOT NULL DEFAULT '', code_version TEXT, created_at TEXT NOT NULL,
        PRIMARY KEY (study, analysis, claim, a, b, split, metric)
    );
    """,
    # the protocol that produced each downstream score (cartlab.eval.protocol): part of its key, so one
    # checkpoint's scores under two protocols are two rows; rows from before carry protocol ''
    5: """
    CREATE TABLE downstream_v5 (
        run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE, task TEXT NOT NULL,
        metric TEXT NOT NULL, value REAL, stderr REAL, num_fewshot INTEGER NOT NULL DEFAULT 0,
        n_loops INTEGER NOT NULL DEFAULT 0, created_at TEXT, protocol TEXT NOT NULL DEFAULT '',
        task_version TEXT, task_hash TEXT, lm_eval_version TEXT, fewshot_seed INTEGER, chat_template TEXT,
        system_prompt TEXT, batch_size INTEGER, limit_docs REAL, dtype TEXT, exit_rule TEXT, step INTEGER,
        PRIMARY KEY (run_id, task, metric, num_fewshot, n_loops, protocol)
    );
    INSERT INTO downstream_v5 (run_id, task, metric, value, stderr, num_fewshot, n_loops, created_at)
        SELECT run_id, task, metric, value, stderr, num_fewshot, n_loops, created_at FROM downstream;
    DROP TABLE downstream;
    ALTER TABLE downstream_v5 RENAME TO downstream;
    """,
}
VARIANT_FIELDS = ("variant", "overrides", "variant_label")

RUN_COLUMNS = ("run_id", "name", "source", "model", "d_model", "prelude_layers", "n_loops", "n_layers", "hooks",
               "seed", "n_seeds", "stage", "stored_params", "effective_params", "tokens", "step", "status",
               "message", "config_json", "hardware_json", "software_json", "git_commit", "created_at",
               "updated_at", "finished_at", *VARIANT_FIELDS)
TRAIN_COLUMNS = ("step", "loss", "grad_norm", "lr", "rho_max", "rho_mean", "hyper_weights", "tokens_per_s", "mfu",
                 "memory_mb", "n_loops", "flops", "forward_cost")
PROBE_COLUMNS = ("probe", "step", "split", "x", "metric", "value")
FINDING_COLUMNS = ("analysis", "claim", "a", "b", "split", "metric", "effect", "low", "high", "n_a", "n_b", "verdict",
                   "note")
PROTOCOL_COLUMNS = ("protocol", "task_version", "task_hash", "lm_eval_version", "fewshot_seed", "chat_template",
                    "system_prompt", "batch_size", "limit_docs", "dtype", "exit_rule", "step")
"""What a downstream score was produced under (`cartlab.eval.protocol.Protocol`); `protocol` is the
key of the rest (few-shot count and loop count included), '' for a score stored before schema 5."""
SCORE_COLUMNS = ("task", "metric", "value", "stderr", "num_fewshot", "n_loops", *PROTOCOL_COLUMNS)
"""A downstream row's columns besides run_id and created_at."""
TABLES = ("runs", "train_log", "eval_log", "downstream", "artifacts", "probes")

ORDER = {"runs": "created_at, run_id", "train_log": "run_id, step", "eval_log": "run_id, step, split",
         "downstream": "run_id, task, metric, num_fewshot, n_loops, protocol", "artifacts": "run_id, kind, path",
         "probes": "run_id, probe, step, split, x, metric"}
"""How `ResultsDB.frame` orders each table's rows."""

# -- the analysed frames (`cartlab.analysis.schema`): the columns each analysis may rely on ------------------
RUNS_COLUMNS = ("run_id", "name", "source", "model", "d_model", "prelude_layers", "n_loops", "n_layers",
                "hooks", "seed", "n_seeds", "stage", "stored_params", "effective_params", "tokens", "status",
                *VARIANT_FIELDS)
TRAIN_LOG_COLUMNS = ("run_id", "step", "loss", "grad_norm", "lr", "rho_max", "rho_mean", "tokens_per_s", "mfu")
EVAL_LOG_COLUMNS = ("run_id", "step", "split", "loss", "ppl")
DOWNSTREAM_COLUMNS = ("run_id", "task", "metric", "value", "stderr", "num_fewshot", "n_loops", "protocol")
PROBES_COLUMNS = ("run_id", *PROBE_COLUMNS)
FRAMES = {
    "runs": RUNS_COLUMNS,
    "train_log": TRAIN_LOG_COLUMNS,
    "eval_log": EVAL_LOG_COLUMNS,
    "downstream": DOWNSTREAM_COLUMNS,
    "probes": PROBES_COLUMNS,
}
"""frame -> its columns: what `cartlab.analysis.schema.validate` checks and the paper's tables fill."""

# The columns that describe a configuration. They do NOT identify one (a learning rate or a component
# field set by hand is in none of them): runs are seeds of one configuration iff their `variant` is
# equal. For rows without a variant of their own (the paper's tables, synthetic frames, a hand-made
# row) the variant is a hash of these columns and `overrides` (`cartlab.results.variants.config_variant`).
CONFIG_COLUMNS = ("source", "model", "d_model", "prelude_layers", "n_loops", "n_layers", "hooks", "stage")


def _check_frames() -> None:
    """Every analysed column is a column of its table (the frames are views of the database)."""
    stored = {"runs": RUN_COLUMNS, "train_log": ("run_id", *TRAIN_COLUMNS), "probes": ("run_id", *PROBE_COLUMNS),
              "eval_log": EVAL_LOG_COLUMNS, "downstream": ("run_id", *SCORE_COLUMNS)}
    for frame, columns in FRAMES.items():
        extra = [c for c in columns if c not in stored[frame]]
        assert not extra, f"frame {frame}: columns {extra} are not in its table"
    assert set(CONFIG_COLUMNS) <= set(RUN_COLUMNS)


_check_frames()
