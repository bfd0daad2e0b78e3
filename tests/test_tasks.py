"""Incremental protocols: step classes, the disjoint/overlapped filter, label lookup tables."""

from __future__ import annotations

import numpy as np
import pytest

from ilseg.errors import IlsegError
from ilseg.tasks import (
    custom_task,
    eval_lut,
    get_task,
    keep_image,
    step_indices,
    train_lut,
)


# -- step classes ------------------------------------------------------------------
def test_voc_15_1_steps():
    task = get_task("voc", "15-1")
    assert task.num_steps == 6
    assert task.new_classes(0) == tuple(range(16))
    assert [task.new_classes(t) for t in range(1, 6)] == [(16,), (17,), (18,), (19,), (20,)]
    assert task.old_classes(3) == tuple(range(18))
    assert task.future_classes(3) == (19, 20)
    assert task.classifier_sizes(2) == (16, 1, 1)
    assert task.num_outputs(5) == 21


def test_voc_15_5s_is_an_alias_of_15_1():
    alias, canonical = get_task("voc", "15-5s"), get_task("voc", "15-1")
    assert alias.step_sizes == canonical.step_sizes == (16, 1, 1, 1, 1, 1)
    assert alias.order == canonical.order


def test_voc_10_1_19_1_15_5():
    t = get_task("voc", "10-1")
    assert t.num_steps == 11
    assert t.new_classes(0) == tuple(range(11))
    assert t.new_classes(1) == (11,) and t.new_classes(10) == (20,)
    t = get_task("voc", "19-1")
    assert (t.new_classes(0), t.new_classes(1)) == (tuple(range(20)), (20,))
    t = get_task("voc", "15-5")
    assert (t.new_classes(0), t.new_classes(1)) == (tuple(range(16)), (16, 17, 18, 19, 20))
    assert get_task("voc", "offline").new_classes(0) == tuple(range(21))


def test_ade_tasks():
    t = get_task("ade", "100-10")
    assert t.num_steps == 6
    assert t.new_classes(0) == tuple(range(101))
    assert t.new_classes(1) == tuple(range(101, 111))
    assert t.new_classes(5) == tuple(range(141, 151))
    t = get_task("ade", "50-50")
    assert [t.new_classes(s) for s in range(3)] == [tuple(range(51)), tuple(range(51, 101)), tuple(range(101, 151))]


def test_synth_6_2_2():
    t = get_task("synth", "6-2-2")
    assert [t.new_classes(s) for s in range(3)] == [tuple(range(7)), (7, 8), (9, 10)]
    assert t.channel_names(1)[-2:] == ("diamond", "star")


def test_custom_shuffled_order():
    order = [0, 20, 19, 18, 17, 16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1]
    t = get_task("voc", "15-1", order=order)
    assert t.new_classes(0) == tuple(order[:16])
    assert t.new_classes(1) == (5,)
    assert t.new_classes(5) == (1,)
    named = custom_task("synth", "mine", ["star", "disc", 3, "ring"], [3, 2])
    assert named.order == (0, 8, 1, 3, 4)
    assert named.new_classes(1) == (3, 4)


def test_unknown_task_and_bad_orders():
    with pytest.raises(IlsegError, match="unknown task '7-3'"):
        get_task("voc", "7-3")
    with pytest.raises(IlsegError, match="unknown dataset"):
        get_task("coco", "15-1")
    with pytest.raises(IlsegError, match="repeats"):
        get_task("synth", "x", order=[0, 1, 1, 2], step_sizes=[2, 2])
    with pytest.raises(IlsegError, match="start with background"):
        get_task("synth", "x", order=[1, 0, 2], step_sizes=[2, 1])
    with pytest.raises(IlsegError, match="steps 0..5"):
        get_task("voc", "15-1").new_classes(6)


# -- the image filter ---------------------------------------------------------------
# voc 15-1, step 1: new {16}, old {0..15}, future {17..20}.
FILTER_CASES = [
    # classes in the mask           disjoint  overlap
    ({0}, False, False),                      # only background
    ({255}, False, False),                    # only ignore
    ({0, 255}, False, False),
    ({0, 5}, False, False),                   # only an old class
    ({0, 17}, False, False),                  # only a future class
    ({16}, True, True),                       # the new class alone
    ({0, 16, 255}, True, True),
    ({0, 5, 16}, True, True),                 # new + old
    ({0, 16, 17}, False, True),               # new + future
    ({0, 3, 16, 20, 255}, False, True),
]


