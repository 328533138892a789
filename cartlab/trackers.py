"""Experiment trackers: a live view of a training run in MLflow, W&B or trackio.

    cartlab train --preset smoke tracker=mlflow               # -> sqlite:///<results_db folder>/mlflow.db
    mlflow ui --backend-store-uri sqlite:///runs/mlflow.db    # (or mlflow server) to look at it
    WANDB_MODE=offline cartlab train --preset smoke tracker=wandb tracker_project=my-study

The results database stays the source of truth: a tracker only mirrors what the training loop
writes there (the config, every train-log row, every evaluation, the final status and metrics).
Trackers are optional (`pip install cartlab[trackers]`; `TrainConfig.validate` refuses one whose
package is missing before anything is trained), run on rank 0 only, and can never stop or
corrupt a run: the first error one raises (no network, a locked store) is one warning, and the
tracker is off for the rest of that run (`Mirror`).

What is mirrored, each at its training step:
    train/<column>       the numeric columns of every train-log row: train/loss, train/grad_norm,
                         train/lr, train/tokens_per_s, train/mfu, train/flops, ...
    val/<split>/loss     every evaluation, per validation domain (and val/<split>/ppl)
    final/...            at the end, read back from the results database: final/step,
                         final/train/loss, final/val/<split>/loss and ppl; and the run's status
A resumed run continues the same tracker run: MLflow finds the run tagged `cartlab.run_id`, W&B
resumes id=<run id> (resume="allow"), trackio resumes by name. Steps logged after the newest
checkpoint and before a crash are logged again on resume: MLflow then holds both values of those
steps, W&B keeps the first (it drops steps below its current one); the database has the truth.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any, Protocol

TRACKERS: dict[str, tuple[str, ...]] = {
    "none": (),
    "mlflow": ("mlflow", "sqlalchemy", "alembic"),  # mlflow-skinny + what its SQLite store needs
    "wandb": ("wandb",),
    "trackio": ("trackio",),  # implements W&B's API: `import trackio as wandb`
}
"""tracker name -> the modules it needs, all installed by `pip install cartlab[trackers]`."""

INSTALL = "pip install cartlab[trackers]"


class Tracker(Protocol):
    """One tracker backend. The loop reaches it through `Mirror`, so a method may raise."""

    def start(self, run_id: str, config: dict) -> None:
        """Open (or reopen, on resume) the tracker run of `run_id` and record its config."""

    def log_train(self, step: int, row: dict) -> None:
        """A train-log row (the columns of the results database's `train_log`)."""

    def log_eval(self, step: int, results: dict[str, dict]) -> None:
        """An evaluation: {split: {"loss": ..., "ppl": ...}}."""

    def finish(self, status: str, final: dict[str, float]) -> None:
        """Close the run with cartlab's status (completed, interrupted, diverged, failed) and
        its final metrics (`final_metrics`)."""


def missing_module(tracker: str) -> str | None:
    """The first module `tracker` needs that is not installed (None: all are). Nothing is imported."""
    return next((m for m in TRACKERS[tracker] if importlib.util.find_spec(m) is None), None)


def make_tracker(cfg) -> Tracker | None:
    """The backend `cfg.tracker` names (None for 'none'), configured from the TrainConfig `cfg`;
    its package is imported when the run starts, not here."""
    project = cfg.tracker_project or "cartlab"
    if cfg.tracker == "mlflow":
        return MLflowTracker(cfg.tracking_uri or default_mlflow_uri(cfg), project)
    if cfg.tracker in ("wandb", "trackio"):
        return WandbTracker(cfg.tracker, project, cfg.tracking_uri, cfg.out_dir, quiet=cfg.quiet)
    return None


def default_mlflow_uri(cfg) -> str:
    """`sqlite:///<results_db folder>/mlflow.db` (absolute): MLflow's local SQLite store next to
    the results database (an in-memory results database puts it in `out_dir`)."""
    folder = Path(cfg.out_dir) if str(cfg.results_db) == ":memory:" else Path(cfg.results_db).parent
    return f"sqlite:///{(folder.resolve() / 'mlflow.db').as_posix()}"


# -- what is logged ------------------------------------------------------------------------------------------
def train_metrics(row: dict) -> dict[str, float]:
    """The numeric columns of a train-log row as train/<column> (step, text and nulls left out)."""
    return {f"train/{k}": float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def eval_metrics(results: dict[str, dict]) -> dict[str, float]:
    """{split: {"loss", "ppl"}} as val/<split>/loss and val/<split>/ppl."""
    return {f"val/{split}/{k}": float(v) for split, r in results.items() for k, v in r.items()}


def final_metrics(db, run_id: str) -> dict[str, float]:
    """What the run ended with, read from the results database `db` (a `ResultsDB`): final/step
    (the run row's step), final/train/loss (the last train-log row) and the last evaluation's
    final/val/<split>/loss and ppl."""
    row = db.get_run(run_id) or {}
    out = {"final/step": float(row.get("step") or 0)}
    log = db.frame("train_log", [run_id])
    if len(log):
        out["final/train/loss"] = float(log.loss.iloc[-1])
    ev = db.frame("eval_log", [run_id])
    if len(ev):
        last = ev[ev.step == ev.step.max()]
        out.update({f"final/{k}": v for k, v in
                    eval_metrics({r.split: {"loss": r.loss, "ppl": r.ppl} for r in last.itertuples()}).items()})
    return out


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    """A nested config as dotted keys and text values (as on the command line: 3, 0.001, null,
    [no_lti]): `model.d_model` -> '256'."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(flat_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, str) else json.dumps(v)
    return out


# -- MLflow --------------------------------------------------------------------------------------------------
MLFLOW_STATUS = {"completed": "FINISHED", "interrupted": "KILLED", "diverged": "FAILED", "failed": "FAILED"}
PARAM_VALUE_MAX, PARAM_KEY_MAX = 6000, 250  # MLflow's limits on a param's value and key length
BATCH_MAX = 100  # params per MlflowClient.log_batch call (MLflow refuses more)


class MLflowTracker:
    """MLflow through `MlflowClient` (no global active run, so runs trained one after another in
    one process never mix): experiment `project`, run name = run id, tagged `cartlab.run_id`;
    params = the flattened config (a value longer than MLflow takes is cut, ending '...')."""

    def __init__(self, tracking_uri: str, experiment: str):
        self.tracking_uri, self.experiment = tracking_uri, experiment

    def start(self, run_id: str, config: dict) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = client = MlflowClient(self.tracking_uri)
        exp = self._experiment_id()
        q = '"' if "'" in run_id else "'"
        found = client.search_runs([exp], filter_string=f"tags.`cartlab.run_id` = {q}{run_id}{q}", max_results=1)
        if found:  # a resume: reopen it; params are immutable in MLflow, so only new keys are added
            self.run, known = found[0].info.run_id, found[0].data.params
            client.update_run(self.run, status="RUNNING")
        else:
            self.run, known = client.create_run(exp, run_name=run_id, tags={"cartlab.run_id": run_id}).info.run_id, {}
        params = [Param(k, v) for k, v in mlflow_params(config).items() if k not in known]
        for i in range(0, len(params), BATCH_MAX):
            client.log_batch(self.run, params=params[i:i + BATCH_MAX])

    def _experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(self.experiment)
        except Exception:  # another process created it first
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    def _log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self.client.log_batch(self.run, metrics=[Metric(_mlflow_key(k), v, stamp, step) for k, v in metrics.items()])

    def log_train(self, step: int, row: dict) -> None:
        self._log(step, train_metrics(row))

    def log_eval(self, step: int, results: dict[str, dict]) -> None:
        self._log(step, eval_metrics(results))

    def finish(self, status: str, final: dict[str, float]) -> None:
        self._log(int(final.get("final/step", 0)), final)
        self.client.set_tag(self.run, "cartlab.status", status)
        self.client.set_terminated(self.run, status=MLFLOW_STATUS[status])


def mlflow_params(config: dict) -> dict[str, str]:
    """`flat_params` within MLflow's limits: a longer value is cut to end in '...', a longer key
    (none of cartlab's) is left out."""
    return {k: v if len(v) <= PARAM_VALUE_MAX else v[:PARAM_VALUE_MAX - 3] + "..."
            for k, v in flat_params(config).items() if len(k) <= PARAM_KEY_MAX}


def _mlflow_key(key: str) -> str:
    """MLflow takes letters, digits, '_', '-', '.', ' ' and '/' in a metric name."""
    return re.sub(r"[^\w\-. /]", "_", key)


# -- W&B and trackio --------------------------------------------------------------------------------------------
class WandbTracker:
    """W&B's API (`init` -> run, `run.log(metrics, step=)`, `run.finish()`), from the `wandb`
    package or `trackio` (which implements it). W&B runs offline with WANDB_MODE=offline (its files
    go under WANDB_DIR, default <out_dir>/wandb; `wandb sync` uploads them later); trackio writes
    its local store (TRACKIO_DIR). `tracking_uri` is the server: W&B's base URL, trackio's server_url."""

    def __init__(self, module: str, project: str, tracking_uri: str | None, out_dir: str, quiet: bool = False):
        self.module, self.project, self.tracking_uri, self.out_dir, self.quiet = \
            module, project, tracking_uri, out_dir, quiet

    def start(self, run_id: str, config: dict) -> None:
        api = importlib.import_module(self.module)
        kwargs: dict[str, Any] = dict(project=self.project, name=run_id, config=config, resume="allow")
        if self.module == "wandb":
            settings = {"silent": self.quiet, "console": "off"}  # the run's own terminal output stays as it is
            if self.tracking_uri:
                settings["base_url"] = self.tracking_uri
            kwargs.update(id=re.sub(r"[:;,#?/'\s]", "-", run_id),  # characters W&B refuses in an id
                          dir=os.environ.get("WANDB_DIR") or self.out_dir, settings=api.Settings(**settings))
        else:  # trackio: no dashboard inside a notebook (papermill runs train_variant)
            kwargs.update(embed=False, **({"server_url": self.tracking_uri} if self.tracking_uri else {}))
        self.api, self.run = api, api.init(**kwargs)

    def log_train(self, step: int, row: dict) -> None:
        self.run.log(train_metrics(row), step=step)

    def log_eval(self, step: int, results: dict[str, dict]) -> None:
        self.run.log(eval_metrics(results), step=step)

    def finish(self, status: str, final: dict[str, float]) -> None:
        if self.module == "wandb":
            self.run.summary.update({**final, "status": status})
            self.run.finish(exit_code=0 if status == "completed" else 1)
        else:  # trackio has no summary: the final metrics are the last logged step's
            self.run.log(final, step=int(final.get("final/step", 0)))
            self.api.finish()  # the module's: it also forgets the run, so nothing finishes it again at exit


# -- what the training loop holds ------------------------------------------------------------------------------
class Mirror:
    """The run's tracker as the training loop holds it (`RunRecorder.tracker`): the backend `cfg.tracker`
    names on rank 0 (`on`), nothing elsewhere or for tracker=none. It never raises: the first error
    of a backend is one RuntimeWarning and the tracker is off for the rest of the run, so a
    tracker can never stop or corrupt training (the results database `db` has everything)."""

    def __init__(self, cfg, db, on: bool = True):
        self.name, self.db = cfg.tracker, db
        self.tracker = make_tracker(cfg) if on else None
        self.run_id: str | None = None

    def start(self, run_id: str, config: dict) -> None:
        self.run_id = run_id
        self._call("start", lambda: self.tracker.start(run_id, config))

    def log_train(self, step: int, row: dict) -> None:
        self._call("logging", lambda: self.tracker.log_train(step, row))

    def log_eval(self, step: int, results: dict[str, dict]) -> None:
        self._call("logging", lambda: self.tracker.log_eval(step, results))

    def finish(self, status: str) -> None:
        """Close the tracker run with `status` and the final metrics read back from the database."""
        if self.run_id is not None:  # never started (the run failed before recording itself): nothing to close
            self._call("finish", lambda: self.tracker.finish(status, final_metrics(self.db, self.run_id)))

    def _call(self, what: str, fn) -> None:
        if self.tracker is None:
            return
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - any tracker error: the run goes on without it
            self.tracker = None
            why = " ".join(str(err).split())[:300]
            warnings.warn(f"tracker={self.name}: {what} failed ({type(err).__name__}: {why}); the tracker is off "
                          f"for the rest of this run, the results database has every number",
                          RuntimeWarning, stacklevel=2)
