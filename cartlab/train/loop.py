"""The training loop: one run from a TrainConfig into the results database, resumable exactly.

    run_id = train(TrainConfig.from_preset("smoke"))

What a run does, in order (`_train` reads as this list):
1. derive its name from the config; a run another live process is training is refused, a
   completed run is not redone, a known unfinished run is resumed from its newest checkpoint
   (log rows after that step are dropped and re-logged); before anything is trained the
   results database's folder and the out dir must take files, and checkpoint folders that
   killed processes left half-written are removed;
2. open the data build (the embedded recipe is built on first use, offline), check the
   tokenizer fits the model, build model and optimizer for the selected device, restore the
   newest checkpoint when resuming, and record the run (with its variant) as running;
3. loop: lr from the schedule, micro-batches with gradient accumulation, clip, step; every
   `log_every` steps a train-log row (loss, grad norm, lr, spectral radius, HyperConnection
   weights, tokens/s, MFU, memory); every `eval_every` steps loss and perplexity on every
   validation bin; every `checkpoint_every` steps an atomic checkpoint (the ones it prunes
   leave the `artifacts` table too);
4. NaN/inf loss marks the run diverged and raises `TrainingDiverged`; SIGINT/SIGTERM (to any
   one rank under torchrun: the ranks agree on it each step) finishes the current step,
   checkpoints, marks the run interrupted and raises `TrainingInterrupted`; any other error
   marks it failed.
Under torchrun (WORLD_SIZE > 1) the model is replicated with DDP or sharded with FSDP2
(`parallel`: `cartlab.train.parallel`; NCCL on CUDA, gloo on CPU), each rank reads its share of
every global batch, and rank 0 alone writes results (and mirrors them into the experiment
tracker `tracker` names: `cartlab.trackers`) and checkpoints (every rank writes its shards of a
sharded one). A run resumes on another number of ranks with the same global batch: the gradient
accumulation absorbs the difference (`regroup`).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

import cartlab
from cartlab.config import ConfigError, show
from cartlab.filelock import file_lock
from cartlab.model import account, build_model
from cartlab.data.resolve import resolve_data
from cartlab.measures import MeasureContext, measures_for, run_measures
from cartlab.results.db import ResultsDB
from cartlab.trackers import Mirror
from cartlab.train import checkpoint
from cartlab.train.config import TrainConfig, _flatten
from cartlab.train.device import Capabilities, build_optimizer, compile_scope, compiled, select
from cartlab.train.loops import LoopSampler, idle_parameters
from cartlab.train.parallel import STRATEGIES


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM: the run was checkpointed and marked interrupted."""


