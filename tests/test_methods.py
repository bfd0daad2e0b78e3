"""Method presets: which losses each computes, their weighting, config checks, freezing, the hooks the
engine asks (identity, taps), and the flat method sections of ilseg 0.1 (``ilseg.methods.legacy``)."""

from __future__ import annotations

import dataclasses
import math
import re
import typing

import pytest
import torch

from ilseg.errors import IlsegError
from ilseg.methods import (
    METHOD_PRESETS,
    EWFConfig,
    FinetuneConfig,
    ILTConfig,
    JointConfig,
    Method,
    MethodConfig,
    MiBConfig,
    PLOPConfig,
    RCILConfig,
    REMINDERConfig,
    SDRConfig,
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
from ilseg.methods.legacy import LEGACY_FIELDS, from_legacy, to_legacy
from ilseg.methods.plop import POD_TAPS
from ilseg.models import TAPS, build_segmenter
from ilseg.tasks import get_task

# The presets ilseg ships (another test module may register a method of its own into METHOD_PRESETS).
FIRST = ("finetune", "joint", "ilt", "ilt-kd-out", "ilt-kd-feat", "ilt-ef", "ilt-ef-kd-out", "ilt-kd-out-feat", "mib",
         "plop")
# The methods of issue 23, each tested in its own file (tests/test_<method>_method.py).
LATER = {"sdr": SDRConfig, "reminder": REMINDERConfig, "reminder-ade": REMINDERConfig,
         "ewf": EWFConfig, "ewf-mib": EWFConfig, "rcil": RCILConfig, "rcil-ade": RCILConfig}
BUILT_IN = FIRST  # the presets the tests of this file cover
CONFIG_CLASSES = (FinetuneConfig, JointConfig, ILTConfig, MiBConfig, PLOPConfig)


def _outputs(channels: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"logits": torch.randn(2, channels, 4, 4, generator=g),
            "features": torch.randn(2, 6, 2, 2, generator=g)}


STUDENT = _outputs(4, 0)   # 3 old channels + 1 new
TEACHER = _outputs(3, 1)
TARGET = torch.tensor([[[0, 1, 3, 255]] * 4, [[2, 3, 0, 0]] * 4])  # 2x4x4


def test_the_built_in_presets():
    every = (*FIRST, *LATER)
    assert [n for n, c in METHOD_PRESETS.items() if type(c).__module__.startswith("ilseg.")] == list(every)
    assert {n: type(METHOD_PRESETS[n]) for n in every} == {
        "finetune": FinetuneConfig, "joint": JointConfig, **{n: ILTConfig for n in BUILT_IN if n.startswith("ilt")},
        "mib": MiBConfig, "plop": PLOPConfig, **LATER}
    assert all(METHOD_PRESETS[n].name == n for n in every)


def test_the_method_base_class_is_abstract():
    with pytest.raises(TypeError):
        Method(METHOD_PRESETS["finetune"])  # type: ignore[abstract]
    with pytest.raises(TypeError, match="ILTConfig"):
        build_method(METHOD_PRESETS["ilt"]).__class__(METHOD_PRESETS["mib"])  # an ILT runs an ILTConfig only


@pytest.mark.parametrize("name", [n for n in BUILT_IN if n != "plop"])  # PLOP: test_plop_method
def test_preset_total_is_weighted_sum(name):
    cfg = METHOD_PRESETS[name]
    method = build_method(cfg)
    teacher = TEACHER if method.needs_teacher else None
    out = method(STUDENT, teacher, TARGET, step=1)
    if isinstance(cfg, MiBConfig):
        ce = unbiased_cross_entropy(STUDENT["logits"], TARGET, TEACHER["logits"].shape[1], reduction=cfg.ce_reduction)
    else:
        ce = cross_entropy(STUDENT["logits"], TARGET, reduction=cfg.ce_reduction)
    assert out["ce"].item() == pytest.approx(ce.item())
    kd = cfg.kd if isinstance(cfg, ILTConfig) else "unbiased" if isinstance(cfg, MiBConfig) else "none"
    if kd == "ilt_mib_code":
        assert out["kd"].item() == pytest.approx(kd_mib(STUDENT["logits"], TEACHER["logits"]).item())
    elif kd == "unbiased":
        assert out["kd"].item() == pytest.approx(kd_unbiased(STUDENT["logits"], TEACHER["logits"]).item())
    elif kd == "ilt_output":
        ref = kd_ilt_output(STUDENT["logits"], TEACHER["logits"], TARGET, mask=cfg.kd_mask)
        assert out["kd"].item() == pytest.approx(ref.item())
    else:
        assert "kd" not in out
    fd_weight = getattr(cfg, "fd_weight", 0.0)  # ILT's alone
    if fd_weight > 0:
        ref = feature_distillation(STUDENT["features"], TEACHER["features"])
        assert out["fd"].item() == pytest.approx(ref.item())
    else:
        assert "fd" not in out
    expected = out["ce"] + getattr(cfg, "kd_weight", 0.0) * out.get("kd", torch.tensor(0.0)) + fd_weight * out.get(
        "fd", torch.tensor(0.0))
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_ilt_recipe_weights():
    cfg = METHOD_PRESETS["ilt"]
    assert (cfg.kd, cfg.kd_weight, cfg.kd_alpha, cfg.fd_weight) == ("ilt_mib_code", 100.0, 1.0, 100.0)
    assert not cfg.keep_old_labels and not cfg.freeze_encoder
    out = build_method(cfg)(STUDENT, TEACHER, TARGET, step=2)
    assert set(out) == {"ce", "kd", "fd", "loss"}
    assert out["loss"].item() == pytest.approx((out["ce"] + 100 * out["kd"] + 100 * out["fd"]).item(), rel=1e-6)
    paper = {n: METHOD_PRESETS[n] for n in ("ilt-kd-out", "ilt-kd-feat", "ilt-ef", "ilt-ef-kd-out", "ilt-kd-out-feat")}
    assert all(c.keep_old_labels for c in paper.values())
    assert paper["ilt-kd-feat"].fd_weight == 50.0 and paper["ilt-kd-out-feat"].fd_weight == 50.0
    assert paper["ilt-kd-out"].kd_weight == 1.0 and paper["ilt-kd-out"].kd_mask == "old_bgr"
    assert paper["ilt-ef"].freeze_encoder and paper["ilt-ef-kd-out"].freeze_encoder
    assert build_method(METHOD_PRESETS["joint"]).all_classes_at_once
    assert not any(build_method(METHOD_PRESETS[n]).all_classes_at_once for n in BUILT_IN if n != "joint")


@pytest.mark.parametrize("name", BUILT_IN)
def test_step_zero_is_cross_entropy_only(name):
    out = build_method(METHOD_PRESETS[name])(STUDENT, None, TARGET, step=0)
    assert set(out) == {"ce", "loss"}
    assert out["loss"] is out["ce"]


def test_missing_teacher_after_step_zero_raises():
    with pytest.raises(ValueError, match="teacher"):
        build_method(METHOD_PRESETS["ilt"])(STUDENT, None, TARGET, step=1)
    assert not build_method(METHOD_PRESETS["finetune"]).needs_teacher
    build_method(METHOD_PRESETS["finetune"])(STUDENT, None, TARGET, step=1)  # no teacher needed


def test_loss_backpropagates_to_student_only():
    student = {k: v.clone().requires_grad_() for k, v in STUDENT.items()}
    teacher = {k: v.clone().requires_grad_() for k, v in TEACHER.items()}
    build_method(METHOD_PRESETS["ilt-kd-out-feat"])(student, teacher, TARGET, step=1)["loss"].backward()
    assert all(v.grad is not None for v in student.values())
    assert all(v.grad is None for v in teacher.values())


def test_ce_reduction_all_override():
    cfg = method_config("ilt", {"ce_reduction": "all"})
    out = build_method(cfg)(STUDENT, TEACHER, TARGET, step=1)
    assert out["ce"].item() == pytest.approx(cross_entropy(STUDENT["logits"], TARGET, reduction="all").item())


# -- config checks -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cls", "fields", "message"),
    [(ILTConfig, {"kd_weight": -1.0, "kd": "ilt_mib_code"}, "kd_weight"),
     (ILTConfig, {"fd_weight": -0.5}, "fd_weight"),
     (ILTConfig, {"kd": "hinton"}, "kd"),
     (ILTConfig, {"kd": "unbiased"}, "kd"),  # MiB's distillation is MiB's, not an ILT variant
     (ILTConfig, {"kd_mask": "new"}, "kd_mask"),
     (FinetuneConfig, {"ce_reduction": "mean"}, "ce_reduction"),
     (FinetuneConfig, {"classifier_init": "xavier"}, "classifier_init"),
     (ILTConfig, {"kd_weight": 1.0}, "kd = 'none'"),
     (ILTConfig, {"kd_temperature": 0.0}, "kd_temperature"),
     (ILTConfig, {"kd_alpha": float("nan")}, "kd_alpha"),
     (FinetuneConfig, {"freeze_bn": "yes"}, "freeze_bn"),
     (JointConfig, {"freeze_encoder": True}, "joint training has a single step"),
     (JointConfig, {"keep_old_labels": True}, "joint training has a single step"),
     (MiBConfig, {"kd_alpha": 0.0}, "kd_alpha"),
     (MiBConfig, {"kd_weight": "10"}, "kd_weight"),
     (PLOPConfig, {"pod_factor": -0.01}, "pod_factor"),
     (PLOPConfig, {"pseudo_labels": "softmax"}, "pseudo_labels"),
     (PLOPConfig, {"pseudo_floor": float("inf")}, "pseudo_floor")],
)
def test_invalid_config_raises(cls, fields, message):
    with pytest.raises(IlsegError, match=re.escape(message)):
        cls(name="x", **fields)


