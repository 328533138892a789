"""Training throughput and MFU of CART and its FLOPs-matched Dense on this machine: eager vs
torch.compile, fp32 vs bf16 autocast.

    python benchmarks/bench_train.py             # d=256, P=6, R=6, seq 256, batch 4 (several minutes: compile is slow)
    python benchmarks/bench_train.py --quick     # d=128, no compile

MFU = achieved model FLOP/s (3 x forward FLOPs per token from `cartlab.model.account`, LM head
included) / peak. On a GPU the peak comes from the device table in `cartlab.hardware` (vendor dense bf16); a
CPU has no datasheet entry, so the peak is measured here as the best large-GEMM throughput over
fp32 and bf16 (an achievable peak, which flatters MFU compared with a vendor figure). One
denominator for both precisions keeps the MFU column comparable: a CPU without native bf16
(no AVX512-BF16/AMX) emulates bf16 GEMMs far below its fp32 rate, and its own bf16 peak would
make a slow run look efficient.
"""
from __future__ import annotations

import argparse
import time

import torch

from cartlab.model import CARTConfig, account, build_model, matched_dense
from cartlab.hardware import peak_flops
from cartlab.train.device import Capabilities, build_optimizer, select


def gemm_peak(dtype: torch.dtype, max_n: int = 2048, reps: int = 3) -> float:
    """Best square-GEMM FLOP/s in `dtype`, growing n from 256 while one product takes < 0.25 s
    (an emulated dtype is slow enough that n=2048 would take minutes)."""
    best_rate, n = 0.0, 256
    while n <= max_n:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # warm-up
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        best_rate = max(best_rate, 2 * n**3 / best)
        if best > 0.25:
            break
        n *= 2
    return best_rate


def tokens_per_s(cfg, precision: str, compile: bool, batch: int, seq_len: int, steps: int) -> float:
    torch.manual_seed(0)
    selection = select(Capabilities.detect(), "cpu" if not torch.cuda.is_available() else "auto", precision, "adamw",
                       compile)
    device = torch.device("cuda" if selection.device == "cuda" else "cpu")
    model = build_model(cfg).to(device)
    opt = build_optimizer(model.parameters(), selection, 3e-4, (0.9, 0.95), 1e-8, 0.1)
    step_model = torch.compile(model) if selection.compile else model
    x = torch.randint(0, cfg.vocab_size, (batch, seq_len), device=device)
    y = torch.randint(0, cfg.vocab_size, (batch, seq_len), device=device)
    for i in range(steps + 2):  # two warm-up steps (compilation happens there)
        if i == 2:
            start = time.perf_counter()
        with selection.autocast():
            _, loss = step_model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch * seq_len / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--quick", action="store_true", help="d=128, seq 128, vocab 8000, no compile")
    args = p.parse_args()
    vocab = 32000
    if args.quick:
        args.d_model, args.seq_len, args.no_compile, vocab = 128, 128, True, 8000
    cart = CARTConfig.paper(d_model=args.d_model, vocab_size=vocab)
    dense = matched_dense(cart, on="flops", seq_len=args.seq_len)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    peak = peak_flops(gpu) if gpu else None
    if peak:
        print(f"torch {torch.__version__}, {gpu}: MFU is against its datasheet bf16 peak {peak / 1e12:.0f} TFLOP/s")
    else:  # a CPU (or a GPU the table does not know): the best measured GEMM rate
        peaks = {"fp32": gemm_peak(torch.float32), "bf16": gemm_peak(torch.bfloat16)}
        peak = max(peaks.values())
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; measured GEMM peak "
              f"fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s; MFU is against "
              f"{peak / 1e9:.1f}")
    print(f"batch {args.batch_size} x seq {args.seq_len}; CART d={args.d_model} P=6 R=6 vs Dense {dense.n_layers}L (FLOPs-matched)\n")
    print(f"{'model':10s} {'precision':9s} {'mode':8s} {'tok/s':>9s} {'MFU':>7s}")
    modes = [False] if args.no_compile else [False, True]
    for name, cfg in [("cart", cart), (f"dense{dense.n_layers}L", dense)]:
        flops = account(cfg, args.seq_len).train_flops_per_token(include_lm_head=True)
        for precision in ("fp32", "bf16"):
            for compile in modes:
                try:
                    tps = tokens_per_s(cfg, precision, compile, args.batch_size, args.seq_len, args.steps)
                    mfu = f"{tps * flops / peak * 100:6.1f}%"
                    print(f"{name:10s} {precision:9s} {'compiled' if compile else 'eager':8s} {tps:9.0f} {mfu:>7s}")
                except Exception as err:  # a compile failure is a result worth printing, not a crash
                    print(f"{name:10s} {precision:9s} {'compiled' if compile else 'eager':8s}   failed: "
                          f"{type(err).__name__}: {str(err).splitlines()[0][:80]}")


if __name__ == "__main__":
    main()
