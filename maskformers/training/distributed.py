"""torch.distributed helpers for runs launched with ``torchrun`` (gloo on CPU, nccl on GPU).

``torchrun --nproc_per_node=N -m maskformers train ...`` sets RANK, WORLD_SIZE, LOCAL_RANK and the
rendezvous variables; :func:`setup` reads them, initialises the process group once and picks the
device. Without them everything runs as one process and these helpers are no-ops.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "setup", "teardown", "is_distributed", "all_reduce_mean", "barrier", "gather_objects",
           "broadcast_object"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def setup(device: str | None = None, *, backend: str | None = None) -> DistInfo:
    """Initialise the process group from torchrun's environment (if any) and choose the device.

    device: "cpu", "cuda" or None (cuda when available). With CUDA each process uses ``cuda:LOCAL_RANK``.
    backend: default "nccl" for CUDA and "gloo" for CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind.startswith("cuda"):
        index = local_rank if world > 1 or kind == "cuda" else torch.device(kind).index or 0
        dev = torch.device("cuda", index)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(kind)
    if world > 1 and not is_distributed():
        dist.init_process_group(backend or ("nccl" if dev.type == "cuda" else "gloo"))
    if is_distributed():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def teardown() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over processes (a copy; the input is unchanged)."""
    if not is_distributed():
        return values.clone()
    out = values.detach().clone()
    dist.all_reduce(out)
    return out / dist.get_world_size()


def gather_objects(items: list[Any]) -> list[Any]:
    """``items`` of every process, concatenated in rank order (this process's alone when not distributed)."""
    if not is_distributed():
        return items
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, items)
    return [x for part in gathered for x in part]


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` on every process."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
