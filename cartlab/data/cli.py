"""`cartlab data ...`: build token bins from a recipe, list recipes, inspect a build or a bin.

    cartlab data build embedded                 # -> <data root>/built/embedded/
    cartlab data build paper-stage2 --out /big/disk/stage2 --force
    cartlab data list
    cartlab data info data/built/embedded       # a build directory or a single .bin
"""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("data", description="Tokenizers, corpora and token bins: build a data recipe into token bins and inspect them.")
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    b = sub.add_parser("build", help="build a recipe into train.bin, val_<domain>.bin and meta.json")
    b.add_argument("recipe", help="recipe name (data/recipes/NAME.yaml) or path to a YAML file")
    b.add_argument("--out", type=Path, default=None,
                   help="output directory (default: <data root>/built/<recipe>)")
    b.add_argument("--force", action="store_true", help="replace a build of a different recipe")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.add_argument("--no-progress", dest="quiet", action="store_true", help=argparse.SUPPRESS)  # its old name
    b.set_defaults(func=_build)

    ls = sub.add_parser("list", help="list the recipes and whether each is built")
    ls.set_defaults(func=_list)

    i = sub.add_parser("info", help="describe a build directory or a .bin file")
    i.add_argument("path", type=Path)
    i.add_argument("--verify", action="store_true", help="also check sha256 and every token id")
    i.set_defaults(func=_info)


def _build(args: argparse.Namespace) -> int:
    from cartlab.data.build import build

    build(args.recipe, args.out, progress=not args.quiet, force=args.force)
    return 0


def _list(args: argparse.Namespace) -> int:
    from cartlab.data import paths
    from cartlab.data.recipe import list_recipes, load_recipe

    for name in list_recipes():
        r = load_recipe(name)
        built = (paths.built_dir(name) / "meta.json").exists()
        print(f"{name:<16} {r.train_tokens:>14,} tokens  {'built' if built else 'not built':<10} {r.description}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from cartlab.data.binfile import open_bin
    from cartlab.data.meta import load_meta

    if args.path.is_dir():
        meta = load_meta(args.path, verify_sha256=args.verify)
        tok = meta["tokenizer"]
        print(f"{meta['dir']}: recipe {meta['recipe_name']!r}, tokenizer {tok['name']} "
              f"(vocab {tok['vocab_size']}, {tok['hash'][:12]}), {meta['dtype']}, chunk {meta['chunk_size']}")
        for name, info in meta["files"].items():
            print(f"  {name:<24} {info['n_tokens']:>12,} tokens  {info['role']}")
        for name, share in meta["share_per_domain"].items():
            print(f"  share of train: {name:<14} {share:.3f}")
        if args.verify:
            for name in meta["files"]:
                open_bin(args.path / name, check_ids=True)
            print("  sha256 and token ids verified")
    else:
        print(open_bin(args.path, check_ids=args.verify))
    return 0
