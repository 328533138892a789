"""What the per-loop measures (`cartlab.measures.loops`: logit_lens, loop_contraction) add to
training at the cpu-demo size, and how the contraction's settings trade time for accuracy.

    python benchmarks/bench_loop_measures.py                 # trains 100 steps first (~1 min idle)
    python benchmarks/bench_loop_measures.py --train-steps 0 # on the initial model
    python benchmarks/bench_loop_measures.py --checkpoint runs/<cpu-demo run>/checkpoints/step_00000200

1. Builds the cpu-demo model and trains it --train-steps updates on the cpu-demo data (built
   offline into $CARTLAB_DATA_DIR, default a temporary folder, if absent), timing each update.
2. Times, interleaved over --repeats rounds (best of each kept): one training update, the
   evaluation (3 domains x 8 batches x 8 x 128 tokens), and each measure as the training loop
   runs it (`run_measures`). Times are CPU seconds of this process on --threads threads (default
   1): on a shared machine wall time mostly measures the other processes.
3. Projects a cpu-demo run (200 updates, an evaluation every 50: 4) with and without the measures.
4. The contraction at other settings (sequences of the first batch, sampled tokens, iterations,
   tol), against 60 unstopped iterations on the same tokens: time, iterations used, error.
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train-steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--checkpoint", default="", help="a cpu-demo checkpoint to measure instead of training one")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("CARTLAB_DATA_DIR", tempfile.mkdtemp(prefix="bench_loops_"))

    from cartlab.data import BatchLoader, load_meta, open_bin
    from cartlab.data.resolve import resolve_data
    from cartlab.measures import MeasureContext, measures_for, run_measures
    from cartlab.model import build_model
    from cartlab.model.probes import loop_contraction
    from cartlab.train import TrainConfig
    from cartlab.train.device import Capabilities, select
    from cartlab.train.loop import _val_bins, evaluate

    cfg = TrainConfig.from_preset("cpu-demo", overrides=["device=cpu"])
    data_dir = resolve_data(cfg.data)
    selection = select(Capabilities.detect(), "cpu", cfg.precision)
    torch.manual_seed(0)
    model = build_model(cfg.model_config())
    loader = BatchLoader(open_bin(data_dir / "train.bin"), cfg.batch_size, cfg.seq_len, "random", seed=0)

    def updater(net):
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.optim.lr)

        def update():
            net.train()
            x, y = loader.next_batch()
            _, loss = net(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return update

    if args.checkpoint:
        from cartlab.checkpoint import load_weights

        load_weights(args.checkpoint, model)
    else:
        update = updater(model)
        for _ in range(args.train_steps):
            update()
    model.eval()
    val_bins = {s: open_bin(path) for s, path in _val_bins(load_meta(data_dir)).items()}
    ctx = MeasureContext(model, cfg.model_config(), cfg, val_bins, args.train_steps, torch.device("cpu"), selection)
    measures = measures_for(cfg.model_config(), ["logit_lens", "loop_contraction"])
    jobs = {"update": updater(copy.deepcopy(model)),  # a copy: the measured model stays as it is
            "evaluation": lambda: evaluate(model, val_bins, cfg, selection, ctx.device),
            **{m.name: (lambda m=m: run_measures([m], ctx)) for m in measures}}
    best = {name: float("inf") for name in jobs}
    for _ in range(args.repeats):
        for name, job in jobs.items():
            t = time.process_time()
            job()
            best[name] = min(best[name], time.process_time() - t)
    evals = len({*range(cfg.eval_every, cfg.steps + 1, cfg.eval_every), cfg.steps})
    run = cfg.steps * best["update"] + evals * best["evaluation"]
    added = evals * sum(best[m.name] for m in measures)
    print(f"cpu-demo model {args.checkpoint or f'after {args.train_steps} updates'}, CPU seconds on "
          f"{torch.get_num_threads()} thread(s), best of {args.repeats}:")
    print(f"  one update {best['update']:.3f} s; evaluation {best['evaluation']:.2f} s")
    for m in measures:
        print(f"  {m.name:<17} {best[m.name]:5.2f} s per evaluation = {best[m.name] / best['evaluation']:4.2f} x the "
              f"evaluation")
    print(f"  a {cfg.steps}-update run with {evals} evaluations: {run:.0f} s; both measures add {added:.1f} s "
          f"(+{100 * added / run:.1f}%)")

    print("contraction at other settings (|relative error| against 60 unstopped iterations on the same tokens):")
    model.eval()
    firsts = {s: ctx.batches(s, 1)[0][0] for s in val_bins}
    for seqs, n_tokens, n_iter, tol in ((2, 64, 20, 3e-3), (2, 64, 20, 1e-2), (2, 64, 30, 1e-3), (8, 32, 30, 1e-3),
                                        (8, 64, 20, 3e-3)):
        t = time.process_time()
        got = {s: loop_contraction(model, x[:seqs], n_tokens=n_tokens, n_iter=n_iter, tol=tol)
               for s, x in firsts.items()}
        sec = time.process_time() - t
        ref = {s: loop_contraction(model, x[:seqs], n_tokens=n_tokens, n_iter=60, tol=0.0) for s, x in firsts.items()}
        err = {k: max(abs(row[k] / r[k] - 1) for s in got for row, r in zip(got[s], ref[s]))
               for k in ("radius_mean", "norm_mean")}
        iters = [row["iters"] for rows in got.values() for row in rows]
        print(f"  {seqs} sequences, {n_tokens:2d} tokens, <= {n_iter} iterations, tol {tol:g}: {sec:5.2f} s, used "
              f"{min(iters)}-{max(iters)}; error radius {err['radius_mean']:.4f}, norm {err['norm_mean']:.4f}")
    for s, x in firsts.items():
        rows = loop_contraction(model, x, n_tokens=256, n_iter=60, tol=0.0)
        print(f"  {s}, 256 tokens of 8 sequences: radius_mean " + ", ".join(f"{r['radius_mean']:.3f}" for r in rows)
              + "; norm_mean " + ", ".join(f"{r['norm_mean']:.3f}" for r in rows)
              + f"; gate {rows[0]['gate_radius']:.3f}")


if __name__ == "__main__":
    main()
