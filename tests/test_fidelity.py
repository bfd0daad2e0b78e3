"""The switches that reproduce each reference code exactly (docs/fidelity.md): each changes what it should
and nothing else."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import InterruptAt, tiny_config

from ilseg.config import load_config, preset_dir
from ilseg.data.splits import class_presence
from ilseg.engine.loaders import eval_dataset
from ilseg.engine.optim import Optimisation
from ilseg.engine.run import run_training
from ilseg.errors import IlsegError
from ilseg.placement import Placement
from ilseg.runs.checkpoint import load_checkpoint
from ilseg.tasks import get_task, keep_test_image

def tiny(root, tmp_path, *extra):
    return tiny_config(root, *extra, cache_dir=tmp_path / "cache")


# -- optim.schedule: constant (cssegmentation as it ran) ---------------------------------------------
def test_the_constant_schedule_keeps_the_learning_rate_and_resumes_it(tmp_path, synth_root):
    cfg = tiny(synth_root, tmp_path, "optim.schedule=constant", "optim.optimizer=sgd", "optim.lr=0.02")
    model = torch.nn.Linear(2, 2)
    opt = Optimisation.build(cfg, model, lr=0.02, total_iters=5, placement=Placement(torch.device("cpu")))
    rates = []
    for _ in range(8):  # past total_iters too
        opt.optimizer.step()
        opt.scheduler.step()
        rates.append(opt.optimizer.param_groups[0]["lr"])
    assert rates == [0.02] * 8
    again = Optimisation.build(cfg, torch.nn.Linear(2, 2), lr=0.02, total_iters=5,
                               placement=Placement(torch.device("cpu")))
    again.restore({"optimizer": opt.optimizer.state_dict(), "scheduler": opt.scheduler.state_dict()})
    again.scheduler.step()
    assert again.optimizer.param_groups[0]["lr"] == 0.02
    poly = tiny(synth_root, tmp_path, "optim.optimizer=sgd", "optim.lr=0.02")
    decaying = Optimisation.build(poly, torch.nn.Linear(2, 2), lr=0.02, total_iters=5,
                                  placement=Placement(torch.device("cpu")))
    decaying.optimizer.step()
    decaying.scheduler.step()
    assert decaying.optimizer.param_groups[0]["lr"] < 0.02  # the default still decays


def test_a_run_with_the_constant_schedule_logs_the_same_rate_every_epoch(tmp_path, synth_root):
    cfg = tiny(synth_root, tmp_path, "optim.schedule=constant", "method.name=finetune", "optim.lr=0.003")
    run_training(cfg, tmp_path / "run", quiet=True, steps="0")
    rates = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if '"lr"' in line]
    assert rates and all(r == pytest.approx(0.003) for r in rates)
    assert load_checkpoint(tmp_path / "run" / "step0.pth")["identity"]["optim.schedule"] == "constant"


def test_the_constant_schedule_has_no_end_rate():
    with pytest.raises(IlsegError, match="optim.schedule=constant"):
        load_config(preset_dir() / "synth-demo.yaml", ["optim.schedule=constant", "optim.lr_end=1e-5"])


# -- eval.test_images: which validation images score a step ---------------------------------------
def test_the_test_image_rules_on_hand_made_class_sets():
    task = get_task("synth", "6-2-2")  # step 0: 1..6, step 1: 7, 8, step 2: 9, 10
    only_bg, old, new_1, future, old_future = {0}, {0, 3}, {0, 7, 255}, {0, 9}, {0, 2, 10}
    assert [keep_test_image(c, task, 1, "all") for c in (only_bg, old, new_1, future, old_future)] == [True] * 5
    assert [keep_test_image(c, task, 1, "seen") for c in (only_bg, old, new_1, future, old_future)] == [
        False, True, True, False, True]
    assert [keep_test_image(c, task, 1, "seen_only") for c in (only_bg, old, new_1, future, old_future)] == [
        False, True, True, False, False]
    assert keep_test_image(old_future, task, 2, "seen_only")  # every class is seen after the last step


@pytest.mark.parametrize("rule", ["seen", "seen_only"])
def test_a_step_is_scored_on_exactly_the_images_the_rule_keeps(tmp_path, synth_root, rule):
    cfg = tiny(synth_root, tmp_path, f"eval.test_images={rule}")
    task = cfg.build_task()
    everything = eval_dataset(tiny(synth_root, tmp_path), task, 0)
    presence = class_presence(everything, cache_dir=tmp_path / "cache", progress=False)
    for step in range(task.num_steps):
        kept = eval_dataset(cfg, task, step)
        expected = [everything.images[i] for i, p in enumerate(presence) if keep_test_image(p, task, step, rule)]
        assert kept.images == expected
        assert 0 < len(kept) <= len(everything)
    assert len(eval_dataset(cfg, task, task.num_steps - 1)) == len([p for p in presence if p - {0, 255}])


# -- eval.every: scores during a step (cssegmentation's every 10 epochs) ---------------------------
def test_evaluations_during_a_step_are_kept_and_change_nothing_trained(tmp_path, synth_root):
    plain = tiny(synth_root, tmp_path, "method.name=finetune", "optim.epochs=3")
    every = tiny(synth_root, tmp_path, "method.name=finetune", "optim.epochs=3", "eval.every=1")
    run_training(plain, tmp_path / "plain", quiet=True, steps="0")
    results = run_training(every, tmp_path / "every", quiet=True, steps="0")
    a, b = load_checkpoint(tmp_path / "plain" / "step0.pth"), load_checkpoint(tmp_path / "every" / "step0.pth")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    row = results["steps"][0]
    assert [e["epoch"] for e in row["evaluations"]] == [1, 2, 3]
    assert row["evaluations"][-1]["miou_all"] == row["miou_all"]  # the last is the step's own score
    assert "evaluations" not in json.loads((tmp_path / "plain" / "results.json").read_text())["steps"][0]

    # interrupted before epoch 3, then resumed: the evaluations of epochs 1 and 2 are still there
    with pytest.raises(KeyboardInterrupt):
        run_training(every, tmp_path / "broken", quiet=True, steps="0", callbacks=InterruptAt(step=0, epoch=2))
    assert [e["epoch"] for e in load_checkpoint(tmp_path / "broken" / "last.pth")["evaluations"]] == [1, 2]
    resumed = run_training(every, tmp_path / "broken", quiet=True, steps="0", resume=True)
    assert resumed["steps"][0]["evaluations"] == row["evaluations"]


# -- data.normalize: caffe (the ILT paper's code) ------------------------------------------------------
def test_caffe_normalisation_subtracts_the_ilt_codes_means_from_0_255_rgb():
    import numpy as np

    from ilseg.data.transforms import CAFFE_MEAN_AS_ILT, denormalize, eval_transform

    rgb = np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    x, _ = eval_transform(None, normalize="caffe")(rgb, np.zeros((4, 5), dtype=np.uint8))
    want = torch.from_numpy(rgb).permute(2, 0, 1).float() - torch.tensor(CAFFE_MEAN_AS_ILT).view(3, 1, 1)
    torch.testing.assert_close(x, want, rtol=0, atol=1e-4)
    assert CAFFE_MEAN_AS_ILT[0] < CAFFE_MEAN_AS_ILT[2]  # B's mean subtracted from R, as that code does
    torch.testing.assert_close(denormalize(x, "caffe") * 255, torch.from_numpy(rgb).permute(2, 0, 1).float(),
                               rtol=0, atol=1e-3)
    imagenet, _ = eval_transform(None)(rgb, np.zeros((4, 5), dtype=np.uint8))
    assert float(imagenet.abs().max()) < 3 < float(x.abs().max())  # the default is unchanged


# -- model.frozen_bn_affine: false (the ILT paper's code trains BN's scale and offset) ------------------
@pytest.mark.parametrize("affine_frozen", [True, False])
def test_frozen_bn_keeps_its_statistics_and_trains_scale_and_offset_only_when_asked(affine_frozen):
    from ilseg.models import build_segmenter

    model = build_segmenter(backbone="resnet50", head="aspp_v2", output_stride=16, classes_per_step=[3],
                            backbone_width=8, frozen_bn=True, frozen_bn_affine=affine_frozen)
    bn = model.body.bn1
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    model(torch.randn(2, 3, 32, 32))["logits"].square().mean().backward()
    opt.step()
    after = bn.state_dict()
    assert torch.equal(before["running_mean"], after["running_mean"])
    assert torch.equal(before["running_var"], after["running_var"])
    assert torch.equal(before["weight"], after["weight"]) == affine_frozen
    assert torch.equal(before["bias"], after["bias"]) == affine_frozen


def test_the_report_shows_the_best_evaluation_only_on_request_and_says_it_is_a_test_set_selection(
        tmp_path, synth_root):
    from ilseg.reports import write_report
    from ilseg.reports.collect import BEST_ON_TEST_NOTE, collect

    every = tiny(synth_root, tmp_path, "method.name=finetune", "optim.epochs=2", "optim.epochs_next=2",
                 "eval.every=1")
    results = run_training(every, tmp_path / "every", quiet=True)
    plain = tiny(synth_root, tmp_path, "method.name=finetune")
    run_training(plain, tmp_path / "plain", quiet=True)

    final = collect([tmp_path / "every"])[0].runs[0].results["steps"]
    best = collect([tmp_path / "every"], selection="best-on-test")[0].runs[0].results["steps"]
    for row, final_row, chosen in zip(results["steps"], final, best):
        assert final_row["miou_all"] == row["miou_all"]
        assert chosen["miou_all"] == max(e["miou_all"] for e in row["evaluations"])
        assert chosen["selected_epoch"] in (1, 2)
    written = write_report([tmp_path / "every"], tmp_path / "report", selection="best-on-test")
    assert BEST_ON_TEST_NOTE in written["markdown"].read_text()
    assert BEST_ON_TEST_NOTE in written["html"].read_text()
    assert json.loads(written["json"].read_text())["selection"] == "best-on-test"
    assert BEST_ON_TEST_NOTE not in write_report([tmp_path / "every"], tmp_path / "r2")["markdown"].read_text()
    with pytest.raises(IlsegError, match="no evaluations during the step.*eval.every"):
        collect([tmp_path / "plain"], selection="best-on-test")


# -- data.fixed_crops: the ILT paper's incremental steps (one crop per image, file order) ---------------
def _epoch_batches(cfg, step):
    from ilseg.engine.distributed import DistInfo
    from ilseg.engine.loaders import training_data
    from ilseg.tasks import train_lut

    task = cfg.build_task()
    data = training_data(cfg, task, step, train_lut(task, step), dist=DistInfo(), progress=False)
    epochs = []
    for epoch in (0, 1):
        data.set_epoch(epoch)
        epochs.append([(images.clone(), targets.clone()) for images, targets in data.loader])
    return data, epochs


def test_fixed_crops_give_every_image_one_crop_in_file_order_from_step_1_on(tmp_path, synth_root):
    cfg = tiny(synth_root, tmp_path, "data.fixed_crops=true")
    data, (first, second) = _epoch_batches(cfg, 1)
    assert list(data.batches) == [list(range(i * 4, i * 4 + 4)) for i in range(len(data.dataset) // 4)]
    assert len(first) == len(second) == len(data.dataset) // 4  # the last partial batch is left out
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    _, (zero_a, zero_b) = _epoch_batches(cfg, 0)  # step 0 trains as usual: other crops every epoch
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(zero_a, zero_b))
    _, (usual_a, usual_b) = _epoch_batches(tiny(synth_root, tmp_path), 1)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(usual_a, usual_b))


def test_the_cached_teacher_trains_exactly_what_the_online_teacher_does_with_one_pass(tmp_path, synth_root):
    from ilseg.engine.callbacks import Callbacks

    class CountTeacherCalls(Callbacks):
        def __init__(self):
            self.calls = 0

        def on_step_start(self, step, setup):
            if setup.teacher is not None:
                forward = setup.teacher.forward

                def counted(*args, **kwargs):
                    self.calls += 1
                    return forward(*args, **kwargs)

                setup.teacher.forward = counted

    outs = {}
    for cached in (False, True):
        cfg = tiny(synth_root, tmp_path, "method.name=ilt", "data.fixed_crops=true", "optim.epochs=1",
                   "optim.epochs_next=3", f"runtime.cache_teacher={str(cached).lower()}")
        counter = CountTeacherCalls()
        run_training(cfg, tmp_path / str(cached), quiet=True, steps="0:2", callbacks=counter)
        outs[cached] = (load_checkpoint(tmp_path / str(cached) / "step1.pth"), counter.calls)
    (online, online_calls), (replayed, replayed_calls) = outs[False], outs[True]
    assert all(torch.equal(online["model"][k], replayed["model"][k]) for k in online["model"])
    assert online_calls == 3 * replayed_calls > 0  # three epochs online, one computed pass replayed
    with pytest.raises(IlsegError, match="needs data.fixed_crops"):
        tiny(synth_root, tmp_path, "runtime.cache_teacher=true")


# -- optim.weight_decay_on: kernels, optim.decay_iterations*: the ILT paper's code -------------------------
def test_weight_decay_on_kernels_only_leaves_biases_and_batchnorm_undecayed():
    from ilseg.engine.optim import build_optimizer

    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3))
    opt = build_optimizer(model.parameters(), kind="sgd", lr=1.0, momentum=0.0, nesterov=False, weight_decay=0.5,
                          decay_kernels_only=True)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()  # no gradients: only weight decay could move a parameter (none moves: grads are None)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # zero gradients: the decay alone, lr 1 x 0.5 x w, on the kernel only
    after = list(model.parameters())
    torch.testing.assert_close(after[0], before[0] * 0.5)
    assert all(torch.equal(a, b) for a, b in zip(before[1:], after[1:]))  # conv bias, BN weight and bias
    assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.0]


def test_the_poly_horizon_can_be_longer_than_the_step(tmp_path, synth_root):
    cfg = tiny(synth_root, tmp_path, "optim.optimizer=sgd", "optim.lr=0.02", "optim.lr_end=0.001",
               "optim.decay_iterations=20", "optim.iterations=5")
    from ilseg.engine.optim import StepLength

    length = StepLength.of(cfg.optim, 0, batches=3)
    assert (length.total, length.horizon) == (5, 20)
    opt = Optimisation.build(cfg, torch.nn.Linear(2, 2), lr=0.02, total_iters=length.horizon,
                             placement=Placement(torch.device("cpu")), lr_end=length.lr_end)
    for _ in range(5):
        opt.optimizer.step()
        opt.scheduler.step()
    # (lr - lr_end) (1 - 5/20)^0.9 + lr_end, as TensorFlow's polynomial_decay with decay_steps 20
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx((0.02 - 0.001) * 0.75 ** 0.9 + 0.001)
    assert StepLength.of(tiny(synth_root, tmp_path).optim, 0, batches=3).horizon == 2 * 3  # default: the step


# -- data.augment: ilt_paper (rescale in [0.5, 1.5), flip, pad with the mean colour / 255, random crop) --------
def test_the_ilt_paper_augmentation_scales_pads_with_mean_and_ignore_and_crops():
    import numpy as np

    from ilseg.data.transforms import ilt_paper_train_transform

    rgb = np.full((20, 30, 3), 200, dtype=np.uint8)
    mask = np.full((20, 30), 3, dtype=np.uint8)
    transform = ilt_paper_train_transform(48, normalize="caffe")
    padded = 0
    for seed in range(20):
        torch.manual_seed(seed)
        x, y = transform(rgb, mask)
        assert x.shape == (3, 48, 48) and y.shape == (48, 48)
        assert set(y.unique().tolist()) == {3, 255}  # the scaled image (< 48 px) and the padding
        outside = y == 255
        padded += int(outside.sum())
        # the padding is the mean colour: 0 after normalisation (up to the mean's rounding)
        assert float(x[:, outside].abs().max()) <= 0.5
        inside = (y == 3).sum().item()
        assert 0.5 ** 2 * 600 * 0.95 <= inside <= 1.5 ** 2 * 600 * 1.05  # area scaled by [0.25, 2.25)
    assert padded > 0


def test_the_ilt_paper_augmentation_is_what_training_loads_when_asked(tmp_path, synth_root):
    from ilseg.engine.loaders import step_train_transform

    assert "RandomScale" in repr(step_train_transform(tiny(synth_root, tmp_path, "data.augment=ilt_paper")))
    assert "RandomResizedCrop" in repr(step_train_transform(tiny(synth_root, tmp_path)))


def test_the_ilt_paper_padding_is_on_the_bottom_and_right():
    import numpy as np

    from ilseg.data.transforms import ilt_paper_train_transform

    transform = ilt_paper_train_transform(64, scale=(1.0, 1.0))  # no rescale: a 20 x 30 image in a 64 crop
    torch.manual_seed(0)
    _, y = transform(np.zeros((20, 30, 3), dtype=np.uint8), np.zeros((20, 30), dtype=np.uint8))
    assert (y[:20, :30] == 0).all() and (y[20:, :] == 255).all() and (y[:, 30:] == 255).all()
