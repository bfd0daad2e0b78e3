"""ResNet body: shapes, the dilation pattern, torchvision compatibility."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from ilseg.errors import IlsegError
from ilseg.models.backbone import ResNet


def _forward(body: nn.Module, size: int = 64) -> torch.Tensor:
    body.eval()
    with torch.no_grad():
        return body(torch.randn(1, 3, size, size))


@pytest.mark.parametrize(
    ("depth", "output_stride"),
    [(18, 8), (18, 16), (18, 32), (34, 8), (34, 16), (50, 8), (50, 16), (101, 8), (101, 16)],
)
def test_feature_shape(depth: int, output_stride: int) -> None:
    body = ResNet(depth, output_stride=output_stride)
    expected_channels = 512 if depth < 50 else 2048
    assert body.out_channels == expected_channels
    out = _forward(body, 32)
    assert out.shape == (1, expected_channels, 32 // output_stride, 32 // output_stride)


def _convs3x3(stage: nn.Module) -> list[nn.Conv2d]:
    return [m for m in stage.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]


@pytest.mark.parametrize("depth", [18, 50])
def test_dilation_pattern_os16(depth: int) -> None:
    body = ResNet(depth, output_stride=16)
    layer4 = _convs3x3(body.layer4)
    assert len(layer4) == {18: 4, 50: 3}[depth]
    for conv in layer4:  # the first block's conv included
        assert conv.dilation == (2, 2) and conv.padding == (2, 2) and conv.stride == (1, 1)
    assert body.layer4[0].downsample[0].stride == (1, 1)
    for stage in (body.layer1, body.layer2, body.layer3):
        assert all(conv.dilation == (1, 1) for conv in _convs3x3(stage))
    strided = body.layer2[0].conv2 if depth == 50 else body.layer2[0].conv1
    assert strided.stride == (2, 2)
    assert body.layer3[0].downsample[0].stride == (2, 2)


@pytest.mark.parametrize("depth", [18, 50])
def test_dilation_pattern_os8(depth: int) -> None:
    body = ResNet(depth, output_stride=8)
    for conv in _convs3x3(body.layer3):
        assert conv.dilation == (2, 2) and conv.padding == (2, 2) and conv.stride == (1, 1)
    for conv in _convs3x3(body.layer4):
        assert conv.dilation == (4, 4) and conv.padding == (4, 4) and conv.stride == (1, 1)
    assert body.layer3[0].downsample[0].stride == (1, 1)
    assert body.layer4[0].downsample[0].stride == (1, 1)


def test_stride_sits_on_the_3x3_conv() -> None:
    body = ResNet(50, output_stride=32)
    for stage in (body.layer2, body.layer3, body.layer4):
        first = stage[0]
        assert first.conv1.stride == (1, 1)
        assert first.conv2.stride == (2, 2)
        assert first.downsample[0].stride == (2, 2)


@pytest.mark.parametrize("depth", [18, 50])
def test_torchvision_state_dict_loads_strictly(depth: int) -> None:
    reference = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    body = ResNet(depth)
    body.load_state_dict(state, strict=True)
    assert set(body.state_dict()) == set(state)


@pytest.mark.parametrize("depth", [18, 50])
def test_zero_slope_os32_computes_what_torchvision_computes(depth: int) -> None:
    """With ReLU and no dilation the body is torchvision's ResNet up to layer4."""
    torch.manual_seed(0)
    reference = getattr(torchvision.models, f"resnet{depth}")(weights=None).eval()
    for m in reference.modules():  # non-trivial BN statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    body = ResNet(depth, output_stride=32, negative_slope=0.0).eval()
    body.load_state_dict({k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        r = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
        for stage in (reference.layer1, reference.layer2, reference.layer3, reference.layer4):
            r = stage(r)
        ours = body(x)
    torch.testing.assert_close(ours, r, rtol=1e-4, atol=1e-5)


def test_activation_is_leaky() -> None:
    out = _forward(ResNet(18, output_stride=32), 64)
    assert (out < 0).any(), "LeakyReLU(0.01) lets small negative values through"
    slopes = {m.negative_slope for m in ResNet(18).modules() if isinstance(m, nn.LeakyReLU)}
    assert slopes == {0.01}


def test_init_like_torchvision() -> None:
    body = ResNet(18)
    bns = [m for m in body.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in bns)
    w = body.layer4[0].conv1.weight  # 512 out, 3x3: fan_out = 4608
    expected_std = (2.0 / (512 * 9)) ** 0.5
    assert abs(w.std().item() - expected_std) / expected_std < 0.05
    assert not any(isinstance(m, nn.Linear) for m in body.modules())


def test_batchnorms_convert_to_sync_batchnorm() -> None:
    body = ResNet(18)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in body.modules())
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(body)
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in converted.modules()) == n_bn == 20


@pytest.mark.parametrize(("depth", "output_stride"), [(42, 16), (50, 4), (18, 12)])
def test_invalid_configuration_raises(depth: int, output_stride: int) -> None:
    with pytest.raises(IlsegError):
        ResNet(depth, output_stride=output_stride)
