"""`cartlab train`: train one run into the results database.

    cartlab train --preset smoke
    cartlab train --preset paper-stage2 model.d_model=512 model.n_loops=8 seed=2
    cartlab train --config my_run.yaml model.hooks=unshare_core,no_lti
    cartlab train --preset smoke dense_match=flops        # the FLOPs-matched Dense baseline
    cartlab train --resume RUN_ID                         # continue an interrupted run
    cartlab train --resume RUN_ID --trust-checkpoint      # ... from a checkpoint of cartlab < 0.2 (pickled state)
    torchrun --nproc_per_node 4 -m cartlab.cli train --preset paper-stage2 parallel=fsdp   # 4 GPUs, FSDP2 (default ddp)
"""
from __future__ import annotations

import argparse
import json
import sys

from cartlab.model.config import ConfigError


def register(subparsers) -> None:
    from cartlab.train.config import PRESETS

    p = subparsers.add_parser("train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", help=f"start from a preset: {', '.join(sorted(PRESETS))}")
    src.add_argument("--config", help="start from a YAML file (may name a `preset:` to extend)")
    p.add_argument("overrides", nargs="*", metavar="FIELD=VALUE",
                   help="dotted overrides, e.g. model.n_loops=8 optim.lr=3e-4 model.hooks=no_lti,no_lie")
    p.add_argument("--resume", metavar="RUN", help="continue RUN from its newest checkpoint")
    p.add_argument("--db", help="results database (default: the config's results_db, runs/results.db)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and run name, do not train")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="read a checkpoint's state.pt / dcp/.metadata with plain pickle if the safe reader refuses it (a checkpoint written before cartlab stored them pickle-free): this runs any code the files carry, so give it only for checkpoints you trust")
    p.set_defaults(func=run)


def resolve(args: argparse.Namespace):
    from cartlab.results.db import ResultsDB
    from cartlab.train.config import TrainConfig

    extra = list(args.overrides)
    if args.db:
        extra.append(f"results_db={args.db}")
    if args.quiet:
        extra.append("quiet=true")
    if args.resume:
        db_path = args.db or TrainConfig().results_db
        db = ResultsDB(db_path, readonly=True)
        row = db.get_run(args.resume)
        db.close()
        if row is None:
            raise ConfigError(f"--resume {args.resume}: no such run in {db_path}")
        stored = json.loads(row["config_json"])["train"]
        return TrainConfig.from_dict(stored, extra)
    if args.config:
        return TrainConfig.from_yaml(args.config, extra)
    return TrainConfig.from_preset(args.preset or "smoke", extra)


def run(args: argparse.Namespace) -> int:
    from cartlab.checkpoint import trusting
    from cartlab.train.loop import TrainingDiverged, TrainingInterrupted, train

    cfg = resolve(args)
    if args.print_config:
        print(f"# run: {cfg.run_name()}")
        print(cfg.to_yaml(), end="")
        return 0
    try:
        with trusting(args.trust_checkpoint):
            run_id = train(cfg, resume=args.resume)
    except TrainingInterrupted as err:
        print(f"cartlab: {err}", file=sys.stderr)
        return 130
    except TrainingDiverged as err:
        print(f"cartlab: {err}", file=sys.stderr)
        return 3
    print(summary(run_id, cfg))
    return 0


def summary(run_id: str, cfg) -> str:
    """What a finished run left and what to do next: its final validation losses, its newest
    checkpoint, and the commands that evaluate and report it."""
    from cartlab.checkpoint import latest
    from cartlab.results.db import ResultsDB
    from pathlib import Path

    db = ResultsDB(cfg.results_db, readonly=True)
    try:
        row = db.get_run(run_id) or {}
        ev = db.frame("eval_log", [run_id])
    finally:
        db.close()
    lines = [f"cartlab: run {run_id} {row.get('status', 'unknown')} at step {row.get('step')} -> {cfg.results_db}"]
    if not ev.empty:
        last = ev[ev.step == ev.step.max()]
        lines.append("  final val: " + ", ".join(f"{r.split} {r.loss:.3f} (ppl {r.ppl:.1f})" for r in last.itertuples()))
    ckpt = latest(Path(cfg.out_dir) / run_id / "checkpoints")
    if ckpt is not None:
        lines.append(f"  checkpoint: {ckpt}")
        lines.append(f"  next: cartlab eval {Path(cfg.out_dir) / run_id} --tasks cartlab_mc,cartlab_ppl --db {cfg.results_db}")
    lines.append(f"        cartlab report STUDY --db {cfg.results_db}   (for a study of ablations/; cartlab ablate STUDY trains one)")
    return "\n".join(lines)
