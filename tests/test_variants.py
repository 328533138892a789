"""Guards issue 12's scientific hazard and the results database's edges: a run's variant (its whole
resolved config minus the seed) is what groups runs as seeds, so a run made by setting a component
field by hand (model.state_gate=residual, no hooks) is never counted as a baseline seed by
`cartlab.analysis`; schema migration 2 backfills the variant of existing runs; readers open the
database read-only; bad paths are one clear error that leaves the file alone; a status write
that fails is applied on the next open.
Run: pytest tests/test_variants.py -q
"""
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cartlab import results
from cartlab.analysis import decompose, schema, stats
from cartlab.analysis.synthetic import eval_rows, run_row
from cartlab.results.db import MIGRATIONS, SCHEMA_VERSION, ResultsDB
from cartlab.train.config import TrainConfig

BASE_PPL = {1: 30.0, 2: 30.2}  # two baseline seeds: mean 30.1
RESIDUAL_PPL = 45.0  # far off: pooled into the baseline it would move its mean to 35.07


def cfg(*overrides):
    return TrainConfig.from_preset("smoke", list(overrides))


def row_of(c: TrainConfig, **extra) -> dict:
    """The runs row the training loop writes for config `c` (without training)."""
    m = c.model_config()
    return dict(
        name=c.run_name(), source="local", model=m.kind, d_model=m.d_model,
        prelude_layers=getattr(m, "prelude_layers", None), n_loops=getattr(m, "n_loops", None),
        n_layers=getattr(m, "n_layers", None), hooks=",".join(sorted(getattr(m, "hooks", ()))), seed=c.seed,
        stage=c.stage, stored_params=extra.pop("stored_params", 1e6), effective_params=2e6, tokens=1e6,
        status="completed", config_json={"train": c.to_dict(), "model": m.to_dict(), "identity": c.identity()},
        **extra,
    )


def write_store(path, runs: dict[str, tuple[TrainConfig, float]], stored=None) -> None:
    db = ResultsDB(path)
    try:
        for rid, (c, ppl) in runs.items():
            db.upsert_run(rid, **row_of(c, stored_params=(stored or {}).get(rid, 1e6)), **c.variant_fields())
            db.log_eval(rid, c.steps, {"prose": {"loss": float(np.log(ppl)), "ppl": ppl}})
    finally:
        db.close()


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "results.db"
    runs = {f"base-s{s}": (cfg(f"seed={s}"), v) for s, v in BASE_PPL.items()}
    runs["residual-s1"] = (cfg("seed=1", "model.state_gate=residual"), RESIDUAL_PPL)
    runs["no_lti-s1"] = (cfg("seed=1", "model.hooks=no_lti"), 31.0)
    runs["dense-s1"] = (cfg("seed=1", "dense_match=stored"), 29.0)
    write_store(path, runs)
    return path


