"""What a run does differently under torchrun (WORLD_SIZE > 1): join the process group, agree on
the loss and on stopping each step, gather every rank's loader position, and split a resumed
run's global batch over another number of ranks."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def _dist_setup(device: str) -> tuple[int, int, int]:
    """(rank, local rank, world size); joins the process group (NCCL on CUDA, gloo on CPU) under
    torchrun, (0, 0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 0, 1
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    return dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")), world


def regroup(saved: dict | list, run_world: int, rank: int, world: int, grad_accum: int,
            run_id: str) -> tuple[dict, int]:
    """(this rank's loader state, micro-batches per step) for a run whose global batch was set on
    `run_world` ranks, resumed on `world`: the run's grad_accum x run_world micro-batches per
    step are split over the ranks there are now, and the loader continues after the windows
    already read (`saved`: the checkpoint's loader states, one per rank that wrote it). Batches
    are the same windows as before up to the end of the current epoch; the next epoch's
    boundary falls where the new rank count puts it."""
    micro = grad_accum * run_world  # micro-batches of batch_size per optimizer step, over all ranks
    if micro % world:
        raise ValueError(f"cannot resume run {run_id!r} on {world} ranks: its steps are {micro} micro-batches "
                         f"(grad_accum={grad_accum} on {run_world} ranks); resume on a number of ranks that "
                         f"divides {micro}")
    states = saved if isinstance(saved, list) else [saved]
    if len(states) == world:  # written by as many ranks as there are now
        return states[rank], micro // world
    written, first = len(states), states[0]
    return {**first, "world_size": world, "rank": rank, "step": first["step"] * written // world}, micro // world


def _reduce_step(loss: float, stopping: bool, world: int, device) -> tuple[float, bool]:
    """The loss averaged over ranks, and whether any rank has been asked to stop, in one
    all-reduce per step: every rank then stops after the same step (a rank that stopped alone
    would leave the others waiting in their next collective)."""
    if world == 1:
        return loss, stopping
    t = torch.tensor([loss, float(stopping)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t[0].item() / world, t[1].item() > 0


def _gather(state: dict, world: int) -> list[dict]:
    """Every rank's `state` (e.g. its loader position), in rank order, on every rank."""
    states = [None] * world
    dist.all_gather_object(states, state)
    return states