@pytest.mark.parametrize("classes, disjoint, overlap", FILTER_CASES)
def test_keep_image_step1(classes, disjoint, overlap):
    task = get_task("voc", "15-1")
    assert keep_image(classes, task, 1, "disjoint") is disjoint
    assert keep_image(classes, task, 1, "overlap") is overlap


def test_keep_image_step0_and_last():
    task = get_task("voc", "15-1")
    assert keep_image({0, 15}, task, 0, "disjoint")
    assert not keep_image({0, 15, 20}, task, 0, "disjoint")
    assert keep_image({0, 15, 20}, task, 0, "overlap")
    assert not keep_image({0, 16}, task, 0, "overlap")
    assert not keep_image({0}, task, 0, "overlap")  # background alone is not a "new" class
    # At the last step nothing is in the future: both modes agree.
    assert keep_image({0, 3, 16, 19, 20}, task, 5, "disjoint")
    assert keep_image({0, 3, 16, 19, 20}, task, 5, "overlap")


def test_keep_image_custom_order_future_classes():
    # synth order 0,10,9,...,1 in steps (7,2,2): step 1 learns 4 and 3; 2 and 1 are future.
    task = get_task("synth", "x", order=[0, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1], step_sizes=[7, 2, 2])
    assert keep_image({0, 10, 4}, task, 1, "disjoint")
    assert not keep_image({0, 4, 1}, task, 1, "disjoint")
    assert keep_image({0, 4, 1}, task, 1, "overlap")
    assert not keep_image({0, 6, 1}, task, 1, "overlap")


def test_step_indices_and_bad_mode():
    task = get_task("voc", "15-1")
    sets = [case[0] for case in FILTER_CASES]
    assert step_indices(sets, task, 1, "disjoint") == [5, 6, 7]
    assert step_indices(sets, task, 1, "overlap") == [5, 6, 7, 8, 9]
    with pytest.raises(IlsegError, match="unknown mode"):
        keep_image({16}, task, 1, "both")  # type: ignore[arg-type]


# -- label lookup tables --------------------------------------------------------------
def test_train_lut_background_shift():
    task = get_task("voc", "15-1")
    lut = train_lut(task, 1)
    assert lut.dtype == np.uint8 and lut.shape == (256,)
    assert lut[16] == 16                      # new class keeps its channel
    assert lut[5] == 0 and lut[0] == 0        # old class -> background
    assert lut[17] == 0 and lut[20] == 0      # future class -> background
    assert lut[255] == 255                    # ignore stays ignored
    assert lut[21] == 255                     # not a VOC class
    kept = train_lut(task, 1, keep_old=True)
    assert kept[5] == 5 and kept[16] == 16 and kept[17] == 0
    step0 = train_lut(task, 0)
    assert step0[15] == 15 and step0[16] == 0 and step0[0] == 0


def test_test_lut_unseen_classes():
    task = get_task("voc", "15-1")
    ignore = eval_lut(task, 1)
    assert ignore[16] == 16 and ignore[5] == 5 and ignore[0] == 0
    assert ignore[17] == 255 and ignore[255] == 255
    background = eval_lut(task, 1, unseen="background")
    assert background[17] == 0 and background[16] == 16
    ade = eval_lut(get_task("ade", "100-50"), 0, ignore_background=True)
    assert ade[0] == 255 and ade[100] == 100 and ade[101] == 255
    with pytest.raises(IlsegError):
        eval_lut(task, 1, unseen="drop")  # type: ignore[arg-type]


def test_luts_follow_a_custom_order():
    task = get_task("synth", "x", order=[0, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1], step_sizes=[7, 2, 2])
    tl = train_lut(task, 1)
    assert (tl[4], tl[3]) == (7, 8)           # channels 7, 8 stand for classes 4, 3
    assert tl[10] == 0 and tl[1] == 0         # old and future -> background
    ev = eval_lut(task, 1)
    assert (ev[10], ev[5], ev[3]) == (1, 6, 8)
    assert ev[2] == 255 and ev[1] == 255
    mask = np.array([[10, 4], [1, 255]], dtype=np.uint8)
    assert tl[mask].tolist() == [[0, 7], [0, 255]]