# -- the acceptance test -----------------------------------------------------------------------------------
def test_a_field_set_by_hand_is_never_a_baseline_seed(store):
    runs, ev = results.runs(store), results.eval_log(store)
    by_id = runs.set_index("run_id")
    # the hazard is real: on the old configuration columns the residual run looks like a baseline seed
    pair = by_id.loc[["residual-s1", "base-s1"], list(schema.CONFIG_COLUMNS)].astype(str)
    assert (pair.nunique(dropna=False) == 1).all() and by_id.loc["residual-s1", "hooks"] == ""
    assert by_id.loc["residual-s1", "overrides"] == "state_gate=residual"
    assert by_id.loc["residual-s1", "variant"] != by_id.loc["base-s1", "variant"] == by_id.loc["base-s2", "variant"]
    assert by_id.loc["residual-s1", "variant_label"] == "cart d=64 P=2 R=3 {state_gate=residual}"
    assert list(schema.is_baseline(runs).loc[lambda m: m].index.map(runs.run_id)) == ["base-s1", "base-s2"]

    summary = stats.seed_summary(runs, ev).set_index("variant")
    base = summary.loc[by_id.loc["base-s1", "variant"]]
    assert base["n"] == 2 and base["mean"] == pytest.approx(30.1)
    res = summary.loc[by_id.loc["residual-s1", "variant"]]
    assert res["n"] == 1 and res["mean"] == RESIDUAL_PPL and "{state_gate=residual}" in res["config"]

    bands = stats.band_comparisons(runs, ev, split="prose").set_index("variant")
    assert set(bands["baseline"]) == {"cart d=64 P=2 R=3"} and "n=2 seeds" in bands.attrs["caveat"]
    assert bands.loc[by_id.loc["residual-s1", "variant"], "config"] == "cart d=64 P=2 R=3 {state_gate=residual}"
    assert bands.loc[by_id.loc["residual-s1", "variant"], "n"] == 1

    dec = decompose.decompose_gap(runs, ev, cart={"d_model": 64}, split="prose")
    assert dec.attrs["band"].n == 2 and dec.attrs["band"].mean == pytest.approx(30.1)
    lti = dec.set_index("component").loc["lti_gate"]
    assert lti["value"] == pytest.approx(30.1 - 31.0)  # the hook run, not the hand-set residual one
    total = dec[(dec.path == "stored") & (dec.component == "total")].iloc[0]
    assert total["value"] == pytest.approx(30.1 - 29.0)
    gaps = decompose.dense_gaps(runs, ev, cart={"d_model": 64})
    assert gaps["cart_n"].tolist() == [2] and gaps["cart"].tolist() == [pytest.approx(30.1)]


def test_two_baseline_variants_are_refused_not_pooled(tmp_path):
    path = tmp_path / "r.db"
    write_store(path, {"a-s1": (cfg("seed=1"), 30.0), "a-s2": (cfg("seed=2"), 30.2),
                       "b-s1": (cfg("seed=1", "optim.lr=1e-3"), 33.0), "b-s2": (cfg("seed=2", "optim.lr=1e-3"), 33.1)})
    runs, ev = results.runs(path), results.eval_log(path)
    with pytest.raises(ValueError, match=r"matches 2 different variants.*cart d=64 P=2 R=3 \(variant [0-9a-f]{12}\)"):
        decompose.decompose_gap(runs, ev, cart={"d_model": 64}, split="prose")
    summary = stats.seed_summary(runs, ev)
    assert sorted(summary["n"]) == [2, 2] and summary["config"].nunique() == 2  # labels told apart
    out = decompose.dense_gaps(runs, ev, cart={"variant": runs.variant[0]})  # choosing one by its key works
    assert out["cart_n"].tolist() == [2]


def test_frames_without_variants_get_them_from_their_columns():
    runs = pd.DataFrame([run_row("b0", seed=0), run_row("b1", seed=1),
                         run_row("g0", overrides="state_gate=residual")])
    ev = eval_rows({"b0": {"wiki": 20.0}, "b1": {"wiki": 20.2}, "g0": {"wiki": 25.0}}, step=10)
    schema.validate(runs.drop(columns="overrides"), "runs")  # the variant columns are optional
    full = schema.with_variants(runs)
    assert full.variant[0] == full.variant[1] != full.variant[2]
    assert full.variant_label[2] == "cart d=1024 P=6 R=6 {state_gate=residual}"
    out = stats.seed_summary(runs, ev).set_index("overrides")
    assert out.loc["", "n"] == 3 - 1 and out.loc["state_gate=residual", "n"] == 1
    with pytest.raises(ValueError, match="runs.variant: 'x' covers rows that differ in"):
        schema.validate(runs.assign(variant="x"), "runs")


