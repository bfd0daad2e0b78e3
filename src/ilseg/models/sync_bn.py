"""BatchNorm synchronised across the processes of a distributed run.

:func:`convert_sync_batchnorm` swaps every BN of a model for a synchronised
one, in place: torch's :class:`~torch.nn.SyncBatchNorm` on CUDA, and
:class:`CPUSyncBatchNorm` on the CPU, where torch's refuses to run
("SyncBatchNorm expected input tensor to be on GPU", and DDP rejects it on CPU
modules).  Either computes the statistics of the *global* batch, so a run on W
processes normalises exactly as one process with the whole batch does.

The new modules share the old ones' parameters and buffers, keep their
train/eval mode (a frozen BN stays frozen), and have the same state-dict keys
as ``nn.BatchNorm2d``: checkpoints load into the unconverted model.

Example (inside a process group)::

    >>> model = convert_sync_batchnorm(build_segmenter(...), device_type="cpu")
    >>> ddp = nn.parallel.DistributedDataParallel(model)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

_BatchNorm = nn.modules.batchnorm._BatchNorm


class _SyncBatchNormFunction(torch.autograd.Function):
    """BN over the union of every rank's batch, computed in float32 with CPU collectives.

    Forward: all-reduce the per-channel sums and value counts, then the sums of
    squared deviations from the global mean (two passes, accumulated in
    float64 like torch's CPU BN).  Backward: all-reduce ``sum(dy)`` and ``sum(dy * xhat)``, so each
    rank's input gradient is that of the sum of all ranks' losses; the weight
    and bias gradients stay local, and DDP's average over ranks makes them the
    gradients of the mean loss, as with one process.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                group: Any) -> tuple[Tensor, Tensor, Tensor]:
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, channels] + [1] * (x.dim() - 2)
        xc = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 / fp16 inputs are normalised in float32
        stats = torch.cat([xc.sum(dims, dtype=torch.float64),
                           torch.tensor([xc.numel() // channels], dtype=torch.float64)])
        dist.all_reduce(stats, group=group)
        count = float(stats[-1])
        if count <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(x.shape)}")
        mean = stats[:-1] / count
        centred = xc - mean.to(xc.dtype).view(shape)
        squares = (centred * centred).sum(dims, dtype=torch.float64)
        dist.all_reduce(squares, group=group)
        var = squares / count
        invstd = torch.rsqrt(var + eps).to(xc.dtype)
        xhat = centred * invstd.view(shape)
        y = xhat
        if weight is not None:
            y = y * weight.to(xc.dtype).view(shape)
        if bias is not None:
            y = y + bias.to(xc.dtype).view(shape)
        ctx.save_for_backward(xhat, invstd, weight)
        ctx.count, ctx.group, ctx.has_bias = count, group, bias is not None
        unbiased = var * (count / (count - 1))
        ctx.mark_non_differentiable(mean, unbiased)
        return y.to(x.dtype), mean, unbiased

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor, _grad_mean: Tensor,
                 _grad_var: Tensor) -> tuple[Tensor | None, ...]:
        xhat, invstd, weight = ctx.saved_tensors
        channels = xhat.shape[1]
        dims = [0, *range(2, xhat.dim())]
        shape = [1, channels] + [1] * (xhat.dim() - 2)
        gy = grad_y.to(xhat.dtype)
        sum_dy = gy.sum(dims, dtype=torch.float64)
        sum_dy_xhat = (gy * xhat).sum(dims, dtype=torch.float64)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # the same on every rank (same graph), so all of them reduce
            both = torch.cat([sum_dy, sum_dy_xhat])
            dist.all_reduce(both, group=ctx.group)
            mean_dy = (both[:channels] / ctx.count).to(xhat.dtype).view(shape)
            mean_dy_xhat = (both[channels:] / ctx.count).to(xhat.dtype).view(shape)
            scale = invstd if weight is None else invstd * weight.to(xhat.dtype)
            grad_x = ((gy - mean_dy - xhat * mean_dy_xhat) * scale.view(shape)).to(grad_y.dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            grad_w = sum_dy_xhat.to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = sum_dy.to(grad_y.dtype if weight is None else weight.dtype)
        return grad_x, grad_w, grad_b, None, None


class CPUSyncBatchNorm(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training statistics are those of every rank's batch together.

    In training mode, inside a process group of more than one rank (gloo), the
    batch mean and variance are computed over all ranks' inputs and the
    running statistics are updated as plain BN would update them on that
    global batch.  In eval mode, or without a process group, it is plain BN.
    For CPU tensors only; on CUDA use torch's :class:`~torch.nn.SyncBatchNorm`.
    """

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        if input.device.type != "cpu":
            raise ValueError("CPUSyncBatchNorm synchronises CPU tensors; on CUDA use torch.nn.SyncBatchNorm "
                             "(convert_sync_batchnorm(..., device_type='cuda'))")
        self._check_input_dim(input)
        y, mean, unbiased_var = _SyncBatchNormFunction.apply(input, self.weight, self.bias, self.eps,
                                                             dist.group.WORLD)
        tracked = self.num_batches_tracked
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None \
                and tracked is not None:
            tracked.add_(1)
            factor = self.momentum if self.momentum is not None else 1.0 / float(tracked)
            with torch.no_grad():
                self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased_var.to(self.running_var.dtype), alpha=factor)
        return y


SYNC_BATCHNORM_TYPES: tuple[type[nn.Module], ...] = (nn.SyncBatchNorm, CPUSyncBatchNorm)


def convert_sync_batchnorm(module: nn.Module, *, device_type: str) -> nn.Module:
    """Replace the BatchNorms of ``module`` by synchronised ones, in place; return ``module``.

    Args:
        module: a model (or a single BN, then the new BN is returned).
        device_type: ``"cuda"`` (torch's :class:`~torch.nn.SyncBatchNorm`, any
            BN) or ``"cpu"`` (:class:`CPUSyncBatchNorm`, ``BatchNorm2d`` only).
    """
    if isinstance(module, SYNC_BATCHNORM_TYPES):
        return module
    if isinstance(module, nn.BatchNorm2d if device_type == "cpu" else _BatchNorm):
        cls = CPUSyncBatchNorm if device_type == "cpu" else nn.SyncBatchNorm
        sync = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.affine:
            sync.weight, sync.bias = module.weight, module.bias
        sync.running_mean, sync.running_var = module.running_mean, module.running_var
        sync.num_batches_tracked = module.num_batches_tracked
        sync.training = module.training
        return sync
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, device_type=device_type))
    return module
