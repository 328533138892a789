"""`cartlab model info`: parameter and FLOP accounting of a model config, without building it.

    cartlab model info cart d_model=256 --hooks no_lti,unshare_core
    cartlab model info dense d_model=1024 n_layers=7 --seq-len 1024
    cartlab model info cart --match-dense effective
"""
from __future__ import annotations

import argparse
import json

import yaml

from cartlab.model.config import CONFIG_KINDS, ConfigError


def parse_overrides(items: list[str]) -> dict:
    """['d_model=256', 'share_core=false'] -> {'d_model': 256, 'share_core': False} (YAML typing)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form field=value")
        out[key.strip()] = yaml.safe_load(value)
    return out


def register(subparsers) -> None:
    parser = subparsers.add_parser("model", help="inspect model configs (parameters, FLOPs)")
    sub = parser.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    info = sub.add_parser("info", help="stored/effective parameters, forward FLOPs, effective layers")
    info.add_argument("kind", choices=sorted(CONFIG_KINDS), help="model family")
    info.add_argument("overrides", nargs="*", metavar="FIELD=VALUE", help="config fields, e.g. d_model=256")
    info.add_argument("--hooks", default="", help="comma-separated ablation hooks (CART only)")
    info.add_argument("--seq-len", type=int, default=1024, help="sequence length for FLOPs (default 1024)")
    info.add_argument("--match-dense", choices=["stored", "effective", "flops"],
                      help="also print the matched Dense config (CART only)")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(func=run_info)


def run_info(args: argparse.Namespace) -> int:
    from cartlab.model.accounting import account, matched_dense

    fields = parse_overrides(args.overrides)
    if args.hooks:
        if args.kind != "cart":
            raise ConfigError("--hooks applies to kind 'cart' only")
        fields["hooks"] = tuple(h.strip() for h in args.hooks.split(",") if h.strip())
    cfg = CONFIG_KINDS[args.kind].from_dict({"kind": args.kind, **fields})
    acc = account(cfg, args.seq_len)
    report = {"config": cfg.to_dict(), "accounting": acc.to_dict()}
    if args.match_dense:
        if args.kind != "cart":
            raise ConfigError("--match-dense applies to kind 'cart' only")
        dense = matched_dense(cfg, on=args.match_dense, seq_len=args.seq_len)
        report["matched_dense"] = {"on": args.match_dense, "n_layers": dense.n_layers,
                                   "accounting": account(dense, args.seq_len).to_dict()}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    hooks = ",".join(cfg.to_dict().get("hooks", [])) or "-"
    print(f"{args.kind}  d_model={cfg.d_model}  hooks={hooks}")
    print(f"  stored params      {acc.stored_params / 1e6:10.2f} M  (embedding {acc.embedding_params / 1e6:.2f} M)")
    print(f"  effective params   {acc.effective_params / 1e6:10.2f} M  (leverage {acc.leverage:.2f})")
    print(f"  forward GFLOPs     {acc.forward_flops / 1e9:10.1f}    per sequence of {acc.seq_len} (LM head excluded)")
    print(f"  effective layers   {acc.effective_layers:10.2f}")
    if args.match_dense:
        m = report["matched_dense"]
        print(f"  matched Dense on {m['on']}: {m['n_layers']} layers, "
              f"{m['accounting']['stored_params'] / 1e6:.2f} M stored")
    return 0
