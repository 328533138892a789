"""The loop count R of every training step: the sampler lives with the model
(`cartlab.model.loops`, whose expected R the accounting reads); this module adds what
distributed training asks of it."""
from __future__ import annotations

from cartlab.model.config import LMConfig
from cartlab.model.loops import QUADRATURE, STREAM, LoopSampler

__all__ = ["LoopSampler", "STREAM", "QUADRATURE", "idle_parameters"]


def idle_parameters(cfg: LMConfig) -> bool:
    """True when a training step can leave some parameters without gradient, so DDP must look for
    unused parameters: an unshared core whose later blocks a short draw of R skips, or whose first
    blocks truncated BPTT runs without gradient. (A shared core gets gradient from every step.)"""
    if getattr(cfg, "share_core", True):
        return False
    return cfg.loops_vary or cfg.bptt_loops is not None
