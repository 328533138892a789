"""`cartlab eval`: downstream benchmarks with lm-evaluation-harness, few-shot and variable R.

    cartlab eval runs/RUN --tasks cartlab_mc,cartlab_ppl                    # offline tasks (data/tasks)
    cartlab eval runs/RUN --tasks hellaswag,arc_challenge,lambada_openai,piqa \\
        --num-fewshot 0,5 --n-loops 2,4,6,8,10,12,14,16                    # the paper's Table 12 (online)
    cartlab eval runs/RUN --tasks cartlab_mc,cartlab_ppl --n-loops profile   # the depth-profile grid
    cartlab eval pretrained=runs/RUN --tasks cartlab_mc --output-path results --log-samples   # lm-eval's files
    cartlab eval runs/RUN --preset paper                                   # a pinned protocol (--list-presets)
    cartlab eval exported/RUN --tasks cartlab_mc --exit kl --exit-threshold 0.01   # an export, via lm-eval's hf

Every metric and its stderr goes to the downstream table of the results database, with the
protocol that produced it (`cartlab.eval.protocol`: task version and config hash, lm-eval's
version, few-shot count and seed, chat template and system prompt, batch size, limit, dtype,
loop count and exit rule, the checkpoint's step): one row per task, metric and protocol, so a
quick `--limit` look or an earlier checkpoint is kept apart from the final weights on whole
tasks, and a report gives each protocol its own column. `--preset NAME` takes the tasks, shots,
loop counts and seeds of a pinned protocol (data/protocols/NAME.yaml: `local`, section 7.5's
`paper`, section 7.4's `variable-r`); flags given beside it win. `--n-loops profile` is the grid
of the validation depth profile (`cartlab.measures.depth.depth_grid`: 1..2R, then 2.5R, 3R, 4R).

The habits are lm-eval's: the checkpoint may be given as `pretrained=PATH`, `--output-path` and
`--log-samples` write lm-eval's results and samples files (in a folder named after PATH), the
device is chosen by capability unless --device says otherwise, and each kind of request shows a
progress bar. Every R and few-shot count is checked against the checkpoint and the tasks before
anything is evaluated.

An exported model folder (`cartlab export`) is scored by lm-eval's own hf model
(`cartlab.eval.exported`) and stored as its checkpoint's scores are: the run and step its
config.json records, the same protocol, and with --exit the mean loops per token counted alike.
"""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", help="a checkpoint folder, a run folder (its newest checkpoint) or an "
                                                  "exported model folder (cartlab export; scored by lm-eval's hf "
                                                  "model); lm-eval's pretrained=PATH also works")
    p.add_argument("--tasks", help="comma-separated lm-eval task names or local tasks (data/tasks)")
    p.add_argument("--preset", help="a pinned protocol (data/protocols/NAME.yaml): its tasks, few-shot counts, loop "
                                    "counts, seed and batch size; flags given beside it win")
    p.add_argument("--list-presets", action="store_true", help="list the protocol presets and exit")
    p.add_argument("--num-fewshot", "--num_fewshot", default=None, help="comma-separated few-shot counts (default 0)")
    p.add_argument("--n-loops", default=None,
                   help="comma-separated inference loop counts for CART, or 'profile' for the depth-profile "
                        "grid 1..2R, 2.5R, 3R, 4R (default: the trained R)")
    p.add_argument("--fewshot-seed", "--fewshot_random_seed", default=None,
                   help="lm-eval's fewshot_random_seed (default 1234)")
    p.add_argument("--system-prompt", "--system_instruction", default=None,
                   help="lm-eval's system_instruction, prepended to every prompt (default: none)")
    p.add_argument("--exit", default=None,
                   help="per-token exit rule for CART (kl, entropy, latent, argmax, learned; cartlab.model.exits): "
                        "each token stops by it after at most R loops; part of the stored protocol, with the mean "
                        "loops per token stored beside the scores (metric loops_per_token)")
    p.add_argument("--exit-threshold", "--exit_threshold", default=None, help="the exit rule's threshold")
    p.add_argument("--db", default="runs/results.db", help="results database of the run (default runs/results.db)")
    p.add_argument("--limit", help="evaluate only the first N documents of each task (stored under a protocol "
                                   "that says so)")
    p.add_argument("--batch-size", "--batch_size", default=None, help="(default 8)")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no lm-eval log below errors")
    p.add_argument("--device", default="auto", help="auto (default: CUDA if available, as training picks), cpu or cuda")
    p.add_argument("--output-path", "--output_path", "-o", default=None,
                   help="write lm-eval's results_<time>.json under OUTPUT_PATH/<checkpoint path>/ for each setting")
    p.add_argument("--log-samples", "--log_samples", "-s", action="store_true",
                   help="also write lm-eval's samples_<task>_<time>.jsonl (needs --output-path)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="read a checkpoint's state.pt / dcp/.metadata with plain pickle if the safe reader refuses it (a checkpoint written before cartlab stored them pickle-free): this runs any code the files carry, so give it only for checkpoints you trust")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cartlab.checkpoint import trusting
    from cartlab.eval.config import EvalConfig
    from cartlab.eval.protocol import load_preset, presets
    from cartlab.eval.run import evaluate, format_table

    if args.list_presets:
        for name, spec in presets().items():
            print(f"{name}: {', '.join(spec['tasks'])}; shots {spec.get('num_fewshot', [0])}; "
                  f"R {spec.get('n_loops') or 'trained'}\n    {spec.get('description', '')}")
        return 0
    if args.checkpoint is None:
        raise ValueError("checkpoint: give a checkpoint or run folder (or --list-presets)")
    preset = load_preset(args.preset) if args.preset else {}

    def joined(key):
        value = preset.get(key)
        return ",".join(str(v) for v in value) if isinstance(value, list) else value

    args.checkpoint = checkpoint_arg(args.checkpoint)
    tasks = args.tasks or joined("tasks")
    if not tasks:
        raise ValueError("--tasks: name at least one task, or give --preset (cartlab eval --list-presets)")
    given = {"checkpoint": args.checkpoint, "tasks": tasks, "num_fewshot": args.num_fewshot or joined("num_fewshot"),
             "n_loops": expand_loops(args.n_loops or joined("n_loops"), args.checkpoint), "db": args.db,
             "limit": args.limit, "batch_size": args.batch_size or preset.get("batch_size"), "device": args.device,
             "fewshot_seed": args.fewshot_seed or preset.get("fewshot_seed"), "exit": args.exit,
             "exit_threshold": args.exit_threshold}
    cfg = EvalConfig.from_dict({"checkpoint": args.checkpoint, "tasks": [],
                                "system_prompt": args.system_prompt or preset.get("system_prompt")},
                               [f"{k}={v}" for k, v in given.items() if v is not None])
    with trusting(args.trust_checkpoint):
        rows = evaluate(cfg.checkpoint, cfg.tasks, num_fewshot=cfg.num_fewshot, n_loops=cfg.n_loops or [None],
                        db=cfg.db, limit=cfg.limit, batch_size=cfg.batch_size, device=cfg.device,
                        output_path=args.output_path, log_samples=args.log_samples, fewshot_seed=cfg.fewshot_seed,
                        system_prompt=cfg.system_prompt, quiet=args.quiet, exit=cfg.exit,
                        exit_threshold=cfg.exit_threshold,
                        log=(lambda s: None) if args.quiet else print)
    print(format_table(rows))
    if rows.attrs["stored"]:
        print(f"cartlab: {len(rows)} metric rows -> {args.db}")
    return 0


def expand_loops(spec: str | None, checkpoint: str) -> str | None:
    """`--n-loops` as given, except 'profile': the depth-profile grid of the checkpoint's CART
    (`cartlab.measures.depth.profile_grid`), e.g. "1,2,3,4,5,6,7,8,10,12,16" at R=4."""
    if spec is None or spec.strip() != "profile":
        return spec
    import json
    from pathlib import Path

    from cartlab import checkpoint as ckpt
    from cartlab.eval.lm import is_export, resolve_checkpoint
    from cartlab.measures.depth import profile_grid
    from cartlab.model import LMConfig
    from cartlab.model.family import family_of, looping

    if is_export(checkpoint):  # an exported folder: config.json keeps the cartlab model config
        model_cfg = LMConfig.from_dict(json.loads((Path(checkpoint) / "config.json").read_text())["cartlab"])
    else:
        model_cfg = LMConfig.from_dict(ckpt.load_config(resolve_checkpoint(checkpoint))["model"])
    if not family_of(model_cfg).loops:
        raise ValueError(f"--n-loops profile: only {looping()} checkpoints loop; this one is {model_cfg.kind}")
    return ",".join(str(r) for r in profile_grid(model_cfg))


def checkpoint_arg(text: str) -> str:
    """The checkpoint path of the positional argument: PATH, or lm-eval's `pretrained=PATH`."""
    from pathlib import Path

    key, sep, value = text.partition("=")
    if not sep or Path(text).exists():
        return text
    if key in ("pretrained", "checkpoint") and value and "," not in value:
        return value
    raise ValueError(f"checkpoint: {text!r} is neither a path nor pretrained=PATH (the other model_args have "
                     f"options of their own, e.g. --n-loops)")
