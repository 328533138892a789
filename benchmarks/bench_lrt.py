"""LRT's training cost on this machine, next to what the FLOP accounting predicts.

    python benchmarks/bench_lrt.py            # d=256, 6 layers, seq 256, batch 4 (a few minutes on 2 CPU cores)
    python benchmarks/bench_lrt.py --quick    # d=128, 4 layers, seq 128, for a smoke run

    python benchmarks/bench_lrt.py --d-model 128 --n-layers 4 --seq-len 256 --vocab-size 4096   # the issue's size
    python benchmarks/bench_lrt.py --threads 1 ...   # every model on one intra-op thread

Prints, for Dense and for both LRT recipes on the same backbone (ours: lrt_kv + lrt_residual,
shared projection; the published one: `lrt_paper`) at S = 2, 4, 8 interleaved subsets:
1. train-step time (forward + backward + AdamW) relative to Dense, next to the ratio of their
   training FLOPs per token (`account(...).train_flops_per_token`, LM head included), and
   measured / predicted (the target: within 1.10x at S <= 4, 1.20x at S = 8);
2. the measured cost of the interleaved forward alone: its wall time over its initialisation
   pass (`model.diagnostics()["lrt_forward_cost"]`, median over the rounds; ~2 when the
   refinements cost one pass);
3. the floor of S sequential passes on this machine, over the same prediction: a Dense step plus
   Dense's own layers run once more over the sequence in S causal chunks (a growing key cache, no
   memory, no masks, no buffer), plus the recipe's FLOPs beyond that schedule's (ours: the memory
   projection and slots; `lrt_paper`: also the LM head on the full pass and the K/V feedback) timed
   at Dense's own FLOP rate. Any schedule that runs the layers S times in sequence pays at least
   this in eager PyTorch; where the floor is above a target, per-pass overhead, not LRT's code, is
   what separates the measurement from its FLOPs;
4. cached decoding: seconds per generated token (greedy, 64 tokens after a 16-token prompt, batch
   1), relative to Dense (the authors report ~9% overhead).
Steps of all models are interleaved over several rounds and each keeps its best time (the
ratios use best times; "round median" is the median over rounds of each round's time over that
round's Dense time, the steadier figure when the load changes during the run), so load
from other processes on a shared machine affects them alike.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from cartlab.model import DenseConfig, LRTConfig, account, build_model
from cartlab.model.layers import KVCache, LayerKV


def step_seconds(model, x, y, opt) -> float:
    start = time.perf_counter()
    _, loss = model(x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - start


class GrowingKV(LayerKV):
    """A key cache autograd can differentiate through: each chunk's keys are concatenated."""

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


