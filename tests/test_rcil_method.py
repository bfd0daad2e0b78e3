"""RCIL: the parallel branches (drop-path, the fold, the freeze), pooled cube distillation, and runs on the engine."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from ilseg.config import load_config, preset_dir
from ilseg.engine.run import evaluate_checkpoint, run_training
from ilseg.methods import METHOD_PRESETS, RCIL, build_method, describe_method, method_config
from ilseg.methods import rcil as rcil_module
from ilseg.methods.losses import kd_unbiased, unbiased_cross_entropy
from ilseg.methods.rcil import (
    PCKD_TAPS,
    ParallelBranches,
    add_branches,
    drop_path_weights,
    parallel_branches,
    pckd_channel,
    pckd_losses,
    pckd_spatial,
)
from ilseg.models import build_segmenter
from ilseg.runs.folder import load_step_model
from ilseg.tasks import get_task
from tiny import InterruptAt, tiny_config


def _model(backbone: str = "resnet18") -> nn.Module:
    torch.manual_seed(0)
    model = build_segmenter(backbone=backbone, backbone_width=8, head_channels=8, classes_per_step=[7])
    add_branches(model)
    return model


def _perturb(model: nn.Module) -> None:
    """Make the two branches and the BN statistics differ, as after some training."""
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, 64, 64))
        for branches in parallel_branches(model):
            for p in branches.parameters():
                p.add_(0.1 * torch.randn_like(p))
    model.eval()


def _one_channel_pair() -> ParallelBranches:
    """1 -> 1 channel 1x1 convs: W1 = 2, W2 = 4; BN1 gamma 3, beta 1, mean 0.5, var 3; BN2 gamma 1, beta 0,
    mean 1, var 0; both with eps 1 (so sqrt(var + eps) is 2 and 1)."""
    conv = nn.Conv2d(1, 1, 1, bias=False)
    bn = nn.BatchNorm2d(1, eps=1.0)
    pair = ParallelBranches([conv], bn)
    assert pair.convs_new is not None and isinstance(pair.bn_new, nn.BatchNorm2d)
    with torch.no_grad():
        pair.convs[0].weight.fill_(2.0)
        pair.convs_new[0].weight.fill_(4.0)
        bn.weight.fill_(3.0), bn.bias.fill_(1.0), bn.running_mean.fill_(0.5), bn.running_var.fill_(3.0)
        pair.bn_new.weight.fill_(1.0), pair.bn_new.bias.fill_(0.0)
        pair.bn_new.running_mean.fill_(1.0), pair.bn_new.running_var.fill_(0.0)
    return pair.eval()


# -- drop-path ------------------------------------------------------------------------------------------
def test_drop_path_picks_first_second_or_both_by_the_draw(monkeypatch):
    draws = torch.tensor([0.10, 0.50, 0.90, 0.33, 0.66, 0.3299])
    monkeypatch.setattr(rcil_module.torch, "rand", lambda *a, **k: draws.clone())
    first, second = drop_path_weights(6)
    # r < 0.33: first only; 0.33 <= r < 0.66: second only; r >= 0.66: the average (RCIL's residual.py)
    assert first.tolist() == [1.0, 0.0, 0.5, 0.0, 0.5, 1.0]
    assert second.tolist() == [0.0, 1.0, 0.5, 1.0, 0.5, 0.0]


def test_training_mixes_each_channel_from_the_generator_and_evaluation_averages():
    torch.manual_seed(1)
    pair = ParallelBranches([nn.Conv2d(2, 64, 3, padding=1, bias=False)], nn.BatchNorm2d(64))
    _perturb_pair(pair)
    x = torch.randn(2, 2, 5, 5)
    pair.eval()
    with torch.no_grad():
        first, second = pair.bn(pair.convs[0](x)), pair.bn_new(pair.convs_new[0](x))  # type: ignore[index,misc]
        torch.testing.assert_close(pair(x), (first + second) / 2)
        pair.generator = torch.Generator().manual_seed(5)
        pair.train()
        pair.bn.eval(), pair.bn_new.eval()  # type: ignore[union-attr]  # the same BN outputs as above
        mixed = pair(x)
    w1, w2 = drop_path_weights(64, torch.Generator().manual_seed(5))
    torch.testing.assert_close(mixed, first * w1.view(1, -1, 1, 1) + second * w2.view(1, -1, 1, 1))
    assert {0.0, 0.5, 1.0} == set(w1.tolist())  # 64 channels draw every case
    pair.drop_path = False
    with torch.no_grad():
        torch.testing.assert_close(pair(x), (first + second) / 2)


def _perturb_pair(pair: ParallelBranches) -> None:
    pair.train()
    with torch.no_grad():
        pair(torch.randn(8, pair.convs[0].in_channels, 6, 6))  # type: ignore[union-attr]
        assert pair.convs_new is not None
        for p in pair.convs_new.parameters():
            p.add_(0.2 * torch.randn_like(p))


# -- the fold ---------------------------------------------------------------------------------------------
def test_the_fold_of_a_pair_by_hand():
    pair = _one_channel_pair()
    kernels, bias = pair.folded()
    # s1 = 3 / sqrt(3 + 1) = 1.5, t1 = 1 - 0.5 * 1.5 = 0.25; s2 = 1 / sqrt(0 + 1) = 1, t2 = 0 - 1 * 1 = -1
    # K = (1.5 * 2 + 1 * 4) / 2 = 3.5, B = (0.25 - 1) / 2 = -0.375
    assert kernels[0].item() == pytest.approx(3.5) and bias.item() == pytest.approx(-0.375)
    x = torch.full((1, 1, 1, 1), 2.0)
    with torch.no_grad():
        assert pair(x).item() == pytest.approx((1.5 * 4 + 0.25 + 1 * 8 - 1) / 2)  # 6.625
        pair.collapse()
        assert pair(x).item() == pytest.approx(3.5 * 2 - 0.375)  # the same 6.625, from one conv
    assert pair.collapsed


def test_merge_into_first_keeps_the_pair_as_the_frozen_first_branch():
    model = _model("resnet50")
    _perturb(model)
    x = torch.randn(2, 8, 9, 9)
    for pair in parallel_branches(model):
        conv = pair.convs[0]
        inp = torch.randn(2, conv.in_channels, 9, 9)  # type: ignore[union-attr]
        with torch.no_grad():
            before = pair(inp)
            second_before = copy.deepcopy(pair.convs_new.state_dict())  # type: ignore[union-attr]
            pair.merge_into_first()
            torch.testing.assert_close(pair.bn(torch.cat([c(inp) for c in pair.convs], 1)), before,
                                       rtol=1e-5, atol=1e-5)
        assert not any(p.requires_grad for p in [*pair.convs.parameters(), *pair.bn.parameters()])
        assert all(p.requires_grad for p in pair.convs_new.parameters())  # type: ignore[union-attr]
        assert all(torch.equal(v, second_before[k]) for k, v in pair.convs_new.state_dict().items())  # type: ignore[union-attr]
    model.train()
    assert all(not pair.bn.training and pair.bn_new.training for pair in parallel_branches(model))  # type: ignore[union-attr]
    del x


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_a_collapsed_model_computes_what_the_branched_one_does(backbone):
    model = _model(backbone)
    _perturb(model)
    x = torch.randn(2, 3, 64, 64)
    teacher = copy.deepcopy(model)
    for pair in parallel_branches(teacher):
        pair.collapse()
    with torch.no_grad():
        expected, got = model(x), teacher(x)
    torch.testing.assert_close(got["logits"], expected["logits"], rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(got["features"], expected["features"], rtol=1e-5, atol=2e-5)
    assert not any(k.endswith("_new") or "_new." in k for k in teacher.state_dict())


def test_branches_go_where_rcil_puts_them_and_start_as_copies_in_the_body():
    torch.manual_seed(0)
    plain = build_segmenter(backbone="resnet50", backbone_width=8, head_channels=8, classes_per_step=[7]).eval()
    model = copy.deepcopy(plain)
    add_branches(model)
    keys = model.state_dict().keys()
    assert {"body.layer1.0.conv2.convs.0.weight", "body.layer1.0.conv2.convs_new.0.weight",
            "body.layer1.0.conv2.bn.running_var", "body.layer1.0.conv2.bn_new.weight",
            "head.map_convs.0.convs.3.weight", "head.map_convs.0.convs_new.3.weight",
            "head.map_convs.0.bn_new.running_mean"} <= set(keys)
    assert not any(k.startswith("body.layer1.0.bn2") or k.startswith("head.map_bn") for k in keys)
    # 3 + 4 + 6 + 3 bottlenecks of ResNet-50, and the head
    assert sum(1 for _ in parallel_branches(model.body)) == 16 and sum(1 for _ in parallel_branches(model.head)) == 1
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.body(x), plain.body(x))  # both body branches start equal
    head = next(parallel_branches(model.head))
    assert not torch.equal(head.convs[0].weight, head.convs_new[0].weight)  # type: ignore[index]
    add_branches(model)  # a second call changes nothing
    assert model.state_dict().keys() == keys


# -- pooled cube distillation -------------------------------------------------------------------------------
def test_pckd_spatial_by_hand():
    # one pixel of value 2 against 0: each of the 2x2 outputs of a k x k window (padding k/2) averages
    # 4 over k^2 cells, so the norm is 2 * 4 / k^2; the mean over the six windows is 0.1242824...
    a, b = torch.full((1, 1, 1, 1), 2.0), torch.zeros(1, 1, 1, 1)
    expected = sum(8 / k**2 for k in (4, 8, 12, 16, 20, 24)) / 6
    assert pckd_spatial(a, b).item() == pytest.approx(expected)
    assert expected == pytest.approx(0.1242824074)
    assert pckd_spatial(b, a).item() == pytest.approx(expected)  # symmetric
    assert pckd_spatial(-a, b).item() == pytest.approx(expected)  # the maps are squared


def test_pckd_channel_by_hand():
    # channels 1, 2, 3 -> squares 1, 4, 9 -> windows of three with zero padding: 5/3, 14/3, 13/3
    a = torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    assert pckd_channel(a, torch.zeros_like(a)).item() == pytest.approx(math.sqrt(25 + 196 + 169) / 3)
    # the batch mean of the per-image norms
    two = torch.cat([a, torch.zeros_like(a)])
    assert pckd_channel(two, torch.zeros_like(two)).item() == pytest.approx(math.sqrt(390) / 6)


def test_pckd_sums_weight_each_map_and_the_last_of_each_sum_differently():
    torch.manual_seed(0)
    teacher = [torch.randn(2, 4, 3, 3), torch.randn(2, 5, 3, 3), torch.randn(2, 3, 3, 3)]  # 2 maps, 3 old logits
    student = [torch.randn(2, 4, 3, 3), torch.randn(2, 5, 3, 3), torch.randn(2, 5, 3, 3)]  # 5 logits: 2 new
    got = pckd_losses(teacher, student, num_old_channels=3, num_classes_total=5, factor=0.1, last_factor=0.02)
    schedule = math.sqrt(5 / 2)
    merged = torch.cat([student[2][:, :1] + student[2][:, 3:].sum(1, keepdim=True), student[2][:, 1:3]], 1)
    spatial = (0.1 * pckd_spatial(teacher[0], student[0]) + 0.1 * pckd_spatial(teacher[1], student[1])
               + 0.02 * pckd_spatial(teacher[2], merged)) * schedule / 3
    channel = (0.1 * pckd_channel(teacher[0], student[0]) + 0.02 * pckd_channel(teacher[1], student[1])) * schedule / 2
    torch.testing.assert_close(got["pckd_spatial"], spatial)
    torch.testing.assert_close(got["pckd_channel"], channel)
    with pytest.raises(ValueError, match="new classes"):
        pckd_losses(teacher, teacher, num_old_channels=3, num_classes_total=3, factor=1, last_factor=1)


# -- the method -------------------------------------------------------------------------------------------
def test_presets_are_rcils_voc_and_ade_settings():
    voc, ade = METHOD_PRESETS["rcil"], METHOD_PRESETS["rcil-ade"]
    assert (voc.kd_weight, voc.kd_alpha, voc.pckd_factor, voc.pckd_last_factor) == (100.0, 1.0, 0.01, 0.0005)
    assert (ade.pckd_factor, ade.pckd_last_factor) == (5e-6, 5e-7)
    assert voc.ce_reduction == "all" and voc.classifier_init == "background" and voc.drop_path
    assert describe_method(voc).startswith("rcil: L = UNCE(y, mean over all pixels) + 100*UNKD(alpha=1) + PCKD(")


def test_start_step_folds_the_student_collapses_the_teacher_and_asks_for_the_maps():
    task = get_task("synth", "6-2-2")
    method = build_method(method_config("rcil"))
    model = _model()
    assert method.start_step(model, task, 0).teacher is None and model.taps == ()
    _perturb(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)["logits"]
    setup = method.start_step(model, task, 1)
    assert setup.student.taps == PCKD_TAPS and setup.teacher is not None and setup.teacher.taps == PCKD_TAPS
    assert all(pair.collapsed for pair in parallel_branches(setup.teacher))
    assert all(pair.first_frozen and not pair.collapsed for pair in parallel_branches(setup.student))
    with torch.no_grad():
        torch.testing.assert_close(setup.teacher(x)["logits"], before, rtol=1e-5, atol=2e-5)
    trainable = {n for n, p in setup.student.named_parameters() if p.requires_grad}
    assert not any(".convs.0." in n or ".bn." in n for n in trainable)
    assert any(".convs_new.0." in n for n in trainable) and "classifiers.1.weight" in trainable


def test_losses_are_unbiased_ce_kd_and_both_pckd_sums():
    method = build_method(method_config("rcil"))
    torch.manual_seed(0)
    maps = {"layer1": (4, 8), "layer2": (6, 4), "layer3": (8, 2), "layer4": (8, 2), "head": (5, 2)}

    def outputs(classes: int) -> dict:
        taps = {k: torch.randn(2, c, s, s) for k, (c, s) in maps.items()}
        taps["logits_lowres"] = torch.randn(2, classes, 2, 2)
        return {"logits": torch.randn(2, classes, 8, 8), "taps": taps}

    student, teacher = outputs(5), outputs(3)
    target = torch.randint(0, 5, (2, 8, 8))
    got = method(student, teacher, target, step=1)
    slope = 0.01

    def activated(out: dict) -> list:
        return [torch.nn.functional.leaky_relu(out["taps"][k], slope) for k in PCKD_TAPS[:4]] + [
            out["taps"]["head"], out["taps"]["logits_lowres"]]

    pckd = pckd_losses(activated(teacher), activated(student), num_old_channels=3, num_classes_total=5,
                       factor=0.01, last_factor=0.0005)
    torch.testing.assert_close(got["ce"], unbiased_cross_entropy(student["logits"], target, 3, reduction="all"))
    torch.testing.assert_close(got["kd"], kd_unbiased(student["logits"], teacher["logits"]))
    torch.testing.assert_close(got["pckd_spatial"], pckd["pckd_spatial"])
    torch.testing.assert_close(got["loss"], got["ce"] + 100 * got["kd"] + pckd["pckd_spatial"]
                               + pckd["pckd_channel"])
    assert sorted(method(student, None, target, step=0)) == ["ce", "loss"]


def test_the_draw_counter_is_state_restarted_by_a_new_step_and_kept_on_resume():
    task = get_task("synth", "6-2-2")
    method = build_method(method_config("rcil"))
    assert isinstance(method, RCIL)
    torch.manual_seed(3)
    method.start_step(_model(), task, 0)
    out = {"logits": torch.zeros(1, 7, 2, 2)}
    for _ in range(3):
        method(out, None, torch.zeros(1, 2, 2, dtype=torch.long), step=0)
    assert method.state_dict() == {"step": 0, "batches": 3}
    resumed = build_method(method_config("rcil"))
    resumed.load_state_dict(method.state_dict())
    torch.manual_seed(3)
    resumed.start_step(_model(), task, 0)  # the same step: its draws go on from batch 3
    assert resumed.state_dict() == {"step": 0, "batches": 3}
    assert torch.equal(torch.rand(4, generator=resumed.generator), torch.rand(4, generator=method.generator))
    method.start_step(_model(), task, 1)  # a new step counts from 0
    assert method.state_dict() == {"step": 1, "batches": 0}


def test_step_zero_identity_names_the_branched_model():
    rcil, finetune = build_method(method_config("rcil")), build_method(method_config("finetune"))
    assert rcil.identity(0) != finetune.identity(0)
    assert rcil.identity(0)["architecture"] == "rcil parallel branches"


# -- on the engine ------------------------------------------------------------------------------------------
def test_rcil_trains_three_steps_evaluates_from_its_checkpoints_and_resumes_mid_step(synth_root, tmp_path: Path):
    cfg = tiny_config(synth_root, "method.name=rcil", "optim.epochs_next=2", cache_dir=tmp_path / "cache")
    whole = run_training(cfg, tmp_path / "whole", quiet=True)
    assert [s["step"] for s in whole["steps"]] == [0, 1, 2]
    log = (tmp_path / "whole" / "train.log").read_text()
    assert "pckd_spatial" in log and "pckd_channel" in log
    # every checkpoint of the run holds the branches, and ilseg evaluate rebuilds them
    model, _ = load_step_model(cfg, tmp_path / "whole" / "step2.pth")
    assert sum(1 for _ in parallel_branches(model)) == 9
    scores = evaluate_checkpoint(cfg, tmp_path / "whole" / "step2.pth")
    assert scores["iou_per_class"] == whole["steps"][2]["iou_per_class"]
    # stopped before step 1's second epoch, then resumed: the same draws, the same weights
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, tmp_path / "parts", quiet=True, callbacks=InterruptAt(1, 1))
    parts = run_training(cfg, tmp_path / "parts", resume=True, quiet=True)
    a = torch.load(tmp_path / "whole" / "step2.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "parts" / "step2.pth", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert parts["steps"][2]["iou_per_class"] == whole["steps"][2]["iou_per_class"]


@pytest.mark.parametrize(("preset", "factors"), [("voc-15-1-ov-rcil", (0.01, 0.0005)),
                                                 ("voc-10-1-disjoint-rcil", (0.01, 0.0005)),
                                                 ("ade-100-50-ov-rcil", (5e-6, 5e-7))])
def test_rcil_run_presets_use_the_authors_factors(preset, factors):
    cfg = load_config(preset_dir() / f"{preset}.yaml")
    assert (cfg.method.pckd_factor, cfg.method.pckd_last_factor) == factors
    assert cfg.method.kd_weight == 100.0


def test_the_stem_has_no_activation_as_in_rcils_code_unless_asked():
    for stem_activation, kind in ((False, nn.Identity), (True, nn.LeakyReLU)):
        model = build_segmenter(backbone="resnet18", backbone_width=8, head_channels=8, classes_per_step=[3])
        build_method(method_config("rcil", {"stem_activation": stem_activation})).adapt_model(model)
        assert isinstance(model.body.act, kind)
        assert all(isinstance(block.act, nn.LeakyReLU) for stage in (model.body.layer1, model.body.layer4)
                   for block in stage)


@pytest.mark.parametrize("k", [4, 8, 12, 16, 20, 24])
def test_the_box_average_is_rcils_two_dimensional_average_pooling(k):
    x = torch.randn(2, 3, 17, 13)
    expected = torch.nn.functional.avg_pool2d(x, k, stride=1, padding=k // 2)
    torch.testing.assert_close(rcil_module.box_average(x, k), expected)


def test_a_channel_dropped_from_a_branch_sends_no_gradient_into_it():
    torch.manual_seed(2)
    pair = ParallelBranches([nn.Conv2d(3, 32, 1, bias=False)], nn.BatchNorm2d(32))
    pair.train()
    pair.generator = torch.Generator().manual_seed(9)
    pair(torch.randn(4, 3, 5, 5)).square().sum().backward()
    w_first, w_second = drop_path_weights(32, torch.Generator().manual_seed(9))
    first_grad = pair.convs[0].weight.grad.flatten(1).abs().sum(1)  # type: ignore[union-attr]
    second_grad = pair.convs_new[0].weight.grad.flatten(1).abs().sum(1)  # type: ignore[index,union-attr]
    assert torch.equal(first_grad == 0, w_first == 0) and torch.equal(second_grad == 0, w_second == 0)


def test_pckd_pulls_the_student_only():
    torch.manual_seed(4)
    teacher = [torch.randn(1, 4, 3, 3, requires_grad=True) for _ in range(2)]
    student = [torch.randn(1, 4, 3, 3, requires_grad=True), torch.randn(1, 5, 3, 3, requires_grad=True)]
    teacher[1] = torch.randn(1, 3, 3, 3, requires_grad=True)
    losses = pckd_losses([t.detach() for t in teacher], student, num_old_channels=3, num_classes_total=5,
                         factor=0.1, last_factor=0.1)
    (losses["pckd_spatial"] + losses["pckd_channel"]).backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student)
    # a student map equal to the teacher's is at the minimum: no pull
    same = torch.randn(1, 4, 3, 3, requires_grad=True)
    pckd_spatial(same.detach(), same).backward()
    assert same.grad is not None and same.grad.abs().max() == 0
