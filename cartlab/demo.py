"""`cartlab demo`: the README's main job, offline on a laptop.

Builds the embedded corpus if it is missing, trains the cpu-demo study (ablations/cpu-demo.yaml:
a small CART with two seeds, its stored- and effective-matched Dense baselines and three section-8
ablations) through `cartlab ablate`, renders its report through `cartlab report`, and prints
where the report is. Re-running it after an interruption trains only the unfinished runs.
"""
from __future__ import annotations

import argparse
import time

STUDY = "cpu-demo"


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", default="runs/results.db", help="results database (default: runs/results.db)")
    p.add_argument("--reports-dir", default="reports", help="where the report goes (default: reports)")
    p.add_argument("--workers", type=int, default=1, help="runs trained at once (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cartlab.ablate import ablate
    from cartlab.report import render

    t0 = time.time()
    outcomes = ablate(STUDY, [f"results_db={args.db}"], workers=args.workers, reports_dir=args.reports_dir,
                      progress=not args.quiet)
    if any(not o.ok for o in outcomes):
        print("cartlab: some demo runs failed; the report needs them all. Re-run `cartlab demo` to retry them.")
        return 1
    print(f"cartlab: rendering the {STUDY} report")
    index = render(STUDY, args.db, args.reports_dir)
    minutes = (time.time() - t0) / 60
    print(f"cartlab: demo done in {minutes:.1f} min. Report: {index.resolve()}\n"
          f"         summary: {index.with_name('summary.md').resolve()}")
    return 0
