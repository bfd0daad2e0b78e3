"""The ILT paper's own setting: DeepLab-v2 (ASPP-v2, frozen BN, output stride 8) and its iteration recipe.

docs/methods.md "The ILT paper's setting" says where each value comes from.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ilseg.config import config_from_dict, load_config, preset_dir
from ilseg.engine.callbacks import Callbacks
from ilseg.engine.optim import poly_schedule
from ilseg.engine.run import run_training
from ilseg.engine.signals import StopRequests
from ilseg.errors import IlsegError, Interrupted
from ilseg.methods import ILTConfig, JointConfig, StepSetup, build_method
from ilseg.methods.plop import POD_TAPS
from ilseg.models import build_segmenter, copy_for_teacher, fold_batchnorm
from ilseg.models.aspp import V2_RATES, ASPPv2Classifier, NoHead

ILT_PAPER_SETTING_PRESETS = sorted(preset_dir().glob("voc-*-paper-*.yaml"))  # the "-paper-" presets
VARIANTS = ("finetune", "ilt-kd-out", "ilt-kd-feat", "ilt-ef", "ilt-ef-kd-out", "ilt-kd-out-feat", "joint")
_BN = torch.nn.modules.batchnorm._BatchNorm


def _tiny_v2(classes_per_step: list[int], **options: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_segmenter(backbone="resnet50", backbone_width=8, output_stride=8, head="aspp_v2",
                           classes_per_step=classes_per_step, **options)  # type: ignore[arg-type]


def test_aspp_v2_is_the_sum_of_four_dilated_convolutions():
    torch.manual_seed(1)
    cls = ASPPv2Classifier(6, 3)
    with torch.no_grad():
        for conv in cls.branches:
            conv.bias.normal_()
    x = torch.randn(2, 6, 30, 30)
    expected = sum(F.conv2d(x, conv.weight, conv.bias, padding=rate, dilation=rate)
                   for conv, rate in zip(cls.branches, (6, 12, 18, 24), strict=True))
    torch.testing.assert_close(cls(x), expected)
    assert cls.rates == V2_RATES == (6, 12, 18, 24) and cls.out_channels == 3
    assert all(conv.kernel_size == (3, 3) and conv.bias is not None for conv in cls.branches)


def test_the_v2_segmenter_grows_one_aspp_v2_per_step_and_equals_one_wide_aspp_v2():
    model = _tiny_v2([3]).eval()
    assert isinstance(model.head, NoHead) and model.head_channels == model.body.out_channels
    model.add_step(2)
    assert model.classes_per_step == (3, 2) and all(isinstance(c, ASPPv2Classifier) for c in model.classifiers)
    x = torch.randn(1, 3, 40, 40)
    features = model.body(x)
    wide = ASPPv2Classifier(model.head_channels, 5)
    with torch.no_grad():
        for index, wide_conv in enumerate(wide.branches):
            wide_conv.weight.copy_(torch.cat([c.branches[index].weight for c in model.classifiers]))
            wide_conv.bias.copy_(torch.cat([c.branches[index].bias for c in model.classifiers]))
    out = model(x, upsample=False)
    torch.testing.assert_close(out["logits"], wide(features))
    torch.testing.assert_close(out["features"], features)


def test_teacher_copy_folding_and_pod_maps_work_with_the_v2_head():
    model = _tiny_v2([3], frozen_bn=True)
    model.taps = POD_TAPS
    x = torch.randn(2, 3, 32, 32)
    teacher = copy_for_teacher(model)
    before = teacher(x)["logits"]
    assert fold_batchnorm(teacher) > 0
    torch.testing.assert_close(teacher(x)["logits"], before, rtol=1e-4, atol=1e-4)
    pod = model.train()(x)["taps"]
    assert list(pod) == list(POD_TAPS)
    assert [m.shape[1] for m in pod.values()] == [32, 64, 128, 256, 256, 3]  # stages, head (= features), logits


def test_background_init_of_a_v2_classifier_shifts_the_summed_background_logit():
    model = _tiny_v2([3]).eval()
    x = torch.randn(1, 3, 32, 32)
    before = model(x, upsample=False)["logits"]
    model.add_step(2, init="background")
    after = model(x, upsample=False)["logits"]
    shift = math.log(3)
    torch.testing.assert_close(after[:, 0], before[:, 0] - shift, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after[:, 3], after[:, 0])
    torch.testing.assert_close(after[:, 1:3], before[:, 1:3])


def test_frozen_bn_keeps_statistics_and_affine_parameters_through_a_training_step():
    model = _tiny_v2([3], frozen_bn=True).train()
    bns = [m for m in model.modules() if isinstance(m, _BN)]
    assert bns and all(not m.training and not m.weight.requires_grad for m in bns)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9,
                                weight_decay=1e-4)
    loss = F.cross_entropy(model(torch.randn(2, 3, 32, 32))["logits"], torch.randint(0, 3, (2, 32, 32)))
    loss.backward()
    optimizer.step()
    bn_names = {name for name, m in model.named_modules() if isinstance(m, _BN)}
    for key, value in model.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if owner in bn_names:
            assert torch.equal(value, before[key]), key  # running stats, weight and bias
    assert not torch.equal(model.state_dict()["classifiers.0.branches.0.weight"],
                           before["classifiers.0.branches.0.weight"])
    assert not torch.equal(model.state_dict()["body.conv1.weight"], before["body.conv1.weight"])
    model.train()  # still frozen after another train()
    assert all(not m.training for m in bns)


@pytest.mark.parametrize("stride_on", ["3x3", "1x1"])
def test_output_stride_8_with_dilations_2_and_4_and_where_the_stride_sits(stride_on):
    model = _tiny_v2([3], stride_on=stride_on).eval()
    body = model.body
    assert body(torch.zeros(1, 3, 64, 64)).shape[-2:] == (8, 8)
    assert model(torch.zeros(1, 3, 64, 64))["logits"].shape == (1, 3, 64, 64)
    assert all(block.conv2.dilation == (2, 2) and block.conv2.stride == (1, 1) for block in body.layer3)
    assert all(block.conv2.dilation == (4, 4) and block.conv2.stride == (1, 1) for block in body.layer4)
    first = body.layer2[0]
    strided, plain = (first.conv1, first.conv2) if stride_on == "1x1" else (first.conv2, first.conv1)
    assert strided.stride == (2, 2) and plain.stride == (1, 1)
    assert first.downsample[0].stride == (2, 2)


def test_stride_on_1x1_needs_a_bottleneck_resnet():
    with pytest.raises(IlsegError, match="bottleneck"):
        build_segmenter(backbone="resnet18", backbone_width=8, classes_per_step=[3], stride_on="1x1")
    with pytest.raises(IlsegError, match="stride_on"):
        load_config(preset_dir() / "synth-demo.yaml", ["model.stride_on=1x1"])


def test_there_is_a_paper_preset_for_every_task_and_variant():
    names = {p.stem for p in ILT_PAPER_SETTING_PRESETS}
    assert names == {f"voc-{task}-paper-{v}" for task in ("19-1", "15-5", "15-1") for v in VARIANTS}


@pytest.mark.parametrize("path", ILT_PAPER_SETTING_PRESETS, ids=[p.stem for p in ILT_PAPER_SETTING_PRESETS])
def test_paper_presets_hold_the_official_recipe_in_the_run_config(path):
    cfg = config_from_dict(load_config(path).to_dict())  # as the run folder's config.yaml gives it back
    m, o, d = cfg.model, cfg.optim, cfg.data
    assert (m.backbone, m.head, m.output_stride, m.frozen_bn, m.activation) == ("resnet101", "aspp_v2", 8, True, "relu")
    assert (m.pretrained, m.stride_on) == ("imagenet", "3x3")  # torchvision's weights stride on the 3x3
    assert (d.dataset, d.crop_size, d.overlap) == ("voc", 321, False)
    assert (o.optimizer, o.batch_size, o.momentum, o.nesterov, o.weight_decay, o.poly_power) == (
        "sgd", 4, 0.9, False, 1e-4, 0.9)
    assert (o.lr, o.lr_end) == (1e-4, 1e-6)
    task = cfg.data.task
    if build_method(cfg.method).all_classes_at_once:
        assert type(cfg.method) is JointConfig and o.iterations == 21000
        return
    assert (o.lr_next, o.lr_end_next) == (5e-5, 1e-6)
    assert (o.iterations, o.iterations_next) == {"19-1": (20000, 1000), "15-5": (16000, 5000),
                                                 "15-1": (16000, 1000)}[task]
    assert cfg.method.keep_old_labels
    assert not isinstance(cfg.method, ILTConfig) or cfg.method.kd_mask == "old_bgr"  # finetune has no KD
    assert cfg.method.name == path.stem.split("-paper-")[1]


def test_poly_schedule_with_a_floor_reaches_lr_end_and_resumes_exactly():
    def optimizer() -> torch.optim.Optimizer:
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)

    opt = optimizer()
    sched = poly_schedule(opt, 10, 0.9, lr_end=1e-6)
    rates = []
    for _ in range(10):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates[0] == 1e-4
    for i, rate in enumerate(rates):
        assert rate == pytest.approx((1e-4 - 1e-6) * (1 - i / 10) ** 0.9 + 1e-6, rel=1e-12)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-6, rel=1e-12)  # after the last iteration
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-6, rel=1e-12)  # stays at the floor
    # resumed after 4 iterations: the same sequence
    first, second = optimizer(), optimizer()
    s1 = poly_schedule(first, 10, 0.9, lr_end=1e-6)
    for _ in range(4):
        first.step()
        s1.step()
    s2 = poly_schedule(second, 10, 0.9, lr_end=1e-6)
    s2.load_state_dict(s1.state_dict())
    second.load_state_dict(first.state_dict())
    for _ in range(6):
        assert second.param_groups[0]["lr"] == first.param_groups[0]["lr"]
        for o, s in ((first, s1), (second, s2)):
            o.step()
            s.step()
    # lr_end 0 keeps torch's PolynomialLR (today's schedule)
    assert isinstance(poly_schedule(optimizer(), 10, 0.9), torch.optim.lr_scheduler.PolynomialLR)


def _paper_synth(root, cache, *extra):
    return load_config(preset_dir() / "synth-demo.yaml", [
        f"data.root={root}", f"data.cache_dir={cache}", "data.crop_size=32", "data.workers=0",
        "model.backbone=resnet18", "model.width=8", "model.output_stride=8", "model.head=aspp_v2",
        "model.frozen_bn=true", "model.activation=relu", "method.name=ilt-kd-out",
        "optim.optimizer=sgd", "optim.nesterov=false", "optim.lr=0.01", "optim.lr_end=0.0001",
        "optim.lr_next=0.005", "optim.lr_end_next=0.0001", "optim.iterations=7", "optim.iterations_next=5",
        "optim.batch_size=8", "eval.batch_size=16", *extra])


def _states(out, steps):
    return [torch.load(out / f"step{t}.pth", weights_only=True) for t in steps]


def test_a_two_step_run_in_the_paper_setting_trains_the_configured_iterations(synth_root, tmp_path):
    cfg = _paper_synth(synth_root, tmp_path / "cache")
    results = run_training(cfg, tmp_path / "run", steps="0:2", quiet=True)
    assert [s["step"] for s in results["steps"]] == [0, 1]
    for state, iterations, lr_end in zip(_states(tmp_path / "run", [0, 1]), (7, 5), (1e-4, 1e-4), strict=True):
        assert state["scheduler"]["last_epoch"] == iterations
        assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(lr_end, rel=1e-9)
        weights = state["model"]
        assert "classifiers.0.branches.3.weight" in weights and "head.aspp" not in "".join(weights)
    # frozen BN: step 1's BN statistics are step 0's, which are the initial ones
    s0, s1 = _states(tmp_path / "run", [0, 1])
    mean = "body.layer4.0.bn2.running_mean"
    assert torch.equal(s0["model"][mean], s1["model"][mean]) and torch.equal(s0["model"][mean],
                                                                              torch.zeros_like(s0["model"][mean]))


class StopInStep(Callbacks):
    """A stop request (as SIGTERM makes one) after iteration ``iteration`` of step ``step``.

    The training loop asks :meth:`StopRequests.requested` once after each
    iteration; :meth:`requested` is what the test puts in its place.
    """

    def __init__(self, step: int, iteration: int) -> None:
        self.step, self.iteration = step, iteration
        self.current: int | None = None
        self.polls = 0

    def on_step_start(self, step: int, setup: StepSetup) -> None:
        self.current = step

    def requested(self) -> bool:
        if self.current == self.step:
            self.polls += 1
            return self.polls == self.iteration
        return False


@pytest.mark.slow  # three short runs
def test_an_iteration_based_step_stopped_part_way_resumes_exactly(synth_root, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    cfg = _paper_synth(synth_root, tmp_path / "cache")
    run_training(cfg, reference, steps="0:2", quiet=True)

    out = tmp_path / "stopped"
    stop = StopInStep(step=1, iteration=3)
    real_requested = StopRequests.requested
    with monkeypatch.context() as patch:
        patch.setattr(StopRequests, "requested", lambda self: stop.requested() or real_requested(self))
        with pytest.raises(Interrupted):
            run_training(cfg, out, steps="0:2", quiet=True, callbacks=stop)
    last = torch.load(out / "last.pth", weights_only=True)
    assert last["step"] == 1 and last["scheduler"]["last_epoch"] == 3
    run_training(cfg, out, steps="0:2", resume=True, quiet=True)
    for mine, theirs in zip(_states(out, [0, 1]), _states(reference, [0, 1]), strict=True):
        assert mine["scheduler"]["last_epoch"] == theirs["scheduler"]["last_epoch"]
        for key, value in theirs["model"].items():
            assert torch.equal(mine["model"][key], value), key
