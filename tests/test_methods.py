"""Method presets: which losses each computes, their weighting, config checks, freezing."""

from __future__ import annotations

import math

import pytest
import torch

from ilseg.errors import IlsegError
from ilseg.models import build_segmenter
from ilseg.tasks import get_task
from ilseg.methods import (
    METHOD_PRESETS,
    Method,
    MethodConfig,
    build_method,
    cross_entropy,
    describe_method,
    feature_distillation,
    kd_ilt_output,
    kd_mib,
    kd_unbiased,
    method_config,
    unbiased_cross_entropy,
)


def _outputs(channels: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"logits": torch.randn(2, channels, 4, 4, generator=g),
            "features": torch.randn(2, 6, 2, 2, generator=g)}


STUDENT = _outputs(4, 0)   # 3 old channels + 1 new
TEACHER = _outputs(3, 1)
TARGET = torch.tensor([[[0, 1, 3, 255]] * 4, [[2, 3, 0, 0]] * 4])  # 2x4x4


@pytest.mark.parametrize("name", [n for n, c in METHOD_PRESETS.items() if not c.uses_pod])  # PLOP: test_plop_method
def test_preset_total_is_weighted_sum(name):
    cfg = METHOD_PRESETS[name]
    method = build_method(cfg)
    teacher = TEACHER if method.needs_teacher else None
    out = method(STUDENT, teacher, TARGET, step=1)
    if cfg.unbiased_ce:
        ce = unbiased_cross_entropy(STUDENT["logits"], TARGET, TEACHER["logits"].shape[1], reduction=cfg.ce_reduction)
    else:
        ce = cross_entropy(STUDENT["logits"], TARGET, reduction=cfg.ce_reduction)
    assert out["ce"].item() == pytest.approx(ce.item())
    if cfg.kd == "mib":
        assert out["kd"].item() == pytest.approx(kd_mib(STUDENT["logits"], TEACHER["logits"]).item())
    elif cfg.kd == "unbiased":
        assert out["kd"].item() == pytest.approx(kd_unbiased(STUDENT["logits"], TEACHER["logits"]).item())
    elif cfg.kd == "ilt_output":
        ref = kd_ilt_output(STUDENT["logits"], TEACHER["logits"], TARGET, mask=cfg.kd_mask)
        assert out["kd"].item() == pytest.approx(ref.item())
    else:
        assert "kd" not in out
    if cfg.fd_weight > 0:
        ref = feature_distillation(STUDENT["features"], TEACHER["features"])
        assert out["fd"].item() == pytest.approx(ref.item())
    else:
        assert "fd" not in out
    expected = out["ce"] + cfg.kd_weight * out.get("kd", torch.tensor(0.0)) + cfg.fd_weight * out.get(
        "fd", torch.tensor(0.0))
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_ilt_recipe_weights():
    cfg = METHOD_PRESETS["ilt"]
    assert (cfg.kd, cfg.kd_weight, cfg.kd_alpha, cfg.fd_weight) == ("mib", 100.0, 1.0, 100.0)
    assert not cfg.keep_old_labels and not cfg.freeze_encoder
    out = Method(cfg)(STUDENT, TEACHER, TARGET, step=2)
    assert set(out) == {"ce", "kd", "fd", "loss"}
    assert out["loss"].item() == pytest.approx((out["ce"] + 100 * out["kd"] + 100 * out["fd"]).item(), rel=1e-6)
    paper = {n: METHOD_PRESETS[n] for n in ("ilt-kd-out", "ilt-kd-feat", "ilt-ef", "ilt-ef-kd-out", "ilt-kd-out-feat")}
    assert all(c.keep_old_labels for c in paper.values())
    assert paper["ilt-kd-feat"].fd_weight == 50.0 and paper["ilt-kd-out-feat"].fd_weight == 50.0
    assert paper["ilt-kd-out"].kd_weight == 1.0 and paper["ilt-kd-out"].kd_mask == "old_bgr"
    assert paper["ilt-ef"].freeze_encoder and paper["ilt-ef-kd-out"].freeze_encoder
    assert METHOD_PRESETS["joint"].joint


@pytest.mark.parametrize("name", list(METHOD_PRESETS))
def test_step_zero_is_cross_entropy_only(name):
    out = build_method(METHOD_PRESETS[name])(STUDENT, None, TARGET, step=0)
    assert set(out) == {"ce", "loss"}
    assert out["loss"] is out["ce"]


