"""`cartlab model info`: parameter and FLOP accounting of a model config, without building it.

    cartlab model info cart d_model=256 --hooks no_lti,unshare_core
    cartlab model info dense d_model=1024 n_layers=7 --seq-len 1024
    cartlab model info cart --match-dense effective
    cartlab model info dense d_model=512 n_layers=12 --hooks lrt_kv,lrt_residual   # LRT: prints its overhead
    cartlab model info dense d_model=768 n_layers=12 --lrt-variants   # every LRT variant's overhead on it
    cartlab model info cart --hooks random_loops,truncated_bptt    # counted at the expected R of training
"""
from __future__ import annotations

import argparse
import json

from cartlab.model.config import ConfigError, LMConfig
from cartlab.model.family import family_of, kinds


def register(subparsers) -> None:
    parser = subparsers.add_parser("model", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    info = sub.add_parser("info", help="stored/effective parameters, forward FLOPs, effective layers")
    info.add_argument("kind", choices=kinds(), help="stored model kind (LRT: dense with its hooks)")
    info.add_argument("overrides", nargs="*", metavar="FIELD=VALUE", help="config fields, e.g. d_model=256")
    info.add_argument("--hooks", default="", help="comma-separated hooks of the model family "
                                                  "(CART ablations; lrt_kv, lrt_residual, lrt_paper make dense an LRT)")
    info.add_argument("--seq-len", type=int, default=1024, help="sequence length for FLOPs (default 1024)")
    info.add_argument("--match-dense", choices=["stored", "effective", "flops"],
                      help="also print the matched Dense config (CART only)")
    info.add_argument("--lrt-variants", action="store_true",
                      help="also print every LRT variant's parameter and FLOPs overhead on this Dense backbone "
                           "(kind dense only)")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(func=run_info)


def run_info(args: argparse.Namespace) -> int:
    from cartlab.model.accounting import account, lrt_variants, matched_dense, memory_overhead

    # the hooks go in first: they pick the family (LRT is kind dense with LRT hooks) whose fields
    # the overrides may name
    given = {"kind": args.kind, **({"hooks": [h for h in args.hooks.split(",") if h]} if args.hooks else {})}
    cfg = LMConfig.from_dict(given, list(args.overrides))
    spec = family_of(cfg)
    acc = account(cfg, args.seq_len)
    report = {"config": cfg.to_dict(), "accounting": acc.to_dict()}
    if spec.memory:
        report["memory_overhead"] = memory_overhead(cfg, args.seq_len)
    if args.lrt_variants:
        if args.kind != "dense":
            raise ConfigError(f"--lrt-variants is not allowed with kind {args.kind!r}: it applies to kind 'dense' only")
        report["lrt_variants"] = lrt_variants(cfg, args.seq_len)
    if args.match_dense:
        if not spec.loops:
            raise ConfigError(f"--match-dense={args.match_dense} is not allowed: it applies to kind 'cart' only")
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
    how = ("3x training forward" if acc.bptt_loops is None else
           f"3x training forward, the backward through the last {acc.bptt_loops} loops only")
    print(f"  train GFLOPs/token {acc.train_flops_per_token() / 1e9:10.3f}    ({how}, LM head included)")
    if getattr(cfg, "loops_vary", False):
        low, high = cfg.loop_range
        print(f"  training loops     R ~ {cfg.train_loops} on {low}..{high} per step, expected R {acc.mean_loops:.2f} "
              f"(counted above; inference default n_loops={cfg.n_loops})")
    if acc.bptt_loops is not None:
        print(f"  truncated BPTT     gradient through the last {acc.bptt_loops} loops; {acc.frozen_loops:.2f} loops "
              f"per step run without gradient on average")
    if "memory_overhead" in report:
        o = report["memory_overhead"]
        read = ("final norm" if cfg.memory_read_rule == "norm" else
                f"{'shared' if cfg.memory_shared else 'unshared'} projection")
        paths = "+".join(p for p, on in (("slot", cfg.memory_kv), ("residual", cfg.memory_residual),
                                         ("gated K/V feedback", cfg.memory_kv_feedback)) if on)
        print(f"  LRT memory         {o['params'] / 1e6:10.3f} M  (+{o['params_pct']:.2f}% parameters over the Dense "
              f"backbone; {read}, {paths}, source layer {cfg.memory_source_layer}, injection layers "
              f"{list(cfg.memory_injection_layers)})")
        print(f"  LRT compute        inference FLOPs +{o['inference_flops_pct']:.1f}%, training FLOPs "
              f"x{o['train_flops_ratio']:.2f} the backbone's (S={cfg.memory_subsets}); sweeps {cfg.memory_sweep_count}, "
              f"loss {cfg.memory_loss_rule}")
    if "lrt_variants" in report:
        print(f"  LRT variants on this backbone (seq {args.seq_len}):  params    inference FLOPs   training FLOPs")
        for v in report["lrt_variants"]:
            print(f"    {v['variant']:<46} {v['params_pct']:+6.2f}%  {v['inference_flops_pct']:+8.1f}%  "
                  f"       x{v['train_flops_ratio']:.2f}")
    if args.match_dense:
        m = report["matched_dense"]
        print(f"  matched Dense on {m['on']}: {m['n_layers']} layers, "
              f"{m['accounting']['stored_params'] / 1e6:.2f} M stored")
    return 0
