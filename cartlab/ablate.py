"""`cartlab ablate STUDY`: train every run of a study by executing notebooks/train_variant.ipynb.

    cartlab ablate cpu-demo                          # ablations/cpu-demo.yaml
    cartlab ablate paper-diagnostics --workers 4     # four runs at a time (one GPU each if present)
    cartlab ablate my_study.yaml --db lab.db optim.lr=1e-3   # overrides apply to every run
    cartlab ablate cpu-demo --list                   # each run: completed, running, interrupted, failed or pending
    cartlab ablate paper-diagnostics --launcher slurm   # one Slurm job per run (cartlab.cluster)

Each run's executed notebook is kept as reports/<study>/runs/<run_id>.ipynb. Runs already
completed in the results database are skipped, so after a crash or a kill the same command
redoes only what is unfinished (an interrupted run resumes from its newest checkpoint).

`--launcher slurm` (or `submitit-local`) trains each run as its own job instead, with the study's
`slurm:` resources, into a shard database that is merged into the study's as the job finishes
(see cartlab.cluster); those jobs draw no notebook (`cartlab ablate STUDY` later draws them).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from cartlab.cluster import LAUNCHERS, Outcome
from cartlab.studies import StudyRun, load_study


def study_runs(study: str, overrides: list[str] | None = None) -> tuple[str, list[StudyRun]]:
    """(study name, its runs), each run's config with `overrides` applied; a run listed twice
    (e.g. the same config reached from two entries) appears once."""
    s = load_study(study)
    unique: dict[str, StudyRun] = {}
    for run in s.expand(overrides):
        unique.setdefault(run.run_id, run)
    return s.name, list(unique.values())


STATES = ("completed", "running", "interrupted", "failed", "diverged", "pending")
"""What `cartlab ablate STUDY --list` says of a run: completed; running (a live process holds the
run's lock and trains it now); interrupted (its row says running or interrupted but no live process
holds it, or it left a checkpoint and no row); failed or diverged (its row says so); pending
(nothing of it yet)."""


def run_lock(run: StudyRun) -> Path:
    """The lock a live trainer holds on `run` (`cartlab.train.loop`'s `_run_lock`)."""
    return Path(f"{run.config.results_db}.locks") / run.run_id.replace(os.sep, "_")


def lock_held(path: Path) -> bool:
    """True when a live process holds the `cartlab.filelock` lock `path`; creates nothing. The
    probe takes the lock for an instant when it is free (a trainer starting in that instant
    would be refused, as for any second holder); False where there is no fcntl."""
    try:
        import fcntl
    except ImportError:
        return False
    try:
        handle = open(path, "rb")
    except OSError:  # no lock file: never trained here
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def run_states(runs: list[StudyRun]) -> dict[str, tuple[str, str]]:
    """{run_id: (state, detail)} for `--list`, one of `STATES`; detail is how far a run got
    (`step 120/200`) or why it failed. Reads each results database read-only: a missing one
    means nothing has run, and nothing is created."""
    from cartlab.checkpoint import latest
    from cartlab.results.db import ResultsDB

    rows: dict[str, dict] = {}
    for path in {str(r.config.results_db) for r in runs}:
        if not Path(path).is_file() or Path(path).stat().st_size == 0:  # none yet, or being created now
            continue
        db = ResultsDB(path, readonly=True)
        try:
            for r in runs:
                if str(r.config.results_db) == path:
                    row = db.get_run(r.run_id)
                    if row is not None:
                        logged = db.conn.execute("SELECT MAX(step) FROM train_log WHERE run_id = ?",
                                                 (r.run_id,)).fetchone()[0]
                        rows[r.run_id] = {**row, "step": max(row["step"] or 0, logged or 0)}
        finally:
            db.close()
    states = {}
    for r in runs:
        row = rows.get(r.run_id)
        status = row["status"] if row else None
        at = f"step {row['step']}/{r.config.steps}" if row else ""
        if status == "completed":
            states[r.run_id] = ("completed", "")
        elif lock_held(run_lock(r)):
            states[r.run_id] = ("running", at)
        elif status in ("running", "interrupted"):  # and no live process holds it: killed, or stopped
            states[r.run_id] = ("interrupted", at)
        elif row is not None:  # failed or diverged: the row's message says why
            states[r.run_id] = (status, row["message"] or at)
        elif (ckpt := latest(Path(r.config.out_dir) / r.run_id / "checkpoints")) is not None:
            states[r.run_id] = ("interrupted", f"checkpoint {ckpt.name}, no database row")
        else:
            states[r.run_id] = ("pending", "")
    return states


def pending(runs: list[StudyRun]) -> list[StudyRun]:
    """The runs not completed in their results database."""
    from cartlab.results.db import ResultsDB

    todo = []
    for run in runs:
        db = ResultsDB(run.config.results_db)
        try:
            row = db.get_run(run.run_id)
        finally:
            db.close()
        if row is None or row["status"] != "completed":
            todo.append(run)
    return todo


def final_metrics(run: StudyRun) -> str:
    """A completed run's final validation losses, `val iteration 2.87, prose 4.10` ('' if none)."""
    from cartlab.results.db import ResultsDB

    db = ResultsDB(run.config.results_db, readonly=True)
    try:
        ev = db.frame("eval_log", [run.run_id])
    finally:
        db.close()
    if ev.empty:
        return ""
    last = ev[ev.step == ev.step.max()]
    return "val " + ", ".join(f"{r.split} {r.loss:.3f}" for r in last.itertuples())


def notebook_of(run: StudyRun, study: str, reports_dir: Path) -> Path:
    """Where the executed train_variant notebook of `run` is kept."""
    return reports_dir / study / "runs" / f"{run.run_id}.ipynb"


def execute_run(run: StudyRun, study: str, reports_dir: Path) -> Outcome:
    """Execute train_variant for one run; never raises for a failing run (the outcome says)."""
    from cartlab.notebooks import execute

    out = notebook_of(run, study, reports_dir)
    cfg = run.config
    cfg.quiet = True
    t0 = time.time()
    try:
        execute("train_variant", out, {"config_yaml": cfg.to_yaml(), "label": run.label, "study": study})
        return Outcome(run, True, time.time() - t0, out)
    except Exception as err:  # noqa: BLE001 -- a failed run is reported, the study goes on
        return Outcome(run, False, time.time() - t0, out.with_name(f"{out.stem}.failed.ipynb"),
                       _last_line(err))


def _last_line(err: Exception) -> str:
    lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__


class StepWatcher:
    """While runs train in notebook kernels (other processes), read how far each has got from
    the results database every `interval` seconds (their newest train-log step) and hand
    {run_id: step} to `show`. Read-only: it never blocks or changes a writer."""

    def __init__(self, db: str | os.PathLike | None, show, interval: float = 2.0):
        import threading

        self.db, self.show, self.interval = db, show, interval
        self.active: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True) if db else None  # None: watch nothing

    def __enter__(self):
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def steps(self) -> dict[str, int]:
        import sqlite3

        from cartlab.results.db import ResultsDB

        ids = sorted(self.active)
        if not ids or not Path(self.db).is_file():
            return {}
        try:
            db = ResultsDB(self.db, readonly=True)
        except ValueError:  # not created yet by the first run
            return {}
        try:
            rows = db.conn.execute(f"SELECT run_id, MAX(step) FROM train_log WHERE run_id IN "
                                   f"({', '.join('?' * len(ids))}) GROUP BY run_id", ids).fetchall()
        except sqlite3.Error:  # a writer mid-migration: try again next time
            rows = []
        finally:
            db.close()
        return {rid: int(step) for rid, step in rows}

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.show(self.steps())


