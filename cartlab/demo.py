"""`cartlab demo`: the README's main job, offline on a laptop.

Builds the embedded corpus if it is missing, trains the cpu-demo study (ablations/cpu-demo.yaml:
a small CART and its stored-matched Dense with two seeds each, the effective-matched Dense and
three section-8 ablations, 8 runs of 200 steps) through `cartlab ablate`, renders its report
through `cartlab report` (opening with what the study shows: the CART-Dense gap on every domain
with its seed noise), and prints where the report is. Re-running it after an interruption trains
only the unfinished runs.

It trains two runs at once, one CPU core each, when the machine has two cores free (at least two
cores, and a 1-minute load average that leaves two of them idle; a core less than half busy counts
as idle), else one run at a time on every core; `--workers N` decides instead. The runs and their
seeds are the same either way.
"""
from __future__ import annotations

import argparse
import math
import os
import time

STUDY = "cpu-demo"


def choose_workers(cpu_count: int | None, load: float | None) -> tuple[int, str]:
    """(runs to train at once, why) on a machine with `cpu_count` cores and a 1-minute load
    average `load` (None: unknown, taken as idle): 2 when two cores are free, else 1. A core
    counts as free unless more than half of it is busy (load is rounded), so an idle machine's
    background noise (a load of 0.2) does not halve the demo's speed."""
    cores = cpu_count or 1
    if cores < 2:
        return 1, "1 CPU core"
    free = max(0, cores - math.floor((load or 0.0) + 0.5))
    shown = "" if load is None else f", load {load:.1f}"
    return (2 if free >= 2 else 1), f"{free} of {cores} cores free{shown}"


def load_average() -> float | None:
    """The 1-minute load average, None where the OS does not tell it (Windows)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", default="runs/results.db", help="results database (default: runs/results.db)")
    p.add_argument("--reports-dir", default="reports", help="where the report goes (default: reports)")
    p.add_argument("--workers", type=int, default=None,
                   help="runs trained at once (default: 2 when two CPU cores are free, else 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cartlab.ablate import ablate
    from cartlab.report import render

    t0 = time.time()
    if args.workers is None:
        workers, why = choose_workers(os.cpu_count(), load_average())
    else:
        workers, why = args.workers, f"--workers {args.workers}"
    print(f"cartlab: training {workers} run{'s at once' if workers > 1 else ' at a time'} ({why})")
    outcomes = ablate(STUDY, [f"results_db={args.db}"], workers=workers, reports_dir=args.reports_dir,
                      progress=not args.quiet, next_hint=False)  # the report is rendered right below
    if any(not o.ok for o in outcomes):
        print("cartlab: some demo runs failed; the report needs them all. Re-run `cartlab demo` to retry them.")
        return 1
    print(f"cartlab: rendering the {STUDY} report")
    index = render(STUDY, args.db, args.reports_dir)
    minutes = (time.time() - t0) / 60
    print(f"cartlab: demo done in {minutes:.1f} min. Report: {index.resolve()}\n"
          f"         summary: {index.with_name('summary.md').resolve()}")
    return 0
