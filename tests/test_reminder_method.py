"""REMINDER as a method: prototypes, class-similarity weights, CSW-KD (values worked out by hand), its state,
and runs on the engine (whose pass over the previous step's training set, ``Method.prepare_previous``, gives
the old classes' prototypes)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny import InterruptAt, tiny_config

from ilseg.config import load_config, preset_dir
from ilseg.data.synth import generate_synth
from ilseg.engine.run import run_training
from ilseg.errors import IlsegError
from ilseg.methods import METHOD_PRESETS, PLOP, REMINDER, REMINDERConfig, build_method, method_config
from ilseg.methods.plop import POD_TAPS
from ilseg.methods.reminder import (
    PrototypeMeans,
    class_feature_sums,
    cosine_similarities,
    csw_distillation,
    similarity_weights,
    upsampling_matrix,
)
from ilseg.models import build_segmenter
from ilseg.runs.checkpoint import load_checkpoint
from ilseg.tasks import get_task

LN2 = math.log(2.0)
E = math.e


@pytest.fixture(scope="module")
def synth64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic set at 64 px: Local POD's 4x4 regions need a head map of at least 4x4."""
    root = tmp_path_factory.mktemp("synth64")
    generate_synth(root, seed=3, num_images=60, size=64, workers=1)
    return root


# ---------------------------------------------------------------- presets


def test_presets_are_the_authors_options():
    voc, ade = METHOD_PRESETS["reminder"], METHOD_PRESETS["reminder-ade"]
    # argparser.py 58-67: --method REMINDER = PLOP's options + csw_kd 0.5 (delta_csw keeps its default 0);
    # ClassSimilarityWeightedKD's temperature 3 (utils/loss.py 327)
    assert type(voc) is REMINDERConfig and type(build_method(voc)) is REMINDER
    assert (voc.csw_weight, voc.csw_temperature, voc.csw_delta) == (0.5, 3.0, 0.0)
    assert (voc.pod_factor, voc.pod_logits_factor, voc.pseudo_labels, voc.pseudo_floor) == (0.01, 0.0005, "entropy",
                                                                                             0.001)
    assert voc.ce_reduction == "all" and voc.classifier_init == "background" and not voc.keep_old_labels
    # scripts/ade/reminder_100-50.sh: --pod_factor 0.001, logits factor 0.00001, --csw_kd 0.5 --delta_csw 1.0
    assert (ade.pod_factor, ade.pod_logits_factor, ade.csw_weight, ade.csw_delta) == (0.001, 0.00001, 0.5, 1.0)
    assert isinstance(build_method(voc), PLOP)
    assert "0.5*CSW-KD(T=3, delta=0" in build_method(voc).describe()
    with pytest.raises(IlsegError, match="csw_temperature"):
        method_config("reminder", {"csw_temperature": 0})
    with pytest.raises(IlsegError, match="csw_delta"):
        method_config("reminder", {"csw_delta": -1})


@pytest.mark.parametrize(("preset", "method", "task", "overlap", "batch", "epochs_next", "lr_next"), [
    ("voc-15-1-ov-reminder", "reminder", "15-1", True, 16, 30, 0.001),
    ("voc-15-1-disjoint-reminder", "reminder", "15-1", False, 16, 30, 0.001),
    ("voc-10-1-ov-reminder", "reminder", "10-1", True, 16, 30, 0.001),
    ("voc-10-1-disjoint-reminder", "reminder", "10-1", False, 16, 30, 0.001),
    ("ade-100-50-ov-reminder", "reminder-ade", "100-50", True, 10, 70, 0.0008),
])
def test_the_yaml_presets_are_the_authors_scripts(preset, method, task, overlap, batch, epochs_next, lr_next):
    cfg = load_config(preset_dir() / f"{preset}.yaml")
    assert cfg.method == METHOD_PRESETS[method] and cfg.data.task == task and cfg.data.overlap is overlap
    assert (cfg.optim.batch_size, cfg.optim.epochs_next, cfg.optim.lr, cfg.optim.lr_next) == (
        batch, epochs_next, 0.01, lr_next)


# ---------------------------------------------------------------- prototypes


def test_upsampling_matrix_is_bilinear_with_aligned_corners():
    # 2 -> 4 cells: outputs at 0, 1/3, 2/3, 1 of the way
    expected = torch.tensor([[1.0, 0.0], [2 / 3, 1 / 3], [1 / 3, 2 / 3], [0.0, 1.0]])
    assert torch.allclose(upsampling_matrix(4, 2), expected)


