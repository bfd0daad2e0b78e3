"""PLOP: the POD maps of the model (its taps), Local POD, entropy thresholds and pseudo-labels, by hand."""

from __future__ import annotations

import copy
import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from ilseg.errors import IlsegError
from ilseg.methods.plop import (
    POD_TAPS,
    EntropyThresholds,
    entropy_scores,
    local_pod_loss,
    merge_extra_channels,
    normalized_entropy,
    plop_compat_median,
    plop_cross_entropy,
    pod_embedding,
    pseudo_label,
)
from ilseg.models import TAPS, build_segmenter, copy_for_teacher, fold_batchnorm
from ilseg.models.backbone import BasicBlock, Bottleneck
from ilseg.models.segmenter import IncrementalSegmenter

# ---------------------------------------------------------------- POD embedding

GRID = torch.arange(16.0).view(1, 1, 4, 4)  # rows 0..3 / 4..7 / 8..11 / 12..15


def test_pod_embedding_scale_1_is_the_row_means_then_the_column_means():
    expected = [1.5, 5.5, 9.5, 13.5, 6.0, 7.0, 8.0, 9.0]
    torch.testing.assert_close(pod_embedding(GRID, scales=(1,)), torch.tensor([expected]))


def test_pod_embedding_scale_2_gives_each_quarter_its_row_and_column_means():
    # regions row-major: [[0,1],[4,5]], [[2,3],[6,7]], [[8,9],[12,13]], [[10,11],[14,15]]
    expected = [0.5, 4.5, 2.0, 3.0,
                2.5, 6.5, 4.0, 5.0,
                8.5, 12.5, 10.0, 11.0,
                10.5, 14.5, 12.0, 13.0]
    torch.testing.assert_close(pod_embedding(GRID, scales=(2,)), torch.tensor([expected]))


def test_pod_embedding_scale_4_repeats_each_pixel_twice():
    expected = [float(v) for v in range(16) for _ in range(2)]
    torch.testing.assert_close(pod_embedding(GRID, scales=(4,)), torch.tensor([expected]))


def test_pod_embedding_concatenates_the_scales_in_order():
    parts = [pod_embedding(GRID, scales=(s,)) for s in (1, 2, 4)]
    torch.testing.assert_close(pod_embedding(GRID), torch.cat(parts, dim=1))


def test_pod_embedding_orders_channels_inside_each_mean():
    two = torch.cat([GRID, 100 + GRID], dim=1)  # 1x2x4x4
    expected = [1.5, 5.5, 9.5, 13.5, 101.5, 105.5, 109.5, 113.5, 6.0, 7.0, 8.0, 9.0, 106.0, 107.0, 108.0, 109.0]
    torch.testing.assert_close(pod_embedding(two, scales=(1,)), torch.tensor([expected]))


def test_pod_embedding_has_14_c_w_values_per_image():
    x = torch.randn(2, 3, 8, 8)
    assert pod_embedding(x).shape == (2, 14 * 3 * 8)
    assert pod_embedding(torch.randn(1, 256, 32, 32)).shape == (1, 114_688)  # PLOP's head map


def test_pod_embedding_leaves_out_what_the_width_does_not_divide():
    x = torch.zeros(1, 1, 5, 5)
    x[..., 4, :] = 1000.0  # last row and column: outside the 2x2 regions of side 2
    x[..., :, 4] = 1000.0
    x[..., :4, :4] = GRID
    torch.testing.assert_close(pod_embedding(x, scales=(2,)), pod_embedding(GRID, scales=(2,)))


def test_pod_embedding_refuses_non_square_maps():
    with pytest.raises(ValueError, match="square"):
        pod_embedding(torch.zeros(1, 1, 4, 6))


# ---------------------------------------------------------------- Local POD


def test_merge_extra_channels_sums_the_new_logits_into_background():
    z = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0]).view(1, 5, 1, 1)
    torch.testing.assert_close(merge_extra_channels(z, 3).flatten(), torch.tensor([31.0, 2.0, 3.0]))


