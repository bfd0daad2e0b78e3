"""ASPP head: eval-mode pooling by hand, training-mode pooling, batch-1 guard, init."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ilseg.errors import IlsegError
from ilseg.models.aspp import ASPP, DEFAULT_DILATIONS, eval_pool


def _window_mean(x: torch.Tensor, top: int, left: int, kh: int, kw: int) -> torch.Tensor:
    """Mean of ``x[..., top:top+kh, left:left+kw]`` by an explicit double loop."""
    total = torch.zeros(x.shape[:2], dtype=torch.float64)
    for i in range(top, top + kh):
        for j in range(left, left + kw):
            total += x[:, :, i, j].double()
    return total / (kh * kw)


def test_eval_pool_40x40_by_hand() -> None:
    h = w = 40
    rows = torch.arange(h, dtype=torch.float64).view(h, 1)
    cols = torch.arange(w, dtype=torch.float64).view(1, w)
    pattern = torch.stack([rows * w + cols, (rows - 7) ** 2 - 3 * cols]).unsqueeze(0).float()  # 1x2x40x40
    pooled = eval_pool(pattern, 32)
    assert pooled.shape == pattern.shape
    # kernel 32: the valid pooled map is 9x9, padded 15 left/top and 16 right/bottom.
    # output (i, j) is the window starting at (clamp(i - 15, 0, 8), clamp(j - 15, 0, 8)).
    for i, j in [(0, 0), (15, 15), (20, 5), (23, 39), (39, 39), (16, 24), (24, 16)]:
        top, left = min(max(i - 15, 0), 8), min(max(j - 15, 0), 8)
        expected = _window_mean(pattern, top, left, 32, 32).float()
        torch.testing.assert_close(pooled[:, :, i, j], expected, rtol=1e-6, atol=1e-4)


def test_eval_pool_odd_size_and_small_map() -> None:
    x = torch.randn(2, 3, 35, 33)
    pooled = eval_pool(x, 32)  # valid map 4x2; pad top 15 / bottom 16, left 15 / right 16
    assert pooled.shape == x.shape
    torch.testing.assert_close(pooled[:, :, 0, 0], _window_mean(x, 0, 0, 32, 32).float())
    torch.testing.assert_close(pooled[:, :, 34, 32], _window_mean(x, 3, 1, 32, 32).float())
    small = torch.randn(2, 3, 7, 9)  # kernel (7, 9): the global mean everywhere
    pooled_small = eval_pool(small, 32)
    assert pooled_small.shape == small.shape
    torch.testing.assert_close(pooled_small, small.mean(dim=(2, 3), keepdim=True).expand_as(small))


def test_eval_mode_branch_uses_local_pool_training_mode_global() -> None:
    torch.manual_seed(0)
    head = ASPP(4, 8, dilations=(1, 2, 3))
    x = torch.randn(2, 4, 40, 40)
    head.eval()
    local = head.pool(x)
    torch.testing.assert_close(local, eval_pool(x, 32))
    head.train()
    torch.testing.assert_close(head.pool(x), x.mean(dim=(2, 3), keepdim=True))


def test_eval_forward_equals_manual_composition() -> None:
    torch.manual_seed(0)
    head = ASPP(6, 8, hidden_channels=5, dilations=(1, 2, 3)).eval()
    for bn in (head.map_bn, head.global_pooling_bn, head.red_bn):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 6, 36, 34)
    act = nn.LeakyReLU(0.01)
    with torch.no_grad():
        branches = torch.cat([conv(x) for conv in head.map_convs], dim=1)
        main = head.red_conv(act(head.map_bn(branches)))
        pool = head.pool_red_conv(act(head.global_pooling_bn(head.global_pooling_conv(eval_pool(x, 32)))))
        expected = act(head.red_bn(main + pool))
        out = head(x)
    assert out.shape == (2, 8, 36, 34)
    torch.testing.assert_close(out, expected)


def test_training_forward_shape() -> None:
    head = ASPP(16, 8, dilations=(1, 2, 3)).train()
    out = head(torch.randn(2, 16, 5, 7))
    assert out.shape == (2, 8, 5, 7)


def test_batch_of_one_in_training_mode_raises() -> None:
    head = ASPP(16, 8, dilations=(1, 2, 3)).train()
    with pytest.raises(IlsegError, match="batch of at least 2"):
        head(torch.randn(1, 16, 4, 4))
    head.eval()
    assert head(torch.randn(1, 16, 4, 4)).shape == (1, 8, 4, 4)
    head.train()
    head.global_pooling_bn.eval()  # frozen BN: no batch statistics needed
    assert head(torch.randn(1, 16, 4, 4)).shape == (1, 8, 4, 4)


def test_init_xavier_with_leaky_gain() -> None:
    torch.manual_seed(0)
    head = ASPP(512, 256, dilations=(6, 12, 18))
    gain = nn.init.calculate_gain("leaky_relu", 0.01)
    conv = head.map_convs[1]  # 512 -> 256, 3x3
    expected_std = gain * (2.0 / (512 * 9 + 256 * 9)) ** 0.5
    assert abs(conv.weight.std().item() - expected_std) / expected_std < 0.05
    assert all(m.bias is None for m in head.modules() if isinstance(m, nn.Conv2d))
    bns = [m for m in head.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 3
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in bns)


def test_dilations_and_widths() -> None:
    head = ASPP(32, 16, dilations=DEFAULT_DILATIONS[16])
    assert [c.dilation[0] for c in head.map_convs] == [1, 6, 12, 18]
    assert [c.padding[0] for c in head.map_convs] == [0, 6, 12, 18]
    assert head.red_conv.in_channels == 64 and head.red_conv.out_channels == 16
    assert DEFAULT_DILATIONS[8] == (12, 24, 32)
    with pytest.raises(IlsegError):
        ASPP(32, 16, dilations=(6, 12))