def chunked_seconds(dense, x, subsets: int) -> float:
    """Forward and backward of Dense's layers over x in `subsets` causal chunks, one after another."""
    start = time.perf_counter()
    cache, outs = KVCache(), []
    cache.sites = defaultdict(GrowingKV)
    for chunk in dense.wte(x).tensor_split(subsets, dim=1):  # (B, ~T/S, d) each
        rope = dense.positions(chunk, cache, None)
        for i, layer in enumerate(dense.layers):
            chunk = layer(chunk, rope, cache[f"layer.{i}"])
        cache.pos += chunk.size(1)
        outs.append(chunk)
    torch.cat(outs, dim=1).square().mean().backward()
    dense.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=6)
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5, help="timed steps per model (best one kept)")
    p.add_argument("--subsets", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--quick", action="store_true", help="d=128, 4 layers, seq 128, 3 rounds")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    args = p.parse_args()
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads={args.threads} is not allowed; it must be an integer >= 1")
        torch.set_num_threads(args.threads)
    if args.quick:
        args.d_model, args.n_layers, args.seq_len, args.rounds = 128, 4, 128, 3
    T, B, V = args.seq_len, args.batch_size, args.vocab_size
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {B} x seq {T}, vocab {V}, "
          f"d={args.d_model}, {args.n_layers} layers")

    base = dict(d_model=args.d_model, n_layers=args.n_layers, vocab_size=V)
    configs = {"dense": DenseConfig(**base)}
    for S in args.subsets:
        configs[f"ours S={S}"] = LRTConfig(**base, hooks=("lrt_kv", "lrt_residual"), memory_subsets=S)
    for S in args.subsets:
        configs[f"paper S={S}"] = LRTConfig(**base, hooks=("lrt_paper",), memory_subsets=S)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)
    runs = {}
    for name, cfg in configs.items():
        torch.manual_seed(0)
        model = build_model(cfg).train()
        runs[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))
        step_seconds(model, x, y, runs[name][1])  # warm-up
    best = {name: float("inf") for name in runs}
    rounds: dict[str, list[float]] = {name: [] for name in runs}
    costs: dict[str, list[float]] = {name: [] for name in runs}
    chunks: dict[int, list[float]] = {S: [] for S in sorted({1, *args.subsets})}  # Dense's layers in S chunks
    for S in chunks:
        chunked_seconds(runs["dense"][0], x, S)  # warm-up
    for _ in range(args.rounds):
        for name, (model, opt) in runs.items():
            seconds = step_seconds(model, x, y, opt)
            best[name] = min(best[name], seconds)
            rounds[name].append(seconds)
            costs[name].append(model.diagnostics().get("lrt_forward_cost", 1.0))
        for S in chunks:
            chunks[S].append(chunked_seconds(runs["dense"][0], x, S))
    cost = {name: sorted(c)[len(c) // 2] for name, c in costs.items()}  # median

    flops = {name: account(cfg, T).train_flops_per_token(include_lm_head=True) for name, cfg in configs.items()}
    # the floor's schedule (a Dense step and Dense's layers once more) in Dense steps, FLOP-wise
    chunked = 1.0 + account(configs["dense"], T).train_flops_per_token(include_lm_head=False) / flops["dense"]
    for recipe in ("ours", "paper"):
        cfg = configs[f"{recipe} S={args.subsets[0]}"]
        acc = account(cfg, T)
        print(f"LRT memory ({recipe}): +{acc.stored_params - account(configs['dense'], T).stored_params:,} parameters; "
              f"source layer {cfg.memory_source_layer}, injection layers {list(cfg.memory_injection_layers)}")
    print(f"\n{'model':12s} {'step (s)':>9s} {'measured vs Dense':>18s} {'round median':>13s} {'FLOPs predict':>14s} "
          f"{'measured/predicted':>19s} {'floor/predicted':>16s} {'fwd / init pass':>16s}")
    for name in runs:
        ratio = best[name] / best["dense"]
        steady = sorted(a / b for a, b in zip(rounds[name], rounds["dense"]))[len(rounds[name]) // 2]
        predicted = flops[name] / flops["dense"]
        S = None if name == "dense" else int(name.split("=")[1])
        if S is not None:  # Dense step + its layers in S chunks, in the same round; + the recipe's other FLOPs
            floor_step = min(a + b for a, b in zip(rounds["dense"], chunks[S]))
        floor = "-" if S is None else f"{(floor_step / best['dense'] + predicted - chunked) / predicted:.2f}x"
        fwd = f"{cost[name]:.2f}" if name != "dense" else "-"
        print(f"{name:12s} {best[name]:9.3f} {ratio:17.2f}x {steady:12.2f}x {predicted:13.2f}x "
              f"{ratio / predicted:18.2f}x {floor:>16s} {fwd:>16s}")
    most = max(chunks)
    if most > 1:
        per_pass = (min(chunks[most]) - min(chunks[1])) / (most - 1)
        print(f"\neach further sequential pass of Dense's {args.n_layers} layers, forward and backward (chunks of "
              f"{T // most}-{T} positions, from S = 1 and {most}): {1e3 * per_pass:.1f} ms, {per_pass / best['dense']:.1%} "
              f"of a Dense step, which the FLOPs do not count")
    decode = {name: decode_seconds(runs[name][0], V, args.rounds)
              for name in ("dense", f"ours S={args.subsets[0]}", f"paper S={args.subsets[0]}")}
    print(f"\ncached decoding, 64 tokens after a 16-token prompt, batch 1 (best of {args.rounds}):")
    for name, s in decode.items():
        print(f"{name.split()[0]:12s} {1e3 * s:8.2f} ms/token {s / decode['dense']:8.2f}x Dense")


def decode_seconds(model, vocab: int, rounds: int, new: int = 64) -> float:
    """Best seconds per generated token of greedy cached decoding."""
    model.eval()
    prompt = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(1))
    best = float("inf")
    for _ in range(rounds + 1):
        start = time.perf_counter()
        model.generate(prompt, new, temperature=0)
        best = min(best, (time.perf_counter() - start) / new)
    model.train()
    return best


if __name__ == "__main__":
    main()
