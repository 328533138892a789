"""Generation speed of a cartlab model and of its transformers export (issue 17), printed:

    python benchmarks/bench_export.py               # paper width d=256, P=6, R=6, vocab 32000, 512 new tokens
    python benchmarks/bench_export.py --quick       # d=128, vocab 8000, 128 new tokens
    python benchmarks/bench_export.py --threads 1   # one torch thread (the fair setting on a shared machine)

1. cartlab's cached `generate` against transformers' `generate` of the same weights exported
   (`cartlab.export`: the folder loaded with AutoModelForCausalLM(trust_remote_code=True)), batch 1,
   greedy; the two must produce the same tokens.
2. cartlab's cached against uncached `generate` at prompts of 8 and 128 tokens (target: >= 10x at
   both).

Tokens/s are given per wall-clock second and per CPU second of this process: on a shared machine
the wall clock also counts the time other processes hold the cores, so compare the CPU figures.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from common import cart_args, check


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) that `fn()` takes."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def rate(tokens: int, seconds: tuple[float, float]) -> str:
    return f"{tokens / seconds[0]:7.1f} tok/s wall, {tokens / seconds[1]:7.1f} tok/s CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cart_args(p)
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--prompt-lens", type=int, nargs="+", default=[8, 128])
    p.add_argument("--only", type=int, nargs="+", choices=[1, 2], help="run only these items")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="d=128, vocab 8000, 128 new tokens")
    args = p.parse_args()
    if args.quick:
        args.d_model, args.vocab_size, args.new_tokens = 128, 8000, 128
    if args.threads:
        torch.set_num_threads(args.threads)
    wanted = set(args.only or [1, 2])

    from cartlab.model import CARTConfig, build_model

    torch.manual_seed(0)
    cfg = CARTConfig.paper(d_model=args.d_model, n_loops=args.n_loops, prelude_layers=args.prelude_layers,
                           vocab_size=args.vocab_size)
    model = build_model(cfg).eval()
    V, N = args.vocab_size, args.new_tokens
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CART d={args.d_model} "
          f"P={args.prelude_layers} R={args.n_loops} vocab {V}, batch 1, greedy, {N} new tokens, "
          f"load average {os.getloadavg()[0]:.1f}")

    def prompt(length: int) -> torch.Tensor:
        return torch.randint(0, V, (1, length), generator=torch.Generator().manual_seed(length))

    if 1 in wanted:
        with tempfile.TemporaryDirectory() as tmp:
            os.environ.setdefault("HF_MODULES_CACHE", str(Path(tmp) / "modules"))
            from transformers import AutoModelForCausalLM

            from cartlab.export.write import quiet_transformers, write_model

            with quiet_transformers():
                write_model(Path(tmp), model)
                exported = AutoModelForCausalLM.from_pretrained(tmp, trust_remote_code=True).eval()
            exported.generation_config.eos_token_id = None  # generate all N tokens, as cartlab does
            ids = prompt(args.prompt_lens[0])
            ours, theirs = {}, {}
            model.generate(ids, 8, temperature=0)  # warm-up
            exported.generate(ids, max_new_tokens=8, do_sample=False)
            t_ours = timed(lambda: ours.setdefault("out", model.generate(ids, N, temperature=0)))
            with torch.no_grad():
                t_theirs = timed(lambda: theirs.setdefault("out", exported.generate(ids, max_new_tokens=N,
                                                                                     do_sample=False)))
            same = torch.equal(ours["out"], theirs["out"])
            print(f"\n1. cached generation, prompt {ids.size(1)}: cartlab vs transformers (exported, same weights)")
            print(f"   cartlab generate       {rate(N, t_ours)}")
            print(f"   transformers generate  {rate(N, t_theirs)}")
            print(f"   transformers / cartlab: {t_ours[1] / t_theirs[1]:.2f}x (CPU)   same tokens: {check(same)}")

    if 2 in wanted:
        print(f"\n2. cartlab generate with and without the KV cache (target: cached >= 10x uncached)")
        for length in args.prompt_lens:
            ids = prompt(length)
            cached = timed(lambda: model.generate(ids, N, temperature=0, use_cache=True))
            uncached = timed(lambda: model.generate(ids, N, temperature=0, use_cache=False))
            speedup = uncached[1] / cached[1]
            print(f"   prompt {length:4d}: cached {rate(N, cached)}   uncached {rate(N, uncached)}   "
                  f"speed-up {speedup:5.1f}x (CPU; wall {uncached[0] / cached[0]:.1f}x) {check(speedup >= 10)}")


if __name__ == "__main__":
    main()
