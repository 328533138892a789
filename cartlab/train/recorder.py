"""Everything a training run writes about itself: its row and status in the results database,
its train-log, eval and probe rows, its checkpoint artifacts, and the live mirror of those in an
experiment tracker (`cartlab.trackers`). The training loop calls a `RunRecorder` and nothing else
for this; rank 0 alone writes (every other rank's recorder only reads).

    rec = RunRecorder(cfg, main=True)
    rec.start(run_id, cfg, model_cfg, accounting, step=0, tokens=..., hardware={...})
    rec.train_row(run_id, step, row); rec.eval(run_id, step, results); rec.checkpoint(run_id, step, path, pruned)
    rec.status(run_id, "completed", step=cfg.steps); rec.finish("completed"); rec.close()
"""
from __future__ import annotations

import json
import platform
import resource

import torch

import cartlab
from cartlab.provenance import git_commit
from cartlab.results.db import ResultsDB
from cartlab.trackers import Mirror


class RunRecorder:
    """The results database of `cfg.results_db` and the tracker `cfg.tracker`, seen from one run.
    On a rank other than 0 (`main` False) every write is skipped."""

    def __init__(self, cfg, main: bool):
        self.main = main
        self.db = ResultsDB(cfg.results_db)
        self.tracker = Mirror(cfg, self.db, on=main)  # an MLflow/W&B view of what db gets

    def stored(self, run_id: str) -> dict | None:
        """The run's row as recorded by an earlier launch (None: a new run), its identity parsed."""
        row = self.db.get_run(run_id)
        if row is None:
            return None
        return {**row, "identity": json.loads(row["config_json"])["identity"]}

    def start(self, run_id: str, cfg, model_cfg, accounting, step: int, tokens: int, hardware: dict) -> None:
        """The run's row, 'running' at `step` (0, or the checkpoint resumed from), with its variant,
        config, identity and provenance; train-log and eval rows after `step` are dropped (they are
        logged again); the tracker run starts."""
        if not self.main:
            return
        m, acc = model_cfg, accounting
        self.db.upsert_run(
            run_id, name=run_id, source="local", model=m.kind, d_model=m.d_model,
            prelude_layers=getattr(m, "prelude_layers", None), n_loops=getattr(m, "n_loops", None),
            n_layers=getattr(m, "n_layers", None), hooks=",".join(sorted(getattr(m, "hooks", ()))),
            seed=cfg.seed, n_seeds=1, stage=cfg.stage, **cfg.variant_fields(),
            stored_params=acc.stored_params, effective_params=acc.effective_params,
            tokens=tokens, status="running", message=None, step=step,
            config_json={"train": cfg.to_dict(), "model": m.to_dict(), "identity": cfg.identity()},
            git_commit=git_commit(), software_json=software(), hardware_json=hardware,
        )
        self.db.truncate_after(run_id, step)
        self.tracker.start(run_id, {**cfg.to_dict(), "model": m.to_dict(), **cfg.variant_fields(),
                                    "stored_params": acc.stored_params, "effective_params": acc.effective_params})

    def train_row(self, run_id: str, step: int, row: dict) -> None:
        if self.main:
            self.db.log_train(run_id, [row])
            self.tracker.log_train(step, row)

    def eval(self, run_id: str, step: int, results: dict[str, dict]) -> None:
        """Loss and perplexity per validation split at `step`."""
        if self.main:
            self.db.log_eval(run_id, step, results)
            self.tracker.log_eval(step, results)

    def probes(self, run_id: str, rows: list[dict]) -> None:
        """Measure rows (`cartlab.measures`) into the `probes` table."""
        if self.main:
            self.db.log_probes(run_id, rows)

    def checkpoint(self, run_id: str, step: int, path, pruned) -> None:
        """The checkpoint of update `step` as an artifact, the ones it pruned unregistered, and the
        run's row at `step`."""
        if self.main:
            self.db.add_artifact(run_id, "checkpoint", str(path), step)
            for old in pruned:
                self.db.remove_artifact(run_id, "checkpoint", str(old))
            self.db.upsert_run(run_id, step=step)

    def status(self, run_id: str, status: str, message: str | None = None, step: int | None = None) -> None:
        """How the run ended: completed, interrupted, diverged or failed, at update `step`."""
        if self.main:
            self.db.set_status(run_id, status, message, step=step)

    def finish(self, status: str) -> None:
        """Close the tracker run (with the final metrics read back from the database)."""
        self.tracker.finish(status)

    def close(self) -> None:
        self.db.close()


def software() -> dict:
    """The versions a run was trained with."""
    import numpy

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "cartlab": cartlab.__version__, "platform": platform.platform()}


def memory_mb(device: str) -> float:
    """Peak memory of this process so far: CUDA allocations, or the resident set on a CPU."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
