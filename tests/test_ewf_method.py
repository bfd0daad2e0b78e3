"""EWF as a method: the fusion rule by hand, the frozen old classifiers, the base methods' losses unchanged, and
runs on the engine whose evaluation and checkpoints hold the fused weights (also after a resume)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ilseg.config import load_config, preset_dir
from ilseg.data.synth import generate_synth
from ilseg.engine.optim import build_optimizer
from ilseg.engine.run import evaluate_checkpoint, run_training
from ilseg.errors import IlsegError
from ilseg.methods import METHOD_PRESETS, EWF, EWFConfig, MiB, MiBConfig, PLOP, PLOPConfig, build_method, method_config
from ilseg.methods.ewf import MIB_FIELDS, PLOP_FIELDS, fuse_endpoints, fusion_weight
from ilseg.methods.plop import POD_TAPS
from ilseg.models import IncrementalSegmenter, build_segmenter, fold_batchnorm
from ilseg.runs.checkpoint import load_checkpoint
from ilseg.tasks import get_task
from tiny import InterruptAt, Record, tiny_config


def _model(classes: int = 7) -> IncrementalSegmenter:
    torch.manual_seed(0)
    return build_segmenter(backbone="resnet18", backbone_width=8, head_channels=8, classes_per_step=[classes])


# ---------------------------------------------------------------- config and presets


def test_presets_are_the_base_methods_presets_with_fusion_and_frozen_old_classifiers():
    ewf, ewf_mib = METHOD_PRESETS["ewf"], METHOD_PRESETS["ewf-mib"]
    assert type(ewf) is EWFConfig and type(build_method(ewf)) is EWF
    assert (ewf.base, ewf_mib.base) == ("plop", "mib")
    for cfg in (ewf, ewf_mib):
        assert cfg.fusion and cfg.freeze_old_classifiers and cfg.fuse_largest_changes == 0.0
        assert (cfg.ce_reduction, cfg.classifier_init) == ("all", "background")
    # the base's fields keep the base's own defaults: --method PLOP / --method MiB (argparser.py:44-57)
    assert ewf.base_config() == dataclasses.replace(PLOPConfig(name="plop"), name="ewf")
    assert ewf_mib.base_config() == dataclasses.replace(MiBConfig(name="mib"), name="ewf-mib")
    assert type(build_method(ewf).base) is PLOP and type(build_method(ewf_mib).base) is MiB
    assert {f.name for f in dataclasses.fields(PLOPConfig)} - {f.name for f in dataclasses.fields(EWFConfig)} == set()
    assert {f.name for f in dataclasses.fields(MiBConfig)} - {f.name for f in dataclasses.fields(EWFConfig)} == set()
    assert "sqrt(N_new / N_all)" in build_method(ewf).describe()
    assert "old classifiers frozen" in build_method(ewf_mib).describe()


def test_config_rules_name_the_fields():
    with pytest.raises(IlsegError, match="pod_factor is for base 'plop'"):
        method_config("ewf-mib", {"pod_factor": 0.1})
    with pytest.raises(IlsegError, match="kd_weight is for base 'mib'"):
        method_config("ewf", {"kd_weight": 5})
    with pytest.raises(IlsegError, match="ce_reduction to 'all'"):  # PLOP's own rule, through the base config
        method_config("ewf", {"ce_reduction": "valid"})
    with pytest.raises(IlsegError, match="at most 1"):
        method_config("ewf", {"fuse_largest_changes": 1.5})
    with pytest.raises(IlsegError, match=">= 0"):
        method_config("ewf", {"fuse_largest_changes": -0.1})
    assert method_config("ewf-mib", {"kd_weight": 5}).base_config().kd_weight == 5.0
    assert set(MIB_FIELDS) | set(PLOP_FIELDS) <= {f.name for f in dataclasses.fields(EWFConfig)}


@pytest.mark.parametrize(("preset", "method", "batch", "epochs"), [
    ("voc-15-1-ov-ewf", "ewf", 24, 30), ("voc-15-1-disjoint-ewf", "ewf", 24, 30),
    ("voc-10-1-ov-ewf", "ewf", 24, 30), ("voc-10-1-disjoint-ewf", "ewf", 24, 30),
    ("ade-100-50-ov-ewf", "ewf-mib", 48, 60)])
def test_run_presets_use_the_authors_scripts(preset, method, batch, epochs):
    cfg = load_config(preset_dir() / f"{preset}.yaml")
    assert cfg.method.name == method and cfg.method == METHOD_PRESETS[method]
    o = cfg.optim
    assert (o.lr, o.lr_next, o.epochs, o.epochs_next, o.batch_size) == (0.01, 0.001, epochs, epochs, batch)


# ---------------------------------------------------------------- the fusion rule


def test_the_coefficient_is_sqrt_of_the_new_classes_share():
    assert fusion_weight(7, 9) == 0.75  # sqrt(9/16)
    assert fusion_weight(3, 1) == 0.5  # sqrt(1/4)
    # VOC 15-1 step 1 and ADE20k 100-50: the code's np.sqrt(new / (new + old)) (run.py:522), bit for bit
    assert fusion_weight(16, 1) == float(np.sqrt(1 / (1 + 16))) and abs(fusion_weight(16, 1) - 0.2425356) < 1e-7
    assert fusion_weight(101, 50) == float(np.sqrt(50 / (50 + 101)))
    with pytest.raises(ValueError):
        fusion_weight(0, 1)


def test_fuse_endpoints_by_hand():
    old = {"conv.weight": torch.tensor([4.0, 0.0, -2.0]), "bn.running_var": torch.tensor([1.0, 2.0]),
           "bn.num_batches_tracked": torch.tensor(5)}
    new = {"conv.weight": torch.tensor([8.0, 2.0, 2.0]), "bn.running_var": torch.tensor([5.0, 2.0]),
           "bn.num_batches_tracked": torch.tensor(9), "classifiers.1.weight": torch.tensor([0.5])}
    fused = fuse_endpoints(old, new, 0.75)
    # 0.25 * old + 0.75 * new: 1 + 6, 0 + 1.5, -0.5 + 1.5; BN statistics too: 0.25 + 3.75, 0.5 + 1.5
    assert torch.equal(fused["conv.weight"], torch.tensor([7.0, 1.5, 1.0]))
    assert torch.equal(fused["bn.running_var"], torch.tensor([4.0, 2.0]))
    # integer counters and entries the old model lacks (the new classifier) are not fused
    assert set(fused) == {"conv.weight", "bn.running_var"}
    with pytest.raises(IlsegError, match="cannot fuse 'conv.weight'"):
        fuse_endpoints(old, {**new, "conv.weight": torch.zeros(2)}, 0.75)
    with pytest.raises(IlsegError, match="nothing"):
        fuse_endpoints(old, {"bn.running_var": torch.ones(2)}, 0.75)


def test_fuse_endpoints_rounds_as_the_code_does():
    generator = torch.Generator().manual_seed(0)
    old = {"a": torch.randn(1000, generator=generator), "b": torch.randn(7, 3, generator=generator)}
    new = {k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in old.items()}
    merge_weight = np.sqrt(1 / (1 + 16))  # a numpy float64, as run.py:522 makes it
    fused = fuse_endpoints(old, new, fusion_weight(16, 1))
    for name, weight in old.items():  # run.py:543, with its operands
        assert torch.equal(fused[name], (1 - merge_weight) * weight + merge_weight * new[name])


def test_fusing_only_the_largest_changes_by_hand():
    old = {"a": torch.zeros(2), "b": torch.zeros(2)}
    new = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0, 4.0])}
    # |changes| 1, 2, 3, 4; share 0.5: k = 2, the 2nd largest is 3: changes below 3 keep the new value,
    # the others are fused with a = 0.5: 1.5, 2
    fused = fuse_endpoints(old, new, 0.5, largest_changes=0.5)
    assert torch.equal(fused["a"], torch.tensor([1.0, 2.0])) and torch.equal(fused["b"], torch.tensor([1.5, 2.0]))
    # the code's share 0.45: k = int(4 * 0.45) = 1, the largest (4): only it is fused
    fused = fuse_endpoints(old, new, 0.5, largest_changes=0.45)
    assert torch.equal(fused["b"], torch.tensor([3.0, 2.0])) and torch.equal(fused["a"], new["a"])
    # the threshold is the code's torch.topk(pick, int(n * 0.45))[0][-1] (run.py:527-532)
    generator = torch.Generator().manual_seed(1)
    old = {"a": torch.randn(400, generator=generator), "b": torch.randn(200, generator=generator)}
    new = {k: v + torch.randn(v.shape, generator=generator) for k, v in old.items()}
    pick = torch.cat([(old[k] - new[k]).abs().flatten() for k in old])
    threshold = torch.topk(pick, int(pick.shape[0] * 0.45))[0][-1]
    fused = fuse_endpoints(old, new, 0.3, largest_changes=0.45)
    for k in old:
        code = torch.where((old[k] - new[k]).abs() < threshold, new[k], (1 - 0.3) * old[k] + 0.3 * new[k])
        assert torch.equal(fused[k], code)
    with pytest.raises(IlsegError, match="selects no entry"):
        fuse_endpoints({"a": torch.zeros(2)}, {"a": torch.ones(2)}, 0.5, largest_changes=0.1)


# ---------------------------------------------------------------- the step boundary


def test_start_step_freezes_the_old_classifiers_and_finish_step_fuses_by_hand():
    model = _model(classes=7)
    task = get_task("voc", "6-9-5")  # step sizes 7, 9, 5: at step 1, 7 old channels and 9 new
    with torch.no_grad():  # the previous model: round numbers to fuse by hand
        model.body.conv1.weight.fill_(4.0)
        model.body.bn1.running_mean.fill_(1.0)
        model.body.bn1.running_var.fill_(2.0)
        model.body.bn1.num_batches_tracked.fill_(10)
        model.classifiers[0].bias.fill_(0.6)
        model.classifiers[0].bias[0] = 0.2
    method = build_method(method_config("ewf-mib"))
    setup = method.start_step(model, task, 1)
    student, teacher = setup.student, setup.teacher
    assert teacher is not None and teacher.num_outputs == 7 and student.num_outputs == 16
    # frozen: the old classifier (with MiB's background init: bias 0.2 - log(10)); trainable: the rest
    assert not any(p.requires_grad for p in student.classifiers[0].parameters())
    assert all(p.requires_grad for p in student.classifiers[1].parameters())
    assert all(p.requires_grad for p in student.body.parameters()) and all(
        p.requires_grad for p in student.head.parameters())
    assert abs(float(student.classifiers[0].bias[0]) - (0.2 - math.log(10))) < 1e-6
    with torch.no_grad():  # "trained": new values
        student.body.conv1.weight.fill_(8.0)
        student.body.bn1.running_mean.fill_(3.0)
        student.body.bn1.running_var.fill_(6.0)
        student.body.bn1.num_batches_tracked.fill_(17)
        student.classifiers[1].weight.fill_(0.5)
        student.classifiers[1].bias.fill_(-0.25)
    fold_batchnorm(teacher)  # what the engine does to the teacher: finish_step must not read it
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    method.finish_step(student, teacher, 1)
    # a = sqrt(9 / 16) = 0.75: theta = 0.25 * old + 0.75 * new
    assert torch.all(student.body.conv1.weight == 7.0)  # 1 + 6
    assert torch.all(student.body.bn1.running_mean == 2.5)  # 0.25 + 2.25
    assert torch.all(student.body.bn1.running_var == 5.0)  # 0.5 + 4.5
    assert int(student.body.bn1.num_batches_tracked) == 17  # the trained model's counter
    bias = student.classifiers[0].bias
    # background: 0.25 * 0.2 + 0.75 * (0.2 - ln 10) = 0.2 - 0.75 ln 10 = -1.5269388
    assert abs(float(bias[0]) - (0.2 - 0.75 * math.log(10))) < 1e-6 and abs(float(bias[0]) + 1.5269388) < 1e-6
    assert torch.allclose(bias[1:], torch.full((6,), 0.6))  # 0.25 * 0.6 + 0.75 * 0.6
    # the new classifier keeps its trained weights
    assert torch.all(student.classifiers[1].weight == 0.5) and torch.all(student.classifiers[1].bias == -0.25)
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())
    # the copy is spent: fusing again needs a new start_step
    with pytest.raises(ValueError, match="start_step"):
        method.finish_step(student, teacher, 1)


def test_the_frozen_old_classifiers_get_no_gradient_and_no_update():
    for freeze in (True, False):
        method = build_method(method_config("ewf-mib", {"freeze_old_classifiers": freeze}))
        setup = method.start_step(_model(7), get_task("synth", "6-2-2"), 1)
        student = setup.student
        optimizer = build_optimizer(student.parameters(), kind="sgd", lr=0.1, momentum=0.9, nesterov=True,
                                    weight_decay=1e-4)
        before = [p.detach().clone() for p in student.classifiers[0].parameters()]
        x, target = torch.randn(2, 3, 32, 32), torch.randint(0, 9, (2, 32, 32))
        with torch.no_grad():
            teacher_out = setup.teacher(x)
        losses = method(student.train()(x), teacher_out, target, step=1)
        losses["loss"].backward()
        optimizer.step()
        old = list(student.classifiers[0].parameters())
        assert all((p.grad is None) == freeze for p in old)
        assert all(p.grad is not None for p in student.classifiers[1].parameters())
        assert all(torch.equal(p, b) for p, b in zip(old, before)) == freeze


def test_without_fusion_and_freezing_ewf_is_its_base_method():
    method = build_method(method_config("ewf", {"fusion": False, "freeze_old_classifiers": False}))
    model = _model(7)
    setup = method.start_step(model, get_task("synth", "6-2-2"), 1)
    state = {k: v.clone() for k, v in setup.student.state_dict().items()}
    assert all(p.requires_grad for p in setup.student.parameters())
    method.finish_step(setup.student, setup.teacher, 1)
    assert all(torch.equal(v, state[k]) for k, v in setup.student.state_dict().items())
    method.finish_step(setup.student, setup.teacher, 0)  # step 0: never anything


def test_the_losses_taps_and_thresholds_are_the_base_methods():
    torch.manual_seed(1)
    task = get_task("synth", "6-2-2")
    x, target = torch.randn(2, 3, 64, 64), torch.randint(0, 9, (2, 64, 64))
    target[0, :8] = 255
    for preset, base_class, base_cfg in (("ewf-mib", MiB, MiBConfig(name="ewf-mib")),
                                         ("ewf", PLOP, PLOPConfig(name="ewf"))):
        ewf, base = build_method(method_config(preset)), base_class(base_cfg)
        assert ewf.taps(1) == base.taps(1) and ewf.prepares(1) == base.prepares(1)
        assert ewf.taps(0) == () and not ewf.prepares(0)
        setups = [m.start_step(_model(7), task, 1) for m in (ewf, base)]
        assert setups[0].student.taps == setups[1].student.taps
        outs = [(s.student.train()(x), s.teacher(x)) for s in setups]
        if ewf.prepares(1):
            lines = [m.prepare([(teacher, target)], 1) for m, (_, teacher) in zip((ewf, base), outs)]
            assert lines[0] == lines[1] and "pseudo-label thresholds" in lines[0]
        got, want = ewf(*outs[0], target, step=1), base(*outs[1], target, step=1)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        step0 = ewf(outs[0][0], None, target, step=0)
        assert set(step0) == {"ce", "loss"}
    assert build_method(method_config("ewf")).taps(1) == POD_TAPS


def test_ewf_keeps_no_state_across_steps():
    method = build_method(method_config("ewf"))
    method.start_step(_model(7), get_task("synth", "6-2-2"), 1)  # the previous model's copy is not method state
    assert method.state_dict() == {}
    method.load_state_dict({})
    with pytest.raises(IlsegError, match="keeps no state"):
        method.load_state_dict({"prototypes": torch.zeros(1)})


# ---------------------------------------------------------------- on the engine


def _fused(previous: dict, trained: dict, weight: float) -> dict:
    """What step t's checkpoint must hold: (1 - a) previous + a trained on the previous checkpoint's float
    entries, the trained values elsewhere (the new classifier, BN counters)."""
    out = dict(trained)
    for name, old in previous.items():
        if old.is_floating_point():
            out[name] = old * (1 - weight) + trained[name] * weight
    return out


def test_three_steps_evaluate_and_save_the_fused_model_and_resume_mid_step(synth_root, tmp_path: Path):
    cfg = tiny_config(synth_root, "method.name=ewf-mib", "optim.epochs_next=2", cache_dir=tmp_path / "cache")
    record = Record()
    results = run_training(cfg, tmp_path / "whole", quiet=True, callbacks=record)
    assert [s["step"] for s in results["steps"]] == [0, 1, 2]
    ckpt = [load_checkpoint(tmp_path / "whole" / f"step{t}.pth")["model"] for t in range(3)]
    last = load_checkpoint(tmp_path / "whole" / "last.pth")
    assert last["step"] == 2
    trained = last["model"]  # step 2 as trained, saved before the fusion
    # during step 2 the old classifiers did not move (frozen); only MiB's init lowered the background bias
    assert torch.equal(trained["classifiers.1.weight"], ckpt[1]["classifiers.1.weight"])
    assert torch.equal(trained["classifiers.1.bias"], ckpt[1]["classifiers.1.bias"])
    assert torch.equal(trained["classifiers.0.weight"], ckpt[1]["classifiers.0.weight"])
    assert torch.equal(trained["classifiers.0.bias"][1:], ckpt[1]["classifiers.0.bias"][1:])
    assert torch.equal(trained["classifiers.0.bias"][0], ckpt[1]["classifiers.0.bias"][0] - math.log(3))
    # step 2 (7 + 2 old channels, 2 new): a = sqrt(2 / 11); the body did train
    expected = _fused(ckpt[1], trained, math.sqrt(2 / 11))
    assert not torch.equal(trained["body.conv1.weight"], ckpt[1]["body.conv1.weight"])
    assert ckpt[2].keys() == expected.keys()
    assert all(torch.equal(ckpt[2][k], expected[k]) for k in expected), [
        k for k in expected if not torch.equal(ckpt[2][k], expected[k])]
    assert torch.equal(ckpt[2]["classifiers.2.weight"], trained["classifiers.2.weight"])  # the new one: as trained
    # the model the engine evaluated is the fused one: the student in memory, and the scores of step2.pth
    student = record.setups[2].student.state_dict()
    assert all(torch.equal(student[k].cpu(), ckpt[2][k]) for k in ckpt[2])
    scores = evaluate_checkpoint(cfg, tmp_path / "whole" / "step2.pth")
    assert scores["iou_per_class"] == results["steps"][2]["iou_per_class"]
    # step 1 was fused the same way (a = sqrt(2 / 9)), and step 2 started from it: its teacher is the fused model
    assert not torch.equal(ckpt[1]["body.conv1.weight"], ckpt[0]["body.conv1.weight"])
    # stopped before step 2's second epoch, then resumed: the previous model is copied again, the same fusion
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, tmp_path / "parts", quiet=True, callbacks=InterruptAt(2, 1))
    parts = run_training(cfg, tmp_path / "parts", resume=True, quiet=True)
    again = load_checkpoint(tmp_path / "parts" / "step2.pth")["model"]
    assert all(torch.equal(again[k], ckpt[2][k]) for k in ckpt[2])
    assert parts["steps"][2]["iou_per_class"] == results["steps"][2]["iou_per_class"]


def test_on_plop_the_thresholds_are_prepared_and_the_step_fused(tmp_path: Path):
    root = tmp_path / "synth64"
    generate_synth(root, seed=3, num_images=60, size=64, workers=1)
    cfg = tiny_config(root, "method.name=ewf", "optim.epochs=1", "data.crop_size=64", cache_dir=tmp_path / "cache")
    run_training(cfg, tmp_path / "run", steps="0:2", quiet=True)
    log = (tmp_path / "run" / "train.log").read_text()
    assert "pseudo-label thresholds" in log
    assert "train/pod" in (tmp_path / "run" / "metrics.jsonl").read_text()
    previous = load_checkpoint(tmp_path / "run" / "step0.pth")["model"]
    trained = load_checkpoint(tmp_path / "run" / "last.pth")["model"]
    fused = load_checkpoint(tmp_path / "run" / "step1.pth")["model"]
    expected = _fused(previous, trained, math.sqrt(2 / 9))
    assert all(torch.equal(fused[k], expected[k]) for k in expected)
