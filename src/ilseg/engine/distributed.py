"""Distributed helpers on PyTorch's own stack (torchrun + torch.distributed).

``ilseg train`` under ``torchrun`` reads the usual environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set by torchrun) and initialises a
process group: NCCL on CUDA, gloo on the CPU (overridable).  Without torchrun
everything here degrades to single-process no-ops.
"""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from ilseg.errors import IlsegError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(backend: str, device_kind: str, timeout_s: int) -> DistInfo:
    """Initialise the process group when launched by torchrun; return this rank's info."""
    if not launched_by_torchrun():
        return DistInfo()
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world == 1:
        return DistInfo(rank=0, world_size=1, local_rank=local)
    if backend == "auto":
        backend = "nccl" if device_kind == "cuda" else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise IlsegError("runtime.backend is 'nccl' but CUDA is not available; use runtime.backend=gloo on the CPU")
    if device_kind == "cuda":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (no-op single-process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class ShardSampler(Sampler[int]):
    """Evaluation sampler: rank r takes indices r, r+W, r+2W... with no padding.

    torch's DistributedSampler pads the last shard with repeated images, which
    would count those images twice in the confusion matrix.  Here every image
    is evaluated exactly once across ranks; shards may differ in length by one.
    """

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return max(0, math.ceil((self.length - self.rank) / self.world_size))