def phase(step: int, steps: int) -> str:
    """What a run in a notebook kernel is doing, from its newest logged train step: `120/200`
    while it trains; after its last step, the final evaluation, the measures (e.g. the depth
    profile) and the notebook's plots, which the train log cannot tell apart."""
    return f"{step}/{steps}" if step < steps else "final eval, measures"


def worker_env(index: int, n_workers: int, gpus: list[str], cpu_count: int) -> dict[str, str]:
    """Environment of worker `index`: one GPU each (round robin) when there are GPUs, else an
    equal share of the CPU threads so that workers do not oversubscribe the cores."""
    if gpus:
        return {"CUDA_VISIBLE_DEVICES": gpus[index % len(gpus)]}
    return {"OMP_NUM_THREADS": str(max(1, cpu_count // n_workers))}


def visible_gpus() -> list[str]:
    """The GPU ids this process may use (CUDA_VISIBLE_DEVICES order), [] without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return []
    listed = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    return listed or [str(i) for i in range(torch.cuda.device_count())]


def _init_worker(slot, n_workers: int, gpus: list[str]) -> None:
    with slot.get_lock():
        index = slot.value
        slot.value += 1
    env = worker_env(index, n_workers, gpus, os.cpu_count() or 1)
    if "OMP_NUM_THREADS" in os.environ:  # the user's choice wins
        env.pop("OMP_NUM_THREADS", None)
    os.environ.update(env)  # the notebook kernel inherits it


def ablate(study: str, overrides: list[str] | None = None, *, workers: int = 1, reports_dir: str | Path = "reports",
           progress: bool = True, log=print, launcher: str = "local", jobs: dict | None = None,
           next_hint: bool = True) -> list[Outcome]:
    """Train every unfinished run of `study`, `workers` at a time, or as cluster jobs (`launcher`
    slurm or submitit-local; `jobs`: keyword arguments of `cartlab.cluster.run_jobs`); returns the
    outcomes of the runs attempted (completed ones are skipped and not listed). `next_hint`: end
    with the `cartlab report` line (a caller that renders the report itself turns it off)."""
    from tqdm.auto import tqdm

    if workers < 1:
        raise ValueError(f"--workers: must be >= 1, got {workers}")
    name, runs = study_runs(study, overrides)
    reports_dir = Path(reports_dir)
    to_train = pending(runs)
    # a run completed by another study, by `cartlab train`, or killed while its notebook was being
    # written has no executed notebook here: execute it (training is skipped, the plots are drawn)
    train_ids = {r.run_id for r in to_train}
    to_render = [r for r in runs if r.run_id not in train_ids and not notebook_of(r, name, reports_dir).is_file()
                 and launcher == "local"]
    todo = to_train + to_render
    if to_train:  # build missing offline data once, here, rather than racing in every worker
        from cartlab.data import resolve_data

        for cfg in {repr(r.config.data): r.config for r in to_train}.values():
            resolve_data(cfg.data, progress=progress)
    log(f"cartlab: study {name}: {len(runs)} runs, {len(runs) - len(to_train)} already completed, "
        f"{len(to_train)} to train" + (f", {len(to_render)} completed without their notebook (no training)"
                                       if to_render else ""))
    bar = tqdm(total=len(runs), initial=len(runs) - len(todo), desc=f"ablate {name}", unit="run",
               disable=not progress, dynamic_ncols=True)
    outcomes = []
    by_id = {r.run_id: r for r in todo}
    dbs = {str(r.config.results_db) for r in todo}
    watched = progress and len(dbs) == 1 and launcher == "local"  # cluster jobs write shards, not the db
    watcher = StepWatcher(next(iter(dbs)) if watched else None, lambda steps: show(steps))

    def show(steps: dict[str, int]) -> None:  # inside each running run: its newest logged step, or its phase
        bar.set_postfix_str(", ".join(f"{by_id[rid].label} s{by_id[rid].seed} {phase(step, by_id[rid].config.steps)}"
                                      for rid, step in sorted(steps.items()) if rid in watcher.active))

    def report(o: Outcome) -> None:
        outcomes.append(o)
        watcher.active.discard(o.run.run_id)
        bar.update(1)
        what = "trained" if o.run.run_id in train_ids else "notebook drawn"
        state = f"{what} in {o.seconds / 60:.1f} min" if o.ok else f"FAILED ({o.error})"
        bar.write(f"  {o.run.label} seed {o.run.seed} [{o.run.run_id}]: {state} -> {o.notebook}")

    try:
        with watcher:
            if launcher != "local":
                from cartlab.cluster import run_jobs

                for outcome in run_jobs(todo, name, launcher, load_study(study).slurm, reports_dir,
                                        log=bar.write, **(jobs or {})):
                    report(outcome)
            elif workers == 1 or len(todo) <= 1:
                for run in todo:
                    watcher.active = {run.run_id}
                    bar.set_postfix_str(run.label)
                    report(execute_run(run, name, reports_dir))
            else:
                import multiprocessing as mp
                from concurrent.futures import ProcessPoolExecutor, as_completed

                watcher.active = set(by_id)
                ctx = mp.get_context("spawn")
                slot = ctx.Value("i", 0)
                with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                         initargs=(slot, workers, visible_gpus())) as pool:
                    futures = [pool.submit(execute_run, run, name, reports_dir) for run in todo]
                    for fut in as_completed(futures):
                        report(fut.result())
    finally:
        bar.close()
    failed = [o for o in outcomes if not o.ok]
    trained = sum(o.ok and o.run.run_id in train_ids for o in outcomes)
    drawn = sum(o.ok and o.run.run_id not in train_ids for o in outcomes)
    log(f"cartlab: study {name}: {trained} trained, " + (f"{drawn} notebooks drawn, " if drawn else "")
        + f"{len(failed)} failed" + (f" (see {', '.join(str(o.notebook) for o in failed)})" if failed else ""))
    if not failed and next_hint:
        db = runs[0].config.results_db if runs else "runs/results.db"
        log(f"cartlab: next: cartlab report {study}" + (f" --db {db}" if str(db) != "runs/results.db" else ""))
    return outcomes


def register(subparsers) -> None:
    p = subparsers.add_parser("ablate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", help="a study name under ablations/ or a path to a study YAML")
    p.add_argument("overrides", nargs="*", metavar="FIELD=VALUE", help="dotted overrides for every run")
    p.add_argument("--db", help="results database for every run (default: the preset's, runs/results.db)")
    p.add_argument("--workers", type=int, default=1,
                   help="runs executed at once (default 1); each worker gets one GPU, or a share of the CPU cores")
    p.add_argument("--reports-dir", default="reports", help="where executed notebooks go (default: reports)")
    p.add_argument("--list", action="store_true",
                   help="list the runs and their state (completed, running: a live process trains it; interrupted; "
                        "failed; pending), train nothing and create nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--launcher", choices=LAUNCHERS, default="local",
                   help="local (default): notebooks on this machine; slurm: one job per run with the study's "
                        "slurm: resources; submitit-local: those jobs as local processes")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"results_db={args.db}"] if args.db else [])
    if args.list:
        name, runs = study_runs(args.study, overrides)
        states = run_states(runs)
        width = max(len(s) for s in STATES)
        for r in runs:
            state, detail = states[r.run_id]
            detail = final_metrics(r) if state == "completed" else detail
            print(f"{state:<{width}}  {r.label:<24} seed {r.seed:<4} {r.run_id}" + (f"  {detail}" if detail else ""))
        return 0
    outcomes = ablate(args.study, overrides, workers=args.workers, reports_dir=args.reports_dir,
                      progress=not args.quiet, launcher=args.launcher)
    return 1 if any(not o.ok for o in outcomes) else 0

