"""Dense baseline (section 4.3): n_layers standard MHA + SwiGLU + RoPE layers, tied embeddings.

    tokens -> embedding -> n_layers x Block -> norm -> tied LM head

LRT, the same layers with a recurrent memory, is its own family on this model
(`cartlab.model.lrt.LRT`, hooks `lrt_kv`, `lrt_residual`).
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn

from cartlab.model.base import CausalLM
from cartlab.model.config import DenseConfig
from cartlab.model.family import ModelSpec, register_family
from cartlab.model.layers import MHAKV, Block, KVCache, cache_site


class Dense(CausalLM):
    block: ClassVar[type[Block]] = Block
    """The layer class (LRT's layers also take a memory slot)."""

    def __init__(self, cfg: DenseConfig):
        super().__init__(cfg)
        self.layers = nn.ModuleList(self.block(cfg, MHAKV(cfg)) for _ in range(cfg.n_layers))
        self.init_weights()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
                attention_mask: torch.Tensor | None = None):
        """idx (B, T) -> logits (B, T, V), loss. `cache` continues a sequence (KV-cached generation);
        `attention_mask` (B, T), 1 for real tokens and 0 for left padding (`CausalLM.positions`)."""
        x = self.wte(idx)  # (B, T, d)
        rope = self.positions(idx, cache, attention_mask)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, cache_site(cache, f"layer.{i}"))  # (B, T, d)
        if cache is not None:
            cache.pos += idx.size(1)
        return self.head(x, targets, cache)

    def applications(self) -> list[tuple[str, nn.Module, int]]:
        return [("embedding", self.wte, 1), ("layers", self.layers, 1), ("norm", self.norm, 1)]


def dense_stem(m: DenseConfig) -> str:
    """Run-name stem: 'dense4L-d128'."""
    return f"dense{m.n_layers}L-d{m.d_model}"


def dense_label(m: DenseConfig) -> str:
    """Variant label: 'dense d=128 L=4'."""
    return f"dense d={m.d_model} L={m.n_layers}"


register_family(ModelSpec(name="dense", display="Dense", config=DenseConfig, model=Dense, stem=dense_stem,
                          label=dense_label))