class TrainingDiverged(Exception):
    """The loss became NaN or infinite; the run is marked diverged."""


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to optim.lr over warmup_steps, then cosine decay to lr * min_lr_ratio at
    `steps` (section 4.3). `step` is the 0-based index of the update about to be taken."""
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = min(1.0, (step - o.warmup_steps) / max(1, cfg.steps - o.warmup_steps))
    floor = o.lr * o.min_lr_ratio
    return floor + 0.5 * (o.lr - floor) * (1 + math.cos(math.pi * progress))


# -- distributed ---------------------------------------------------------------------------------------------
def _dist_setup(device: str) -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 0, 1
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    return dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")), world


def regroup(saved: dict | list, run_world: int, rank: int, world: int, grad_accum: int,
            run_id: str) -> tuple[dict, int]:
    """(this rank's loader state, micro-batches per step) for a run whose global batch was set on
    `run_world` ranks, resumed on `world`: the run's grad_accum x run_world micro-batches per
    step are split over the ranks there are now, and the loader continues after the windows
    already read (`saved`: the checkpoint's loader states, one per rank that wrote it). Batches
    are the same windows as before up to the end of the current epoch; the next epoch's
    boundary falls where the new rank count puts it."""
    micro = grad_accum * run_world  # micro-batches of batch_size per optimizer step, over all ranks
    if micro % world:
        raise ValueError(f"cannot resume run {run_id!r} on {world} ranks: its steps are {micro} micro-batches "
                         f"(grad_accum={grad_accum} on {run_world} ranks); resume on a number of ranks that "
                         f"divides {micro}")
    states = saved if isinstance(saved, list) else [saved]
    if len(states) == world:  # written by as many ranks as there are now
        return states[rank], micro // world
    written, first = len(states), states[0]
    return {**first, "world_size": world, "rank": rank, "step": first["step"] * written // world}, micro // world


def _reduce_step(loss: float, stopping: bool, world: int, device) -> tuple[float, bool]:
    """The loss averaged over ranks, and whether any rank has been asked to stop, in one
    all-reduce per step: every rank then stops after the same step (a rank that stopped alone
    would leave the others waiting in their next collective)."""
    if world == 1:
        return loss, stopping
    t = torch.tensor([loss, float(stopping)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t[0].item() / world, t[1].item() > 0


# -- data ----------------------------------------------------------------------------------------------------------
def _val_bins(meta: dict) -> dict[str, Path]:
    """The validation bins the build recorded, by domain. load_meta has checked them against the
    build's tokenizer; any other val_*.bin lying in the folder is never read."""
    return {info["domain"]: Path(meta["dir"]) / name for name, info in meta["files"].items() if "domain" in info}


@torch.no_grad()
def evaluate(model, val_bins: dict, cfg: TrainConfig, selection, device) -> dict[str, dict]:
    """Mean loss and perplexity on every validation bin over the same fixed batches each time:
    the first `eval_batches` windows-batches from the start of the bin (section 11)."""
    from cartlab.data import BatchLoader

    model.eval()
    out = {}
    for split, vbin in val_bins.items():
        vl = BatchLoader(vbin, cfg.eval_batch_size, cfg.seq_len, "sequential")
        losses = []
        for _ in range(min(cfg.eval_batches, vl.steps_per_epoch)):
            x, y = vl.next_batch()
            with selection.autocast():
                _, loss = model(x.to(device), y.to(device))
            losses.append(loss.item())
        mean = float(np.mean(losses))
        out[split] = {"loss": mean, "ppl": math.exp(min(mean, 50.0))}
    model.train()
    return out


# -- provenance ----------------------------------------------------------------------------------------------
def git_commit() -> str | None:
    try:
        root = Path(cartlab.__file__).resolve().parents[1]
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def software() -> dict:
    import numpy

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "cartlab": cartlab.__version__, "platform": platform.platform()}


def memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


@contextlib.contextmanager
def _stop_on_signals():
    """Turn SIGINT/SIGTERM into a flag checked between steps (main thread only)."""
    flag = {"signal": None}
    if threading_main():
        def handler(signum, frame):
            flag["signal"] = signal.Signals(signum).name

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield flag
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    else:
        yield flag


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# -- the run ---------------------------------------------------------------------------------------------------
def check_same_identity(stored: dict, cfg: TrainConfig, run_id: str) -> None:
    old, new = _flatten(stored), _flatten(cfg.identity())
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
        detail = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:6])
        raise ValueError(f"cannot resume run {run_id!r}: its config changed ({detail}); "
                         f"start a new run instead of resuming")


def train(config: TrainConfig, resume: str | None = None) -> str:
    """Train `config` into its results database and return the run id. With `resume`, continue
    that run: its stored config is used, and `config` may only change operational fields."""
    run_id = resume or config.run_name()
    if int(os.environ.get("RANK", "0")) == 0:
        preflight(config)
    with _run_lock(config.results_db, run_id):
        return _train(config, run_id, resume)


def check_vocab(meta: dict, model_cfg) -> None:
    """The model's vocabulary must hold every id of the data build's tokenizer."""
    vocab = int(meta["tokenizer"]["vocab_size"])
    if model_cfg.vocab_size < vocab:
        raise ValueError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the data's tokenizer vocabulary "
                         f"({vocab}, {meta['tokenizer']['name']}); set model.vocab_size >= {vocab}")