# -- migration 2 -------------------------------------------------------------------------------------------
def old_database(path):
    """A database as cartlab wrote it at schema 1, with one local run of each kind and a published row."""
    conn = sqlite3.connect(path)
    conn.executescript(MIGRATIONS[1])
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    rows = {"base": cfg("seed=3"), "residual": cfg("seed=3", "model.state_gate=residual")}
    for rid, c in rows.items():
        r = row_of(c)
        r["config_json"] = json.dumps(r["config_json"])
        conn.execute(f"INSERT INTO runs (run_id, {', '.join(r)}, created_at, updated_at) "
                     f"VALUES (?, {', '.join('?' * len(r))}, 't0', 't0')", ("run-" + rid, *r.values()))
    conn.execute("INSERT INTO runs (run_id, name, source, model, d_model, prelude_layers, n_loops, hooks, stage, "
                 "status, created_at, updated_at) VALUES ('paper/x', 'x', 'published', 'cart', 1024, 6, 6, '', "
                 "'stage2', 'published', 't0', 't0')")
    conn.execute("INSERT INTO runs (run_id, name, model, d_model, prelude_layers, n_loops, status, config_json, "
                 "created_at, updated_at) VALUES ('hand', 'hand', 'cart', 32, 2, 3, 'completed', '{\"x\": 1}', 't0', 't0')")
    conn.execute("INSERT INTO eval_log VALUES ('run-base', 40, 'prose', 3.4, 30.0)")
    conn.commit()
    conn.close()
    return rows


def dump(path, table):
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        cur = conn.execute(f"SELECT * FROM {table} ORDER BY 1")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]
    finally:
        conn.close()


def test_migration_2_backfills_variants_and_changes_nothing_else(tmp_path):
    path = tmp_path / "old.db"
    cfgs = old_database(path)
    before = {t: dump(path, t) for t in ("runs", "train_log", "eval_log", "downstream", "artifacts")}
    db = ResultsDB(path)
    assert db.schema_version == SCHEMA_VERSION >= 2  # migrated to today's schema, through migration 2
    db.close()
    after = {t: dump(path, t) for t in before}
    runs = {r["run_id"]: r for r in after["runs"]}
    for rid, c in cfgs.items():
        got = {k: runs["run-" + rid][k] for k in ("variant", "overrides", "variant_label")}
        assert got == c.variant_fields()
    assert runs["run-residual"]["overrides"] == "state_gate=residual"
    assert runs["paper/x"]["variant"] == schema.config_variant(runs["paper/x"]) and runs["paper/x"]["overrides"] == ""
    assert runs["hand"]["variant"] == schema.config_variant(runs["hand"])  # no config to rebuild: its columns
    assert runs["hand"]["variant_label"] == "cart d=32 P=2 R=3 (variant from columns)"
    strip = [{k: v for k, v in r.items() if k not in ("variant", "overrides", "variant_label")} for r in after["runs"]]
    assert strip == before["runs"]
    added = ("n_loops", "flops", "forward_cost")  # migration 3's train_log columns, null on old rows
    assert all(r[k] is None for r in after["train_log"] for k in added)
    after["train_log"] = [{k: v for k, v in r.items() if k not in added} for r in after["train_log"]]
    assert {t: after[t] for t in after if t != "runs"} == {t: before[t] for t in before if t != "runs"}
    # a published run imported today gets the same variant as a backfilled one of the same columns
    pub = results.runs(path, source="published")
    assert schema.with_variants(pub.drop(columns=["variant"])).variant.tolist() == pub.variant.tolist()


# -- read-only readers -------------------------------------------------------------------------------------
def snapshot(path):
    return path.read_bytes(), os.stat(path).st_mtime_ns, sorted(os.listdir(path.parent))


def test_readers_open_read_only_and_leave_no_trace(store):
    before = snapshot(store)
    db = ResultsDB(store, readonly=True)
    assert len(db.frame("runs")) == 5 and len(db.frame("eval_log")) == 5
    with pytest.raises(ValueError, match="opened read-only"):
        db.upsert_run("x", status="running")
    db.close()
    assert len(results.runs(store)) == 5 and len(results.eval_log(store)) == 5
    assert snapshot(store) == before  # same bytes and mtime, and no -wal/-shm left behind


def test_a_reader_sees_a_running_writers_commits(store):
    writer = ResultsDB(store)
    try:
        writer.upsert_run("new", model="cart", d_model=64, status="running")
        assert "new" in set(results.runs(store).run_id)
    finally:
        writer.close()


