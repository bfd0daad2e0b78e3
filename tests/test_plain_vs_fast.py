"""The engine's fast iteration computes what the plain one computes (the yardstick of the benchmarks)."""

from __future__ import annotations

import copy

import pytest
import torch
from plain import plain_iteration, plain_losses, plain_sgd

from ilseg.engine.loop import train_one_epoch
from ilseg.engine.optim import build_optimizer, poly_schedule
from ilseg.methods import METHOD_PRESETS, PLOPConfig, build_method
from ilseg.methods.legacy import to_legacy
from ilseg.models import build_segmenter, copy_for_teacher, fold_batchnorm
from ilseg.placement import Placement

# PLOP's terms (Local POD, pseudo-labels from prepared thresholds) have no plain twin: they are checked
# against hand-computed values in test_plop_terms.py.  Only the built-in methods have a plain twin (the flat form of
# ilseg.methods.legacy), not one another test module registers.
PLAIN = [name for name, cfg in METHOD_PRESETS.items()
         if to_legacy(cfg) is not None and not build_method(cfg).prepares(1) and not build_method(cfg).taps(1)]
DISTILLING = [name for name in PLAIN if build_method(METHOD_PRESETS[name]).needs_teacher]


def test_every_built_in_method_but_plop_has_a_plain_twin():
    assert PLAIN == ["finetune", "joint", "ilt", "ilt-kd-out", "ilt-kd-feat", "ilt-ef", "ilt-ef-kd-out",
                     "ilt-kd-out-feat", "mib"]
    assert DISTILLING == ["ilt", "ilt-kd-out", "ilt-kd-feat", "ilt-ef-kd-out", "ilt-kd-out-feat", "mib"]
    with pytest.raises(ValueError, match="no plain twin of method 'plop'"):
        plain_losses(METHOD_PRESETS["plop"], {}, None, torch.zeros(1, 1, 1, dtype=torch.long), step=1)
    # PLOP with neither of its terms is the CE over all pixels: plain at last, but not a preset
    bare = PLOPConfig(name="plop", pod_factor=0.0, pod_logits_factor=0.0, pseudo_labels="none")
    assert not build_method(bare).prepares(1) and not build_method(bare).taps(1)


def _batch(seed: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, 32, 32, generator=g)
    target = torch.randint(0, classes, (2, 32, 32), generator=g)
    target[:, :4] = 255  # some ignored pixels, a different number per image
    target[0, 4:6] = 255
    return images, target


def _models() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    model = build_segmenter(backbone="resnet18", backbone_width=8, head_channels=8, classes_per_step=[5])
    teacher = copy_for_teacher(model)
    model.add_step(2)
    return model, teacher


@pytest.mark.parametrize("name", PLAIN)
def test_method_losses_equal_their_plain_formulas(name):
    cfg = METHOD_PRESETS[name]
    model, teacher = _models()
    images, target = _batch(0, 7)
    with torch.no_grad():
        t_out = teacher(images)
    student = model(images)
    fast = build_method(cfg)(student, t_out if build_method(cfg).needs_teacher else None, target, step=1)
    plain = plain_losses(cfg, student, t_out, target, step=1)
    assert fast.keys() == plain.keys()
    for key in fast:
        torch.testing.assert_close(fast[key], plain[key], rtol=1e-5, atol=1e-6, msg=f"{name} {key}")


@pytest.mark.parametrize("name", ["finetune", *DISTILLING])
def test_a_fast_iteration_makes_the_update_of_a_plain_one(name):
    """One iteration (folded teacher, the method's losses, fused SGD) against the plain one.

    One iteration: on a model this small (batch statistics of 2 images),
    float rounding grows over several iterations; the gradients and the first
    update are what the fast path must get right.
    """
    model, teacher = _models()
    assert_fast_update_is_plain(name, model, teacher, _batch(0, 7), Placement(torch.device("cpu")),
                                loss_rel=1e-5, update_rel=1e-4, update_abs=1e-7)


def assert_fast_update_is_plain(name: str, model: torch.nn.Module, teacher: torch.nn.Module,
                                batch: tuple[torch.Tensor, torch.Tensor], placement: Placement, *,
                                loss_rel: float, update_rel: float, update_abs: float) -> None:
    """One iteration of ``name`` the engine's way (teacher folded, ``placement``'s layout, fused SGD) and
    the plain way from the same weights: the losses agree to ``loss_rel`` and every tensor's update to
    ``update_rel`` of its size (also used by the CUDA tests)."""
    cfg = METHOD_PRESETS[name]
    needs_teacher = build_method(cfg).needs_teacher
    start = {k: v.clone() for k, v in model.state_dict().items()}
    plain_model, plain_teacher = copy.deepcopy(model), copy.deepcopy(teacher)
    fold_batchnorm(teacher)  # what the engine does to its teacher
    if placement.channels_last:
        model.to(memory_format=torch.channels_last)
        teacher.to(memory_format=torch.channels_last)
    opt = build_optimizer(model.parameters(), kind="sgd", lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    progress = train_one_epoch(model=model, teacher=teacher if needs_teacher else None, method=build_method(cfg),
                               loader=[batch], optimizer=opt, scheduler=poly_schedule(opt, 10, 0.9), scaler=None,
                               placement=placement, step=1)
    plain_opt = plain_sgd(list(plain_model.parameters()), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    values = plain_iteration(plain_model, plain_teacher if needs_teacher else None, cfg, *batch, plain_opt, 1)
    assert progress.sums == pytest.approx(values, rel=loss_rel)
    fast_state, plain_state = model.state_dict(), plain_model.state_dict()
    for key, plain_value in plain_state.items():
        if not plain_value.is_floating_point():
            continue
        update = (plain_value - start[key]).norm()
        error = (fast_state[key] - plain_value).norm()
        assert error <= update_rel * update + update_abs, \
            f"{name} {key}: {float(error):.3g} vs update {float(update):.3g}"
