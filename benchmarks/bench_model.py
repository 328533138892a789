"""Model speed on this machine, printed next to what the FLOP accounting predicts.

    python benchmarks/bench_model.py              # paper width d=256, P=6, R=6 (a few minutes on 2 CPU cores)
    python benchmarks/bench_model.py --quick      # smaller shapes, for a smoke run

Prints:
1. train-step tokens/s (forward + backward + AdamW) of CART and of its FLOPs-matched Dense, the
   measured speed ratio next to the ratio their training FLOPs predict (target: CART reaches
   >= 0.9x of its FLOPs-predicted speed);
2. the wall-time cost of `unfreeze_kv` next to its FLOPs cost;
3. greedy generation of N new tokens with and without the KV cache (target: >= 10x), and
   batched decoding of 4 left-padded prompts of different lengths against the 4 one at a time;
4. Dense against transformers' LlamaForCausalLM of the same shape, random init (target: Dense
   no slower), when transformers is installed.
"""
from __future__ import annotations

import argparse
import time

import torch
from common import cart_args, check

from cartlab.model import CARTConfig, DenseConfig, account, build_model, matched_dense


def train_tokens_per_s(model, vocab: int, batch: int, seq_len: int, steps: int, warmup: int = 2) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (batch, seq_len), generator=g)
    y = torch.randint(0, vocab, (batch, seq_len), generator=g)
    model.train()
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        out = model(x, y) if not hasattr(model, "model") else model(input_ids=x, labels=y)
        loss = out[1] if isinstance(out, tuple) else out.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * batch * seq_len / (time.perf_counter() - start)


def generation_tokens_per_s(model, vocab: int, new_tokens: int, use_cache: bool, prompt_len: int) -> float:
    model.eval()
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    model.generate(prompt, new_tokens, temperature=0, use_cache=use_cache)
    return new_tokens / (time.perf_counter() - start)


def batched_tokens_per_s(model, vocab: int, new_tokens: int, prompt_len: int, n: int = 4) -> tuple[float, float]:
    """tokens/s of greedy cached decoding of `n` prompts (lengths prompt_len, prompt_len - 1, ...)
    as one left-padded batch (attention mask), and as `n` single generations one after another."""
    model.eval()
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, vocab, (max(1, prompt_len - i),), generator=g) for i in range(n)]
    idx = torch.zeros(n, prompt_len, dtype=torch.long)
    mask = torch.zeros(n, prompt_len, dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, prompt_len - len(r):], mask[i, prompt_len - len(r):] = r, 1
    start = time.perf_counter()
    model.generate(idx, new_tokens, temperature=0, attention_mask=mask)
    batched = n * new_tokens / (time.perf_counter() - start)
    start = time.perf_counter()
    for r in rows:
        model.generate(r[None], new_tokens, temperature=0)
    return batched, n * new_tokens / (time.perf_counter() - start)


