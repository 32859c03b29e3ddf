"""DDP plumbing for ``torchrun``: process-group set-up from the environment, rank helpers, reductions.

Outside torchrun (no ``WORLD_SIZE`` > 1 in the environment) everything degrades to a single process, so the
same code path runs in a notebook, under ``python -m kd.train`` and under ``torchrun --nproc_per_node=N``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its global rank, the world size and the device it should use."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the process group that torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    Backend: nccl when running on CUDA, gloo otherwise. ``device`` is "cpu", "cuda" or None (CUDA when
    available). With one process no group is created.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("device cuda requested but CUDA is not available")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device(kind)
    if world_size > 1 and not is_dist():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", init_method="env://")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def cleanup() -> None:
    """Leave the process group, if one was joined."""
    if is_dist():
        dist.destroy_process_group()


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    """True on rank 0: the process that writes files and shows progress."""
    return get_rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_mean(t: Tensor) -> Tensor:
    """Mean of ``t`` over all processes (a new tensor; ``t`` itself with one process)."""
    if not is_dist():
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / get_world_size()


def average_gradients(module: nn.Module) -> None:
    """Average the gradients of ``module``'s trainable parameters over all processes, in place.

    For trainable modules outside the DDP-wrapped model (distiller adapters). A parameter without a
    gradient on this rank takes part with zeros, so every rank issues the same collectives.
    """
    if not is_dist():
        return
    world = get_world_size()
    for p in module.parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad /= world


def all_reduce_max(t: Tensor) -> Tensor:
    """Element-wise max of ``t`` over all processes."""
    if not is_dist():
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_reduce_dict(d: dict[str, Tensor]) -> dict[str, Tensor]:
    """Mean over processes of a dict of scalar tensors, in one collective."""
    if not is_dist() or not d:
        return d
    keys = sorted(d)
    stacked = all_reduce_mean(torch.stack([d[k].detach().float() for k in keys]))
    return dict(zip(keys, stacked.unbind(0), strict=True))


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` with one process)."""
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every process."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
