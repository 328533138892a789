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
Under torchrun (WORLD_SIZE > 1: `cartlab.train.distributed`) the model is replicated with DDP or
sharded with FSDP2 (`parallel`: `cartlab.train.parallel`; NCCL on CUDA, gloo on CPU), each rank
reads its share of every global batch, and rank 0 alone writes results (through
`cartlab.train.recorder`, which mirrors them into the experiment tracker `tracker` names:
`cartlab.trackers`) and checkpoints (every rank writes its shards of a sharded one). A run
resumes on another number of ranks with the same global batch: the gradient
accumulation absorbs the difference (`regroup`).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from cartlab.data.resolve import resolve_data
from cartlab.measures import MeasureContext, measures_for, run_measures
from cartlab.model import account, build_model
from cartlab.train import checkpoint
from cartlab.train.config import TrainConfig
from cartlab.train.device import Capabilities, build_optimizer, compile_scope, compiled, select
from cartlab.train.distributed import _dist_setup, _gather, _reduce_step, regroup
from cartlab.train.evaluation import _val_bins, eval_line, evaluate, token_byte_table
from cartlab.train.loops import LoopSampler, idle_parameters
from cartlab.train.parallel import STRATEGIES
from cartlab.train.preflight import _run_lock, check_same_identity, check_vocab, check_writable, preflight
from cartlab.train.recorder import RunRecorder, memory_mb
from cartlab.train.signals import _stop_on_signals

# check_same_identity, evaluate, regroup and _val_bins live beside this module; imported from here too
__all__ = ["TrainingDiverged", "TrainingInterrupted", "check_same_identity", "evaluate", "lr_at", "regroup", "train"]


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


# -- the run ---------------------------------------------------------------------------------------------------
def train(config: TrainConfig, resume: str | None = None) -> str:
    """Train `config` into its results database and return the run id. With `resume`, continue
    that run: its stored config is used, and `config` may only change operational fields."""
    run_id = resume or config.run_name()
    if int(os.environ.get("RANK", "0")) == 0:
        preflight(config)
    with _run_lock(config.results_db, run_id):
        return _train(config, run_id, resume)


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
        self.record = RunRecorder(cfg, self.main)  # the database rows and tracker mirror (rank 0 writes)
        self.existing: dict | None = None
        self.start, self.last = 0, None

    def close(self) -> None:
        self.record.close()

    # -- 1. -------------------------------------------------------------------------------------------------
    def open(self, resume: str | None) -> bool:
        """Check the run against the database; False when it is already completed. A new run
        or a resume checks first that the out dir takes files."""
        cfg, run_id = self.cfg, self.run_id
        self.existing = self.record.stored(run_id)
        if resume and self.existing is None:
            raise ValueError(f"cannot resume run {resume!r}: no such run in {cfg.results_db}")
        if self.existing is not None:
            check_same_identity(self.existing["identity"], cfg, run_id)
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
        self.token_bytes = token_byte_table(self.data_dir / meta["tokenizer"].get("file", "tokenizer.json"))

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
        cfg, run_id = self.cfg, self.run_id
        self.record.start(run_id, cfg, self.model_cfg, self.accounting, step=self.start,
                          tokens=cfg.steps * self.tokens_per_step,
                          hardware={**self.selection.to_dict(), "world_size": self.world, "parallel": cfg.parallel,
                                    "grad_accum_per_rank": self.accum, "cpu_count": os.cpu_count(),
                                    "compile_scope": compile_scope(self.selection, self.loops_vary),
                                    "data_dir": str(self.data_dir), "data_sha256": self.meta.get("sha256", {})})
        if self.main and self.start:
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
            self.record.status(run_id, "completed", step=cfg.steps)
            status = "completed"
        except (TrainingInterrupted, TrainingDiverged) as err:
            status = "interrupted" if isinstance(err, TrainingInterrupted) else "diverged"
            raise
        except BaseException as err:
            self.record.status(run_id, "failed", f"{type(err).__name__}: {err}"[:500])
            raise
        finally:
            self._phase(status)  # the line the bar leaves: `<run> [completed]` or how it ended
            self.bar.close()
            self.record.finish(status)

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
            self.record.status(self.run_id, "diverged", f"loss {loss_value} at step {step + 1}", step=step)
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
        self.record.train_row(self.run_id, done, row)

    def _evaluate(self, done: int) -> None:
        """Loss and perplexity on every validation bin, then the measures due at this step (every
        eval, or the last one: `cartlab.measures`) into the `probes` table."""
        self._phase("final eval" if done == self.cfg.steps else "eval")
        results = evaluate(self.raw, self.val_bins, self.cfg, self.selection, self.device)
        due = [m for m in self.measures if m.when == "eval" or done == self.cfg.steps]
        view = self.strategy.replica(self.raw, self.model_cfg) if due else None  # collective if sharded
        if not self.main:
            return
        self.record.eval(self.run_id, done, results)
        if not self.cfg.quiet:  # nanoGPT's line at every eval, printed above the bar
            self.bar.write(eval_line(done, self.last_loss, results, self.last_tps))
        if due:
            device = next(view.parameters()).device  # a sharded run's replica is on the CPU
            ctx = MeasureContext(view, self.model_cfg, self.cfg, self.val_bins, done, device, self.selection,
                                 self.token_bytes)
            rows = []
            for m in due:  # one at a time, so that the bar names the one running (e.g. depth profile)
                self._phase(m.name.replace("_", " "))
                rows += run_measures([m], ctx)
            self.record.probes(self.run_id, rows)

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
            self.record.checkpoint(self.run_id, done, path, pruned)

    def _interrupt(self, done: int, signal_name: str | None) -> None:
        """A signal arrived (here or on another rank): checkpoint update `done` unless that just
        happened, mark the run interrupted and stop."""
        if done % self.cfg.checkpoint_every:
            self._checkpoint(done)
        why = signal_name or "a signal to another rank"
        self.record.status(self.run_id, "interrupted", f"{why} at step {done}", step=done)
        raise TrainingInterrupted(f"run {self.run_id} interrupted by {why} at step {done}; "
                                  f"resume with `cartlab train --resume {self.run_id}`")

