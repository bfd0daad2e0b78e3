"""PLOP as a method: its step boundary (the maps it taps), the thresholds it prepares, losses and a run on the
engine."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from ilseg.config import load_config, preset_dir
from ilseg.data.synth import generate_synth
from ilseg.engine.run import run_training
from ilseg.errors import IlsegError
from ilseg.methods import (
    METHOD_PRESETS,
    PLOP,
    PLOPConfig,
    build_method,
    describe_method,
    method_config,
)
from ilseg.methods.legacy import to_legacy
from ilseg.methods.plop import (
    POD_TAPS,
    EntropyThresholds,
    local_pod_loss,
    plop_cross_entropy,
    pseudo_label,
)
from ilseg.models import build_segmenter, copy_for_teacher, fold_batchnorm
from ilseg.tasks import get_task


def _model():
    torch.manual_seed(0)
    return build_segmenter(backbone="resnet18", backbone_width=8, head_channels=8, classes_per_step=[7])


def test_plop_preset_is_plops_voc_setting():
    cfg = METHOD_PRESETS["plop"]
    assert (cfg.pod_factor, cfg.pod_logits_factor) == (0.01, 0.0005)
    assert cfg.pseudo_labels == "entropy" and cfg.pseudo_threshold == "median" and cfg.pseudo_floor == 0.001
    assert cfg.ce_reduction == "all" and cfg.classifier_init == "background"
    assert type(cfg) is PLOPConfig and type(build_method(cfg)) is PLOP and PLOPConfig(name="plop") == cfg
    assert cfg.uses_pod and not cfg.keep_old_labels
    # no output or feature distillation and no unbiased CE: PLOP's config has no such field ...
    assert {"kd", "kd_weight", "fd_weight", "unbiased_ce"}.isdisjoint(f.name for f in dataclasses.fields(cfg))
    flat = to_legacy(cfg)  # ... and as ilseg 0.1 wrote it, they were off
    assert flat is not None and (flat["kd"], flat["kd_weight"], flat["fd_weight"], flat["unbiased_ce"]) == (
        "none", 0.0, 0.0, False)
    assert "POD(stages+head 0.01, logits 0.0005)" in describe_method(cfg)


def test_pseudo_labels_need_plops_reduction():
    with pytest.raises(IlsegError, match="ce_reduction to 'all'"):
        method_config("plop", {"ce_reduction": "valid"})
    with pytest.raises(IlsegError, match="pseudo_threshold"):
        method_config("plop", {"pseudo_threshold": "mean"})


def test_start_step_turns_the_pod_maps_on_for_student_and_teacher_from_step_one():
    method = build_method(METHOD_PRESETS["plop"])
    task = get_task("synth", "6-2-2")
    model = _model()
    setup0 = method.start_step(model, task, 0)
    assert setup0.teacher is None and model.taps == ()
    assert set(model.eval()(torch.randn(1, 3, 32, 32))) == {"logits", "features"}
    setup1 = method.start_step(model, task, 1)
    assert POD_TAPS == ("layer1", "layer2", "layer3", "layer4", "head", "logits_lowres")
    assert setup1.student.taps == POD_TAPS and setup1.teacher is not None and setup1.teacher.taps == POD_TAPS
    out = setup1.student.train()(torch.randn(2, 3, 64, 64))
    assert list(out["taps"]) == list(POD_TAPS)
    assert out["taps"]["logits_lowres"].shape[1] == 9  # logits at head resolution, 7 + 2 channels
    with torch.no_grad():
        teacher_out = setup1.teacher(torch.randn(2, 3, 64, 64))
    assert list(teacher_out["taps"]) == list(POD_TAPS) and teacher_out["taps"]["logits_lowres"].shape[1] == 7
    folded = copy_for_teacher(setup1.teacher)  # what the engine folds keeps them too
    fold_batchnorm(folded)
    assert folded.taps == POD_TAPS


def test_the_teacher_copy_inherits_the_taps_and_plop_without_pod_taps_nothing():
    task = get_task("synth", "6-2-2")
    method = build_method(method_config("plop", {"pod_factor": 0, "pod_logits_factor": 0}))
    setup = method.start_step(method.start_step(_model(), task, 0).student, task, 1)
    assert setup.teacher is not None  # pseudo-labels come from the teacher
    assert setup.student.taps == setup.teacher.taps == ()
    z = {"logits": torch.randn(1, 9, 8, 8), "features": torch.zeros(1)}  # no "taps": Local POD is off
    t = {"logits": torch.randn(1, 7, 8, 8), "features": torch.zeros(1)}
    method.prepare([(t, torch.zeros(1, 8, 8, dtype=torch.long))], 1)
    assert set(method(z, t, torch.zeros(1, 8, 8, dtype=torch.long), step=1)) == {"ce", "loss"}
    # a model that asked for maps at step 1 goes back to none for a method without taps
    model = setup.student
    model.taps = POD_TAPS
    setup2 = method.start_step(model, task, 2)
    assert setup2.student.taps == () and setup2.teacher is not None and setup2.teacher.taps == ()


def test_prepare_then_losses_are_plops_terms():
    method = build_method(METHOD_PRESETS["plop"])
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
    assert not method.prepares(0) and method.prepares(1) and method.prepares(2)
    line = method.prepare(((t, y) for t, (_, y) in zip(teacher_out, batches)), 1,
                          reduce=lambda t: reduced.append(t.clone()))
    thresholds = method.thresholds
    assert thresholds is not None
    expected = EntropyThresholds(num_old_channels=7, num_classes_total=9)
    for t, (_, y) in zip(teacher_out, batches):
        expected.update(t["logits"], y)
    assert torch.equal(thresholds, expected.thresholds("median", 0.001))
    assert line == "pseudo-label thresholds from 4 training images (median): " + " ".join(
        f"{float(t):.4g}" for t in thresholds)
    assert len(reduced) == 1 and torch.equal(reduced[0], expected.state())  # the counts go to all_reduce
    images, target = batches[0]
    out = student(images)
    losses = method(out, teacher_out[0], target, step=1)
    labels, kept = pseudo_label(target, teacher_out[0]["logits"], thresholds, num_old_channels=7,
                                num_classes_total=9)
    assert losses["ce"].item() == pytest.approx(plop_cross_entropy(out["logits"], labels, kept).item(), rel=1e-6)
    pod = local_pod_loss([out["taps"][n] for n in POD_TAPS], [teacher_out[0]["taps"][n] for n in POD_TAPS],
                         num_old_channels=7, num_classes_total=9, num_new=2, factors=0.01, logits_factor=0.0005)
    assert losses["pod"].item() == pytest.approx(pod.item(), rel=1e-6)
    assert losses["loss"].item() == pytest.approx(losses["ce"].item() + losses["pod"].item(), rel=1e-6)
    losses["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_plop_compat_thresholds_are_per_process():
    method = build_method(method_config("plop", {"pseudo_threshold": "plop_compat"}))
    task = get_task("synth", "6-2-2")
    setup = method.start_step(method.start_step(_model(), task, 0).student, task, 1)
    logits = torch.randn(1, 7, 8, 8)
    calls = []
    method.prepare([({"logits": logits}, torch.zeros(1, 8, 8, dtype=torch.long))], 1, reduce=calls.append)
    assert calls == []  # PLOP's own code does not reduce the histograms over ranks
    assert setup.teacher is not None and method.thresholds is not None and method.thresholds.shape == (7,)


def test_losses_without_prepare_are_refused():
    method = build_method(METHOD_PRESETS["plop"])
    z = {"logits": torch.randn(1, 9, 8, 8), "features": torch.zeros(1), "taps": {}}
    t = {"logits": torch.randn(1, 7, 8, 8), "features": torch.zeros(1), "taps": {}}
    with pytest.raises(ValueError, match=r"thresholds from prepare\(\), which was not called for step 1"):
        method(z, t, torch.zeros(1, 8, 8, dtype=torch.long), step=1)
    with pytest.raises(ValueError, match="start_step first"):  # prepare needs the step's number of new classes
        method.prepare([({"logits": t["logits"]}, torch.zeros(1, 8, 8, dtype=torch.long))], 1)


def test_prepare_of_an_empty_training_set_is_refused_and_a_new_step_forgets_the_thresholds():
    method = build_method(METHOD_PRESETS["plop"])
    task = get_task("synth", "6-2-2")
    setup = method.start_step(method.start_step(_model(), task, 0).student, task, 1)
    with pytest.raises(IlsegError, match="step 1 has no training batch"):
        method.prepare([], 1)
    method.prepare([({"logits": torch.randn(1, 7, 8, 8)}, torch.zeros(1, 8, 8, dtype=torch.long))], 1)
    assert method.thresholds is not None
    method.start_step(setup.student, task, 2)
    assert method.thresholds is None  # step 2's come from its own prepare()
    assert not build_method(method_config("plop", {"pseudo_labels": "none"})).prepares(1)


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