def _tiny_maps(requires_grad: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A 2x1x2x2 feature map and 2xCx1x1 logits (C_old = 2, N_all = 3) for the hand-computed loss."""
    teacher_feature = torch.zeros(2, 1, 2, 2)
    student_feature = torch.stack([torch.ones(1, 2, 2), torch.full((1, 2, 2), 2.0)])
    teacher_logits = torch.tensor([[1.0, 2.0], [1.0, 2.0]]).view(2, 2, 1, 1)
    student_logits = torch.tensor([[0.0, 2.0, 1.0], [1.0, 0.0, 1.0]]).view(2, 3, 1, 1)
    students = [student_feature.requires_grad_(requires_grad), student_logits.requires_grad_(requires_grad)]
    teachers = [teacher_feature.requires_grad_(requires_grad), teacher_logits.requires_grad_(requires_grad)]
    return students, teachers


def test_local_pod_loss_by_hand():
    students, teachers = _tiny_maps()
    # feature map, squared: image 0 all 1, image 1 all 4, teacher 0.  Scale 1 on 2x2 gives
    # 4 values q per image, so ||diff|| = 2q: 2 and 8, batch mean 5.
    # logits: student merged to [0+1, 2] and [1+1, 0], squared [1, 4] and [4, 0]; teacher
    # squared [1, 4].  Each channel appears twice (row mean, column mean): norms 0 and
    # sqrt(2 * (3^2 + 4^2)) = 5 sqrt 2, batch mean 5 sqrt 2 / 2.
    schedule = math.sqrt(3 / 1)
    expected = (0.01 * 5 * schedule + 0.0005 * (5 * math.sqrt(2) / 2) * schedule) / 2
    loss = local_pod_loss(students, teachers, num_old_channels=2, num_classes_total=3, num_new=1,
                          factors=0.01, logits_factor=0.0005, scales=(1,))
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, torch.tensor(expected))


def test_local_pod_loss_per_map_factors_and_zero_factor_still_counts_the_map():
    students, teachers = _tiny_maps()
    loss = local_pod_loss(students, teachers, num_old_channels=2, num_classes_total=3, num_new=1,
                          factors=[0.01], logits_factor=0.0, scales=(1,))
    torch.testing.assert_close(loss, torch.tensor(0.01 * 5 * math.sqrt(3) / 2))


def test_local_pod_loss_at_every_scale_of_a_constant_map():
    # a constant map q^2 embeds as 14*C*w copies of q^2: ||diff|| = q^2 sqrt(14*C*w)
    student = torch.full((1, 2, 4, 4), 3.0)
    teacher = torch.full((1, 2, 4, 4), 1.0)
    logits = torch.zeros(1, 3, 4, 4)
    loss = local_pod_loss([student, logits], [teacher, logits[:, :2]], num_old_channels=2, num_classes_total=3,
                          num_new=1, factors=0.1, logits_factor=1.0)
    expected = 0.1 * (9 - 1) * math.sqrt(14 * 2 * 4) * math.sqrt(3) / 2
    torch.testing.assert_close(loss, torch.tensor(expected))


def test_local_pod_loss_gradient_reaches_the_student_only():
    students, teachers = _tiny_maps()
    local_pod_loss(students, teachers, num_old_channels=2, num_classes_total=3, num_new=1,
                   factors=0.01, logits_factor=0.0005, scales=(1,)).backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in students)
    assert all(t.grad is None for t in teachers)


def test_local_pod_loss_accepts_inference_mode_teacher_maps_and_is_float32_under_autocast():
    students, _ = _tiny_maps()
    with torch.inference_mode():
        _, teachers = _tiny_maps(requires_grad=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = local_pod_loss([s.bfloat16() for s in students], teachers, num_old_channels=2,
                              num_classes_total=3, num_new=1, factors=0.01, logits_factor=0.0005, scales=(1,))
    assert loss.dtype == torch.float32
    loss.backward()
    assert students[0].grad is not None


def test_local_pod_loss_is_zero_with_a_finite_gradient_for_equal_maps():
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    logits = torch.cat([x, torch.zeros(2, 1, 4, 4)], dim=1)  # a new channel of zeros: the merge gives x back
    loss = local_pod_loss([x, logits], [x.detach(), x.detach()], num_old_channels=3, num_classes_total=4,
                          num_new=1, factors=1.0, logits_factor=1.0)
    loss.backward()
    assert loss.item() == 0.0
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("kwargs", [
    {"num_new": 2},  # 2 + 2 != 3
    {"factors": [0.1, 0.1]},  # one factor too many
    {"num_old_channels": 1, "num_new": 2},  # the teacher's logits have 2 channels
])
def test_local_pod_loss_refuses_inconsistent_arguments(kwargs):
    students, teachers = _tiny_maps()
    args = {"num_old_channels": 2, "num_classes_total": 3, "num_new": 1, "factors": 0.01,
            "logits_factor": 0.0005, "scales": (1,)} | kwargs
    with pytest.raises(ValueError):
        local_pod_loss(students, teachers, **args)


# ---------------------------------------------------------------- entropy


def test_normalized_entropy_by_hand():
    p = torch.tensor([[0.5, 0.5, 0.0], [0.7, 0.2, 0.1], [1.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 3)
    h = [math.log(2), -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1)), 0.0]
    expected = torch.tensor([[[x / (3 * math.log(3)) for x in h]]])
    torch.testing.assert_close(normalized_entropy(p), expected)


def test_entropy_scores_divide_by_ln_n_all_and_predict_background_on_ties():
    scores, prediction = entropy_scores(torch.zeros(1, 2, 1, 1), num_classes_total=4)
    torch.testing.assert_close(scores, torch.tensor([[[0.5 / math.log(4)]]]))  # e = ln2 / (2 ln2)
    assert prediction.tolist() == [[[0]]]


# ---------------------------------------------------------------- thresholds


def _accumulator(bins: int = 10) -> EntropyThresholds:
    return EntropyThresholds(num_old_channels=3, num_classes_total=4, bins=bins)


def test_true_median_of_constructed_histograms():
    acc = _accumulator(bins=10)
    w = acc.bin_width
    acc.counts[0, :10] = torch.tensor([0, 3, 0, 2, 0, 0, 0, 0, 0, 0])  # 5 values: rank 3 lies in bin 1
    acc.counts[1, :10] = torch.tensor([1, 1, 0, 0, 2, 0, 0, 0, 0, 0])  # 4 values: lower median (rank 2) in bin 1
    thresholds = acc.thresholds(mode="median", floor=0.0)
    torch.testing.assert_close(thresholds, torch.tensor([1.5 * w, 1.5 * w, 0.0]))
    floored = acc.thresholds(mode="median", floor=2 * w)  # the floor wins over bin 1, and fills class 2
    torch.testing.assert_close(floored, torch.tensor([2 * w, 2 * w, 2 * w]))


def _batches(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for scale in (0.5, 2.0, 6.0):
        logits = torch.randn(2, 3, 9, 9, generator=g) * scale
        label = torch.randint(0, 3, (2, 9, 9), generator=g)
        label[:, 0] = 255
        batches.append((logits, label))
    return batches


def test_true_median_matches_torch_median_within_half_a_bin():
    acc = _accumulator(bins=100_000)
    for logits, label in _batches():
        acc.update(logits, label)
    scores = torch.cat([entropy_scores(t, num_classes_total=4)[0][y == 0] for t, y in _batches()])
    classes = torch.cat([entropy_scores(t, num_classes_total=4)[1][y == 0] for t, y in _batches()])
    thresholds = acc.thresholds(mode="median", floor=0.0)
    for c in range(3):
        values = scores[classes == c]
        assert values.numel() > 10 and int(acc.counts[c, : acc.bins].sum()) == values.numel()
        assert abs(thresholds[c].item() - values.median().item()) <= acc.bin_width / 2 + 1e-9


def test_thresholds_merged_from_two_ranks_equal_those_of_one_process():
    single, rank0, rank1 = _accumulator(1000), _accumulator(1000), _accumulator(1000)
    for index, (logits, label) in enumerate(_batches()):
        single.update(logits, label)
        (rank0 if index % 2 == 0 else rank1).update(logits, label)
    rank0.merge(rank1.state())
    assert torch.equal(rank0.state(), single.state())
    for mode in ("median", "plop_compat"):
        torch.testing.assert_close(rank0.thresholds(mode=mode), single.thresholds(mode=mode), rtol=0, atol=0)


def test_update_counts_only_label_zero_pixels_under_the_teacher_prediction():
    acc = _accumulator()
    logits = torch.tensor([[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0], [0, 10.0, 0]]).T.reshape(1, 3, 1, 4)
    acc.update(logits, torch.tensor([[[0, 0, 255, 3]]]))
    assert acc.counts[:, : acc.bins].sum(dim=1).tolist() == [1, 1, 0]
    assert acc.counts[:, acc.bins:].sum(dim=1).tolist() == [1, 1, 0]
    assert acc.counts[0, acc.bins] == 1  # v < 0.01: PLOP's bin 0


def _compat(bins: dict[int, int]) -> list[int]:
    histogram = [0] * 100
    for index, count in bins.items():
        histogram[index] = count
    return histogram


def test_plop_compat_bin_zero_interpolates_inside_the_bin():
    # total 12, half 6 <= 10 in bin 0: median = 0 + 6/10 * 0.01
    torch.testing.assert_close(plop_compat_median(_compat({0: 10, 1: 2})), torch.tensor(0.006))


def test_plop_compat_running_sum_adds_the_bin_index_not_the_count():
    # total 104, half 52.  A true running count would be 4 before bin 3 (0.03 + 48/100 * 0.01);
    # PLOP's running sum is 0 + 1 + 2 = 3 there: 0.03 + (52 - 3)/100 * 0.01.
    torch.testing.assert_close(plop_compat_median(_compat({0: 4, 3: 100})), torch.tensor(0.0349))


def test_plop_compat_falls_through_to_bin_99():
    # every bin 0..98 holds n: no bin passes, the walk ends at bin 99 (empty) with running sum 4950
    assert plop_compat_median([101] * 99 + [0]).item() == math.inf  # half 4999.5 > 4950
    assert plop_compat_median([99] * 99 + [0]).item() == -math.inf  # half 4900.5 < 4950
    assert math.isnan(plop_compat_median([100] * 99 + [0]).item())  # half 4950: 0 / 0
    # stopping on an empty bin: half 55 equals the running sum 0 + 1 + ... + 10 at bin 11
    assert math.isnan(plop_compat_median(_compat({0: 10, 29: 100})).item())


def test_plop_compat_skips_bins_29_and_58_and_reads_bin_57_as_058():
    assert plop_compat_median(_compat({29: 1000})).item() == -math.inf  # never read
    assert plop_compat_median(_compat({58: 1000})).item() == -math.inf
    # bin 30 is read at k = 30 with running sum 0 + ... + 29 = 435: 0.30 + (500 - 435)/1000 * 0.01
    torch.testing.assert_close(plop_compat_median(_compat({30: 1000})), torch.tensor(0.30065))
    # bin 57 is read at k = 58 (lower border 0.58, running sum 1653): 0.58 + (2500 - 1653)/5000 * 0.01
    torch.testing.assert_close(plop_compat_median(_compat({57: 5000})), torch.tensor(0.581694))


def test_plop_compat_thresholds_apply_the_floor_as_plop_does():
    acc = _accumulator()
    compat = acc.counts[:, acc.bins:]
    compat[0] = torch.tensor(_compat({0: 10, 1: 2}))  # 0.006
    compat[1] = torch.tensor([99] * 99 + [0])  # -inf -> floor
    # class 2 empty: 0 -> floor
    torch.testing.assert_close(acc.thresholds(mode="plop_compat"), torch.tensor([0.006, 0.001, 0.001]))
    compat[1] = torch.tensor([101] * 99 + [0])  # +inf survives the floor
    compat[2] = torch.tensor([100] * 99 + [0])  # NaN survives it too (PLOP's max(nan, floor) is nan)
    thresholds = acc.thresholds(mode="plop_compat")
    assert thresholds[1].item() == math.inf and math.isnan(thresholds[2].item())


# ---------------------------------------------------------------- pseudo-labels and CE


def test_pseudo_label_by_hand():
    # C_old = 3, N_all = 4.  Pixels (row-major): confident 1, uncertain, new class 3,
    # ignored, confident background, confident 2 with a tiny class-2 threshold.
    columns = [[0, 10, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0], [10, 0, 0], [0, 0, 10]]
    logits = torch.tensor(columns, dtype=torch.float32).T.reshape(1, 3, 2, 3)
    label = torch.tensor([[[0, 1, 3], [255, 0, 0]]])
    thresholds = torch.tensor([0.01, 0.01, 1e-5])
    uncertain_v = (1 / 3) / math.log(4)  # uniform over 3: e = ln3 / (3 ln3)
    assert uncertain_v > 0.01
    new_label, factor = pseudo_label(label, logits, thresholds, num_old_channels=3, num_classes_total=4)
    assert new_label.tolist() == [[[1, 255, 3], [255, 0, 255]]]
    assert new_label.dtype == label.dtype
    # background: (0,0), (0,1), (1,1), (1,2); kept: (0,0) and (1,1)
    torch.testing.assert_close(factor, torch.tensor([2 / (4 + 1e-6)]))


def test_pseudo_label_factor_is_zero_without_background():
    logits = torch.zeros(2, 3, 1, 2)
    label = torch.tensor([[[3, 255]], [[0, 0]]])
    new_label, factor = pseudo_label(label, logits, torch.full((3,), 1.0), num_old_channels=3, num_classes_total=4)
    assert new_label.tolist() == [[[3, 255]], [[0, 0]]]
    torch.testing.assert_close(factor, torch.tensor([0.0, 1 / (1 + 0.5e-6)]))


def test_pseudo_labels_from_an_inference_mode_teacher_train_the_student():
    logits = torch.randn(2, 4, 3, 3, requires_grad=True)
    with torch.inference_mode():
        teacher_logits = torch.randn(2, 3, 3, 3)
    label = torch.zeros(2, 3, 3, dtype=torch.int64)
    new_label, factor = pseudo_label(label, teacher_logits, torch.full((3,), 1.0), num_old_channels=3,
                                     num_classes_total=4)
    plop_cross_entropy(logits, new_label, factor).backward()
    assert logits.grad is not None


def test_plop_cross_entropy_averages_over_every_pixel():
    logits = torch.zeros(2, 2, 1, 2, dtype=torch.bfloat16, requires_grad=True)
    label = torch.tensor([[[0, 255]], [[1, 1]]])
    loss = plop_cross_entropy(logits, label, torch.tensor([1.0, 0.5]))
    # (1 * ln2 + 0 + 0.5 * ln2 + 0.5 * ln2) / 4 pixels
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, torch.tensor(math.log(2) / 2))
    loss.backward()
    assert logits.grad is not None


# ---------------------------------------------------------------- the model's POD maps


def _model(backbone: str = "resnet18") -> IncrementalSegmenter:
    torch.manual_seed(0)
    return build_segmenter(backbone=backbone, backbone_width=8, head_channels=8, classes_per_step=[3, 2])


def _image(batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def _pod_maps(out: dict) -> list[torch.Tensor]:
    """The six maps Local POD compares, in its order, from a model's output."""
    return [out["taps"][name] for name in POD_TAPS]


def test_taps_are_off_by_default_and_change_neither_outputs_nor_state_dict():
    model = _model().eval()
    keys = list(model.state_dict())
    x = _image()
    assert model.taps == ()
    with torch.no_grad():
        plain = model(x)
        model.taps = POD_TAPS
        with_pod = model(x)
    assert set(plain) == {"logits", "features"}
    assert set(with_pod) == {"logits", "features", "taps"} and list(with_pod["taps"]) == list(POD_TAPS)
    assert list(model.state_dict()) == keys
    for key in plain:
        torch.testing.assert_close(with_pod[key], plain[key], rtol=0, atol=0)
    fresh = _model()
    fresh.load_state_dict(model.state_dict(), strict=True)  # checkpoints load either way


def test_no_stage_tap_never_runs_the_preactivation_path():
    model = _model().eval()
    with mock.patch.object(BasicBlock, "forward_with_preactivation", side_effect=AssertionError), \
            torch.no_grad():
        assert set(model(_image())) == {"logits", "features"}
        model.taps = ("head", "logits_lowres")  # maps after the body need no stage map either
        assert set(model(_image())["taps"]) == {"head", "logits_lowres"}


def test_taps_give_the_named_maps_only_in_the_asked_order_and_refuse_an_unknown_name():
    model = _model().eval()
    x = _image()
    with torch.no_grad():
        model.taps = POD_TAPS
        every = model(x)["taps"]
        model.taps = ("logits_lowres", "layer2")
        some = model(x)
        model.taps = ("layer5",)
        with pytest.raises(IlsegError, match="no map 'layer5' to tap"):
            model(x)
    assert POD_TAPS == TAPS
    assert list(some["taps"]) == ["logits_lowres", "layer2"]
    for name in ("logits_lowres", "layer2"):
        torch.testing.assert_close(some["taps"][name], every[name], rtol=0, atol=0)


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_pod_maps_are_the_stage_preactivations_the_head_and_the_small_logits(backbone):
    model = _model(backbone).eval()
    model.taps = POD_TAPS
    x = _image()
    with torch.no_grad():
        out = model(x)
        body = model.body
        h = body.maxpool(body.act(body.bn1(body.conv1(x))))
        expected = []
        for stage in (body.layer1, body.layer2, body.layer3, body.layer4):
            for block in list(stage)[:-1]:
                h = block(h)
            last = stage[-1]
            assert isinstance(last, (BasicBlock, Bottleneck))
            pre = last.residual_sum(h)
            expected.append(pre.clone())
            h = stage[-1](h)  # the in-place activation, as in a plain forward
            torch.testing.assert_close(F.leaky_relu(expected[-1], 0.01), h)
        head = model.head(out["features"])
        small = torch.cat([cls(head) for cls in model.classifiers], dim=1)
    pod = _pod_maps(out)
    assert len(pod) == 6 and len(out["taps"]) == 6
    for got, want in zip(pod, [*expected, head, small]):
        torch.testing.assert_close(got, want)
    assert (pod[0] < 0).any()  # pre-activation: the negative side is not scaled by 0.01
    expansion = 4 if backbone == "resnet50" else 1
    assert [tuple(m.shape[1:]) for m in pod] == [
        (8 * expansion, 8, 8), (16 * expansion, 4, 4), (32 * expansion, 2, 2), (64 * expansion, 2, 2),
        (8, 2, 2), (5, 2, 2)]


def test_pod_maps_of_a_teacher_copy_and_its_folded_batchnorm_agree():
    model = _model()
    model.taps = POD_TAPS
    teacher = copy_for_teacher(model)
    folded = copy.deepcopy(teacher)
    fold_batchnorm(folded)
    assert teacher.taps == folded.taps == POD_TAPS
    x = _image()
    with torch.inference_mode():
        reference, fast = _pod_maps(teacher(x)), _pod_maps(folded(x))
    for a, b in zip(reference, fast):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_local_pod_loss_on_the_model_at_the_start_of_a_step():
    """Student = teacher + a new classifier: only the logits map differs, and every gradient is finite."""
    model = _model()
    model.taps = POD_TAPS
    teacher = copy_for_teacher(model)
    model.add_step(1, init="background")
    model.eval()  # the teacher's BN statistics, so the five feature maps are equal
    x = _image(size=64)  # 4x4 maps at output stride 16, enough for the 4x4 POD regions
    with torch.inference_mode():
        teacher_maps = _pod_maps(teacher(x))
    student_maps = _pod_maps(model(x))
    kwargs = {"num_old_channels": 5, "num_classes_total": 6, "num_new": 1, "logits_factor": 0.0005}
    loss = local_pod_loss(student_maps, teacher_maps, factors=0.01, **kwargs)
    logits_only = local_pod_loss(student_maps, teacher_maps, factors=0.0, **kwargs)
    assert loss.item() > 0
    torch.testing.assert_close(loss, logits_only, rtol=0, atol=0)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