def test_a_field_of_another_method_is_refused_naming_it():
    """The flat config let any method carry any term (``joint`` with ``fd_weight``, ILT with ``unbiased_ce``):
    each config now has only its method's fields."""
    for name, fields in (("joint", {"fd_weight": 1.0}), ("finetune", {"fd_weight": 1.0}),
                         ("ilt", {"unbiased_ce": True}), ("mib", {"kd": "ilt_output"}), ("plop", {"kd_weight": 5}),
                         ("mib", {"joint": True})):
        field = next(iter(fields))
        with pytest.raises(IlsegError, match=rf"unknown fields? '{field}' of method '{name}'"):
            method_config(name, fields)
        with pytest.raises(TypeError, match=field):
            type(METHOD_PRESETS[name])(name="x", **fields)


# Every bounded number of the built-in configs, with its bound: ">=" (metadata "min") or ">" ("above").
BOUNDS = {
    ILTConfig: {"kd_weight": (">=", 0.0), "kd_alpha": (">", 0.0), "kd_temperature": (">", 0.0),
                "fd_weight": (">=", 0.0)},
    MiBConfig: {"kd_weight": (">=", 0.0), "kd_alpha": (">", 0.0)},
    PLOPConfig: {"pod_factor": (">=", 0.0), "pod_logits_factor": (">=", 0.0), "pseudo_floor": (">=", 0.0)},
    FinetuneConfig: {},
    JointConfig: {},
}
# Every field that takes one of a few strings.
LITERALS = {
    ILTConfig: {"ce_reduction", "classifier_init", "kd", "kd_mask"},
    MiBConfig: {"ce_reduction", "classifier_init"},
    PLOPConfig: {"ce_reduction", "classifier_init", "pseudo_labels", "pseudo_threshold"},
    FinetuneConfig: {"ce_reduction", "classifier_init"},
    JointConfig: {"ce_reduction", "classifier_init"},
}


