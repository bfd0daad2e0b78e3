"""Method presets: which losses each computes, their weighting, config checks, freezing."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from ilseg.errors import IlsegError
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
    method_config,
)


def _outputs(channels: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"logits": torch.randn(2, channels, 4, 4, generator=g),
            "features": torch.randn(2, 6, 2, 2, generator=g)}


STUDENT = _outputs(4, 0)   # 3 old channels + 1 new
TEACHER = _outputs(3, 1)
TARGET = torch.tensor([[[0, 1, 3, 255]] * 4, [[2, 3, 0, 0]] * 4])  # 2x4x4


@pytest.mark.parametrize("name", list(METHOD_PRESETS))
def test_preset_total_is_weighted_sum(name):
    cfg = METHOD_PRESETS[name]
    method = build_method(cfg)
    teacher = TEACHER if method.needs_teacher else None
    out = method(STUDENT, teacher, TARGET, step=1)
    ce = cross_entropy(STUDENT["logits"], TARGET, reduction=cfg.ce_reduction)
    assert out["ce"].item() == pytest.approx(ce.item())
    if cfg.kd == "mib":
        assert out["kd"].item() == pytest.approx(kd_mib(STUDENT["logits"], TEACHER["logits"]).item())
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
        assert line.startswith(cfg.name + ": L = CE") and "\n" not in line


# -- freezing --------------------------------------------------------------------------
@pytest.fixture
def fake_models(monkeypatch):
    """A stand-in for ilseg.models recording which freeze functions ran."""
    calls: list[tuple[str, object]] = []
    module = types.ModuleType("ilseg.models")
    module.freeze_encoder = lambda model: calls.append(("encoder", model))  # type: ignore[attr-defined]
    module.freeze_bn = lambda model: calls.append(("bn", model))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ilseg.models", module)
    return calls


def test_begin_step_freezes_from_step_one(fake_models):
    model = torch.nn.Linear(1, 1)
    method = Method(method_config("ilt-ef", {"freeze_bn": True}))
    method.begin_step(model, 0)
    assert fake_models == []
    method.begin_step(model, 1)
    assert fake_models == [("encoder", model), ("bn", model)]


def test_begin_step_without_freezing_does_nothing(fake_models):
    Method(METHOD_PRESETS["ilt"]).begin_step(torch.nn.Linear(1, 1), 3)
    assert fake_models == []
