"""MiB (Cermelli et al., CVPR 2020): unbiased CE and KD by hand, the preset, a run on the engine."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from ilseg.config import load_config, preset_dir
from ilseg.data.synth import generate_synth
from ilseg.engine.run import run_training
from ilseg.methods import (
    METHOD_PRESETS,
    MiB,
    MiBConfig,
    build_method,
    describe_method,
    method_config,
)
from ilseg.methods.legacy import to_legacy
from ilseg.methods.losses import cross_entropy, kd_unbiased, unbiased_cross_entropy


def _lse(*xs: float) -> float:
    return math.log(sum(math.exp(x) for x in xs))


def _pixels(*columns: list[float]) -> torch.Tensor:
    """1xCx1xN logits from N per-pixel channel lists."""
    return torch.tensor(columns, dtype=torch.float32).T.reshape(1, len(columns[0]), 1, len(columns))


def test_unbiased_ce_merges_old_classes_into_background_by_hand():
    # channels: background, old class 1, new class 2 (num_old = 2)
    z = _pixels([1.0, 2.0, 0.5], [0.0, 0.0, 3.0], [0.3, -1.0, 0.2], [2.0, 1.0, -0.5])
    y = torch.tensor([[[0, 2, 255, 1]]])  # bg, new, ignored, an old label (read as background)
    bg = -(_lse(1.0, 2.0) - _lse(1.0, 2.0, 0.5))
    new = -(3.0 - _lse(0.0, 0.0, 3.0))
    old_as_bg = -(_lse(2.0, 1.0) - _lse(2.0, 1.0, -0.5))
    total = bg + new + old_as_bg
    assert unbiased_cross_entropy(z, y, 2).item() == pytest.approx(total / 4, rel=1e-6)  # MiB: all pixels
    assert unbiased_cross_entropy(z, y, 2, reduction="valid").item() == pytest.approx(total / 3, rel=1e-6)
    assert y.tolist() == [[[0, 2, 255, 1]]]  # the caller's target is untouched (MiB's "Fix UnbiasedCE")


def test_unbiased_ce_does_not_care_how_a_background_pixel_splits_between_background_and_old():
    y = torch.tensor([[[0]]])
    a = unbiased_cross_entropy(_pixels([1.0, 2.0, 0.5]), y, 2)
    b = unbiased_cross_entropy(_pixels([2.0, 1.0, 0.5]), y, 2)  # background and old logits swapped
    assert a.item() == pytest.approx(b.item(), rel=1e-7)
    z = _pixels([1.0, 2.0, 0.5]).requires_grad_()
    unbiased_cross_entropy(z, y, 2).backward()
    p = torch.softmax(z.detach()[0, :, 0, 0], 0)
    # d/dz_new = p_new; the old channels share -(p_new) in proportion to their probabilities
    assert z.grad[0, 2, 0, 0].item() == pytest.approx(p[2].item(), rel=1e-5)
    assert z.grad[0, :2, 0, 0].sum().item() == pytest.approx(-p[2].item(), rel=1e-5)


def test_unbiased_ce_of_an_all_ignored_batch_is_zero_with_a_gradient():
    z = torch.randn(2, 3, 2, 2, requires_grad=True)
    loss = unbiased_cross_entropy(z, torch.full((2, 2, 2), 255), 2)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(z.grad, torch.zeros_like(z))


@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_unbiased_kd_by_hand(alpha):
    # student: background, old class 1, new classes 2 and 3; teacher: background, old class 1 (C_old = 2)
    zs = [[0.5, 1.0, -1.0, 2.0], [0.0, -2.0, 1.0, 0.0]]
    ts = [[2.0, 0.0], [-1.0, 1.5]]
    per_pixel = []
    for z, t in zip(zs, ts):
        q0 = math.exp(alpha * t[0]) / (math.exp(alpha * t[0]) + math.exp(alpha * t[1]))
        den = _lse(*z)
        log_bg = _lse(z[0], z[2], z[3]) - den  # background or any new class
        log_old = z[1] - den
        per_pixel.append((q0 * log_bg + (1 - q0) * log_old) / 2)  # / C_old
    expected = -sum(per_pixel) / 2
    got = kd_unbiased(_pixels(*zs), _pixels(*ts), alpha=alpha)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_unbiased_kd_gradient_reaches_the_student_only_and_new_channels_count_as_background():
    z = _pixels([0.5, 1.0, -1.0, 2.0]).requires_grad_()
    t = _pixels([2.0, 0.0]).requires_grad_()
    kd_unbiased(z, t).backward()
    assert t.grad is None
    assert z.grad.abs().sum() > 0
    swapped = _pixels([2.0, 1.0, -1.0, 0.5])  # the background's logit and a new class's swapped
    assert kd_unbiased(swapped, t).item() == pytest.approx(kd_unbiased(z.detach(), t).item(), rel=1e-7)


def test_mib_preset_is_mibs_own_setting():
    cfg = METHOD_PRESETS["mib"]
    assert type(cfg) is MiBConfig and type(build_method(cfg)) is MiB  # unbiased CE and unbiased KD, by its class
    assert (cfg.kd_weight, cfg.kd_alpha) == (10.0, 1.0)
    assert cfg.classifier_init == "background" and cfg.ce_reduction == "all"
    assert MiBConfig(name="mib") == cfg  # MiB's defaults are its code's
    assert not cfg.keep_old_labels and not cfg.freeze_encoder and not cfg.freeze_bn
    assert {"fd_weight", "kd", "unbiased_ce"}.isdisjoint(f.name for f in dataclasses.fields(cfg))  # no FD, no choice
    flat = to_legacy(cfg)  # as ilseg 0.1 wrote it
    assert flat is not None
    assert (flat["unbiased_ce"], flat["kd"], flat["kd_weight"], flat["kd_alpha"], flat["fd_weight"]) == (
        True, "unbiased", 10.0, 1.0, 0.0)
    assert describe_method(cfg).startswith("mib: L = UNCE(y, mean over all pixels) + 10*UNKD(alpha=1)")


def test_mib_loss_terms_at_step_0_and_later():
    method = build_method(METHOD_PRESETS["mib"])
    z = torch.randn(2, 4, 3, 3)
    y = torch.randint(0, 4, (2, 3, 3))
    step0 = method({"logits": z, "features": torch.zeros(1)}, None, y, step=0)
    assert set(step0) == {"ce", "loss"}  # plain CE at step 0
    teacher = {"logits": torch.randn(2, 3, 3, 3), "features": torch.zeros(1)}
    later = method({"logits": z, "features": torch.zeros(1)}, teacher, y, step=1)
    assert later["ce"].item() == pytest.approx(unbiased_cross_entropy(z, y, 3).item())
    assert later["kd"].item() == pytest.approx(kd_unbiased(z, teacher["logits"]).item())
    assert later["loss"].item() == pytest.approx(later["ce"].item() + 10 * later["kd"].item(), rel=1e-6)


def test_mib_settings_change_its_terms():
    z = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([[[0, 1, 3]] * 3, [[255, 2, 0]] * 3])
    student = {"logits": z, "features": torch.zeros(1)}
    teacher = {"logits": torch.randn(2, 3, 3, 3, generator=torch.Generator().manual_seed(1)),
               "features": torch.zeros(1)}
    weighted = build_method(method_config("mib", {"kd_weight": 2.5, "kd_alpha": 2.0}))(student, teacher, y, step=1)
    assert weighted["kd"].item() == pytest.approx(kd_unbiased(z, teacher["logits"], alpha=2.0).item())
    assert weighted["loss"].item() == pytest.approx(weighted["ce"].item() + 2.5 * weighted["kd"].item(), rel=1e-6)
    # without the distillation MiB still takes the unbiased CE, so it still needs the teacher
    method = build_method(method_config("mib", {"kd_weight": 0, "ce_reduction": "valid"}))
    assert method.needs_teacher
    ce_only = method(student, teacher, y, step=1)
    assert set(ce_only) == {"ce", "loss"}
    assert ce_only["ce"].item() == pytest.approx(unbiased_cross_entropy(z, y, 3, reduction="valid").item())
    step0 = method(student, None, y, step=0)  # step 0: the plain CE with the configured reduction
    assert step0["ce"].item() == pytest.approx(cross_entropy(z, y, reduction="valid").item())
    with pytest.raises(ValueError, match="teacher"):
        method(student, None, y, step=1)


@pytest.mark.parametrize("preset", ["voc-15-1-ov-mib", "voc-15-5-disjoint-mib", "ade-100-50-ov-mib"])
def test_mib_config_presets_load(preset):
    cfg = load_config(preset_dir() / f"{preset}.yaml")
    assert cfg.method == METHOD_PRESETS["mib"] or cfg.method.name == "mib"
    assert type(cfg.method) is MiBConfig  # unbiased CE and unbiased KD


def test_a_two_step_mib_run_on_the_engine(tmp_path: Path):
    root = tmp_path / "synth"
    generate_synth(root, seed=3, num_images=60, size=32, workers=1)
    cfg = load_config(preset_dir() / "synth-demo.yaml", [
        f"data.root={root}", "data.task=6-4", "method.name=mib", "model.width=8", "model.head_channels=8",
        "model.output_stride=16", "optim.batch_size=4", "optim.epochs=1", "optim.epochs_next=1",
        "data.crop_size=32", "eval.batch_size=16"])
    results = run_training(cfg, tmp_path / "run", quiet=True)
    assert [s["step"] for s in results["steps"]] == [0, 1]
    assert results["method"] == "mib" and results["steps"][1]["classes_seen"] == 11
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    step1 = [line for line in lines if line.get("step") == 1 and "train/loss" in line]
    assert step1 and all(math.isfinite(line["train/kd"]) for line in step1)