def _first_preset(cls: type[MethodConfig]) -> MethodConfig:
    return next(METHOD_PRESETS[n] for n in BUILT_IN if type(METHOD_PRESETS[n]) is cls)


@pytest.mark.parametrize("cls", CONFIG_CLASSES, ids=lambda c: c.__name__)
def test_every_bound_in_the_field_metadata_is_enforced_naming_the_field(cls):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    declared = {name: (">=", f.metadata["min"]) if "min" in f.metadata else (">", f.metadata["above"])
                for name, f in fields.items() if "min" in f.metadata or "above" in f.metadata}
    assert declared == BOUNDS[cls]
    start = _first_preset(cls)
    for name, (op, bound) in BOUNDS[cls].items():
        where = rf"method '{start.name}': {name} must be {op} 0, got "
        bad = bound - 1.0 if op == ">=" else bound  # a negative weight; a zero temperature, alpha
        with pytest.raises(IlsegError, match=where):
            dataclasses.replace(start, **{name: bad})
        with pytest.raises(IlsegError, match=rf"method '{start.name}': {name} must be a finite number"):
            dataclasses.replace(start, **{name: float("nan")})
        if op == ">=":
            assert getattr(dataclasses.replace(start, **{name: bound}), name) == bound  # the bound itself is fine
        else:
            assert getattr(dataclasses.replace(start, **{name: bound + 1e-6}), name) == bound + 1e-6


