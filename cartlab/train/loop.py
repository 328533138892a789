"""The training loop: one run from a TrainConfig into the results database, resumable exactly.

    run_id = train(TrainConfig.from_preset("smoke"))

What a run does, in order:
1. derive its name from the config; a run another live process is training is refused, a
   completed run is not redone, a known unfinished run is resumed from its newest checkpoint
   (log rows after that step are dropped and re-logged);
2. open the data build (the embedded recipe is built on first use, offline), check the
   tokenizer fits the model, build model and optimizer for the selected device;
3. loop: lr from the schedule, micro-batches with gradient accumulation, clip, step; every
   `log_every` steps a train-log row (loss, grad norm, lr, spectral radius, HyperConnection
   weights, tokens/s, MFU, memory); every `eval_every` steps loss and perplexity on every
   validation bin; every `checkpoint_every` steps an atomic checkpoint;
4. NaN/inf loss marks the run diverged and raises `TrainingDiverged`; SIGINT/SIGTERM (to any
   one rank under torchrun: the ranks agree on it each step) finishes the current step,
   checkpoints, marks the run interrupted and raises `TrainingInterrupted`; any other error
   marks it failed.
Under torchrun (WORLD_SIZE > 1) the model is wrapped in DDP (NCCL on CUDA, gloo on CPU), each
rank reads its share of every global batch, and rank 0 alone writes results and checkpoints.
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
from cartlab.filelock import file_lock
from cartlab.model import CARTConfig, account, build_model
from cartlab.results.db import ResultsDB
from cartlab.train import checkpoint
from cartlab.train.config import TrainConfig, _flatten
from cartlab.train.device import Capabilities, build_optimizer, select


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
def resolve_data(cfg: TrainConfig, progress: bool) -> Path:
    """The build folder for cfg.data: an explicit `dir`, or the recipe's build (the offline
    embedded recipe is built on first use; others must be built with `cartlab data build`)."""
    from cartlab.data.paths import built_dir

    if cfg.data.dir:
        path = Path(cfg.data.dir)
        if not (path / "meta.json").is_file():
            raise ValueError(f"data.dir={cfg.data.dir!r} holds no data build (no meta.json); "
                             f"build one with `cartlab data build RECIPE --out DIR`")
        return path
    path = built_dir(cfg.data.recipe)
    if (path / "meta.json").is_file():
        return path
    from cartlab.data.recipe import list_recipes

    if cfg.data.recipe not in list_recipes():
        raise ValueError(f"data.recipe={cfg.data.recipe!r} is not allowed; choose one of {list_recipes()}")
    if cfg.data.recipe != "embedded":
        raise ValueError(f"data for recipe {cfg.data.recipe!r} is missing ({path}); build it first with "
                         f"`cartlab data build {cfg.data.recipe}` (it needs the internet)")
    from cartlab.data.build import build

    print(f"cartlab: building the embedded corpus into {path} (first use, offline)", file=sys.stderr)
    build("embedded", progress=progress)
    return path


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
    with _run_lock(config.results_db, run_id):
        return _train(config, run_id, resume)


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
    selection = select(Capabilities.detect(), cfg.device, cfg.precision, cfg.optim.name, cfg.compile)
    rank, local_rank, world = _dist_setup(selection.device)
    main = rank == 0
    device = torch.device(f"cuda:{local_rank}" if selection.device == "cuda" else "cpu")
    if selection.device == "cuda":
        torch.cuda.set_device(device)
    db = ResultsDB(cfg.results_db)
    existing = db.get_run(run_id)
    if resume and existing is None:
        raise ValueError(f"cannot resume run {resume!r}: no such run in {cfg.results_db}")
    if existing is not None:
        check_same_identity(json.loads(existing["config_json"])["identity"], cfg, run_id)
        if existing["status"] == "completed":
            if main:
                print(f"cartlab: run {run_id} is already completed in {cfg.results_db}; nothing to do")
            return run_id

    model_cfg = cfg.model_config()
    data_dir = resolve_data(cfg, progress=main and not cfg.quiet)
    from cartlab.data import BatchLoader, load_meta, open_bin

    meta = load_meta(data_dir)
    vocab = int(meta["tokenizer"]["vocab_size"])
    if model_cfg.vocab_size < vocab:
        raise ValueError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the data's tokenizer "
                         f"vocabulary ({vocab}, {meta['tokenizer']['name']}); set model.vocab_size >= {vocab}")
    train_bin = open_bin(data_dir / "train.bin")
    loader = BatchLoader(train_bin, cfg.batch_size, cfg.seq_len, cfg.data.mode, seed=cfg.seed, rank=rank,
                         world_size=world)

    val_bins = {split: open_bin(p) for split, p in _val_bins(meta).items()}

    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg).to(device)
    raw = model
    optimizer = build_optimizer(model.parameters(), selection, cfg.optim.lr, (cfg.optim.beta1, cfg.optim.beta2),
                                cfg.optim.eps, cfg.optim.weight_decay)
    ckpt_dir = Path(cfg.out_dir) / run_id / "checkpoints"
    start = 0
    last = checkpoint.latest(ckpt_dir) if existing is not None else None
    if last is not None:
        state = checkpoint.load(last, model, optimizer)
        loader.load_state_dict(state["loader"][rank] if isinstance(state["loader"], list) else state["loader"])
        checkpoint.set_rng_state(state["rng"])
        start = int(state["step"])
    acc = account(model_cfg, cfg.seq_len)
    flops_per_token = acc.train_flops_per_token(include_lm_head=True)
    if main:
        config_json = {"train": cfg.to_dict(), "model": model_cfg.to_dict(), "identity": cfg.identity()}
        hooks = ",".join(sorted(getattr(model_cfg, "hooks", ())))
        db.upsert_run(
            run_id, name=run_id, source="local", model=model_cfg.kind, d_model=model_cfg.d_model,
            prelude_layers=getattr(model_cfg, "prelude_layers", None), n_loops=getattr(model_cfg, "n_loops", None),
            n_layers=getattr(model_cfg, "n_layers", None), hooks=hooks, seed=cfg.seed, n_seeds=1, stage=cfg.stage,
            stored_params=acc.stored_params, effective_params=acc.effective_params,
            tokens=cfg.steps * cfg.tokens_per_step * world, status="running", message=None, step=start,
            config_json=config_json, git_commit=git_commit(), software_json=software(),
            hardware_json={**selection.to_dict(), "world_size": world, "cpu_count": os.cpu_count(),
                           "data_dir": str(data_dir), "data_sha256": meta.get("sha256", {})},
        )
        db.truncate_after(run_id, start)
        if start:
            print(f"cartlab: resuming {run_id} from step {start} ({last})", file=sys.stderr)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
    step_model = torch.compile(model) if selection.compile else model

    def save(step: int) -> None:
        loaders = [loader.state_dict()] if world == 1 else _gather(loader.state_dict(), world)
        if main:
            path = checkpoint.save(ckpt_dir, step, raw, optimizer, loaders[0] if world == 1 else loaders,
                                   {"train": cfg.to_dict(), "model": model_cfg.to_dict(), "run_id": run_id},
                                   cfg.keep_checkpoints, tokenizer=(data_dir / meta["tokenizer"]["file"], meta["tokenizer"]))
            db.add_artifact(run_id, "checkpoint", str(path), step)
            db.upsert_run(run_id, step=step)

    pending: list[dict] = []
    bar = tqdm(total=cfg.steps, initial=start, disable=cfg.quiet or not main, desc=run_id[:40], dynamic_ncols=True)
    t_last, tokens_since = time.perf_counter(), 0
    try:
        with _stop_on_signals() as stop:
            for step in range(start, cfg.steps):
                lr = lr_at(step, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                total = 0.0
                for micro in range(cfg.grad_accum):
                    x, y = loader.next_batch()
                    x, y = x.to(device), y.to(device)
                    sync = world == 1 or micro == cfg.grad_accum - 1
                    with (contextlib.nullcontext() if sync else model.no_sync()), selection.autocast():
                        _, loss = step_model(x, y)
                    (loss / cfg.grad_accum).backward()
                    total += loss.item() / cfg.grad_accum
                loss_value, stopping = _reduce_step(total, stop["signal"] is not None, world, device)
                if not math.isfinite(loss_value):
                    if main:
                        db.set_status(run_id, "diverged", f"loss {loss_value} at step {step + 1}", step=step)
                    raise TrainingDiverged(f"run {run_id} diverged: loss {loss_value} at step {step + 1}")
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip).item()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                done = step + 1
                tokens_since += cfg.tokens_per_step * world
                bar.update(1)
                if done % cfg.log_every == 0 or done == cfg.steps:
                    elapsed = time.perf_counter() - t_last
                    tps = tokens_since / elapsed
                    t_last, tokens_since = time.perf_counter(), 0
                    diag = raw.diagnostics()
                    pending.append({"step": done, "loss": loss_value, "grad_norm": grad_norm, "lr": lr,
                                    "rho_max": diag.get("rho_max"), "rho_mean": diag.get("rho_mean"),
                                    "hyper_weights": json.dumps(diag["hyper_weights"]) if "hyper_weights" in diag else None,
                                    "tokens_per_s": tps,
                                    "mfu": tps * flops_per_token / selection.peak_flops if selection.peak_flops else None,
                                    "memory_mb": memory_mb(selection.device)})
                    bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tps:.0f}")
                    if main:
                        db.log_train(run_id, pending)
                    pending = []
                if done % cfg.eval_every == 0 or done == cfg.steps:
                    results = evaluate(raw, val_bins, cfg, selection, device)
                    if main:
                        db.log_eval(run_id, done, results)
                if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                    save(done)
                if stopping and done < cfg.steps:
                    if done % cfg.checkpoint_every:
                        save(done)
                    why = stop["signal"] or "a signal to another rank"
                    if main:
                        db.set_status(run_id, "interrupted", f"{why} at step {done}", step=done)
                    raise TrainingInterrupted(f"run {run_id} interrupted by {why} at step {done}; "
                                              f"resume with `cartlab train --resume {run_id}`")
        if main:
            db.set_status(run_id, "completed", step=cfg.steps)
    except (TrainingInterrupted, TrainingDiverged):
        raise
    except BaseException as err:
        if main:
            db.set_status(run_id, "failed", f"{type(err).__name__}: {err}"[:500])
        raise
    finally:
        bar.close()
        db.close()
    return run_id


def _gather(state: dict, world: int) -> list[dict]:
    states = [None] * world
    dist.all_gather_object(states, state)
    return states
