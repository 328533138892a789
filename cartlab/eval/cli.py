"""`cartlab eval`: downstream benchmarks with lm-evaluation-harness, few-shot and variable R.

    cartlab eval runs/RUN --tasks cartlab_mc,cartlab_ppl                    # offline tasks (data/tasks)
    cartlab eval runs/RUN --tasks hellaswag,arc_challenge,lambada_openai,piqa \\
        --num-fewshot 0,5 --n-loops 2,4,6,8,10,12,14,16                    # the paper's Table 12 (online)

Every metric and its stderr goes to the downstream table of the results database (one row per
task, metric, few-shot setting and inference R), which the variable_R notebook reads. That table
holds the run's final weights on whole tasks: with --limit, or on a checkpoint that is not the
run's newest, the metrics are printed and not stored.
"""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names or local tasks (data/tasks)")
    p.add_argument("--num-fewshot", default="0", help="comma-separated few-shot counts (default 0)")
    p.add_argument("--n-loops", default=None,
                   help="comma-separated inference loop counts for CART (default: the trained R)")
    p.add_argument("--db", default="runs/results.db", help="results database of the run (default runs/results.db)")
    p.add_argument("--limit", help="evaluate only the first N documents of each task (printed, not stored)")
    p.add_argument("--batch-size", default=8)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cartlab.eval.config import EvalConfig
    from cartlab.eval.run import evaluate, format_table

    given = {"checkpoint": args.checkpoint, "tasks": args.tasks, "num_fewshot": args.num_fewshot,
             "n_loops": args.n_loops, "db": args.db, "limit": args.limit, "batch_size": args.batch_size,
             "device": args.device}
    cfg = EvalConfig.from_dict({"checkpoint": args.checkpoint, "tasks": []},
                               [f"{k}={v}" for k, v in given.items() if v is not None])
    rows = evaluate(cfg.checkpoint, cfg.tasks, num_fewshot=cfg.num_fewshot, n_loops=cfg.n_loops or [None],
                    db=cfg.db, limit=cfg.limit, batch_size=cfg.batch_size, device=cfg.device)
    print(format_table(rows))
    if rows.attrs["stored"]:
        print(f"cartlab: {len(rows)} metric rows -> {args.db}")
    return 0
