"""Data-parallel training under ``torchrun`` (gloo on CPU): the process group and the gradient all-reduce."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def allreduce_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """Average gradients over ranks with a single all-reduce. A missing gradient counts as zeros so every rank
    makes the same call; it stays missing when no rank had one (the optimizer then skips it, as on one process)."""
    had = [p.grad is not None for p in params]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world
    off = 0
    for p, h in zip(params, had, strict=True):
        g = flat[off : off + p.numel()].view_as(p)
        off += p.numel()
        p.grad = g.clone() if (h or bool(g.any())) else None


def distributed_context() -> tuple[int, int, bool]:
    """(rank, world size, whether this call initialised the process group). Starts gloo under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    created = False
    if not dist.is_initialized():
        dist.init_process_group("gloo")
        created = True
    return dist.get_rank(), dist.get_world_size(), created
