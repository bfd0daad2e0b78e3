"""Distributed helpers on PyTorch's own stack (torchrun + torch.distributed).

``ilseg train`` under ``torchrun`` reads the usual environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set by torchrun) and initialises a
process group: NCCL on CUDA, gloo on the CPU (overridable).  Without torchrun
everything here degrades to single-process no-ops.

What keeps a run on W processes equal to the same run on one (docs/scaling.md):

* :class:`GlobalBatchSampler` - one permutation per epoch, cut into global
  batches of ``optim.batch_size``; rank r takes the r-th slice of each, so
  the ranks' batches together are exactly the single-process batch;
* :func:`ilseg.models.convert_sync_batchnorm` - BN statistics over the
  global batch: torch's SyncBatchNorm on CUDA, ilseg's own on the CPU (gloo);
* :class:`ShardSampler` - evaluation shards without repeated images, so the
  confusion matrix summed over ranks counts every image once;
* :func:`on_main` - work done once on rank 0 (the split scan, the run folder)
  whose result, or error, every rank receives, so no rank waits forever for a
  rank that failed.
"""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from ilseg.errors import IlsegError, ReportedByMainRank, plural

T = TypeVar("T")


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


def env_rank() -> tuple[int, int]:
    """``(rank, world_size)`` from torchrun's environment; ``(0, 1)`` without torchrun."""
    if not launched_by_torchrun():
        return 0, 1
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def setup(backend: str, device_kind: str, timeout_s: int) -> DistInfo:
    """Initialise the process group when launched by torchrun; return this rank's info.

    Args:
        backend: ``"auto"`` (NCCL on CUDA, gloo on the CPU), ``"nccl"`` or ``"gloo"``.
        device_kind: ``"cuda"`` or ``"cpu"``, the device this run trains on.
        timeout_s: how long a collective operation (and the rendezvous) may
            wait for the other ranks before the job fails.
    """
    if not launched_by_torchrun():
        return DistInfo()
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world == 1:
        return DistInfo(rank=0, world_size=1, local_rank=local)
    if backend == "auto":
        backend = "nccl" if device_kind == "cuda" else "gloo"
    if backend == "nccl" and device_kind != "cuda":
        raise IlsegError("runtime.backend is 'nccl', which needs CUDA, but this run trains on the CPU; "
                         "use runtime.backend=gloo (or auto)")
    if device_kind == "cuda":
        visible = torch.cuda.device_count()
        if local >= visible:
            raise IlsegError(
                f"LOCAL_RANK {local} but this machine shows only {plural(visible, 'CUDA device')} "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
                f"start at most {visible} processes per machine (torchrun --nproc_per_node={visible})"
            )
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def teardown(*, together: bool = False) -> None:
    """Destroy the process group.  ``together``: every rank finished the same work, so they first wait for
    each other, the usual guard against destroying a group a peer still uses (a rank of a finished
    two-process run once hung in ``destroy_process_group`` with torch 2.6's gloo).  After an error or a stop
    the peers may be gone, so no rank waits for them."""
    if dist.is_available() and dist.is_initialized():
        if together and _active():
            dist.barrier()
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if _active():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (no-op single-process)."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def average_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """The mean of each value over ranks (every rank passes the same keys)."""
    if not _active() or not values:
        return values
    keys = sorted(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, t.tolist())}


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and return its (picklable) result on every rank.

    If ``fn`` raises on rank 0, rank 0 re-raises it and every other rank raises
    :class:`~ilseg.errors.ReportedByMainRank` with the same message, so all of
    them exit with an error at once instead of waiting for a rank that is gone.
    Single-process, this is just ``fn()``.
    """
    if not _active():
        return fn()
    if dist.get_rank() == 0:
        try:
            result = fn()
        except BaseException as exc:
            broadcast_object(("error", f"{exc}" if isinstance(exc, IlsegError) else f"{type(exc).__name__}: {exc}"))
            raise
        broadcast_object(("ok", result))
        return result
    status, payload = broadcast_object(None)
    if status == "error":
        raise ReportedByMainRank(payload)
    return payload


# -- samplers -----------------------------------------------------------------
class GlobalBatchSampler(Sampler[list[int]]):
    """Training batches whose union over ranks is the single-process batch.

    Each epoch draws one permutation of ``range(length)`` from
    ``seed + epoch`` (the same on every rank), drops the tail that does not
    fill a whole global batch, and cuts the rest into global batches of
    ``global_batch``.  Rank ``r`` of ``W`` yields, for global batch ``i``,
    ``perm[i*B + r*B/W : i*B + (r+1)*B/W]``: the ranks' batches laid end to
    end in rank order are exactly the batch one process would take.  Call
    :meth:`set_epoch` before each epoch.

    Example::

        >>> list(GlobalBatchSampler(8, 4, rank=0, world_size=1, seed=0))
        [[4, 0, 7, 3], [2, 5, 1, 6]]
        >>> [list(GlobalBatchSampler(8, 4, rank=r, world_size=2, seed=0)) for r in (0, 1)]
        [[[4, 0], [2, 5]], [[7, 3], [1, 6]]]
    """

    def __init__(self, length: int, global_batch: int, *, rank: int, world_size: int, seed: int,
                 shuffle: bool = True) -> None:
        if global_batch % world_size:
            raise IlsegError(f"optim.batch_size {global_batch} is the global batch and must divide by the "
                             f"{world_size} processes")
        self.length, self.global_batch = length, global_batch
        self.rank, self.world_size = rank, world_size
        self.seed, self.epoch, self.skip, self.shuffle = seed, 0, 0, shuffle

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Yield ``epoch``'s batches from the ``skip``-th on (to finish an epoch stopped part-way)."""
        self.epoch, self.skip = epoch, skip

    def __iter__(self) -> Iterator[list[int]]:
        if not self.shuffle:  # the images in their order, every epoch
            perm = list(range(self.length))
        else:
            perm = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        per_rank = self.global_batch // self.world_size
        for i in range(self.skip, len(self)):
            start = i * self.global_batch + self.rank * per_rank
            yield perm[start:start + per_rank]

    def __len__(self) -> int:
        return self.length // self.global_batch


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
