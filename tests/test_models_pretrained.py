"""Weight loading: InPlace-ABN checkpoints, torchvision files, the ImageNet hub cache."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

from ilseg.errors import IlsegError
from ilseg.models import (
    ResNet,
    build_segmenter,
    imagenet_cache_path,
    load_iabn_checkpoint,
    load_pretrained,
)
from ilseg.models.pretrained import iabn_to_torchvision_names


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
        if not key.endswith("num_batches_tracked"):
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
