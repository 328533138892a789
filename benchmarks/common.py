"""What several benchmark scripts share: the paper's CART size as command-line options, and the
mark printed next to a figure that has a target. Imported as `common` (the scripts run as
`python benchmarks/bench_*.py`, so this folder is on sys.path)."""
from __future__ import annotations

import argparse


def cart_args(p: argparse.ArgumentParser) -> None:
    """--d-model, --prelude-layers, --n-loops, --vocab-size, defaulting to the paper's CART
    (d=256, P=6, R=6, the Llama-2 vocabulary)."""
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--prelude-layers", type=int, default=6)
    p.add_argument("--n-loops", type=int, default=6)
    p.add_argument("--vocab-size", type=int, default=32000)


def check(ok: bool) -> str:
    """'ok' when a figure meets its target, else 'MISSED'."""
    return "ok" if ok else "MISSED"
