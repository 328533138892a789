"""Studies beyond one machine: `cartlab ablate STUDY --launcher slurm` runs every run as its own
cluster job through submitit, and folds each job's results into the study's database.

    cartlab ablate paper-diagnostics --launcher slurm           # resources: the study's `slurm:` section
    cartlab ablate cpu-demo --launcher submitit-local           # the same jobs as local processes (tests)

A job trains one run with `cartlab.train.train` (no notebook kernel: the job's own process gets
the scheduler's signals) into the run's *shard*, `<out_dir>/<run_id>/results.db`, next to its
checkpoints, because many nodes must not write one SQLite file over NFS (its locking is not
reliable there). As each job finishes, ablate merges its shard into the study database
(`cartlab.results.merge`), so `cartlab report STUDY` works as after a local study.

Jobs survive the cluster's interruptions:
- time-out or preemption: Slurm signals the job (USR2) shortly before; submitit calls
  `TrainJob.checkpoint`, which requeues the same job, and the requeued job resumes the run from
  its newest checkpoint (bit-identically, `tests/test_train_resume.py`); `slurm.requeues` bounds
  the time-outs;
- a job that dies another way (killed, SIGTERM, a lost node) is resubmitted by ablate, at most
  `slurm.requeues` times; a job whose training raised an error is reported failed, not retried.

If ablate itself stops, its jobs go on: run the same command again and it merges what finished
(a shard whose run is completed is merged without a new job), and a second job for a run still
training is refused by the run's lock.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cartlab.config import Config, field

LAUNCHERS = ("local", "slurm", "submitit-local")
"""`local`: notebooks in worker processes on this machine (cartlab.ablate); `slurm`: one Slurm
job per run; `submitit-local`: the same jobs as local processes (submitit's LocalExecutor), for
tests and for trying a cluster study on one machine."""


@dataclass
class SlurmConfig(Config):
    """A study's cluster resources (`slurm:` in its YAML): what every run's job asks for."""

    gpus_per_run: int = field(1, ge=0)
    """GPUs of one run's job, on one node; one task per GPU (DDP), one task for a CPU job (0)."""
    cpus_per_task: int = field(8, ge=1)
    """CPU cores of each task."""
    mem_gb: float | None = field(None, gt=0, none="null: the partition's default")
    """Memory of the job's node share, in GB."""
    time_min: int = field(24 * 60, gt=0)
    """Time limit of one job, in minutes; a run that needs longer is requeued on time-out and
    resumes from its newest checkpoint."""
    partition: str | None = field(None, none="null: the cluster's default partition")
    account: str | None = field(None, none="null: your default account")
    requeues: int = field(3, ge=0)
    """How often a run's job may time out and be requeued, and how often a job that died (killed,
    lost node) is resubmitted."""
    extra: dict = field(default_factory=dict)
    """Further sbatch options, e.g. {constraint: a100, qos: high} (submitit's additional_parameters)."""


@dataclass
class Outcome:
    """How one run of a study ended, local or as a job: `run` (a `cartlab.studies.StudyRun`),
    whether it completed, its wall time, its notebook or job log, and the error when it did not."""

    run: Any
    ok: bool
    seconds: float
    notebook: Path
    error: str = ""


def shard_of(run) -> Path:
    """Where the cluster job of `run` (a StudyRun) writes its results: `<out_dir>/<run_id>/results.db`."""
    return Path(run.config.out_dir).resolve() / run.run_id / "results.db"


@dataclass
class TrainJob:
    """One run as a submitit job: train `config` (a TrainConfig dict whose results_db is the
    run's shard). A known unfinished run resumes from its newest checkpoint by itself, so a
    requeued or resubmitted job is the same job again."""

    config: dict

    def __call__(self) -> str:
        """'completed', or 'interrupted' when SIGTERM stopped training (checkpointed: resubmit)."""
        from cartlab.train import TrainConfig, train
        from cartlab.train.loop import TrainingInterrupted

        _export_distributed_env()
        try:
            train(TrainConfig.from_dict(self.config))
        except TrainingInterrupted:
            return "interrupted"
        return "completed"

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on time-out or preemption: requeue this job unchanged (training
        checkpoints every `checkpoint_every` steps; the requeued job resumes from the newest)."""
        import submitit

        return submitit.helpers.DelayedSubmission(self)


def _export_distributed_env() -> None:
    """A job of several tasks (gpus_per_run > 1) is one run over its GPUs (DDP, or FSDP2 with the
    study's `set: {parallel: fsdp}`): give torch.distributed the
    RANK, WORLD_SIZE, MASTER_ADDR, ... the training loop reads."""
    import submitit

    env = submitit.JobEnvironment()
    if env.num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def executor(launcher: str, folder: Path, slurm: SlurmConfig, name: str):
    """A submitit executor for `launcher` with the study's resources."""
    try:
        import submitit
    except ImportError:
        raise ValueError(f"--launcher {launcher} needs submitit: pip install 'cartlab[cluster]'") from None
    tasks = max(1, slurm.gpus_per_run)
    if launcher == "slurm":
        try:
            ex = submitit.SlurmExecutor(folder, max_num_timeout=slurm.requeues)
        except RuntimeError as err:  # no srun here: not a Slurm machine
            raise ValueError(f"--launcher slurm: {err}") from None
        ex.update_parameters(job_name=name, time=slurm.time_min, nodes=1, ntasks_per_node=tasks,
                             gpus_per_node=slurm.gpus_per_run or None, cpus_per_task=slurm.cpus_per_task,
                             mem=f"{slurm.mem_gb:g}GB" if slurm.mem_gb else None, partition=slurm.partition,
                             account=slurm.account, additional_parameters=dict(slurm.extra) or None,
                             signal_delay_s=120)
    elif launcher == "submitit-local":
        ex = submitit.LocalExecutor(folder, max_num_timeout=slurm.requeues)
        ex.update_parameters(timeout_min=slurm.time_min, tasks_per_node=tasks, gpus_per_node=slurm.gpus_per_run)
    else:
        raise ValueError(f"--launcher {launcher} is not allowed: choose one of {', '.join(LAUNCHERS[1:])} "
                         f"(or local)")
    return ex


def job_config(run) -> dict:
    """The run's TrainConfig for its job: results into its shard, absolute paths (a job may start
    in another folder), no progress bar in the job's log."""
    from cartlab.train import TrainConfig

    return TrainConfig.from_dict(run.config.to_dict(), [f"results_db={shard_of(run)}",
                                                        f"out_dir={Path(run.config.out_dir).resolve()}",
                                                        "quiet=true"]).to_dict()


def run_jobs(runs: list, study: str, launcher: str, slurm: SlurmConfig, reports_dir: Path, *,
             poll: float = 2.0, log=print, submit=None):
    """Train `runs` (StudyRuns) as jobs and yield an `Outcome` as each finishes,
    its shard merged into the run's results database. `submit(executor, run)` makes the job
    (default: `TrainJob`); tests hand their own."""
    from cartlab.results.merge import merge

    ex = executor(launcher, reports_dir / study / "jobs" / "%j", slurm, f"cartlab-{study}")
    submit = submit or (lambda executor, run: executor.submit(TrainJob(job_config(run))))
    live, started = {}, time.time()

    def merged(run, log_path, t0) -> Outcome:
        try:
            merge([shard_of(run)], run.config.results_db)
        except ValueError as err:
            return Outcome(run, False, time.time() - t0, log_path, str(err))
        return Outcome(run, True, time.time() - t0, log_path)

    for run in runs:  # a shard left completed by an earlier ablate needs no job, only a merge
        if _completed(run):
            yield merged(run, shard_of(run), started)
        else:
            job = submit(ex, run)
            live[job] = (run, 0, time.time())
            log(f"  {run.label} seed {run.seed} [{run.run_id}]: job {job.job_id}")
    while live:
        time.sleep(poll)
        for job in [j for j in live if j.done()]:
            run, retries, t0 = live.pop(job)
            state, error = _result(job)
            if state == "completed":
                yield merged(run, job.paths.stdout, t0)
            elif state == "died" and retries < slurm.requeues and "CANCELLED" not in job.state:
                again = submit(ex, run)
                live[again] = (run, retries + 1, t0)
                log(f"  {run.label} seed {run.seed} [{run.run_id}]: job {job.job_id} {error}; "
                    f"resubmitted as job {again.job_id} ({retries + 1}/{slurm.requeues})")
            else:
                yield Outcome(run, False, time.time() - t0, job.paths.stderr, error)


def _completed(run) -> bool:
    """True when the run's shard holds it completed (read-only: a job may still be writing it)."""
    from contextlib import closing

    from cartlab.results.db import ResultsDB

    if not shard_of(run).is_file():
        return False
    try:
        db = ResultsDB(shard_of(run), readonly=True)
    except ValueError:  # created a moment ago, no tables yet
        return False
    with closing(db):
        row = db.get_run(run.run_id)
    return row is not None and row["status"] == "completed"


def _result(job) -> tuple[str, str]:
    """('completed' | 'died' | 'failed', why): died = killed or interrupted before the run was
    done (resubmit it: it resumes), failed = training raised an error (do not retry)."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    try:
        outcome = job.result()
    except UncompletedJobError:
        return "died", f"died ({job.state})"
    except FailedJobError as err:
        lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
        return "failed", lines[-1] if lines else "failed"
    if outcome == "interrupted":
        return "died", "interrupted by SIGTERM (checkpointed)"
    return "completed", ""
