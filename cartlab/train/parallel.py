"""How a model spreads over the ranks of a torchrun job: `parallel=ddp` or `parallel=fsdp`.

    ddp   a full replica per rank, gradients all-reduced (DistributedDataParallel)
    fsdp  FSDP2 (`torch.distributed.fsdp.fully_shard`): every transformer block, and then the
          model, is one unit whose parameters, gradients and optimizer state are split over the
          ranks and gathered for the unit's forward and backward; for models whose replica does
          not fit on one GPU

On one process there is nothing to spread: both train the model itself.

    strategy = STRATEGIES[cfg.parallel](world)
    model = strategy.wrap(raw, device, idle=...)        # what the step calls
    with strategy.accumulating(model, sync=last_micro):  # gradient sync on the last micro-batch only
        loss.backward()
    strategy.clip(model, 1.0)                           # the global gradient norm, clipped
    view = strategy.replica(raw, cfg)                   # rank 0: a full model for diagnostics

Units: each `Block` (prelude, coda, Dense layers) and each `CoreBlock`. A core block runs R
times per forward; sharded like the others it would be gathered R times in the forward and R
times again in the backward, so it is kept gathered from its first loop to the end of the
backward (`reshard_after_forward=False`): one gather per step for the loop, at the memory of one
block. FSDP2 shards no 0-d parameter (the loop embedding's scale is a (1,) vector for this).

Checkpoints of a sharded run are written with `torch.distributed.checkpoint` (each rank writes
its shards; `cartlab.train.checkpoint.save`) and load into any number of ranks, sharded or not
(`cartlab.checkpoint.load`).
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn

PARALLEL = ("ddp", "fsdp")


def fsdp_available() -> bool:
    """FSDP2's public `fully_shard` (torch >= 2.6; cartlab itself needs torch >= 2.4)."""
    import torch.distributed.fsdp as fsdp

    return hasattr(fsdp, "fully_shard")


class Replicated:
    """One process, or DDP over several: every rank holds the whole model."""

    sharded = False

    def __init__(self, world: int):
        self.world = world

    def wrap(self, model: nn.Module, device: torch.device, idle: bool = False) -> nn.Module:
        """`model` itself on one process, else DDP; `idle`: a step can leave parameters without
        gradient, so DDP must look for them (`cartlab.train.loops.idle_parameters`)."""
        if self.world == 1:
            return model
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                   find_unused_parameters=idle)

    def accumulating(self, model: nn.Module, sync: bool):
        """The context of one micro-batch's backward: without gradient sync unless `sync`."""
        return contextlib.nullcontext() if sync or self.world == 1 else model.no_sync()

    def clip(self, model: nn.Module, max_norm: float) -> float:
        """Clip the gradients to `max_norm` (inf: measure only); the norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()

    def replica(self, model: nn.Module, model_cfg) -> nn.Module | None:
        """The model rank 0 reads weights from (diagnostics, measures): the model itself."""
        return model


class Sharded(Replicated):
    """FSDP2 over the ranks of the job (the module docstring)."""

    sharded = True

    def __init__(self, world: int):
        super().__init__(world)
        self._replica: nn.Module | None = None

    def wrap(self, model: nn.Module, device: torch.device, idle: bool = False) -> nn.Module:
        if self.world == 1:
            return model
        from torch.distributed.fsdp import fully_shard

        from cartlab.model.components import CoreBlock
        from cartlab.model.layers import Block

        for module in model.modules():
            if isinstance(module, CoreBlock):
                fully_shard(module, reshard_after_forward=False)  # runs R times per forward
            elif isinstance(module, Block):
                fully_shard(module)
        fully_shard(model)  # the rest: embedding (tied head), anchor, mixer, gate, norms
        return model

    def accumulating(self, model: nn.Module, sync: bool):
        if self.world > 1:
            model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def clip(self, model: nn.Module, max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()  # a DTensor when sharded

    def replica(self, model: nn.Module, model_cfg) -> nn.Module | None:
        """Collective (every rank calls it): rank 0 gets a plain model on the CPU holding the
        current full weights, the other ranks None. A CPU copy, because a sharded model is one
        whose replica need not fit on a GPU."""
        if self.world == 1:
            return model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from cartlab.model import build_model

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if dist.get_rank() != 0:
            return None
        if self._replica is None:
            self._replica = build_model(model_cfg)
        self._replica.load_state_dict(state)
        return self._replica


STRATEGIES = {"ddp": Replicated, "fsdp": Sharded}
