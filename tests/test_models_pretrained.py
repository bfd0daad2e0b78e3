"""Weight loading: InPlace-ABN checkpoints, torchvision files, the ImageNet hub cache."""

from __future__ import annotations

import copy
import functools
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from ilseg.errors import IlsegError
from ilseg.models import (
    ResNet,
    build_segmenter,
    imagenet_cache_path,
    load_iabn_checkpoint,
    load_pretrained,
)
from ilseg.models.pretrained import IABN_EPS, iabn_bn_weight, iabn_to_torchvision_names


def _iabn_name(ours: str) -> str:
    """torchvision name -> InPlace-ABN name, written out independently of the library."""
    parts = ours.split(".")
    if parts[0] in ("conv1", "bn1"):
        return "mod1." + ours
    stage, block, rest = int(parts[0].removeprefix("layer")), int(parts[1]), parts[2:]
    if rest[0] == "downsample":
        inner = ("proj_conv" if rest[1] == "0" else "proj_bn") + "." + rest[2]
    else:
        inner = "convs." + ".".join(rest)
    return f"mod{stage + 1}.block{block + 1}.{inner}"


def _is_bn_weight(ours: str) -> bool:
    """Whether a torchvision-named key is a BatchNorm weight (``bn1``, ``bnI``, ``downsample.1``)."""
    module, attr = ours.rsplit(".", 1)
    last = module.split(".")[-1]
    return attr == "weight" and (last.startswith("bn") or module.endswith("downsample.1"))


def _randomised(body: ResNet, seed: int) -> dict[str, torch.Tensor]:
    """A state dict of ``body``'s shapes with distinct random values everywhere."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.rand(v.shape, generator=g) + 0.5 if v.is_floating_point() else v.clone()
        for k, v in body.state_dict().items()
    }


def _to_iabn(state: dict[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    iabn = {prefix + _iabn_name(k): v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    iabn[prefix + "classifier.fc.weight"] = torch.zeros(1000, 4)
    iabn[prefix + "classifier.fc.bias"] = torch.zeros(1000)
    return iabn


@pytest.fixture(scope="module")
def iabn_resnet50(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A ResNet-50-shaped InPlace-ABN checkpoint file and the values it holds (our names)."""
    state = _randomised(ResNet(50), seed=1)
    path = tmp_path_factory.mktemp("iabn") / "resnet50_iabn_sync.pth.tar"
    torch.save({"state_dict": _to_iabn(state), "epoch": torch.tensor(90)}, path)
    return path, state