def test_missing_teacher_after_step_zero_raises():
    with pytest.raises(ValueError, match="teacher"):
        Method(METHOD_PRESETS["ilt"])(STUDENT, None, TARGET, step=1)
    assert not Method(METHOD_PRESETS["finetune"]).needs_teacher
    Method(METHOD_PRESETS["finetune"])(STUDENT, None, TARGET, step=1)  # no teacher needed


def test_loss_backpropagates_to_student_only():
    student = {k: v.clone().requires_grad_() for k, v in STUDENT.items()}
    teacher = {k: v.clone().requires_grad_() for k, v in TEACHER.items()}
    Method(METHOD_PRESETS["ilt-kd-out-feat"])(student, teacher, TARGET, step=1)["loss"].backward()
    assert all(v.grad is not None for v in student.values())
    assert all(v.grad is None for v in teacher.values())


def test_ce_reduction_all_override():
    cfg = method_config("ilt", {"ce_reduction": "all"})
    out = Method(cfg)(STUDENT, TEACHER, TARGET, step=1)
    assert out["ce"].item() == pytest.approx(cross_entropy(STUDENT["logits"], TARGET, reduction="all").item())


# -- config checks -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "message"),
    [({"kd_weight": -1.0, "kd": "mib"}, "kd_weight"),
     ({"fd_weight": -0.5}, "fd_weight"),
     ({"kd": "hinton"}, "kd"),
     ({"kd_mask": "new"}, "kd_mask"),
     ({"ce_reduction": "mean"}, "ce_reduction"),
     ({"classifier_init": "xavier"}, "classifier_init"),
     ({"kd_weight": 1.0}, "kd = 'none'"),
     ({"kd_temperature": 0.0}, "kd_temperature"),
     ({"kd_alpha": float("nan")}, "kd_alpha"),
     ({"freeze_bn": "yes"}, "freeze_bn"),
     ({"joint": True, "fd_weight": 1.0}, "joint")],
)
def test_invalid_config_raises(fields, message):
    with pytest.raises(IlsegError, match=message):
        MethodConfig(name="x", **fields)


def test_method_config_overrides():
    cfg = method_config("ilt", {"kd_weight": 10})
    assert cfg.kd_weight == 10.0 and isinstance(cfg.kd_weight, float)
    assert method_config("finetune") is METHOD_PRESETS["finetune"]
    with pytest.raises(IlsegError, match="finetune"):
        method_config("lwf")
    with pytest.raises(IlsegError, match="kd_wieght"):
        method_config("ilt", {"kd_wieght": 1})


def test_kd_weight_zero_turns_the_term_off():
    cfg = method_config("ilt", {"kd_weight": 0, "fd_weight": 0})
    assert not Method(cfg).needs_teacher
    assert set(Method(cfg)(STUDENT, None, TARGET, step=1)) == {"ce", "loss"}


def test_describe_method_lists_weights():
    assert describe_method(METHOD_PRESETS["ilt"]) == (
        "ilt: L = CE(y) + 100*KD_mib(alpha=1) + 100*FD [labels: current step only; step 0: CE only]")
    assert "50*FD" in describe_method(METHOD_PRESETS["ilt-kd-out-feat"])
    assert "encoder frozen" in describe_method(METHOD_PRESETS["ilt-ef-kd-out"])
    for cfg in METHOD_PRESETS.values():
        line = describe_method(cfg)
        assert line.startswith((cfg.name + ": L = CE", cfg.name + ": L = UNCE")) and "\n" not in line


# -- the step boundary, on real (tiny) models ------------------------------------------
def _tiny_model(classes_per_step=(7,)):
    torch.manual_seed(0)
    return build_segmenter(backbone="resnet18", backbone_width=8, head_channels=8, output_stride=16,
                           classes_per_step=list(classes_per_step))


TASK = get_task("synth", "6-2-2")  # 7 classes at step 0 (background + 6), then 2 and 2


def test_step0_has_no_teacher_and_freezes_nothing():
    model = _tiny_model()
    setup = Method(method_config("ilt-ef", {"freeze_bn": True})).start_step(model, TASK, 0)
    assert setup.student is model and setup.teacher is None
    assert model.classes_per_step == (7,)
    assert all(p.requires_grad for p in model.parameters())
    assert setup.target_lut[TASK.order[3]] == 3  # a step-0 class keeps its channel
    assert setup.target_lut[TASK.order[8]] == 0  # a future class is background