def test_a_reader_of_an_older_schema_reads_without_migrating(tmp_path):
    path = tmp_path / "old.db"
    cfgs = old_database(path)
    before = snapshot(path)
    runs = results.runs(path).set_index("run_id")
    assert runs.loc["run-residual", "variant"] == cfgs["residual"].variant()
    assert runs.loc["run-residual", "overrides"] == "state_gate=residual"
    assert runs.loc["run-base", "variant_label"] == "cart d=64 P=2 R=3"
    assert snapshot(path) == before
    assert dump(path, "meta") == [{"key": "schema_version", "value": "1"}]


def test_a_missing_database_is_an_error_not_a_new_file(tmp_path):
    with pytest.raises(ValueError, match=r"nowhere/r.db: no such results database"):
        results.runs(tmp_path / "nowhere" / "r.db")
    assert not (tmp_path / "nowhere").exists()


READ_AS_ANOTHER_USER = """
import os, sys
from cartlab import results
from cartlab.results.db import ResultsDB
if os.geteuid() == 0:  # root writes through any permission bits: read as 'nobody' instead
    os.setgid(65534)
    os.setuid(65534)
print(len(results.runs(sys.argv[1])))
try:
    ResultsDB(sys.argv[1])
except ValueError as err:
    print(err)
"""


def test_a_read_only_database_in_a_read_only_folder_reads(store):
    """A read-only file in a read-only folder, read by a process the permissions bind (as root
    the test drops to 'nobody'): `results.runs` reads it, and a writer is refused in one line."""
    folder = Path(tempfile.mkdtemp(prefix="cartlab-ro-"))
    try:
        shutil.copy(store, folder / "results.db")
        (folder / "results.db").chmod(0o444)
        folder.chmod(0o555)
        proc = subprocess.run([sys.executable, "-c", READ_AS_ANOTHER_USER, str(folder / "results.db")],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        count, refusal = proc.stdout.strip().splitlines()
        assert count == "5"
        assert "results.db: cannot write this results database" in refusal
        assert sorted(p.name for p in folder.iterdir()) == ["results.db"]
    finally:
        folder.chmod(0o755)
        shutil.rmtree(folder)


# -- bad databases -----------------------------------------------------------------------------------------
def _other_sqlite(path):
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE photos (id INTEGER)")
    conn.commit()
    conn.close()


def _newer(path):
    db = ResultsDB(path)
    db.conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    db.close()


@pytest.mark.parametrize("make,message", [
    (lambda p: p.write_text("run_id,ppl\na,1\n"), r"bad.db: not a results database \(not an SQLite file\)"),
    (lambda p: p.write_bytes(b"SQLite format 3\x00" + b"\x07" * 200), r"bad.db: not a results database"),
    (_other_sqlite, r"bad.db: an SQLite database but not a cartlab results database \(no schema_version; tables: photos\)"),
    (_newer, rf"bad.db: schema_version={SCHEMA_VERSION + 1} is newer than this cartlab"),
    (lambda p: p.mkdir(), r"bad.db: is a directory, not a results database file"),
])
@pytest.mark.parametrize("readonly", [False, True])
def test_a_bad_database_is_one_line_and_left_alone(tmp_path, make, message, readonly):
    path = tmp_path / "bad.db"
    make(path)
    before = path.read_bytes() if path.is_file() else None
    with pytest.raises(ValueError, match=message) as err:
        ResultsDB(path, readonly=readonly)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    assert (path.read_bytes() if path.is_file() else None) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.db"]


def test_an_unwritable_location_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match=r"file/r.db: cannot create the results database's folder"):
        ResultsDB(blocker / "r.db")
    assert blocker.read_text() == "not a folder"


# -- a status write that fails ------------------------------------------------------------------------------
class FailingOnce:
    """A connection whose first write to `runs` fails like a full disk."""

    def __init__(self, conn):
        self.conn, self.failed = conn, False

    def execute(self, sql, *args):
        if not self.failed and sql.lstrip().upper().startswith("UPDATE RUNS"):
            self.failed = True
            raise sqlite3.OperationalError("database or disk is full")
        return self.conn.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self.conn, name)