@pytest.mark.parametrize("cls", CONFIG_CLASSES, ids=lambda c: c.__name__)
def test_every_literal_field_refuses_an_unknown_value_naming_the_field(cls):
    hints = typing.get_type_hints(cls)
    assert {f.name for f in dataclasses.fields(cls) if typing.get_origin(hints[f.name]) is typing.Literal} == \
        LITERALS[cls]
    start = _first_preset(cls)
    for name in LITERALS[cls]:
        allowed = ", ".join(typing.get_args(hints[name]))
        with pytest.raises(IlsegError, match=re.escape(f"method {start.name!r}: {name} = 'bogus' is not one of "
                                                       f"{allowed}")):
            dataclasses.replace(start, **{name: "bogus"})
    for name in ("freeze_encoder", "freeze_bn", "keep_old_labels"):
        with pytest.raises(IlsegError, match=f"{name} must be true or false"):
            dataclasses.replace(start, **{name: 1})


def test_method_config_overrides():
    cfg = method_config("ilt", {"kd_weight": 10})
    assert cfg.kd_weight == 10.0 and isinstance(cfg.kd_weight, float)
    assert type(cfg) is ILTConfig and cfg.name == "ilt" and cfg.fd_weight == 100.0  # the rest is the preset's
    assert method_config("finetune") is METHOD_PRESETS["finetune"]
    assert method_config("finetune", {"freeze_bn": True}).freeze_bn  # a common field, on any method
    with pytest.raises(IlsegError, match="finetune"):
        method_config("lwf")
    with pytest.raises(IlsegError, match="kd_wieght"):
        method_config("ilt", {"kd_wieght": 1})
    with pytest.raises(IlsegError, match="fd_weight"):
        method_config("finetune", {"fd_weight": 1})


def test_kd_weight_zero_turns_the_term_off():
    cfg = method_config("ilt", {"kd_weight": 0, "fd_weight": 0})
    assert not build_method(cfg).needs_teacher
    assert set(build_method(cfg)(STUDENT, None, TARGET, step=1)) == {"ce", "loss"}


def test_describe_method_lists_weights():
    assert describe_method(METHOD_PRESETS["ilt"]) == (
        "ilt: L = CE(y) + 100*KD_ilt_mib_code(alpha=1) + 100*FD [labels: current step only; step 0: CE only]")
    assert "50*FD" in describe_method(METHOD_PRESETS["ilt-kd-out-feat"])
    assert "encoder frozen" in describe_method(METHOD_PRESETS["ilt-ef-kd-out"])
    for name in BUILT_IN:
        cfg = METHOD_PRESETS[name]
        line = describe_method(cfg)
        assert line == build_method(cfg).describe()
        assert line.startswith((cfg.name + ": L = CE", cfg.name + ": L = UNCE")) and "\n" not in line


