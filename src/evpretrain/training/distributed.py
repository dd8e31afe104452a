"""Processes and devices: torch.distributed as torchrun or SLURM launch it, and moving batches to a device."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ProcessLayout:
    """This process's place among ``world_size`` processes (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def process_layout() -> ProcessLayout:
    """The layout the launcher set in the environment; a single process when ``WORLD_SIZE`` is unset or 1."""
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        return ProcessLayout(rank, int(os.environ.get("LOCAL_RANK", rank)), world_size)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return ProcessLayout()
    rank = int(os.environ["RANK"])
    return ProcessLayout(rank, int(os.environ.get("LOCAL_RANK", rank)), world_size)


def resolve_device(device: str | torch.device | None, layout: ProcessLayout) -> torch.device:
    """``device`` as given, else this process's GPU (``cuda:LOCAL_RANK``) when there is one, else the CPU."""
    if device is not None:
        resolved = torch.device(device)
        if resolved.type == "cuda" and resolved.index is None:
            resolved = torch.device("cuda", layout.local_rank)
    elif torch.cuda.is_available():
        resolved = torch.device("cuda", layout.local_rank)
    else:
        resolved = torch.device("cpu")
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    return resolved


def init_process_group(layout: ProcessLayout, device: torch.device) -> bool:
    """Join the process group (NCCL on GPUs, gloo on CPUs) unless single or already joined; True if this joined."""
    if not layout.distributed or dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, rank=layout.rank, world_size=layout.world_size, **kwargs)
    return True


def mean_across_ranks(value: torch.Tensor, layout: ProcessLayout) -> torch.Tensor:
    """The mean of a tensor over all ranks (itself when single)."""
    if not layout.distributed:
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / layout.world_size


def gather_objects(obj: Any, layout: ProcessLayout) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` when single)."""
    if not layout.distributed:
        return [obj]
    gathered: list[Any] = [None] * layout.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors of a (nested) batch moved to ``device``; other values as they are."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a named tuple
        return type(batch)(*(to_device(value, device) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(value, device) for value in batch)
    return batch