def preflight(cfg: TrainConfig) -> None:
    """What can be known wrong before the run is locked, recorded or built: the data (its build
    exists, or an offline recipe builds; its vocabulary fits the model), then the places the run
    writes. A refusal here leaves no lock, row or file behind."""
    from cartlab.data import load_meta

    meta = load_meta(resolve_data(cfg.data, progress=not cfg.quiet))
    check_vocab(meta, cfg.model_config())
    check_data(meta, cfg)
    if str(cfg.results_db) != ":memory:":
        db = Path(cfg.results_db)
        # a directory, or a file that is not a results database (an empty file is one that another
        # run's process is creating right now: SQLite writes its header with the first table)
        if db.is_dir() or (db.exists() and db.stat().st_size > 0):
            ResultsDB(cfg.results_db, readonly=True).close()
        check_writable(Path(cfg.results_db).parent, "results_db", cfg.results_db)
    check_writable(Path(cfg.out_dir), "out_dir", cfg.out_dir)


def check_data(meta: dict, cfg: TrainConfig) -> None:
    """The rest of what the run reads, before it makes anything: the build's tokenizer file (copied
    into every checkpoint), windows of seq_len in train.bin and each validation bin, and every id of
    train.bin inside the vocabulary (one pass over the file)."""
    from cartlab.data import BatchLoader, get_tokenizer, open_bin

    where = f"data.dir={show(meta['dir'])}"
    try:
        get_tokenizer(meta)
        train_bin = open_bin(Path(meta["dir"]) / "train.bin")
        BatchLoader(train_bin, cfg.batch_size, cfg.seq_len, cfg.data.mode, seed=cfg.seed)
        for vbin in _val_bins(meta).values():
            BatchLoader(vbin, cfg.eval_batch_size, cfg.seq_len, "sequential")
        train_bin.check_ids()
    except ValueError as err:
        raise ConfigError(f"{where}: {err}", "data.dir") from None