def test_describe_every_preset():
    """The line of each built-in preset; all but ilt's are those of ilseg 0.1 (its KD was ``KD_mib``)."""
    assert [describe_method(METHOD_PRESETS[n]) for n in BUILT_IN] == [
        "finetune: L = CE(y) [labels: current step only]",
        "joint: L = CE(y) [labels: all classes at once]",
        "ilt: L = CE(y) + 100*KD_ilt_mib_code(alpha=1) + 100*FD [labels: current step only; step 0: CE only]",
        "ilt-kd-out: L = CE(y) + 1*KD_out(T=1, pixels=old_bgr) [labels: old labels kept; step 0: CE only]",
        "ilt-kd-feat: L = CE(y) + 50*FD [labels: old labels kept; step 0: CE only]",
        "ilt-ef: L = CE(y) [labels: old labels kept; encoder frozen from step 1]",
        ("ilt-ef-kd-out: L = CE(y) + 1*KD_out(T=1, pixels=old_bgr) [labels: old labels kept; step 0: CE only; "
         "encoder frozen from step 1]"),
        ("ilt-kd-out-feat: L = CE(y) + 1*KD_out(T=1, pixels=old_bgr) + 50*FD [labels: old labels kept; "
         "step 0: CE only]"),
        ("mib: L = UNCE(y, mean over all pixels) + 10*UNKD(alpha=1) [labels: current step only; step 0: CE only; "
         "new classifier from background from step 1]"),
        ("plop: L = CE(pseudo-labels: entropy < median threshold, x kept fraction, mean over all pixels) + "
         "POD(stages+head 0.01, logits 0.0005) [labels: current step only; step 0: CE only; "
         "new classifier from background from step 1]"),
    ]
    # what a changed field does to the line
    assert describe_method(method_config("ilt-kd-out", {"kd_temperature": 2, "kd_mask": "all"})) == (
        "ilt-kd-out: L = CE(y) + 1*KD_out(T=2, pixels=all) [labels: old labels kept; step 0: CE only]")
    assert describe_method(method_config("mib", {"kd_weight": 0, "ce_reduction": "valid"})) == (
        "mib: L = UNCE(y) [labels: current step only; step 0: CE only; new classifier from background from step 1]")
    assert describe_method(method_config("plop", {"pseudo_labels": "none", "pod_factor": 0, "pod_logits_factor": 0,
                                                  "freeze_bn": True})) == (
        "plop: L = CE(y, mean over all pixels) [labels: current step only; step 0: CE only; BN frozen, "
        "new classifier from background from step 1]")


# -- the step boundary, on real (tiny) models ------------------------------------------
def _tiny_model(classes_per_step=(7,)):
    torch.manual_seed(0)
    return build_segmenter(backbone="resnet18", backbone_width=8, head_channels=8, output_stride=16,
                           classes_per_step=list(classes_per_step))


TASK = get_task("synth", "6-2-2")  # 7 classes at step 0 (background + 6), then 2 and 2


def test_step0_has_no_teacher_and_freezes_nothing():
    model = _tiny_model()
    setup = build_method(method_config("ilt-ef", {"freeze_bn": True})).start_step(model, TASK, 0)
    assert setup.student is model and setup.teacher is None
    assert model.classes_per_step == (7,)
    assert all(p.requires_grad for p in model.parameters())
    assert setup.target_lut[TASK.order[3]] == 3  # a step-0 class keeps its channel
    assert setup.target_lut[TASK.order[8]] == 0  # a future class is background


def test_start_step_adds_the_classifier_and_copies_the_teacher_first():
    model = _tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    setup = build_method(METHOD_PRESETS["ilt"]).start_step(model, TASK, 1)
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
    assert build_method(METHOD_PRESETS["finetune"]).start_step(_tiny_model(), TASK, 1).teacher is None


