"""Where a model runs: device, autocast and memory format (:class:`Placement`), and :func:`resolve_device`.

Shared by training (:mod:`ilseg.engine`), evaluation and drawing predictions
(:mod:`ilseg.visual`); it depends on nothing of ilseg but the error type.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ilseg.errors import IlsegError

if TYPE_CHECKING:
    from ilseg.config import RuntimeConfig

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Placement:
    """Where and how a model computes: its device, the autocast dtype and the memory format of its inputs.

    Placement changes nothing that is learnt beyond rounding (fp32 vs bf16 autocast, channels-last).
    """

    device: torch.device
    amp: str = "none"
    channels_last: bool = False

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = AMP_DTYPES[self.amp]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    @classmethod
    def for_runtime(cls, runtime: RuntimeConfig, device: torch.device) -> Placement:
        """The placement ``runtime`` asks for on ``device`` (``"auto"`` resolved for it)."""
        return cls(device, runtime.amp_for(device.type), runtime.channels_last_for(device.type))

    def images(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images


def resolve_device(kind: str) -> torch.device:
    """``"cuda"``, ``"cpu"`` or ``"auto"`` (CUDA when there is one) as a device, or a clear error."""
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise IlsegError("runtime.device is 'cuda' but no CUDA device is available; use runtime.device=cpu")
        return torch.device("cuda")
    return torch.device("cpu")
