"""Dense baseline (section 4.3): n_layers standard MHA + SwiGLU + RoPE layers, tied embeddings.

    tokens -> embedding -> n_layers x Block -> norm -> tied LM head

With the LRT hooks (`lrt_kv`, `lrt_residual`) the same layers get a recurrent memory: the
previous token's output of a source layer is read at the injection layers. Which memory the
model has is chosen in one place (`__init__`, from `cartlab.model.memory.MEMORIES`); the memory
decides in which order positions go through `stack` (plain Dense: all at once) and what each
injection layer adds (`memory.inject`).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from cartlab.model.base import CausalLM
from cartlab.model.config import DenseConfig
from cartlab.model.layers import MHAKV, Block, KVCache, cache_site
from cartlab.model.memory import MEMORIES, Recall


class Dense(CausalLM):
    def __init__(self, cfg: DenseConfig):
        super().__init__(cfg)
        self.layers = nn.ModuleList(Block(cfg, MHAKV(cfg)) for _ in range(cfg.n_layers))
        self.init_weights()
        # made after the backbone's init, so one seed gives an LRT model and its Dense backbone the same weights
        self.memory = MEMORIES[cfg.memory_kind](cfg)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
                subsets: int | None = None):
        """idx (B, T) -> logits (B, T, V), loss. `cache` continues a sequence (KV-cached
        generation). LRT only: `subsets` runs the interleaved schedule with S = subsets (the
        training forward uses `memory_subsets`)."""
        x = self.wte(idx)  # (B, T, d)
        x = self.memory.schedule(self, x, cache, subsets)  # (B, T, d)
        return self.head(x, targets, cache)

    def run(self, x: torch.Tensor, cache: KVCache | None = None, recall: Recall | None = None):
        """One pass of the layers over the new positions of x (B, T, d), continuing `cache`."""
        start = 0 if cache is None else cache.pos
        out = self.stack(x, self.rope(start, x.size(1), x.device), cache, recall)
        if cache is not None:
            cache.pos += x.size(1)
        return out

    def stack(self, x: torch.Tensor, rope, cache: KVCache | None = None, recall: Recall | None = None):
        """The layers on x (B, T, d) at the positions `rope` rotates to; `recall` is the memory
        the positions read (None: none). Returns the output and the memory source layer's output
        (None without memory), (B, T, d) each."""
        source = None
        for i, layer in enumerate(self.layers):
            x, slot = self.memory.inject(i, x, recall)
            x = layer(x, rope, cache_site(cache, f"layer.{i}"), slot)
            if i == self.memory.source:
                source = x
        return x, source

    def diagnostics(self) -> dict:
        return self.memory.diagnostics()

    def applications(self) -> list[tuple[str, nn.Module, int]]:
        return [("embedding", self.wte, 1), ("layers", self.layers, 1), *self.memory.applications(self.layers),
                ("norm", self.norm, 1)]

    def train_applications(self) -> list[tuple[str, nn.Module, int]]:
        """One training forward: LRT's interleaved schedule adds a memory-free pass of the layers."""
        return self.applications() + self.memory.init_pass(self.layers)