def test_encoder_freezing_from_step_one_on_a_real_model():
    model = _tiny_model()
    setup = build_method(METHOD_PRESETS["ilt-ef"]).start_step(model, TASK, 1)
    assert not any(p.requires_grad for p in model.body.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    assert all(p.requires_grad for p in model.classifiers.parameters())
    model.train()  # the body's BNs stay in eval mode, so their statistics do not move
    assert not any(m.training for m in model.body.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert setup.teacher is None  # ilt-ef distils nothing


def test_bn_freezing_freezes_every_batchnorm():
    model = _tiny_model()
    build_method(method_config("finetune", {"freeze_bn": True})).start_step(model, TASK, 1)
    model.train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert not any(p.requires_grad for m in bns for p in m.parameters())
    assert any(p.requires_grad for p in model.body.parameters())  # the convolutions still train


def test_background_init_through_the_method():
    model = _tiny_model()
    w_bg = model.classifiers[0].weight[0].clone()
    b_bg = float(model.classifiers[0].bias[0].detach())
    build_method(method_config("ilt", {"classifier_init": "background"})).start_step(model, TASK, 1)
    new = model.classifiers[1]
    assert torch.equal(new.weight[0], w_bg) and torch.equal(new.weight[1], w_bg)
    expected = b_bg - math.log(3)  # two new classes + background share the background's probability
    assert float(new.bias[0].detach()) == pytest.approx(expected)
    assert float(model.classifiers[0].bias[0].detach()) == pytest.approx(expected)


def test_target_labels_follow_the_label_protocol():
    old, new, future = TASK.order[2], TASK.order[7], TASK.order[9]
    current = build_method(METHOD_PRESETS["finetune"]).start_step(_tiny_model(), TASK, 1).target_lut
    kept = build_method(METHOD_PRESETS["ilt-kd-out"]).start_step(_tiny_model(), TASK, 1).target_lut
    assert (current[old], current[new], current[future], current[255]) == (0, 7, 0, 255)
    assert (kept[old], kept[new], kept[future], kept[255]) == (2, 7, 0, 255)


def test_joint_trains_one_step_of_every_class():
    joint = build_method(METHOD_PRESETS["joint"])
    task = joint.training_task(TASK)
    assert task.step_sizes == (11,) and task.order == TASK.order
    assert build_method(METHOD_PRESETS["ilt"]).training_task(TASK) is TASK
    assert (joint.label_protocol, build_method(METHOD_PRESETS["ilt-kd-out"]).label_protocol,
            build_method(METHOD_PRESETS["finetune"]).label_protocol) == ("all classes", "old kept", "current step")


def test_step0_identity_leaves_out_what_acts_from_step_one():
    ilt, ft = build_method(METHOD_PRESETS["ilt"]), build_method(METHOD_PRESETS["finetune"])
    assert ilt.identity(0) == ft.identity(0) == {"ce_reduction": "valid", "joint": False}
    assert ilt.identity(1) != ft.identity(1) and "kd_weight" in ilt.identity(1) and "name" not in ilt.identity(1)
    assert build_method(method_config("finetune", {"ce_reduction": "all"})).identity(0)["ce_reduction"] == "all"


@pytest.mark.parametrize("reduction", ["valid", "all"])
def test_step0_identity_is_shared_by_every_incremental_method_and_not_by_joint(reduction):
    """Runs of finetune, ILT, MiB and PLOP with one CE reduction may share their step-0 model; joint's differs."""
    identities = {name: build_method(method_config(name, {"ce_reduction": reduction})).identity(0)
                  for name in ("finetune", "ilt", "ilt-kd-out", "mib")}
    plop = {"ce_reduction": reduction} | ({"pseudo_labels": "none"} if reduction == "valid" else {})
    identities["plop"] = build_method(method_config("plop", plop)).identity(0)
    assert all(identity == {"ce_reduction": reduction, "joint": False} for identity in identities.values())
    joint = build_method(method_config("joint", {"ce_reduction": reduction})).identity(0)
    assert joint == {"ce_reduction": reduction, "joint": True} and joint != identities["finetune"]
    # a setting that acts from step 1 on leaves step 0 alone
    assert build_method(method_config("mib", {"kd_weight": 0, "ce_reduction": reduction})).identity(0) == \
        identities["mib"]


def test_identity_from_step_one_is_the_kind_and_every_field():
    assert build_method(METHOD_PRESETS["mib"]).identity(1) == {
        "kind": "mib", "ce_reduction": "all", "classifier_init": "background", "freeze_encoder": False,
        "freeze_bn": False, "keep_old_labels": False, "kd_weight": 10.0, "kd_alpha": 1.0}
    assert build_method(METHOD_PRESETS["finetune"]).identity(2) == {
        "kind": "finetune", "ce_reduction": "valid", "classifier_init": "default", "freeze_encoder": False,
        "freeze_bn": False, "keep_old_labels": False}
    kinds = {n: build_method(METHOD_PRESETS[n]).identity(1)["kind"] for n in BUILT_IN}
    assert kinds == {"finetune": "finetune", "joint": "joint", **{n: "ilt" for n in BUILT_IN if n.startswith("ilt")},
                     "mib": "mib", "plop": "plop"}
    # finetune and ILT without any term have the same fields but are different methods
    bare_ilt = build_method(method_config("ilt", {"kd": "none", "kd_weight": 0, "fd_weight": 0}))
    assert bare_ilt.identity(1) != build_method(METHOD_PRESETS["finetune"]).identity(1)


def test_needs_teacher_is_the_one_rule():
    assert [name for name in BUILT_IN if build_method(METHOD_PRESETS[name]).needs_teacher] == [
        "ilt", "ilt-kd-out", "ilt-kd-feat", "ilt-ef-kd-out", "ilt-kd-out-feat", "mib", "plop"]
    # MiB's unbiased CE needs the teacher's channel count even without its distillation
    assert build_method(method_config("mib", {"kd_weight": 0})).needs_teacher


# -- what the methods ask of the model -------------------------------------------------
def test_only_plop_asks_for_taps_and_only_from_step_one():
    for name in BUILT_IN:
        method = build_method(METHOD_PRESETS[name])
        expected = ("layer1", "layer2", "layer3", "layer4", "head", "logits_lowres") if name == "plop" else ()
        assert method.taps(0) == ()
        assert method.taps(1) == method.taps(5) == expected, name
    assert POD_TAPS == TAPS  # PLOP distils every map the model can give, in the model's order
    no_pod = build_method(method_config("plop", {"pod_factor": 0, "pod_logits_factor": 0}))
    assert no_pod.taps(1) == ()  # without Local POD nothing is tapped
    assert build_method(method_config("plop", {"pod_factor": 0})).taps(1) == POD_TAPS  # the logits map alone


@pytest.mark.parametrize("name", ["finetune", "ilt", "mib"])
def test_a_method_without_taps_gets_plain_outputs_from_student_and_teacher(name):
    model = _tiny_model()
    model.taps = ("head",)  # left over: start_step sets what the method asks for
    setup = build_method(METHOD_PRESETS[name]).start_step(model, TASK, 1)
    assert setup.student.taps == ()
    assert setup.teacher is None or setup.teacher.taps == ()
    x = torch.randn(1, 3, 32, 32)
    assert set(setup.student.eval()(x)) == {"logits", "features"}


# -- the flat method sections of ilseg 0.1 ---------------------------------------------
@pytest.mark.parametrize("name", BUILT_IN)
def test_to_legacy_then_from_legacy_gives_every_preset_back(name):
    preset = METHOD_PRESETS[name]
    flat = to_legacy(preset)
    assert flat is not None and set(flat) == set(LEGACY_FIELDS)
    assert from_legacy(preset, flat | {"name": name}, "method") == preset
    # and with a field changed, from another preset's start
    if isinstance(preset, ILTConfig):
        changed = dataclasses.replace(preset, kd_alpha=2.0, fd_weight=preset.fd_weight + 1)
        assert from_legacy(METHOD_PRESETS["ilt"], to_legacy(changed) | {"name": name}, "method") == \
            dataclasses.replace(changed, name="ilt")


def test_the_flat_form_of_the_presets_by_hand():
    """Each preset's flat fields, as ilseg 0.1 wrote them (``kd: mib`` is ILT's ``ilt_mib_code``)."""
    def flat(**fields):
        return {**LEGACY_FIELDS, **fields}

    assert to_legacy(METHOD_PRESETS["finetune"]) == flat()
    assert to_legacy(METHOD_PRESETS["joint"]) == flat(joint=True)
    assert to_legacy(METHOD_PRESETS["ilt"]) == flat(kd="mib", kd_weight=100.0, kd_alpha=1.0, fd_weight=100.0)
    assert to_legacy(METHOD_PRESETS["ilt-kd-out"]) == flat(kd="ilt_output", kd_weight=1.0, keep_old_labels=True)
    assert to_legacy(METHOD_PRESETS["ilt-ef"]) == flat(freeze_encoder=True, keep_old_labels=True)
    assert to_legacy(METHOD_PRESETS["mib"]) == flat(ce_reduction="all", unbiased_ce=True, kd="unbiased",
                                                    kd_weight=10.0, classifier_init="background")
    assert to_legacy(METHOD_PRESETS["plop"]) == flat(ce_reduction="all", pod_factor=0.01, pod_logits_factor=0.0005,
                                                     pseudo_labels="entropy", classifier_init="background")
    assert LEGACY_FIELDS["kd"] == "none" and len(LEGACY_FIELDS) == 18


def test_from_legacy_reads_kd_mib_and_fills_what_the_section_leaves_out():
    cfg = from_legacy(METHOD_PRESETS["ilt-kd-out"], {"name": "ilt-kd-out", "kd": "mib", "kd_weight": 5,
                                                     "unbiased_ce": False, "pod_factor": 0.0}, "method")
    assert type(cfg) is ILTConfig and (cfg.kd, cfg.kd_weight) == ("ilt_mib_code", 5.0)
    assert cfg.keep_old_labels  # the preset's, as the section does not say
    assert from_legacy(METHOD_PRESETS["mib"], {"name": "mib", "kd": "unbiased", "unbiased_ce": True,
                                               "kd_weight": 3}, "method") == method_config("mib", {"kd_weight": 3})


@pytest.mark.parametrize(("name", "section", "fields"), [
    ("ilt", {"unbiased_ce": True}, ["unbiased_ce"]),
    ("plop", {"kd": "mib", "kd_weight": 5}, ["kd_weight", "kd"]),
    ("mib", {"kd": "ilt_output"}, ["kd"]),
    ("mib", {"unbiased_ce": False}, ["unbiased_ce"]),
    ("finetune", {"fd_weight": 1.0}, ["fd_weight"]),
    ("ilt-kd-out", {"joint": True}, ["joint"]),
    ("joint", {"pseudo_labels": "entropy"}, ["pseudo_labels"]),
])
def test_from_legacy_refuses_what_the_method_cannot_express_naming_the_field(name, section, fields):
    with pytest.raises(IlsegError) as error:
        from_legacy(METHOD_PRESETS[name], {"name": name, **section}, "method")
    message = str(error.value)
    assert message.startswith("method: ") and "\n" not in message
    for field in fields:
        assert f"{field} = {section[field]!r} (method {name!r} has " in message


def test_a_flat_section_that_only_repeats_what_the_method_implies_is_accepted():
    # ilseg 0.1 wrote every field; MiB's were unbiased_ce true and kd unbiased, PLOP's no KD at weight 0
    assert from_legacy(METHOD_PRESETS["plop"], {"name": "plop", "kd": "none", "kd_weight": 0, "fd_weight": 0,
                                                "unbiased_ce": False, "joint": False}, "method") == \
        METHOD_PRESETS["plop"]



def test_a_run_config_reads_kd_mib_in_a_new_layout_section_as_ilt_mib_code():
    from ilseg.config import config_from_dict

    cfg = config_from_dict({"method": {"name": "ilt-kd-out", "kd": "mib", "kd_weight": 5}}).method
    assert cfg == method_config("ilt-kd-out", {"kd": "ilt_mib_code", "kd_weight": 5})
    assert config_from_dict({"method": {"name": "ilt", "kd": "mib"}}).method == METHOD_PRESETS["ilt"]
    with pytest.raises(IlsegError, match="kd"):  # not a kind of MiB's, which has no kd field
        config_from_dict({"method": {"name": "mib", "kd": "mib"}})


@pytest.mark.parametrize(("section", "fields"), [
    ({"name": "ilt", "unbiased_ce": True}, ["unbiased_ce"]),
    ({"name": "plop", "kd": "mib", "kd_weight": 5}, ["kd", "kd_weight"]),
])
def test_a_run_config_refuses_a_flat_section_its_method_cannot_express(section, fields):
    from ilseg.config import config_from_dict

    with pytest.raises(IlsegError) as error:
        config_from_dict({"method": section})
    assert all(f"{field} = " in str(error.value) for field in fields)
    assert str(error.value).startswith("method: ")
