"""Dense baseline (section 4.3): n_layers standard MHA + SwiGLU + RoPE layers, tied embeddings."""
from __future__ import annotations

import torch
import torch.nn as nn

from cartlab.model.base import CausalLM
from cartlab.model.config import DenseConfig
from cartlab.model.layers import MHAKV, Block, KVCache, cache_site


class Dense(CausalLM):
    def __init__(self, cfg: DenseConfig):
        super().__init__(cfg)
        self.layers = nn.ModuleList(Block(cfg, MHAKV(cfg)) for _ in range(cfg.n_layers))
        self.init_weights()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None):
        """idx (B, T) -> logits (B, T, V), loss."""
        start = 0 if cache is None else cache.pos
        rope = self.rope(start, idx.size(1), idx.device)
        x = self.wte(idx)  # (B, T, d)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, cache_site(cache, f"layer.{i}"))
        if cache is not None:
            cache.pos += idx.size(1)
        return self.head(x, targets, cache)

    def applications(self) -> list[tuple[str, nn.Module, int]]:
        return [("embedding", self.wte, 1), ("layers", self.layers, 1), ("norm", self.norm, 1)]