def test_a_failed_status_write_is_applied_on_the_next_open(tmp_path):
    path = tmp_path / "r.db"
    db = ResultsDB(path)
    db.upsert_run("a", model="cart", d_model=64, status="running")
    db.conn = FailingOnce(db.conn)
    with pytest.warns(RuntimeWarning, match=r"could not record status 'completed' of run a \(database or disk is full\)"):
        assert db.set_status("a", "completed", step=40) is False
    db.conn = db.conn.conn
    assert db.get_run("a")["status"] == "running"
    assert [p.name for p in db.pending_dir.iterdir()] == ["a.json"]
    db.close()
    assert results.runs(path).status.tolist() == ["running"]  # a reader does not write
    db = ResultsDB(path)  # the next writable open applies it
    row = db.get_run("a")
    assert (row["status"], row["step"]) == ("completed", 40) and row["finished_at"]
    assert not db.pending_dir.exists()
    db.close()


def test_a_later_status_replaces_a_pending_one(tmp_path):
    path = tmp_path / "r.db"
    db = ResultsDB(path)
    db.upsert_run("a/b", model="cart", d_model=64, status="running")
    db.conn = FailingOnce(db.conn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert db.set_status("a/b", "failed", "disk") is False
    assert db.set_status("a/b", "completed") is True  # written: the older pending status must not win
    assert not list(db.pending_dir.iterdir())
    db.conn = db.conn.conn
    db.close()
    db = ResultsDB(path)
    assert db.get_run("a/b")["status"] == "completed"
    db.close()


def test_scaling_fits_and_radius_tables_never_average_two_variants():
    import matplotlib

    matplotlib.use("Agg")
    from cartlab.analysis import plots, scaling, spectral

    widths = {256: 40.0, 512: 27.0, 1024: 20.0}
    rows = [run_row(f"b{d}-s{s}", d_model=d, seed=s) for d in widths for s in (0, 1)]
    ppl = {f"b{d}-s{s}": {"wiki": v + 0.1 * s} for d, v in widths.items() for s in (0, 1)}
    rows.append(run_row("res512", d_model=512, overrides="state_gate=residual"))
    ppl["res512"] = {"wiki": 60.0}
    runs, ev = pd.DataFrame(rows), eval_rows(ppl, step=10)
    fe = schema.final_eval(runs, ev)
    fits = scaling.fit_groups(fe, by=["stage", "model", "n_loops"])  # the residual run is its own (thin) group
    clean = scaling.fit_groups(fe[schema.is_baseline(fe)], by=["stage", "model", "n_loops"])
    assert len(fits) == 1 and fits["overrides"].tolist() == [""] and fits["b"].item() == pytest.approx(clean["b"].item())

    lr = pd.DataFrame(rows[:-1] + [run_row("lr512", d_model=512, variant="0123456789ab", variant_label="cart lr=1e-3")])
    ppl_lr = {**ppl, "lr512": {"wiki": 26.0}}
    fe = schema.final_eval(lr, eval_rows(ppl_lr, step=10))
    with pytest.raises(ValueError, match=r"several variants at d_model=512.*cart lr=1e-3 \(variant 0123456789ab\)"):
        scaling.fit_groups(fe)
    with pytest.raises(ValueError, match=r"d_model=512 holds several variants"):
        plots.plot_scaling_fit(lr, eval_rows(ppl_lr, step=10), where={"stage": "stage2"})
    log = pd.DataFrame({"run_id": lr.run_id, "step": 10, "rho_max": 0.8}).reindex(columns=list(schema.TRAIN_LOG_COLUMNS))
    with pytest.raises(ValueError, match=r"d_model=512, n_loops=6 holds several variants"):
        spectral.radius_table(lr, log)
    assert spectral.radius_table(runs, log.assign(run_id=runs.run_id), where={"overrides": ""}).shape == (3, 1)