def check_writable(folder: Path, name: str, value) -> None:
    """Create `folder` and write (and delete) a probe file in it, or raise one ConfigError line
    naming the field `name`: an unwritable place fails before the first step, not at the
    first checkpoint."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".cartlab-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        reason = f"{err.strerror}: {err.filename}" if err.strerror and err.filename else str(err)
        raise ConfigError(f"{name}={show(str(value))} is not writable ({reason})", name) from None


@contextlib.contextmanager
def _run_lock(results_db: str, run_id: str):
    """One process at a time trains a run: the lock `<results_db>.locks/<run_id>`, held by rank 0
    for the whole run (`cartlab.filelock`). The OS drops it when the process dies, so a killed
    run can be resumed at once; a second launch of a live run is refused instead of writing its
    rows and checkpoints twice. (On Windows nothing stops a second launch.)"""
    if int(os.environ.get("RANK", "0")) != 0 or str(results_db) == ":memory:":
        yield
        return

    def refuse(path: Path) -> None:
        raise ValueError(f"run {run_id!r} is being trained by another process right now ({path} is locked); "
                         f"wait for it, or stop it and `cartlab train --resume {run_id}`")

    with file_lock(Path(f"{results_db}.locks") / run_id.replace(os.sep, "_"), busy=refuse):
        yield


def _train(cfg: TrainConfig, run_id: str, resume: str | None) -> str:
    """The steps of the module docstring, in order."""
    run = _Run(cfg, run_id)
    try:
        if not run.open(resume):  # 1. refused, already completed, new, or resumed
            return run_id
        run.prepare_data()        # 2. the data build, its tokenizer checked against the model
        run.build()               #    model and optimizer on the selected device
        run.restore()             #    weights, optimizer, data position and RNG of the newest checkpoint
        run.record_start()        #    the run row ('running'), log rows after the checkpoint dropped
        run.loop()                # 3.-4. steps, logs, evaluations, checkpoints; signals and divergence
    finally:
        run.close()
    return run_id


class _Run:
    """One training run between `open` and `close`; each method is one step of `_train`."""

    def __init__(self, cfg: TrainConfig, run_id: str):
        self.cfg, self.run_id = cfg, run_id
        self.selection = select(Capabilities.detect(), cfg.device, cfg.precision, cfg.optim.name, cfg.compile,
                                cfg.parallel)
        self.rank, self.local_rank, self.world = _dist_setup(self.selection.device)
        self.main = self.rank == 0
        self.strategy = STRATEGIES[cfg.parallel](self.world)
        self.run_world = self.world  # the ranks the run's global batch is defined on (a resume keeps it)
        self.accum = cfg.grad_accum  # micro-batches per rank and step (`regroup` on another rank count)
        self.device = torch.device(f"cuda:{self.local_rank}" if self.selection.device == "cuda" else "cpu")
        if self.selection.device == "cuda":
            torch.cuda.set_device(self.device)
        self.model_cfg = cfg.model_config()
        self.ckpt_dir = Path(cfg.out_dir) / run_id / "checkpoints"
        self.db = ResultsDB(cfg.results_db)
        self.tracker = Mirror(cfg, self.db, on=self.main)  # an MLflow/W&B view of what db gets (cartlab.trackers)
        self.existing: dict | None = None
        self.start, self.last = 0, None

    def close(self) -> None:
        self.db.close()

    # -- 1. -------------------------------------------------------------------------------------------------
    def open(self, resume: str | None) -> bool:
        """Check the run against the database; False when it is already completed. A new run
        or a resume checks first that the out dir takes files."""
        cfg, run_id = self.cfg, self.run_id
        self.existing = self.db.get_run(run_id)
        if resume and self.existing is None:
            raise ValueError(f"cannot resume run {resume!r}: no such run in {cfg.results_db}")
        if self.existing is not None:
            check_same_identity(json.loads(self.existing["config_json"])["identity"], cfg, run_id)
            if self.existing["status"] == "completed":
                if self.main:
                    print(f"cartlab: run {run_id} is already completed in {cfg.results_db}; nothing to do")
                return False
        if self.main:
            check_writable(Path(cfg.out_dir), "out_dir", cfg.out_dir)
            checkpoint.remove_stale_tmp(self.ckpt_dir)
        return True

    # -- 2. -------------------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        from cartlab.data import BatchLoader, load_meta, open_bin

        cfg = self.cfg
        self.data_dir = resolve_data(cfg.data, progress=self.main and not cfg.quiet)
        self.meta = meta = load_meta(self.data_dir)
        check_vocab(meta, self.model_cfg)
        self.loader = BatchLoader(open_bin(self.data_dir / "train.bin"), cfg.batch_size, cfg.seq_len, cfg.data.mode,
                                  seed=cfg.seed, rank=self.rank, world_size=self.world)
        self.val_bins = {split: open_bin(p) for split, p in _val_bins(meta).items()}

    def build(self) -> None:
        o = self.cfg.optim
        torch.manual_seed(self.cfg.seed)
        self.raw = build_model(self.model_cfg).to(self.device)
        # DDP-wrapped, or sharded in place by FSDP2 (then `raw` is the sharded model), under torchrun
        self.model = self.strategy.wrap(self.raw, self.device, idle=idle_parameters(self.model_cfg))
        self.optimizer = build_optimizer(self.raw.parameters(), self.selection, o.lr, (o.beta1, o.beta2), o.eps,
                                         o.weight_decay)  # after sharding: FSDP2 replaces the parameters
        acc = account(self.model_cfg, self.cfg.seq_len)
        self.accounting = acc
        self.flops_per_token = acc.train_flops_per_token(include_lm_head=True)  # on average over R
        self.measures = measures_for(self.model_cfg, self.cfg.measures)
        self.loops = LoopSampler(self.model_cfg, self.cfg.seed) if hasattr(self.model_cfg, "n_loops") else None

    def loops_at(self, step: int) -> int | None:
        """The loop count R update `step` trains with (None: a model without loops): n_loops, or
        under random loops a draw that depends on (seed, step) only (`cartlab.train.loops`)."""
        return None if self.loops is None else self.loops(step)

    def step_flops(self, step: int) -> float:
        """Training FLOPs of update `step` over all ranks (LM head included), at its R."""
        per_token = self.accounting.train_flops_per_token(include_lm_head=True, n_loops=self.loops_at(step))
        return per_token * self.tokens_per_step

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer update over all ranks: the run's global batch."""
        return self.cfg.tokens_per_step * self.run_world

    def restore(self) -> None:
        self.last = checkpoint.latest(self.ckpt_dir) if self.existing is not None else None
        if self.last is not None:
            state = checkpoint.load(self.last, self.raw, self.optimizer)
            loader = state["loader"]
            self.run_world = state.get("world", len(loader) if isinstance(loader, list) else 1)
            mine, self.accum = regroup(loader, self.run_world, self.rank, self.world, self.cfg.grad_accum,
                                       self.run_id)
            self.loader.load_state_dict(mine)
            checkpoint.set_rng_state(state["rng"])
            self.start = int(state["step"])
        self.flops_done = sum(self.step_flops(s) for s in range(self.start))

    def record_start(self) -> None:
        cfg, m, acc, run_id = self.cfg, self.model_cfg, self.accounting, self.run_id
        if self.main:
            self.db.upsert_run(
                run_id, name=run_id, source="local", model=m.kind, d_model=m.d_model,
                prelude_layers=getattr(m, "prelude_layers", None), n_loops=getattr(m, "n_loops", None),
                n_layers=getattr(m, "n_layers", None), hooks=",".join(sorted(getattr(m, "hooks", ()))),
                seed=cfg.seed, n_seeds=1, stage=cfg.stage, **cfg.variant_fields(),
                stored_params=acc.stored_params, effective_params=acc.effective_params,
                tokens=cfg.steps * self.tokens_per_step, status="running", message=None, step=self.start,
                config_json={"train": cfg.to_dict(), "model": m.to_dict(), "identity": cfg.identity()},
                git_commit=git_commit(), software_json=software(),
                hardware_json={**self.selection.to_dict(), "world_size": self.world, "parallel": cfg.parallel,
                               "grad_accum_per_rank": self.accum, "cpu_count": os.cpu_count(),
                               "compile_scope": compile_scope(self.selection, self.loops_vary),
                               "data_dir": str(self.data_dir), "data_sha256": self.meta.get("sha256", {})},
            )
            self.db.truncate_after(run_id, self.start)
            self.tracker.start(run_id, {**cfg.to_dict(), "model": m.to_dict(), **cfg.variant_fields(),
                                        "stored_params": acc.stored_params, "effective_params": acc.effective_params})
            if self.start:
                regrouped = (f"; {self.world} ranks x {self.accum} micro-batches per step instead of "
                             f"{self.run_world} x {cfg.grad_accum}") if self.world != self.run_world else ""
                print(f"cartlab: resuming {run_id} from step {self.start} ({self.last}){regrouped}", file=sys.stderr)
        self.step_model = compiled(self.model, self.selection, self.loops_vary)

    @property
    def loops_vary(self) -> bool:
        """True when R is drawn per step (hook random_loops): the step passes it to the model."""
        return self.loops is not None and self.loops.varies

    # -- 3. and 4. ------------------------------------------------------------------------------------------
    def loop(self) -> None:
        cfg, run_id, main = self.cfg, self.run_id, self.main
        self.bar = tqdm(total=cfg.steps, initial=self.start, disable=cfg.quiet or not main, dynamic_ncols=True)
        self._phase("train")
        self.t_last, self.tokens_since = time.perf_counter(), 0
        self.last_loss, self.last_tps = math.nan, None
        status = "failed"  # what the tracker is told at the end (the database records the same)
        try:
            with _stop_on_signals() as stop:
                for step in range(self.start, cfg.steps):
                    lr = lr_at(step, cfg)
                    loss_value, grad_norm, stopping = self._step(step, lr, stop["signal"] is not None)
                    self.last_loss = loss_value
                    done = step + 1
                    if done % cfg.log_every == 0 or done == cfg.steps:
                        self._log(done, loss_value, grad_norm, lr)
                    if done % cfg.eval_every == 0 or done == cfg.steps:
                        self._evaluate(done)
                        self._phase("train" if done < cfg.steps else "checkpoint")
                    if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                        self._checkpoint(done)
                    if stopping and done < cfg.steps:
                        self._interrupt(done, stop["signal"])
            if main:
                self.db.set_status(run_id, "completed", step=cfg.steps)
            status = "completed"
        except (TrainingInterrupted, TrainingDiverged) as err:
            status = "interrupted" if isinstance(err, TrainingInterrupted) else "diverged"
            raise
        except BaseException as err:
            if main:
                self.db.set_status(run_id, "failed", f"{type(err).__name__}: {err}"[:500])
            raise
        finally:
            self._phase(status)  # the line the bar leaves: `<run> [completed]` or how it ended
            self.bar.close()
            self.tracker.finish(status)

    def _phase(self, name: str) -> None:
        """Name what the run is doing in its progress bar: train, eval, final eval, each
        post-training measure (depth profile, ...), checkpoint, then how it ended."""
        self.bar.set_description_str(f"{self.run_id[:40]} [{name}]")

    def _step(self, step: int, lr: float, asked_to_stop: bool) -> tuple[float, float, bool]:
        """One optimizer update at `lr`: micro-batches with gradient accumulation, the loss
        averaged over ranks (with the ranks' stop flags), divergence check, clip, step."""
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total, accum = 0.0, self.accum
        at = {"n_loops": self.loops_at(step)} if self.loops_vary else {}  # one R for every micro-batch
        for micro in range(accum):
            x, y = self.loader.next_batch()
            x, y = x.to(self.device), y.to(self.device)
            with self.strategy.accumulating(self.model, sync=micro == accum - 1):  # sync on the last only
                with self.selection.autocast():
                    _, loss = self.step_model(x, y, **at)
                (loss / accum).backward()
            total += loss.item() / accum
        loss_value, stopping = _reduce_step(total, asked_to_stop, self.world, self.device)
        if not math.isfinite(loss_value):
            if self.main:
                self.db.set_status(self.run_id, "diverged", f"loss {loss_value} at step {step + 1}", step=step)
            raise TrainingDiverged(f"run {self.run_id} diverged: loss {loss_value} at step {step + 1}")
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else math.inf
        grad_norm = self.strategy.clip(self.model, clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.tokens_since += self.tokens_per_step
        self.flops_done += self.step_flops(step)
        self.bar.update(1)
        return loss_value, grad_norm, stopping

    def _log(self, done: int, loss_value: float, grad_norm: float, lr: float) -> None:
        """A train-log row: loss, grad norm, lr, spectral radius, HyperConnection weights,
        tokens/s and MFU since the last row, peak memory."""
        elapsed = time.perf_counter() - self.t_last
        tps = self.tokens_since / elapsed
        self.t_last, self.tokens_since = time.perf_counter(), 0
        view = self.strategy.replica(self.raw, self.model_cfg)  # rank 0's full model (collective if sharded)
        diag = view.diagnostics() if view is not None else {}
        peak = self.selection.peak_flops
        row = {"step": done, "loss": loss_value, "grad_norm": grad_norm, "lr": lr,
               "rho_max": diag.get("rho_max"), "rho_mean": diag.get("rho_mean"),
               "hyper_weights": json.dumps(diag["hyper_weights"]) if "hyper_weights" in diag else None,
               "tokens_per_s": tps, "mfu": tps * self.flops_per_token / peak if peak else None,
               "memory_mb": memory_mb(self.selection.device), "n_loops": self.loops_at(done - 1),
               "flops": self.flops_done, "forward_cost": diag.get("lrt_forward_cost")}
        self.last_tps = tps
        self.bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tps:.0f}")
        if self.main:
            self.db.log_train(self.run_id, [row])
            self.tracker.log_train(done, row)

    def _evaluate(self, done: int) -> None:
        """Loss and perplexity on every validation bin, then the measures due at this step (every
        eval, or the last one: `cartlab.measures`) into the `probes` table."""
        self._phase("final eval" if done == self.cfg.steps else "eval")
        results = evaluate(self.raw, self.val_bins, self.cfg, self.selection, self.device)
        due = [m for m in self.measures if m.when == "eval" or done == self.cfg.steps]
        view = self.strategy.replica(self.raw, self.model_cfg) if due else None  # collective if sharded
        if not self.main:
            return
        self.db.log_eval(self.run_id, done, results)
        self.tracker.log_eval(done, results)
        if not self.cfg.quiet:  # nanoGPT's line at every eval, printed above the bar
            self.bar.write(eval_line(done, self.last_loss, results, self.last_tps))
        if due:
            device = next(view.parameters()).device  # a sharded run's replica is on the CPU
            ctx = MeasureContext(view, self.model_cfg, self.cfg, self.val_bins, done, device, self.selection)
            rows = []
            for m in due:  # one at a time, so that the bar names the one running (e.g. depth profile)
                self._phase(m.name.replace("_", " "))
                rows += run_measures([m], ctx)
            self.db.log_probes(self.run_id, rows)

    def _checkpoint(self, done: int) -> None:
        """An atomic checkpoint of update `done` (rank 0 writes every rank's loader position);
        registered as an artifact, and the checkpoints it prunes are unregistered."""
        cfg, meta = self.cfg, self.meta
        loaders = [self.loader.state_dict()] if self.world == 1 else _gather(self.loader.state_dict(), self.world)
        sharded = self.strategy.sharded and self.world > 1
        if self.main or sharded:
            path, pruned = checkpoint.save(
                self.ckpt_dir, done, self.raw, self.optimizer, loaders[0] if self.world == 1 else loaders,
                {"train": cfg.to_dict(), "model": self.model_cfg.to_dict(), "run_id": self.run_id},
                cfg.keep_checkpoints, tokenizer=(self.data_dir / meta["tokenizer"]["file"], meta["tokenizer"]),
                sharded=sharded, world=self.run_world)
        if self.main:
            self.db.add_artifact(self.run_id, "checkpoint", str(path), done)
            for old in pruned:
                self.db.remove_artifact(self.run_id, "checkpoint", str(old))
            self.db.upsert_run(self.run_id, step=done)

    def _interrupt(self, done: int, signal_name: str | None) -> None:
        """A signal arrived (here or on another rank): checkpoint update `done` unless that just
        happened, mark the run interrupted and stop."""
        if done % self.cfg.checkpoint_every:
            self._checkpoint(done)
        why = signal_name or "a signal to another rank"
        if self.main:
            self.db.set_status(self.run_id, "interrupted", f"{why} at step {done}", step=done)
        raise TrainingInterrupted(f"run {self.run_id} interrupted by {why} at step {done}; "
                                  f"resume with `cartlab train --resume {self.run_id}`")


def eval_line(step: int, train_loss: float, results: dict[str, dict], tokens_per_s: float | None) -> str:
    """`step 200: train 3.412 | val iteration 2.871 (ppl 17.7), prose 4.102 (ppl 60.4) | 5,120 tok/s`"""
    val = ", ".join(f"{split} {r['loss']:.3f} (ppl {r['ppl']:.1f})" for split, r in results.items())
    speed = f" | {tokens_per_s:,.0f} tok/s" if tokens_per_s else ""
    return f"step {step}: train {train_loss:.3f} | val {val}{speed}"


def _gather(state: dict, world: int) -> list[dict]:
    states = [None] * world
    dist.all_gather_object(states, state)
    return states