def train_flops_per_token(cfg, seq_len: int) -> float:
    return account(cfg, seq_len).train_flops_per_token(include_lm_head=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cart_args(p)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--gen-tokens", type=int, default=512)
    p.add_argument("--prompt-lens", type=int, nargs="+", default=[8, 128], help="prompt lengths for item 3")
    p.add_argument("--only", type=int, nargs="+", choices=[1, 2, 3, 4], help="run only these items")
    p.add_argument("--quick", action="store_true", help="d=128, seq 128, 3 steps, 128 new tokens")
    args = p.parse_args()
    if args.quick:
        args.d_model, args.seq_len, args.steps, args.gen_tokens, args.vocab_size = 128, 128, 3, 128, 8000
        args.prompt_lens = [8]
    torch.manual_seed(0)
    T, B, V = args.seq_len, args.batch_size, args.vocab_size
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {B} x seq {T}, vocab {V}")

    cart_cfg = CARTConfig.paper(d_model=args.d_model, n_loops=args.n_loops, prelude_layers=args.prelude_layers,
                                vocab_size=V)
    dense_cfg = matched_dense(cart_cfg, on="flops", seq_len=T)
    unfrozen_cfg = CARTConfig.paper(d_model=args.d_model, n_loops=args.n_loops, prelude_layers=args.prelude_layers,
                                    vocab_size=V, hooks=("unfreeze_kv",))

    wanted = set(args.only or [1, 2, 3, 4])
    speed, flops = {}, {}
    if wanted & {1, 2}:
        print("\n1. train step: CART vs FLOPs-matched Dense")
        for name, cfg in [("cart", cart_cfg), (f"dense{dense_cfg.n_layers}L", dense_cfg), ("cart+unfreeze_kv", unfrozen_cfg)]:
            speed[name] = train_tokens_per_s(build_model(cfg), V, B, T, args.steps)
            flops[name] = train_flops_per_token(cfg, T)
            print(f"   {name:18s} {speed[name]:9.0f} tok/s   {flops[name] / 1e6:8.1f} MFLOP/token   "
                  f"{speed[name] * flops[name] / 1e9:6.1f} GFLOP/s")
        dense_name = f"dense{dense_cfg.n_layers}L"
        measured = speed["cart"] / speed[dense_name]
        predicted = flops[dense_name] / flops["cart"]
        print(f"   CART/Dense speed ratio {measured:.3f}, FLOPs predict {predicted:.3f}: "
              f"CART at {measured / predicted:.2f}x of its predicted speed (target >= 0.9) {check(measured / predicted >= 0.9)}")

        print("\n2. unfreeze_kv cost")
        wall = speed["cart"] / speed["cart+unfreeze_kv"] - 1
        flop = flops["cart+unfreeze_kv"] / flops["cart"] - 1
        print(f"   wall time +{wall * 100:.1f}%   FLOPs +{flop * 100:.1f}%")

    if 3 in wanted:
        print(f"\n3. generation of {args.gen_tokens} new tokens (CART, batch 1, greedy)")
        gen_model = build_model(cart_cfg)
        for prompt_len in args.prompt_lens:
            cached = generation_tokens_per_s(gen_model, V, args.gen_tokens, True, prompt_len)
            uncached = generation_tokens_per_s(gen_model, V, args.gen_tokens, False, prompt_len)
            print(f"   prompt {prompt_len:4d}: cached {cached:7.1f} tok/s   uncached {uncached:6.1f} tok/s   "
                  f"speed-up {cached / uncached:5.1f}x (target >= 10) {check(cached / uncached >= 10)}")
            batched, single = batched_tokens_per_s(gen_model, V, args.gen_tokens, prompt_len)
            print(f"   prompt {prompt_len:4d}: 4 prompts left-padded in one batch {batched:7.1f} tok/s   "
                  f"4 one at a time {single:7.1f} tok/s   ({batched / single:.2f}x)")

    if 4 in wanted:
        print("\n4. Dense vs transformers LlamaForCausalLM (same shape, random init, train step)")
        try:
            from transformers import LlamaConfig, LlamaForCausalLM
        except ImportError:
            print("   transformers not installed: skipped")
            return
        llama = LlamaForCausalLM(LlamaConfig(
            vocab_size=V, hidden_size=dense_cfg.d_model, intermediate_size=dense_cfg.ffn_hidden,
            num_hidden_layers=dense_cfg.n_layers, num_attention_heads=dense_cfg.n_heads,
            num_key_value_heads=dense_cfg.n_heads, max_position_embeddings=T, rms_norm_eps=dense_cfg.norm_eps,
            tie_word_embeddings=True, attn_implementation="sdpa"))
        n_ours = build_model(dense_cfg).num_params()
        n_llama = sum(p.numel() for p in llama.parameters())
        dense = build_model(dense_cfg)
        ours, theirs = 0.0, 0.0
        for _ in range(3):  # alternate, keep each one's best: order and noise cancel out
            ours = max(ours, train_tokens_per_s(dense, V, B, T, args.steps))
            theirs = max(theirs, train_tokens_per_s(llama, V, B, T, args.steps))
        print(f"   cartlab Dense {ours:9.0f} tok/s ({n_ours / 1e6:.2f}M params)   "
              f"Llama {theirs:9.0f} tok/s ({n_llama / 1e6:.2f}M params)   "
              f"ratio {ours / theirs:.2f} (target >= 1) {check(ours / theirs >= 1.0)}")


if __name__ == "__main__":
    main()