def test_class_sums_are_over_the_features_upsampled_to_the_labels():
    # f = [[0, 2], [4, 6]] upsampled to 3x3 with aligned corners = [[0, 1, 2], [2, 3, 4], [4, 5, 6]];
    # a second channel is 10 x the first
    f = torch.tensor([[0.0, 2.0], [4.0, 6.0]]).view(1, 1, 2, 2)
    f = torch.cat([f, 10 * f], dim=1)
    labels = torch.tensor([[[1, 1, 1], [255, 2, 0], [0, 0, 0]]])
    sums, counts = class_feature_sums(f, labels, [1, 2, 3, 0])
    # class 1: the top row 0 + 1 + 2 = 3 over 3 pixels; class 2: the centre, 3; class 3: absent;
    # class 0: 4 (middle right) + 4 + 5 + 6 (bottom row) = 19 over 4 pixels
    assert torch.allclose(sums, torch.tensor([[3.0, 30.0], [3.0, 30.0], [0.0, 0.0], [19.0, 190.0]]))
    assert counts.tolist() == [3.0, 1.0, 0.0, 4.0]


def test_prototypes_are_means_of_batch_means_and_unseen_classes_stay_zero():
    means = PrototypeMeans([1, 2, 3], channels=1)
    flat = torch.tensor([[[[0.0, 2.0], [4.0, 6.0]]]])  # upsampled 3x3: [[0,1,2],[2,3,4],[4,5,6]]
    means.add(flat, torch.tensor([[[1, 1, 1], [0, 2, 0], [0, 0, 0]]]))  # class 1: mean 1 (3 px); class 2: 3
    means.add(flat, torch.tensor([[[0, 0, 0], [0, 0, 0], [0, 0, 1]]]))  # class 1: mean 6 (1 px)
    # class 1: (1 + 6) / 2 = 3.5, the mean of its two batch means (not the pixel mean 9/4); class 3 never seen
    assert means.prototypes().view(-1).tolist() == [3.5, 3.0, 0.0]
    assert means.batches.tolist() == [2, 1, 0]


def test_reduced_halves_of_a_global_batch_give_its_single_mean():
    f = torch.randn(4, 3, 2, 2)
    labels = torch.randint(0, 3, (4, 5, 5))
    one = PrototypeMeans([0, 1, 2], channels=3)
    one.add(f, labels)
    # rank 0 holds images 0-1, rank 1 images 2-3; each reduce adds the other rank's matching tensor
    others = list(class_feature_sums(f[2:], labels[2:], [0, 1, 2]))
    rank0 = PrototypeMeans([0, 1, 2], channels=3)
    rank0.add(f[:2], labels[:2], reduce=lambda t: t.add_(others.pop(0)))
    assert torch.allclose(rank0.prototypes(), one.prototypes(), atol=1e-6)
    assert not torch.allclose(PrototypeMeans([0, 1, 2], 3).prototypes(), one.prototypes())


# ---------------------------------------------------------------- similarity weights


def test_cosine_similarity_of_a_zero_prototype_is_zero():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    y = torch.tensor([[4.0, 3.0], [0.0, 2.0], [0.0, 0.0]])
    # (3*4 + 4*3) / 25 = 0.96; 8 / 10 = 0.8; zero rows give 0 (the authors' NaN set to 0)
    assert torch.allclose(cosine_similarities(x, y), torch.tensor([[0.96, 0.8, 0.0], [0.0, 0.0, 0.0]]))


def test_similarity_weights_are_a_softmax_over_old_classes_cut_below_delta_over_c_old():
    new = torch.tensor([[1.0, 0.0], [0.0, 5.0]])
    old = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    # cos = [[1, 0], [0, 1]]: softmax rows [e, 1] / (e + 1) = [0.7311, 0.2689] and [0.2689, 0.7311]
    high, low = E / (E + 1), 1 / (E + 1)
    assert torch.allclose(similarity_weights(new, old, delta=0.0), torch.tensor([[high, low], [low, high]]))
    # delta 1: threshold 1 / C_old = 0.5 removes the 0.2689s
    assert torch.allclose(similarity_weights(new, old, delta=1.0), torch.tensor([[high, 0.0], [0.0, high]]))


# ---------------------------------------------------------------- CSW-KD


