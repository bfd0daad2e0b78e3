"""IncrementalSegmenter: outputs, classifier growth, freezing, teacher copy, reference output."""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from ilseg.errors import IlsegError
from ilseg.models import (
    IncrementalSegmenter,
    build_segmenter,
    copy_for_teacher,
    freeze_bn,
    freeze_encoder,
    unfreeze,
)

EXPECT_DIR = Path(__file__).parent / "expect"
REFERENCE_FILE = EXPECT_DIR / "test_models_segmenter.reference_resnet18_os16.pt"


def _small(classes: tuple[int, ...] = (3, 2), output_stride: int = 16) -> IncrementalSegmenter:
    return build_segmenter(
        backbone="resnet18", output_stride=output_stride, head_channels=16, classes_per_step=classes
    )


def _image(batch: int = 1, h: int = 64, w: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _bn_modules(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


# ---------------------------------------------------------------- outputs


@pytest.mark.parametrize(
    ("backbone", "output_stride"),
    [("resnet18", 8), ("resnet18", 16), ("resnet34", 16), ("resnet101", 16)],
)
def test_output_shapes(backbone: str, output_stride: int) -> None:
    model = build_segmenter(
        backbone=backbone, output_stride=output_stride, head_channels=16, classes_per_step=[3, 2]
    ).eval()
    channels = 2048 if backbone in ("resnet50", "resnet101") else 512
    x = _image(1, 64, 48)
    with torch.no_grad():
        out = model(x)
        low = model(x, upsample=False)
    assert set(out) == {"logits", "features"}
    assert out["logits"].shape == (1, 5, 64, 48)
    assert out["features"].shape == (1, channels, 64 // output_stride, 48 // output_stride)
    assert low["logits"].shape == (1, 5, 64 // output_stride, 48 // output_stride)
    torch.testing.assert_close(low["features"], out["features"])


def test_features_are_the_body_output_and_logits_the_upsampled_classifiers() -> None:
    model = _small().eval()
    x = _image()
    with torch.no_grad():
        out = model(x)
        features = model.body(x)
        head = model.head(features)
        low = torch.cat([model.classifiers[0](head), model.classifiers[1](head)], dim=1)
        up = nn.functional.interpolate(low, size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out["features"], features)
    torch.testing.assert_close(out["logits"], up)


def test_train_mode_forward_backward_reaches_every_parameter() -> None:
    model = _small().train()
    out = model(_image(2, 32, 32))
    (out["logits"].mean() + out["features"].mean()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_classes_per_step_and_num_outputs() -> None:
    model = _small((16,))
    assert model.classes_per_step == (16,) and model.num_outputs == 16
    model.add_step(1)
    model.add_step(3)
    assert model.classes_per_step == (16, 1, 3) and model.num_outputs == 20
    assert len(model.classifiers) == 3


@pytest.mark.parametrize("bad", [[], [0], [3, -1], "abc", [2.5]])
def test_build_rejects_bad_classes(bad: object) -> None:
    with pytest.raises(IlsegError):
        build_segmenter(backbone="resnet18", classes_per_step=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [{"backbone": "resnet152"}, {"backbone": "vgg16"}, {"output_stride": 4}, {"head_channels": 0}],
)
def test_build_rejects_bad_settings(kwargs: dict[str, object]) -> None:
    with pytest.raises(IlsegError):
        build_segmenter(classes_per_step=[3], **kwargs)  # type: ignore[arg-type]


def test_aspp_dilations_follow_output_stride_and_can_be_overridden() -> None:
    assert [c.dilation[0] for c in _small(output_stride=16).head.map_convs] == [1, 6, 12, 18]
    assert [c.dilation[0] for c in _small(output_stride=8).head.map_convs] == [1, 12, 24, 32]
    custom = build_segmenter(backbone="resnet18", classes_per_step=[2], aspp_dilations=(12, 24, 36))
    assert [c.dilation[0] for c in custom.head.map_convs] == [1, 12, 24, 36]


# ---------------------------------------------------------------- growth


def test_add_step_keeps_old_outputs() -> None:
    model = _small().eval()
    x = _image()
    with torch.no_grad():
        before = model(x)["logits"]
        model.add_step(2)
        after = model(x)["logits"]
    assert after.shape == (1, 7, 64, 64)
    torch.testing.assert_close(after[:, :5], before, rtol=0, atol=0)


def test_add_step_background_init_formula() -> None:
    model = _small((4,))
    with torch.no_grad():
        model.classifiers[0].bias.copy_(torch.tensor([0.7, -0.2, 0.1, 0.3]))
    bg_weight = model.classifiers[0].weight[0].detach().clone()
    old_rest = model.classifiers[0].bias[1:].detach().clone()
    model.add_step(3, init="background")
    new = model.classifiers[1]
    expected_bias = 0.7 - math.log(3 + 1)
    assert new.weight.shape == (3, 16, 1, 1)
    for k in range(3):
        torch.testing.assert_close(new.weight[k], bg_weight)
    torch.testing.assert_close(new.bias, torch.full((3,), expected_bias))
    torch.testing.assert_close(model.classifiers[0].bias[0], torch.tensor(expected_bias))
    torch.testing.assert_close(model.classifiers[0].bias[1:], old_rest)
    assert new.weight.requires_grad and new.bias.requires_grad


def test_add_step_background_init_shares_background_probability() -> None:
    """After MiB's init, bg + new classes together get the old background probability."""
    model = _small((3,)).eval()
    x = _image()
    with torch.no_grad():
        p_before = model(x)["logits"].softmax(dim=1)
        model.add_step(2, init="background")
        p_after = model(x)["logits"].softmax(dim=1)
    torch.testing.assert_close(p_after[:, [0, 3, 4]].sum(dim=1), p_before[:, 0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(p_after[:, 1:3], p_before[:, 1:3], rtol=1e-4, atol=1e-5)


def test_add_step_matches_model_dtype_and_device() -> None:
    model = _small().to(torch.float64)
    model.add_step(2)
    assert model.classifiers[-1].weight.dtype == torch.float64
    model.add_step(1, init="background")
    assert model.classifiers[-1].bias.dtype == torch.float64
    meta = _small().to("meta")
    meta.add_step(2)
    assert meta.classifiers[-1].weight.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_add_step_on_gpu() -> None:
    model = _small().cuda()
    model.add_step(2, init="background")
    assert model.classifiers[-1].weight.is_cuda and model.classifiers[-1].bias.is_cuda
    model.eval()  # one image: a training-mode forward is refused (the ASPP pooling BN)
    assert model(_image().cuda())["logits"].shape == (1, 7, 64, 64)


@pytest.mark.parametrize(("n", "init"), [(0, "default"), (-1, "default"), (2, "imprint")])
def test_add_step_rejects_bad_arguments(n: int, init: str) -> None:
    with pytest.raises(IlsegError):
        _small().add_step(n, init=init)  # type: ignore[arg-type]


def test_add_step_in_train_mode_gives_train_mode_classifier() -> None:
    model = _small().train()
    model.add_step(1)
    assert model.classifiers[-1].training


# ---------------------------------------------------------------- freezing


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _sgd_steps(model: IncrementalSegmenter, params: list[nn.Parameter], steps: int = 2) -> None:
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)
    for seed in range(steps):
        optimizer.zero_grad(set_to_none=True)
        out = model(_image(2, 32, 32, seed=seed))
        (out["logits"].square().mean() + out["features"].mean()).backward()
        optimizer.step()


@pytest.mark.parametrize("only_trainable", [True, False])
def test_freeze_bn_keeps_bn_fixed_through_sgd_and_train(only_trainable: bool) -> None:
    model = _small()
    freeze_bn(model)
    model.train()  # must not unfreeze
    bns = _bn_modules(model)
    assert bns and all(not bn.training for bn in bns)
    assert all(not p.requires_grad for bn in bns for p in bn.parameters())
    bn_names = {name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    before = _snapshot(model)

    params = [p for p in model.parameters() if p.requires_grad] if only_trainable else list(model.parameters())
    _sgd_steps(model, params)

    after = model.state_dict()
    for key, value in before.items():
        owner = key.rsplit(".", 1)[0]
        if owner in bn_names:  # weight, bias, running stats, num_batches_tracked
            assert torch.equal(after[key], value), key
    assert not torch.equal(after["body.conv1.weight"], before["body.conv1.weight"])
    assert not torch.equal(after["classifiers.0.weight"], before["classifiers.0.weight"])
    assert all(bn.weight.grad is None for bn in bns)
    assert model.training and model.body.layer1[0].conv1.training


def test_freeze_bn_allows_batch_of_one_in_training() -> None:
    model = _small()
    freeze_bn(model)
    model.train()
    assert model(_image(1, 32, 32))["logits"].shape == (1, 5, 32, 32)


def test_training_batch_of_one_without_frozen_bn_raises() -> None:
    with pytest.raises(IlsegError, match="batch"):
        _small().train()(_image(1, 32, 32))


@pytest.mark.parametrize("only_trainable", [True, False])
def test_freeze_encoder_keeps_body_fixed(only_trainable: bool) -> None:
    model = _small()
    freeze_encoder(model)
    model.train()
    assert all(not bn.training for bn in _bn_modules(model.body))
    assert all(bn.training for bn in _bn_modules(model.head))
    assert all(not p.requires_grad for p in model.body.parameters())
    body_before = _snapshot(model.body)
    head_before = _snapshot(model.head)

    params = [p for p in model.parameters() if p.requires_grad] if only_trainable else list(model.parameters())
    _sgd_steps(model, params)

    for key, value in model.body.state_dict().items():
        assert torch.equal(value, body_before[key]), key
    assert all(p.grad is None for p in model.body.parameters())
    head_after = model.head.state_dict()
    assert not torch.equal(head_after["red_conv.weight"], head_before["red_conv.weight"])
    assert not torch.equal(head_after["red_bn.running_mean"], head_before["red_bn.running_mean"])


def test_unfreeze_restores_training() -> None:
    model = _small()
    freeze_bn(model)
    freeze_encoder(model)
    model.train()
    unfreeze(model)
    assert all(p.requires_grad for p in model.parameters())
    assert all(bn.training for bn in _bn_modules(model))
    model.eval()
    assert all(not bn.training for bn in _bn_modules(model))


def test_freezing_survives_sync_batchnorm_conversion() -> None:
    model = _small()
    freeze_bn(model)
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    converted.train()
    syncs = [m for m in converted.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert len(syncs) == 20 + 3
    assert all(not m.training and not m.weight.requires_grad for m in syncs)


# ---------------------------------------------------------------- teacher


def test_copy_for_teacher_is_frozen_and_independent() -> None:
    model = _small().train()
    teacher = copy_for_teacher(model)
    assert not teacher.training and all(not m.training for m in teacher.modules())
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in model.parameters())
    teacher.train()  # a teacher stays in eval mode
    assert not teacher.training and all(not m.training for m in teacher.modules())
    with torch.no_grad():
        model.classifiers[0].weight.add_(1.0)
    assert not torch.equal(model.classifiers[0].weight, teacher.classifiers[0].weight)
    x = _image(1, 32, 32)
    expected = copy.deepcopy(teacher).eval()(x)["logits"]
    torch.testing.assert_close(teacher(x)["logits"], expected)
    assert not teacher(x)["logits"].requires_grad


# ---------------------------------------------------------------- numerics


def _reference_model_and_input() -> tuple[IncrementalSegmenter, torch.Tensor]:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_segmenter(
            backbone="resnet18", output_stride=16, head_channels=32, classes_per_step=[3, 2]
        )
    return model.eval(), _image(1, 64, 64, seed=0)


def test_reference_output() -> None:
    """Seeded ResNet-18/OS16 logits against tests/expect (set ILSEG_REGEN_EXPECT=1 to rewrite)."""
    model, x = _reference_model_and_input()
    with torch.no_grad():
        out = model(x)
    actual = {
        "logits": out["logits"][:, :, ::4, ::4].clone(),
        "features": out["features"][:, :16].clone(),
    }
    if os.environ.get("ILSEG_REGEN_EXPECT") == "1":
        EXPECT_DIR.mkdir(exist_ok=True)
        torch.save(actual, REFERENCE_FILE)
        pytest.skip(f"wrote {REFERENCE_FILE}")
    assert REFERENCE_FILE.is_file(), f"missing {REFERENCE_FILE}: run with ILSEG_REGEN_EXPECT=1 once"
    expected = torch.load(REFERENCE_FILE, weights_only=True)
    for key in ("logits", "features"):
        torch.testing.assert_close(actual[key], expected[key], atol=1e-5, rtol=1e-5)


def test_bf16_autocast_on_cpu() -> None:
    model = _small().eval()
    x = _image(1, 64, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out["logits"].shape == (1, 5, 64, 64)
    assert out["features"].shape == (1, 512, 4, 4)
    assert torch.isfinite(out["logits"]).all() and torch.isfinite(out["features"]).all()
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        train_out = model(_image(2, 32, 32))
    train_out["logits"].float().mean().backward()
    assert torch.isfinite(model.classifiers[0].weight.grad).all()


def test_channels_last_equals_contiguous() -> None:
    model = _small().eval()
    x = _image(2, 48, 48)
    with torch.no_grad():
        dense = model(x)
        model.to(memory_format=torch.channels_last)
        last = model(x.contiguous(memory_format=torch.channels_last))
    for key in ("logits", "features"):
        torch.testing.assert_close(last[key], dense[key], atol=1e-5, rtol=1e-4)


def test_folding_the_teachers_batchnorm_keeps_its_outputs():
    from ilseg.models import copy_for_teacher, fold_batchnorm

    torch.manual_seed(0)
    model = build_segmenter(backbone="resnet50", backbone_width=8, head_channels=16, classes_per_step=[5, 2])
    for m in model.modules():  # non-trivial statistics and affine parameters, as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(-1.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    teacher = copy_for_teacher(model)
    folded = copy_for_teacher(model)
    count = fold_batchnorm(folded)
    # stem 1 + 16 bottlenecks x 3 + 4 downsamples + the ASPP pooling branch
    assert count == 1 + 16 * 3 + 4 + 1
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules()) == 2  # ASPP map_bn, red_bn
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = teacher(x), folded(x)
    torch.testing.assert_close(b["features"], a["features"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b["logits"], a["logits"], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="eval-mode"):
        fold_batchnorm(model.train())


def test_taps_of_a_body_without_stages_give_the_head_maps_and_refuse_the_stage_maps():
    from ilseg.models import TAPS
    from ilseg.models.aspp import NoHead

    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU())
    model = IncrementalSegmenter(body, NoHead(8), [3, 2]).eval()
    assert TAPS == ("layer1", "layer2", "layer3", "layer4", "head", "logits_lowres") and model.taps == ()
    x = _image(h=32, w=32)
    with torch.no_grad():
        plain = model(x)
        model.taps = ("head", "logits_lowres")
        out = model(x)
        assert set(out) == {"logits", "features", "taps"}
        torch.testing.assert_close(out["logits"], plain["logits"], rtol=0, atol=0)
        torch.testing.assert_close(out["taps"]["head"], plain["features"], rtol=0, atol=0)  # NoHead: the features
        assert out["taps"]["logits_lowres"].shape == (1, 5, 8, 8)
        model.taps = ("layer4",)
        with pytest.raises(IlsegError, match="need a ResNet body, got Sequential"):
            model(x)
    assert copy_for_teacher(model).taps == ("layer4",)  # the teacher copy asks for the same maps
