"""Confusion matrix counting and scores on hand-built matrices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ilseg.metrics import ConfusionMatrix, mean_over_steps, segmentation_scores

NAMES = ["background", "a", "b", "c"]
# rows = ground truth, columns = prediction; class 3 ("c") is absent from the
# ground truth but predicted once (for a background pixel).
MATRIX = np.array([
    [5, 1, 0, 1],
    [1, 3, 0, 0],
    [0, 1, 2, 0],
    [0, 0, 0, 0],
])
# TP = (5, 3, 2, 0); GT row sums = (7, 4, 3, 0); predicted column sums = (6, 5, 2, 1)
IOU = [5 / (7 + 6 - 5), 3 / (4 + 5 - 3), 2 / (3 + 2 - 2)]  # 5/8, 3/6, 2/3; class 3 -> None


def test_scores_on_hand_built_matrix():
    s = segmentation_scores(MATRIX, class_names=NAMES, old=[0, 1], new=[2, 3])
    assert s["iou_per_class"] == pytest.approx({"background": 0.625, "a": 0.5, "b": 2 / 3, "c": None})
    assert s["iou_per_class"]["c"] is None
    assert s["miou_all"] == pytest.approx(sum(IOU) / 3)          # c left out
    assert s["miou_old"] == pytest.approx((0.625 + 0.5) / 2)
    assert s["miou_old_fg"] == pytest.approx(0.5)                 # background left out
    assert s["miou_new"] == pytest.approx(2 / 3)                  # c left out
    assert s["pixel_accuracy"] == pytest.approx(10 / 14)          # trace / total
    assert s["mean_class_accuracy"] == pytest.approx((5 / 7 + 3 / 4 + 2 / 3) / 3)
    assert s["num_pixels"] == 14


def test_scores_accept_tensors():
    from_numpy = segmentation_scores(MATRIX, class_names=NAMES, old=[0, 1], new=[2, 3])
    from_torch = segmentation_scores(torch.from_numpy(MATRIX), class_names=NAMES, old=[0, 1], new=[2, 3])
    assert from_numpy == from_torch


def test_empty_means_are_none():
    only_bg = np.zeros((3, 3), dtype=np.int64)
    only_bg[0, 0] = 4
    s = segmentation_scores(only_bg, class_names=NAMES[:3], old=[0], new=[1, 2])
    assert s["miou_new"] is None and s["miou_old_fg"] is None
    assert s["miou_old"] == 1.0 and s["miou_all"] == 1.0
    empty = segmentation_scores(np.zeros((2, 2)), class_names=NAMES[:2], old=[0], new=[1])
    assert empty["miou_all"] is None and empty["pixel_accuracy"] is None and empty["num_pixels"] == 0


def test_scores_check_names_and_ids():
    with pytest.raises(ValueError, match="names"):
        segmentation_scores(MATRIX, class_names=NAMES[:3], old=[0], new=[1])
    with pytest.raises(ValueError, match="outside"):
        segmentation_scores(MATRIX, class_names=NAMES, old=[0], new=[4])


def test_confusion_matrix_update_ignores_255():
    target = torch.tensor([[[0, 0, 1], [2, 255, 1]],
                           [[255, 2, 2], [0, 1, 255]]])
    pred = torch.tensor([[[0, 1, 1], [2, 0, 0]],
                         [[1, 2, 0], [0, 1, 2]]])
    # counted pairs (gt, pred), the three 255 pixels skipped:
    # (0,0) (0,1) (1,1) (2,2) (1,0) | (2,2) (2,0) (0,0) (1,1)
    expected = torch.tensor([[2, 1, 0],
                             [1, 2, 0],
                             [1, 0, 2]])
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    assert cm.matrix.dtype == torch.int64
    assert torch.equal(cm.matrix, expected)
    cm.update(pred[0], target[0])  # HxW works too
    assert int(cm.matrix.sum()) == 9 + 5


def test_confusion_matrix_merge_and_reset():
    a, b = ConfusionMatrix(2), ConfusionMatrix(2)
    a.update(torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1]))
    b.update(torch.tensor([1, 1]), torch.tensor([1, 255]))
    a += b
    assert torch.equal(a.matrix, torch.tensor([[1, 1], [0, 2]]))
    a.merge(b)
    assert torch.equal(a.matrix, torch.tensor([[1, 1], [0, 3]]))
    with pytest.raises(ValueError):
        a.merge(ConfusionMatrix(3))
    a.reset()
    assert int(a.matrix.sum()) == 0


def test_confusion_matrix_rejects_out_of_range():
    cm = ConfusionMatrix(2)
    with pytest.raises(ValueError, match="0..1"):
        cm.update(torch.tensor([0, 2]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="0..1"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.tensor([0, 1]), torch.tensor([[0, 1]]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_confusion_matrix_on_cuda():
    cm = ConfusionMatrix(3, device="cuda")
    cm.update(torch.tensor([0, 1, 2], device="cuda"), torch.tensor([0, 2, 255], device="cuda"))
    assert cm.matrix.device.type == "cuda"
    assert cm.matrix.cpu().tolist() == [[1, 0, 0], [0, 0, 0], [0, 1, 0]]
    cpu = ConfusionMatrix(3)
    cpu.update(torch.tensor([0, 1, 2], device="cuda"), torch.tensor([0, 2, 255], device="cuda"))
    assert cpu.matrix.device.type == "cpu" and torch.equal(cpu.matrix, cm.matrix.cpu())


def test_mean_over_steps():
    assert mean_over_steps([0.5, None, 0.7]) == pytest.approx(0.6)
    assert mean_over_steps([None]) is None and mean_over_steps([]) is None