def test_start_step_adds_the_classifier_and_copies_the_teacher_first():
    model = _tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    setup = Method(METHOD_PRESETS["ilt"]).start_step(model, TASK, 1)
    assert setup.student is model and model.classes_per_step == (7, 2)
    teacher = setup.teacher
    assert teacher is not None and teacher.classes_per_step == (7,)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    # the teacher shares no storage with the student: training the student leaves it alone
    with torch.no_grad():
        model.classifiers[0].weight.add_(1.0)
    assert torch.equal(teacher.classifiers[0].weight, before["classifiers.0.weight"])
    # finetune distils nothing, so it gets no teacher
    assert Method(METHOD_PRESETS["finetune"]).start_step(_tiny_model(), TASK, 1).teacher is None


def test_encoder_freezing_from_step_one_on_a_real_model():
    model = _tiny_model()
    setup = Method(METHOD_PRESETS["ilt-ef"]).start_step(model, TASK, 1)
    assert not any(p.requires_grad for p in model.body.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    assert all(p.requires_grad for p in model.classifiers.parameters())
    model.train()  # the body's BNs stay in eval mode, so their statistics do not move
    assert not any(m.training for m in model.body.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert setup.teacher is None  # ilt-ef distils nothing


def test_bn_freezing_freezes_every_batchnorm():
    model = _tiny_model()
    Method(method_config("finetune", {"freeze_bn": True})).start_step(model, TASK, 1)
    model.train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert not any(p.requires_grad for m in bns for p in m.parameters())
    assert any(p.requires_grad for p in model.body.parameters())  # the convolutions still train


def test_background_init_through_the_method():
    model = _tiny_model()
    w_bg = model.classifiers[0].weight[0].clone()
    b_bg = float(model.classifiers[0].bias[0].detach())
    Method(method_config("ilt", {"classifier_init": "background"})).start_step(model, TASK, 1)
    new = model.classifiers[1]
    assert torch.equal(new.weight[0], w_bg) and torch.equal(new.weight[1], w_bg)
    expected = b_bg - math.log(3)  # two new classes + background share the background's probability
    assert float(new.bias[0].detach()) == pytest.approx(expected)
    assert float(model.classifiers[0].bias[0].detach()) == pytest.approx(expected)


def test_target_labels_follow_the_label_protocol():
    old, new, future = TASK.order[2], TASK.order[7], TASK.order[9]
    current = Method(METHOD_PRESETS["finetune"]).start_step(_tiny_model(), TASK, 1).target_lut
    kept = Method(METHOD_PRESETS["ilt-kd-out"]).start_step(_tiny_model(), TASK, 1).target_lut
    assert (current[old], current[new], current[future], current[255]) == (0, 7, 0, 255)
    assert (kept[old], kept[new], kept[future], kept[255]) == (2, 7, 0, 255)


def test_joint_trains_one_step_of_every_class():
    joint = Method(METHOD_PRESETS["joint"])
    task = joint.training_task(TASK)
    assert task.step_sizes == (11,) and task.order == TASK.order
    assert Method(METHOD_PRESETS["ilt"]).training_task(TASK) is TASK
    assert (joint.label_protocol, Method(METHOD_PRESETS["ilt-kd-out"]).label_protocol,
            Method(METHOD_PRESETS["finetune"]).label_protocol) == ("all classes", "old kept", "current step")


def test_step0_identity_leaves_out_what_acts_from_step_one():
    ilt, ft = Method(METHOD_PRESETS["ilt"]), Method(METHOD_PRESETS["finetune"])
    assert ilt.identity(0) == ft.identity(0) == {"ce_reduction": "valid", "joint": False}
    assert ilt.identity(1) != ft.identity(1) and "kd_weight" in ilt.identity(1) and "name" not in ilt.identity(1)
    assert Method(method_config("finetune", {"ce_reduction": "all"})).identity(0)["ce_reduction"] == "all"


def test_needs_teacher_is_the_one_rule():
    assert [name for name, cfg in METHOD_PRESETS.items() if Method(cfg).needs_teacher] == [
        "ilt", "ilt-kd-out", "ilt-kd-feat", "ilt-ef-kd-out", "ilt-kd-out-feat", "mib", "plop"]
