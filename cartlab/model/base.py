"""What CART and Dense share: tied token embeddings, rotary angles, the LM head and loss, weight
init, and KV-cached sampling. Subclasses define `forward(idx, targets=None, cache=None, ...)`
and `applications()` (which module runs how many times per forward, for the accounting;
`train_applications()` when a training forward runs more)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from cartlab.model.config import LMConfig
from cartlab.model.layers import KVCache, PaddedRope, RMSNorm, check_mask, rope_angles, rope_angles_at, upcast

RESIDUAL_OUTPUTS = ("attn.proj.weight", "ffn.down.weight")


class CausalLM(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied (section 3.3)

    def init_weights(self) -> None:
        """N(0, init_std) for embeddings and linear weights; the projections that write into the
        residual stream get init_std / sqrt(2 * effective depth) (GPT-2). Norms start at 1 and the
        recurrent-core parts keep their own documented init."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.effective_depth)
        for name, p in self.named_parameters():
            if name.endswith(RESIDUAL_OUTPUTS):
                nn.init.normal_(p, 0.0, out_std)
            elif name.endswith("weight") and p.dim() == 2:
                nn.init.normal_(p, 0.0, std)

    def rope(self, start: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_angles(self.config.head_dim, self.config.rope_theta, start, length, device, self.angle_dtype)

    @property
    def angle_dtype(self) -> torch.dtype:
        """Rotary angles in fp32, or in float64 for a float64 model."""
        return torch.promote_types(self.wte.weight.dtype, torch.float32)

    def positions(self, idx: torch.Tensor, cache: KVCache | None, attention_mask: torch.Tensor | None):
        """The rotary angles of idx's (B, T) positions, continuing `cache` (idx: the tokens, or
        their embeddings (B, T, d); only its shape is read). With an attention mask (B, T) (1
        real token, 0 left padding), or a cache that holds one, a `PaddedRope`: each row's real
        tokens get the positions they would have unpadded, and the cache keeps the mask of every
        position seen (`states['keys']`) for later calls."""
        B, T = idx.shape[:2]
        start = 0 if cache is None else cache.pos
        held = None if cache is None else cache.states.get("keys")  # (B, start) bool
        if attention_mask is None and held is None:
            return self.rope(start, T, idx.device)
        check_mask(attention_mask, B, T)
        new = idx.new_ones(B, T, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if held is None:
            held = idx.new_ones(B, start, dtype=torch.bool)
        pos = (held.sum(1, keepdim=True) + new.cumsum(1) - 1).clamp_min(0)  # (B, T): real tokens before each
        keys = torch.cat([held, new], dim=1)  # (B, S)
        if cache is not None:
            cache.states["keys"] = keys
        return PaddedRope(*rope_angles_at(self.config.head_dim, self.config.rope_theta, pos, self.angle_dtype), keys)

    def head(self, x: torch.Tensor, targets: torch.Tensor | None, cache: KVCache | None = None):
        """logits (B, T, V) and the mean next-token cross-entropy (None without targets;
        target -1 is ignored). Decoding on CPU without autograd reads the head through the
        cache's transposed copy (`KVCache.head_t`), the faster layout for a few rows."""
        h = self.norm(x)
        if cache is not None and h.device.type == "cpu" and not torch.is_grad_enabled():
            logits = h @ cache.head_t(self.lm_head.weight).type_as(h)
        else:
            logits = self.lm_head(h)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(upcast(logits).flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss

    def diagnostics(self) -> dict:
        """Scalars worth logging during training (CART: spectral radius, HyperConnection weights)."""
        return {}

    def train_applications(self) -> list[tuple[str, nn.Module, int]]:
        """What one training forward runs, as `applications()` (which it is unless the training
        forward differs from inference, as LRT's interleaved schedule does)."""
        return self.applications()

    def num_params(self) -> int:
        """Stored parameters (the tied embedding counted once)."""
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        attention_mask: torch.Tensor | None = None,
        **forward_kw,
    ) -> torch.Tensor:
        """Sample `max_new_tokens` after `idx` (B, T). temperature=0 is greedy. With `use_cache`
        each new token costs one position of compute; without, the whole sequence is re-run.
        Extra keyword arguments go to `forward` (e.g. `n_loops`, or `exit` and `exit_threshold` for
        CART, whose `loops_per_token` then holds the loop count of every position run).
        `attention_mask` (B, T), 1 for real tokens and 0 for left padding, generates a batch of
        prompts of different lengths; each row's tokens equal its unbatched generation."""
        cache = KVCache() if use_cache else None
        if attention_mask is not None:
            forward_kw["attention_mask"] = attention_mask
        logits, _ = self(idx, cache=cache, **forward_kw)
        for step in range(max_new_tokens):
            last = upcast(logits[:, -1, :])  # (B, V)
            if temperature == 0:
                nxt = last.argmax(dim=-1, keepdim=True)
            else:
                last = last / temperature
                if top_k is not None:
                    kth = torch.topk(last, min(top_k, last.size(-1))).values[:, -1:]
                    last = last.masked_fill(last < kth, float("-inf"))
                nxt = torch.multinomial(torch.softmax(last, dim=-1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
            if attention_mask is not None:  # the cache holds the mask; uncached runs need it whole
                attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
                forward_kw["attention_mask"] = None if use_cache else attention_mask
            if step + 1 < max_new_tokens:
                logits, _ = self(nxt if use_cache else idx, cache=cache, **forward_kw)
        return idx