def _one_new_pixel() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two pixels, C_old 2, one new class (channel 2): pixel 0 is new, pixel 1 background."""
    student = torch.tensor([[0.0, 0.0, 7.0], [5.0, -3.0, 1.0]]).t().reshape(1, 3, 1, 2).requires_grad_()
    teacher = torch.tensor([[0.0, 0.0], [9.0, 0.0]]).t().reshape(1, 2, 1, 2)
    return student, teacher, torch.tensor([[[2, 0]]])


def test_csw_kd_by_hand():
    student, teacher, target = _one_new_pixel()
    # only pixel 0 counts: q = [1/2, 1/2], log p over the old channels = [-ln 2, -ln 2] at any T (equal logits);
    # r = [1, 0]: target [0.5 + 1e-7, 1e-7]; L = T^2 (0.5 + 2e-7) ln 2 with T = 2
    loss = csw_distillation(student, teacher, target, torch.tensor([[1.0, 0.0]]), temperature=2.0)
    assert loss.item() == pytest.approx(4 * (0.5 + 2e-7) * LN2, rel=1e-6)
    loss.backward()
    # dL/dz_j = -T^2 / |M| * (1/T) * (t_j - p_j sum_k t_k): -2 * (0.5 - 0.25) = -0.5 and +0.5 (to 1e-7);
    # the new channel and the background pixel get none
    assert student.grad is not None
    assert torch.allclose(student.grad[0, :, 0, 0], torch.tensor([-0.5, 0.5, 0.0]), atol=1e-6)
    assert torch.equal(student.grad[0, :, 0, 1], torch.zeros(3))


def test_csw_kd_weights_the_teacher_and_ignores_255_and_needs_one_weight_row_per_new_class():
    student, teacher, target = _one_new_pixel()
    # r = [0.25, 0.75]: target [0.125, 0.375] (+1e-7 each), sum 0.5: L = T^2 * 0.5 ln 2 at T = 1
    loss = csw_distillation(student, teacher, target, torch.tensor([[0.25, 0.75]]), temperature=1.0)
    assert loss.item() == pytest.approx((0.5 + 2e-7) * LN2, rel=1e-6)
    assert csw_distillation(student, teacher, torch.tensor([[[255, 0]]]), torch.tensor([[1.0, 0.0]]),
                            temperature=1.0).item() == 0.0  # no new-class pixel: 0, not NaN
    with pytest.raises(ValueError, match="1x2"):
        csw_distillation(student, teacher, target, torch.ones(2, 2), temperature=1.0)


# ---------------------------------------------------------------- the method


def _model(sizes: list[int]) -> Any:
    torch.manual_seed(0)
    return build_segmenter(backbone="resnet18", backbone_width=8, head_channels=8, classes_per_step=sizes)


def test_start_step_taps_the_head_and_asks_for_the_previous_step_pass_until_it_ran():
    task = get_task("voc", "15-1")
    method = build_method(method_config("reminder", {"pod_factor": 0.0, "pod_logits_factor": 0.0}))
    assert method.taps(0) == () and method.taps(1) == ("head",)  # POD off: the head alone, for the prototypes
    assert build_method(method_config("reminder")).taps(1) == POD_TAPS
    setup = method.start_step(_model([16]), task, 1)
    assert setup.teacher is not None and setup.teacher.taps == ("head",)
    assert method.prepares_previous(1) and not method.prepares_previous(0)
    assert not build_method(method_config("reminder", {"csw_weight": 0.0})).prepares_previous(1)
    method.load_state_dict({"prototypes": torch.zeros(16, 8)})  # a resumed step already has them
    assert not method.prepares_previous(1)


def test_prepare_previous_adds_the_last_steps_prototypes_and_they_are_state():
    task = get_task("voc", "15-1")  # steps of 16 (background + 15), then 1 class each
    method = build_method(method_config("reminder"))
    method.start_step(_model([16]), task, 1)
    head = torch.tensor([[[[0.0, 2.0], [4.0, 6.0]]]])  # upsampled 3x3: [[0,1,2],[2,3,4],[4,5,6]]
    labels = torch.full((1, 3, 3), 255)
    labels[0, 0] = 0  # background: 0, 1, 2 -> prototype 1
    labels[0, 2, 2] = 15  # class 15: 6
    line = method.prepare_previous([({"taps": {"head": head}}, labels)], 1)
    assert "channels 0..15" in line and "never seen" in line
    expected = torch.zeros(16, 1)
    expected[0], expected[15] = 1.0, 6.0
    assert torch.equal(method.prototypes, expected)
    # step 2 adds channel 16's, from step 1's training set, after the 16 it has
    method.start_step(_model([16, 1]), task, 2)
    labels[0, 0] = 16
    method.prepare_previous([({"taps": {"head": head}}, labels)], 2)
    assert method.prototypes.shape == (17, 1) and method.prototypes[16].item() == 1.0
    state = method.state_dict()
    again = build_method(method_config("reminder"))
    again.load_state_dict(state)
    assert torch.equal(again.prototypes, method.prototypes)
    assert build_method(method_config("reminder")).state_dict() == {}
    with pytest.raises(IlsegError, match="another method"):
        again.load_state_dict({"batches": 3})
    # out of order (step 2's pass without step 1's prototypes) is refused
    fresh = build_method(method_config("reminder"))
    fresh.start_step(_model([16, 1]), task, 2)
    with pytest.raises(IlsegError, match="channels 0..15"):
        fresh.prepare_previous([({"taps": {"head": head}}, labels)], 2)


def test_losses_are_plops_plus_half_the_csw_term():
    torch.manual_seed(1)
    cfg = method_config("reminder", {"pseudo_labels": "none", "ce_reduction": "valid"})
    method = build_method(cfg)
    plop = build_method(method_config("plop", {"pseudo_labels": "none", "ce_reduction": "valid"}))
    method.start_step(_model([3]), get_task("voc", "15-1"), 1)
    old, new, channels = 3, 2, 4
    method.load_state_dict({"prototypes": torch.randn(old, channels)})
    taps = {name: torch.randn(2, channels, 4, 4) for name in POD_TAPS[:-1]}
    student = {"logits": torch.randn(2, old + new, 8, 8), "taps": {**taps, "logits_lowres": torch.randn(2, 5, 4, 4)}}
    teacher = {"logits": torch.randn(2, old, 8, 8),
               "taps": {**{k: v + 0.1 for k, v in taps.items()}, "logits_lowres": torch.randn(2, 3, 4, 4)}}
    target = torch.randint(0, old + new, (2, 8, 8))
    losses = method(student, teacher, target, step=1)
    reference = plop(student, teacher, target, step=1)
    assert set(losses) == {"ce", "pod", "csw", "loss"}
    assert torch.equal(losses["ce"], reference["ce"]) and torch.equal(losses["pod"], reference["pod"])
    sums, counts = class_feature_sums(taps["head"], target, [3, 4])
    weights = similarity_weights(sums / counts[:, None], method.prototypes, delta=0.0)
    csw = csw_distillation(student["logits"], teacher["logits"], target, weights, temperature=3.0)
    assert torch.allclose(losses["csw"], csw) and losses["csw"] > 0
    assert torch.allclose(losses["loss"], reference["loss"] + 0.5 * csw)
    # step 0: the CE alone; without the old prototypes a later step is refused, naming the missing pass
    assert set(method(student, None, target, step=0)) == {"ce", "loss"}
    method.load_state_dict({})
    with pytest.raises(IlsegError, match="prepare_previous"):
        method(student, teacher, target, step=1)


# ---------------------------------------------------------------- on the engine


def test_three_steps_train_keep_the_prototypes_and_resume_mid_step(synth64, tmp_path):
    cfg = tiny_config(synth64, "method.name=reminder", "data.task=6-2-2", "optim.epochs=1",
                      "optim.epochs_next=2", "data.crop_size=64", cache_dir=tmp_path / "cache")
    whole = tmp_path / "whole"
    results = run_training(cfg, whole, quiet=True)
    assert [s["step"] for s in results["steps"]] == [0, 1, 2]
    log = (whole / "train.log").read_text()
    assert "prototypes of channels 0..6" in log and "prototypes of channels 7..8" in log
    states = [load_checkpoint(whole / f"step{t}.pth").get("method_state", {}) for t in range(3)]
    assert states[0] == {} and states[1]["prototypes"].shape == (7, 8) and states[2]["prototypes"].shape == (9, 8)
    assert torch.equal(states[2]["prototypes"][:7], states[1]["prototypes"])  # old classes' are kept
    assert "train/csw" in (whole / "metrics.jsonl").read_text()

    # interrupted at the start of step 2's second epoch, then resumed: the same prototypes and weights
    broken = tmp_path / "broken"
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, broken, quiet=True, callbacks=InterruptAt(step=2, epoch=1))
    assert load_checkpoint(broken / "last.pth")["method_state"]["prototypes"].shape == (9, 8)
    run_training(cfg, broken, quiet=True, resume=True)
    assert (broken / "train.log").read_text().count("prototypes of channels 7..8") == 1  # kept, not recomputed
    for t in range(3):
        a, b = load_checkpoint(whole / f"step{t}.pth"), load_checkpoint(broken / f"step{t}.pth")
        assert a.get("method_state", {}).keys() == b.get("method_state", {}).keys()
        assert all(torch.equal(a["method_state"][k], b["method_state"][k]) for k in a.get("method_state", {}))
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), t
