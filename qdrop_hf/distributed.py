"""Reconstruction across processes (``accelerate launch --multi_gpu --num_processes N`` or ``torchrun``).

Each process keeps a shard of the calibration batches (and so caches only its shard of every block's
inputs); every reconstruction step averages the gradients of the rounding variables and activation
steps over all processes, so their parameters stay identical everywhere; activation ranges are
searched on the main process's shard and broadcast; block errors are summed over all shards. Only
the main process writes files. With one process every function here is a no-op.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init() -> None:
    """Join the process group the launcher describes (``WORLD_SIZE`` > 1): NCCL on GPUs, gloo on CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")


def finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def shard(items: list) -> list:
    """This process's share of ``items`` (round-robin); every process gets at least one."""
    if world_size() == 1:
        return items
    if len(items) < world_size():
        raise ValueError(f"{len(items)} calibration batches cannot be split over {world_size()} processes")
    return items[rank()::world_size()]


def average_gradients(params: list[torch.Tensor]) -> None:
    """One all-reduce of all gradients, averaged over processes."""
    if world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_from_main(tensors: list[torch.Tensor]) -> None:
    if world_size() == 1:
        return
    for t in tensors:
        dist.broadcast(t.data, src=0)


def sum_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over processes, in place."""
    if world_size() > 1:
        dist.all_reduce(t)
    return t


def sum_over_processes(*values: float) -> list[float]:
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.tolist()
