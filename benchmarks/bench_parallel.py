"""What FSDP2 saves per rank against DDP, and what it costs per step, on this machine.

    python benchmarks/bench_parallel.py            # the paper's CART (d=256, P=6, R=6) on 2 gloo ranks
    python benchmarks/bench_parallel.py --quick    # the cpu-demo CART (d=128, P=2, R=4)

Both strategies of `cartlab.train.parallel` wrap the same model on 2 CPU processes (gloo) and
train a few AdamW steps on the same batches. Prints, per rank:
1. the bytes of training state it holds between steps: parameters and AdamW's two moments
   (the local shards under FSDP2, the full tensors under DDP; gradients are freed each step);
2. the best train-step time (forward + backward + clip + AdamW) over the timed steps.
On CPU the all-gathers and reduce-scatters go through gloo over loopback, so FSDP2's step time
here says little about NCCL on GPUs; the state per rank is what carries over.
"""
from __future__ import annotations

import argparse
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cartlab.model import CARTConfig, build_model
from cartlab.train.parallel import STRATEGIES


def local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t  # a DTensor's shard on this rank
    return t.numel() * t.element_size()


def worker(rank: int, world: int, port: int, args, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = CARTConfig(**args.model)
    g = torch.Generator().manual_seed(rank)
    x = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len), generator=g)
    for name, strategy in STRATEGIES.items():
        torch.manual_seed(0)
        raw = build_model(cfg)
        s = strategy(world)
        model = s.wrap(raw, torch.device("cpu"))
        opt = torch.optim.AdamW(raw.parameters(), lr=1e-4)
        times = []
        for step in range(args.steps):
            start = time.perf_counter()
            _, loss = model(x, x.roll(-1, 1))
            loss.backward()
            s.clip(model, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
        params = sum(local_bytes(p) for p in raw.parameters())
        moments = sum(local_bytes(v) for st in opt.state.values() for v in st.values() if v.dim() > 0)
        gathered = [None] * world
        dist.all_gather_object(gathered, (params, moments, min(times[1:])))
        if rank == 0:
            out[name] = gathered
        dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the cpu-demo CART instead of the paper's")
    p.add_argument("--steps", type=int, default=4, help="train steps per strategy (the first is not timed)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    args = p.parse_args()
    args.model = (dict(vocab_size=4096, d_model=128, n_heads=4, prelude_layers=2, n_loops=4, ffn_multiple_of=64)
                  if args.quick else dict(d_model=256, prelude_layers=6, n_loops=6))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    world = 2
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(worker, args=(world, port, args, out), nprocs=world)
        results = dict(out)
    print(f"torch {torch.__version__}, {world} gloo ranks x 1 thread, CART {args.model}, "
          f"batch {args.batch_size} x seq {args.seq_len} per rank")
    print(f"{'':6} {'rank':>4} {'params MiB':>11} {'AdamW MiB':>10} {'state MiB':>10} {'step s':>8}")
    for name, ranks in results.items():
        for rank, (params, moments, best) in enumerate(ranks):
            print(f"{name:6} {rank:>4} {params / 2**20:>11.2f} {moments / 2**20:>10.2f} "
                  f"{(params + moments) / 2**20:>10.2f} {best:>8.3f}")
    ddp, fsdp = (sum(results[n][0][:2]) for n in ("ddp", "fsdp"))
    print(f"FSDP2 holds {fsdp / ddp:.2f}x DDP's training state on rank 0")


if __name__ == "__main__":
    main()
