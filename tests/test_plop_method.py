"""PLOP as a method: its step boundary, calibration, losses and a run on the engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ilseg.config import load_config, preset_dir
from ilseg.data.synth import generate_synth
from ilseg.engine.run import run_training
from ilseg.errors import IlsegError
from ilseg.methods import METHOD_PRESETS, Method, describe_method, method_config
from ilseg.methods.plop import EntropyThresholds, local_pod_loss, plop_cross_entropy, pseudo_label
from ilseg.models import build_segmenter
from ilseg.tasks import get_task


def _model():
    torch.manual_seed(0)
    return build_segmenter(backbone="resnet18", backbone_width=8, head_channels=8, classes_per_step=[7])


def test_plop_preset_is_plops_voc_setting():
    cfg = METHOD_PRESETS["plop"]
    assert (cfg.pod_factor, cfg.pod_logits_factor) == (0.01, 0.0005)
    assert cfg.pseudo_labels == "entropy" and cfg.pseudo_threshold == "median" and cfg.pseudo_floor == 0.001
    assert cfg.ce_reduction == "all" and cfg.classifier_init == "background"
    assert not cfg.uses_kd and cfg.fd_weight == 0 and not cfg.unbiased_ce and not cfg.keep_old_labels
    assert "POD(stages+head 0.01, logits 0.0005)" in describe_method(cfg)


def test_pseudo_labels_need_plops_reduction():
    with pytest.raises(IlsegError, match="ce_reduction to 'all'"):
        method_config("plop", {"ce_reduction": "valid"})
    with pytest.raises(IlsegError, match="pseudo_threshold"):
        method_config("plop", {"pseudo_threshold": "mean"})


def test_start_step_turns_the_pod_maps_on_for_student_and_teacher_from_step_one():
    method = Method(METHOD_PRESETS["plop"])
    task = get_task("synth", "6-2-2")
    model = _model()
    setup0 = method.start_step(model, task, 0)
    assert setup0.teacher is None and not model.pod_outputs
    setup1 = method.start_step(model, task, 1)
    assert setup1.student.pod_outputs and setup1.teacher is not None and setup1.teacher.pod_outputs
    out = setup1.student.train()(torch.randn(2, 3, 64, 64))
    assert len(out["pod"]) == 6 and out["pod"][-1].shape[1] == 9  # logits at head resolution, 7 + 2 channels


def test_calibrate_then_losses_are_plops_terms():
    method = Method(METHOD_PRESETS["plop"])
    task = get_task("synth", "6-2-2")
    setup = method.start_step(_model(), task, 0)
    setup = method.start_step(setup.student, task, 1)
    teacher, student = setup.teacher.eval(), setup.student.train()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(2, 3, 64, 64, generator=g), torch.randint(0, 9, (2, 64, 64), generator=g))
               for _ in range(2)]
    for _, target in batches:
        target[target < 7] = 0  # current-step labels: old classes are background
    with torch.no_grad():
        teacher_out = [teacher(x) for x, _ in batches]
    reduced = []
    thresholds = method.calibrate(((t["logits"], y) for t, (_, y) in zip(teacher_out, batches)), 1,
                                  reduce=lambda t: reduced.append(t.clone()))
    expected = EntropyThresholds(num_old_channels=7, num_classes_total=9)
    for t, (_, y) in zip(teacher_out, batches):
        expected.update(t["logits"], y)
    assert torch.equal(thresholds, expected.thresholds("median", 0.001))
    assert len(reduced) == 1 and torch.equal(reduced[0], expected.state())  # the counts go to all_reduce
    images, target = batches[0]
    out = student(images)
    losses = method(out, teacher_out[0], target, step=1)
    labels, kept = pseudo_label(target, teacher_out[0]["logits"], thresholds, num_old_channels=7,
                                num_classes_total=9)
    assert losses["ce"].item() == pytest.approx(plop_cross_entropy(out["logits"], labels, kept).item(), rel=1e-6)
    pod = local_pod_loss(out["pod"], teacher_out[0]["pod"], num_old_channels=7, num_classes_total=9, num_new=2,
                         factors=0.01, logits_factor=0.0005)
    assert losses["pod"].item() == pytest.approx(pod.item(), rel=1e-6)
    assert losses["loss"].item() == pytest.approx(losses["ce"].item() + losses["pod"].item(), rel=1e-6)
    losses["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_plop_compat_thresholds_are_per_process():
    method = Method(method_config("plop", {"pseudo_threshold": "plop_compat"}))
    task = get_task("synth", "6-2-2")
    setup = method.start_step(method.start_step(_model(), task, 0).student, task, 1)
    logits = torch.randn(1, 7, 8, 8)
    calls = []
    method.calibrate([(logits, torch.zeros(1, 8, 8, dtype=torch.long))], 1, reduce=calls.append)
    assert calls == []  # PLOP's own code does not reduce the histograms over ranks
    assert setup.teacher is not None


def test_losses_without_calibration_are_refused():
    method = Method(METHOD_PRESETS["plop"])
    z = {"logits": torch.randn(1, 9, 8, 8), "features": torch.zeros(1), "pod": []}
    t = {"logits": torch.randn(1, 7, 8, 8), "features": torch.zeros(1), "pod": []}
    with pytest.raises(ValueError, match="calibrate"):
        method(z, t, torch.zeros(1, 8, 8, dtype=torch.long), step=1)


def test_plop_runs_and_resumes_on_the_engine(tmp_path: Path):
    root = tmp_path / "synth"
    generate_synth(root, seed=3, num_images=60, size=64, workers=1)
    overrides = [f"data.root={root}", "data.task=6-4", "method.name=plop", "model.width=8",
                 "model.head_channels=8", "model.output_stride=16", "optim.batch_size=4", "optim.epochs=1",
                 "optim.epochs_next=1", "data.crop_size=64", "eval.batch_size=16"]
    cfg = load_config(preset_dir() / "synth-demo.yaml", overrides)
    whole = run_training(cfg, tmp_path / "whole", quiet=True)
    assert [s["step"] for s in whole["steps"]] == [0, 1]
    log = (tmp_path / "whole" / "train.log").read_text()
    assert "pseudo-label thresholds" in log
    lines = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/pod" in line for line in lines if line.get("step") == 1)
    # the same run in two sittings: thresholds are recomputed on the restart and nothing differs
    run_training(cfg, tmp_path / "parts", steps="0", quiet=True)
    parts = run_training(cfg, tmp_path / "parts", resume=True, quiet=True)
    assert parts["steps"][1]["iou_per_class"] == whole["steps"][1]["iou_per_class"]


@pytest.mark.parametrize(("preset", "factors"), [("voc-15-1-ov-plop", (0.01, 0.0005)),
                                                 ("voc-10-1-disjoint-plop", (0.01, 0.0005)),
                                                 ("ade-100-50-ov-plop", (0.001, 0.00001))])
def test_plop_config_presets_reach_the_run_config(preset, factors):
    cfg = load_config(preset_dir() / f"{preset}.yaml")
    assert cfg.method.name == "plop" and cfg.method.pseudo_labels == "entropy"
    assert (cfg.method.pod_factor, cfg.method.pod_logits_factor) == factors
