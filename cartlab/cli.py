"""The `cartlab` command line.

Each subcommand lives next to the code it drives, in a module with a
`register(subparsers)` function that adds its parser and sets `func` to a callable taking the
parsed arguments and returning an exit code. This file only lists those modules.

User errors (a `ValueError` raised by the library, e.g. a bad config field) are printed as one
line, `cartlab: error: ...`, with exit code 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMAND_MODULES = (
    "cartlab.model.cli",
    "cartlab.data.cli",
    "cartlab.train.cli",
    "cartlab.ablate",
    "cartlab.report",
    "cartlab.eval.cli",
    "cartlab.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cartlab",
        description="Train, ablate and analyse depth-recurrent language models (CART, Dense).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # FIELD=VALUE overrides may come after options: `cartlab train --quiet seed=2`
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except ValueError as err:
        print(f"cartlab: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