def test_iabn_values_land_on_the_right_parameters(iabn_resnet50: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, state = iabn_resnet50
    body = ResNet(50)
    load_iabn_checkpoint(path, body)
    loaded = body.state_dict()
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        if _is_bn_weight(key):
            # BN weights are not copied as they are: InPlace-ABN scales by |w| + eps,
            # so the loader stores |w| + 1e-5 (see test_iabn_negative_bn_weights_...).
            assert torch.equal(loaded[key], value.abs() + 1e-5), key
        else:
            assert torch.equal(loaded[key], value), key
    raw = torch.load(path, weights_only=True)["state_dict"]
    assert torch.equal(body.conv1.weight, raw["module.mod1.conv1.weight"])
    assert torch.equal(body.bn1.running_var, raw["module.mod1.bn1.running_var"])
    assert torch.equal(body.layer1[0].downsample[0].weight, raw["module.mod2.block1.proj_conv.weight"])
    assert torch.equal(body.layer1[0].downsample[1].bias, raw["module.mod2.block1.proj_bn.bias"])
    assert torch.equal(body.layer3[5].conv2.weight, raw["module.mod4.block6.convs.conv2.weight"])
    assert torch.equal(body.layer4[2].bn3.running_mean, raw["module.mod5.block3.convs.bn3.running_mean"])


def test_build_segmenter_detects_iabn_format(iabn_resnet50: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, state = iabn_resnet50
    model = build_segmenter(backbone="resnet50", classes_per_step=[2], head_channels=8, pretrained=str(path))
    assert torch.equal(model.body.layer2[3].conv3.weight, state["layer2.3.conv3.weight"])


def test_iabn_without_wrapper_prefix_or_state_dict_key(tmp_path: Path) -> None:
    body = ResNet(18)
    state = _randomised(body, seed=2)
    path = tmp_path / "plain.pth"
    torch.save(_to_iabn(state, prefix=""), path)
    load_iabn_checkpoint(path, body)
    assert torch.equal(body.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])


def test_iabn_missing_and_unexpected_keys_are_named(tmp_path: Path) -> None:
    body = ResNet(18)
    iabn = _to_iabn(_randomised(body, seed=3))
    del iabn["module.mod3.block2.convs.bn1.running_var"]
    iabn["module.mod6.block1.convs.conv1.weight"] = torch.zeros(1)
    iabn["module.bn_out.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth.tar"
    torch.save({"state_dict": iabn}, path)
    with pytest.raises(IlsegError) as info:
        load_iabn_checkpoint(path, body)
    message = str(info.value)
    assert "mod3.block2.convs.bn1.running_var" in message and "layer2.1.bn1.running_var" in message
    assert "mod6.block1.convs.conv1.weight" in message
    assert "bn_out.weight" in message
    assert str(path) in message


class _LiteralInPlaceABN(nn.Module):
    """InPlace-ABN's eval-mode affine normalisation, written out with the SIGNED stored weight.

    ``y = (x - mean) / sqrt(var + eps) * (|w| + eps) + b`` (activation left to the body).
    """

    def __init__(self, bn: nn.BatchNorm2d, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("w", bn.weight.detach().clone())
        self.register_buffer("b", bn.bias.detach().clone())
        self.register_buffer("mean", bn.running_mean.detach().clone())
        self.register_buffer("var", bn.running_var.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def per_channel(t: torch.Tensor) -> torch.Tensor:
            return t.view(1, -1, 1, 1)

        normalised = (x - per_channel(self.mean)) / torch.sqrt(per_channel(self.var) + self.eps)
        return normalised * (per_channel(self.w).abs() + self.eps) + per_channel(self.b)


def _iabn_reference(raw: dict[str, torch.Tensor], make_body: functools.partial[ResNet]) -> nn.Module:
    """``make_body()`` holding the file's raw values, every BN replaced by :class:`_LiteralInPlaceABN`."""
    reference = make_body()
    own = reference.state_dict()
    values = {k: raw["module." + _iabn_name(k)] for k in own if not k.endswith("num_batches_tracked")}
    assert set(values) | {k for k in own if k.endswith("num_batches_tracked")} == set(own)
    reference.load_state_dict(values, strict=False)  # plain copies, by name, nothing converted
    for name, module in list(reference.named_modules()):
        if isinstance(module, nn.BatchNorm2d):
            parent_name, _, child = name.rpartition(".")
            parent = reference.get_submodule(parent_name) if parent_name else reference
            setattr(parent, child, _LiteralInPlaceABN(module))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in reference.modules())
    return reference.eval()


def _iabn_signed_checkpoint(body: ResNet, seed: int) -> dict[str, torch.Tensor]:
    """An InPlace-ABN-format state dict with many negative BN weights and non-trivial running stats."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for key, value in body.state_dict().items():
        if key.endswith("num_batches_tracked"):
            state[key] = value.clone()
        elif key.endswith("running_mean"):
            state[key] = torch.randn(value.shape, generator=g) * 0.3
        elif key.endswith("running_var"):
            state[key] = torch.rand(value.shape, generator=g) * 1.5 + 0.25
        elif key.endswith("bias"):
            state[key] = torch.randn(value.shape, generator=g) * 0.2
        elif _is_bn_weight(key):
            # magnitudes 0.3..1.3, sign random: about half the channels negative
            magnitude = torch.rand(value.shape, generator=g) + 0.3
            sign = torch.where(torch.rand(value.shape, generator=g) < 0.5, -1.0, 1.0)
            state[key] = magnitude * sign
        else:  # conv weights, He-scaled so activations stay O(1)
            fan_in = value[0].numel()
            state[key] = torch.randn(value.shape, generator=g) * (2.0 / fan_in) ** 0.5
    # hand-checked entries (stem BN, a block BN, a projection BN)
    state["bn1.weight"][0] = -0.75
    state["layer1.1.bn2.weight"][3] = -1.25
    state["layer2.0.downsample.1.weight"][1] = -2.0
    return _to_iabn(state)


def test_iabn_negative_bn_weights_compute_what_inplace_abn_computes(tmp_path: Path) -> None:
    make_body = functools.partial(ResNet, 18, width=8)
    body = make_body()
    raw = _iabn_signed_checkpoint(body, seed=7)
    bn_weights = [k for k in raw if k.endswith(("bn1.weight", "bn2.weight", "proj_bn.weight"))]
    negative = sum(int((raw[k] < 0).sum()) for k in bn_weights)
    total = sum(raw[k].numel() for k in bn_weights)
    assert len(bn_weights) == 1 + 2 * 8 + 3 and negative > total // 3
    path = tmp_path / "resnet18_iabn_signed.pth.tar"
    torch.save({"state_dict": raw}, path)

    load_iabn_checkpoint(path, body)
    body.eval()
    reference = _iabn_reference(torch.load(path, weights_only=True)["state_dict"], make_body)
    # float64 forward passes, so that float32 rounding in the two (differently ordered)
    # computations does not blur the comparison; the loaded values stay as loaded.
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    reference.double()
    with torch.no_grad():
        expected = reference(x)
        got = copy.deepcopy(body).double()(x)
    assert expected.abs().mean() > 0.05  # a meaningful signal, not everything squashed to 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    # load_pretrained on the same file takes the same path
    other = make_body()
    load_pretrained(other, path)
    other.eval().double()
    with torch.no_grad():
        torch.testing.assert_close(other(x), expected, rtol=1e-5, atol=1e-5)

    # hand-computed: |w| + 1e-5 for the negative entries set above
    assert IABN_EPS == 1e-5 == body.bn1.eps
    torch.testing.assert_close(body.bn1.weight[0], torch.tensor(0.75001), rtol=0, atol=1e-7)
    torch.testing.assert_close(body.layer1[1].bn2.weight[3], torch.tensor(1.25001), rtol=0, atol=1e-7)
    torch.testing.assert_close(body.layer2[0].downsample[1].weight[1], torch.tensor(2.00001), rtol=0, atol=1e-7)
    # nothing else is converted
    assert torch.equal(body.bn1.bias, raw["module.mod1.bn1.bias"])
    assert torch.equal(body.bn1.running_mean, raw["module.mod1.bn1.running_mean"])
    assert torch.equal(body.layer2[0].downsample[1].running_var, raw["module.mod3.block1.proj_bn.running_var"])
    assert torch.equal(body.layer2[0].downsample[0].weight, raw["module.mod3.block1.proj_conv.weight"])


def test_iabn_bn_weight_uses_the_target_bn_eps(tmp_path: Path) -> None:
    assert torch.equal(iabn_bn_weight(torch.tensor([-0.5, 0.0, 2.0])), torch.tensor([-0.5, 0.0, 2.0]).abs() + 1e-5)
    body = ResNet(18, width=8, norm_layer=functools.partial(nn.BatchNorm2d, eps=1e-3))
    raw = _iabn_signed_checkpoint(ResNet(18, width=8), seed=9)
    path = tmp_path / "eps.pth.tar"
    torch.save(raw, path)
    load_iabn_checkpoint(path, body)
    torch.testing.assert_close(body.bn1.weight[0], torch.tensor(0.751), rtol=0, atol=1e-7)
    expected = raw["module.mod3.block1.proj_bn.weight"].abs() + 1e-3
    torch.testing.assert_close(body.layer2[0].downsample[1].weight, expected)


def test_iabn_renaming_reports_unknown_keys() -> None:
    renamed, unknown = iabn_to_torchvision_names(
        {
            "module.mod2.block3.convs.conv3.weight": torch.zeros(1),
            "module.mod5.block1.proj_bn.running_mean": torch.zeros(1),
            "module.classifier.fc.bias": torch.zeros(1),
            "module.mod2.block0.convs.conv1.weight": torch.zeros(1),
            "module.head.weight": torch.zeros(1),
        }
    )
    assert set(renamed) == {"layer1.2.conv3.weight", "layer4.0.downsample.1.running_mean"}
    assert sorted(unknown) == ["head.weight", "mod2.block0.convs.conv1.weight"]


def test_depth_mismatch_is_reported(iabn_resnet50: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = iabn_resnet50
    with pytest.raises(IlsegError, match="ResNet-34"):
        load_iabn_checkpoint(path, ResNet(34))


def test_shape_mismatch_is_reported(tmp_path: Path) -> None:
    body = ResNet(18)
    state = _randomised(body, seed=4)
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    path = tmp_path / "shape.pth"
    torch.save(state, path)
    with pytest.raises(IlsegError, match=r"layer1\.0\.conv1\.weight: file \(64, 64, 1, 1\)"):
        load_pretrained(body, path)


def test_not_a_checkpoint_names_the_file(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pth.tar"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(IlsegError, match="garbage.pth.tar"):
        load_iabn_checkpoint(garbage, ResNet(18))
    with pytest.raises(IlsegError, match="does not exist"):
        load_iabn_checkpoint(tmp_path / "absent.pth", ResNet(18))
    not_tensors = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_tensors)
    with pytest.raises(IlsegError, match="list.pth"):
        load_pretrained(ResNet(18), not_tensors)


def test_torchvision_file_loads_and_fc_is_ignored(tmp_path: Path) -> None:
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)  # includes fc.*
    model = build_segmenter(backbone="resnet18", classes_per_step=[2], head_channels=8, pretrained=str(path))
    assert torch.equal(model.body.layer3[1].bn2.weight, reference.layer3[1].bn2.weight)
    with pytest.raises(IlsegError, match="layer4.0.conv3.weight"):
        build_segmenter(backbone="resnet50", classes_per_step=[2], head_channels=8, pretrained=str(path))


def test_imagenet_weights_come_from_the_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    reference = torchvision.models.resnet18(weights=None)
    cached = imagenet_cache_path(18)
    assert cached.parent == tmp_path / "checkpoints"
    assert cached.name == Path(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url).name
    cached.parent.mkdir()
    torch.save(reference.state_dict(), cached)
    model = build_segmenter(backbone="resnet18", classes_per_step=[2], head_channels=8, pretrained="imagenet")
    assert torch.equal(model.body.conv1.weight, reference.conv1.weight)


def test_imagenet_weights_missing_offline_says_where_to_put_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    with pytest.raises(IlsegError) as info:
        load_pretrained(ResNet(18), "imagenet")
    message = str(info.value)
    assert imagenet_cache_path(18).name in message
    assert str(tmp_path / "checkpoints") in message
    assert "local checkpoint" in message


def _no_network(*args: object, **kwargs: object) -> None:
    raise urllib.error.URLError("no network in tests")
