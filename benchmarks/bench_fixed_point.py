"""Memory of fixed-point training (hook `fixed_point`, `cartlab.model.solvers`; issue 27
acceptance 4): with backward=ift the memory of a training step does not grow with the solver's
iteration count; with backward=unrolled it grows linearly.

    python benchmarks/bench_fixed_point.py                       # cpu-demo-sized CART, 4 / 8 / 16 iterations
    python benchmarks/bench_fixed_point.py --d-model 256 --device cuda

Every solve runs exactly the iteration count asked for (solver_tol is set below any reachable
residual). For each backward mode and count, one training step (forward, backward) is measured:

    saved    bytes of the tensors autograd keeps for the backward (`saved_tensors_hooks`), counted
             on any device: the part of training memory that grows with depth
    peak     on CUDA, torch.cuda.max_memory_allocated over the step above what was allocated
             before it (the backward's own solve included)
    rss      on CPU, the growth of the process's peak resident set (ru_maxrss), a coarse check:
             the allocator reuses freed memory, so it rises only when a step needs more than any before

One warm-up step runs first; then the modes in order of increasing memory (ift first), so a
rising rss is a real rise.
"""
from __future__ import annotations

import argparse
import resource
import sys

import torch

from cartlab.model import CARTConfig, build_model

ITERATIONS = (4, 8, 16)


def step_memory(cfg: CARTConfig, idx: torch.Tensor, device: torch.device) -> dict[str, float]:
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(idx, idx)
    loss.backward()
    out = {"saved_MiB": saved / 2**20, "iterations": model.solver_stats.iterations.float().mean().item()}
    if device.type == "cuda":
        torch.cuda.synchronize()
        out["peak_MiB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        out["rss_growth_MiB"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--prelude-layers", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--solver", default="anderson", choices=("iteration", "anderson"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    idx = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), device=device)
    print(f"CART d={args.d_model} P={args.prelude_layers} vocab={args.vocab_size}, batch {args.batch_size} x "
          f"{args.seq_len}, solver={args.solver}, device={device}, torch {torch.__version__}")
    rows = {}
    warm = dict(vocab_size=args.vocab_size, d_model=args.d_model, prelude_layers=args.prelude_layers, ffn_multiple_of=64)
    step_memory(CARTConfig(**warm, hooks=("fixed_point",), solver_max_iter=4), idx, device)  # allocator warm-up
    for backward in ("ift", "unrolled"):
        for n in ITERATIONS:
            cfg = CARTConfig(**warm, hooks=("fixed_point",), solver=args.solver, solver_tol=1e-30,
                             solver_max_iter=n, backward=backward)
            rows[backward, n] = r = step_memory(cfg, idx, device)
            figures = "  ".join(f"{k} {v:8.1f}" for k, v in r.items())
            print(f"backward={backward:9s} max_iter={n:3d}  {figures}", flush=True)
    ift = [rows["ift", n]["saved_MiB"] for n in ITERATIONS]
    flat = max(ift) - min(ift) <= 1e-6 * max(ift)
    print(f"ift saved memory constant in the iteration count: {'ok' if flat else 'MISSED'} "
          f"({', '.join(f'{m:.1f}' for m in ift)} MiB at {', '.join(map(str, ITERATIONS))} iterations)")
    sys.exit(0 if flat else 1)


if __name__ == "__main__":
    main()
