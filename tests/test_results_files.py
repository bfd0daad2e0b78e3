"""Results tables: percentages, nulls, the comparison table."""

from __future__ import annotations

import csv
import io

from ilseg.runs.results import comparison_table, pct, results_csv, results_markdown

RESULTS = {
    "method": "ilt", "dataset": "synth", "task": "6-2-2", "overlap": False, "labels": "current step",
    "mean_miou_over_steps": 0.5,
    "steps": [
        {"step": 0, "classes_seen": 7, "miou_all": 0.7, "miou_old": 0.7, "miou_old_fg": 0.65, "miou_new": None,
         "pixel_accuracy": 0.9, "mean_class_accuracy": 0.8, "iou_per_class": {"background": 0.95, "disc": None}},
        {"step": 1, "classes_seen": 9, "miou_all": 0.3, "miou_old": 0.4, "miou_old_fg": 0.35, "miou_new": 0.123,
         "pixel_accuracy": 0.8, "mean_class_accuracy": 0.5,
         "iou_per_class": {"background": 0.9, "disc": 0.2, "diamond": 0.1}},
    ],
}


def test_pct():
    assert pct(0.1234) == "12.3" and pct(None) == "-" and pct(1.0, 0) == "100"


def test_markdown_has_paper_table_and_per_class_rows():
    md = results_markdown(RESULTS)
    assert "| 0 | 7 | 70.0 | 65.0 | - | 70.0 | 90.0 | 80.0 |" in md
    assert "| 1 | 9 | 40.0 | 35.0 | 12.3 | 30.0 | 80.0 | 50.0 |" in md
    assert "| disc | - | 20.0 |" in md  # absent at step 0 (null), present at step 1
    assert "| diamond |  | 10.0 |" in md  # not a class yet at step 0
    assert "Mean of all-class mIoU over steps: 50.0" in md


def test_csv_one_row_per_step():
    rows = results_csv(RESULTS).strip().splitlines()
    assert rows[0].startswith("step,classes_seen,miou_all")
    assert rows[2].startswith("1,9,0.3,0.4,0.35,0.123")


def test_csv_has_a_column_per_class_empty_before_it_is_learnt():
    rows = list(csv.DictReader(io.StringIO(results_csv(RESULTS))))
    assert list(rows[0])[-3:] == ["iou_background", "iou_disc", "iou_diamond"]
    assert [r["iou_background"] for r in rows] == ["0.95", "0.9"]
    assert [r["iou_disc"] for r in rows] == ["nan", "0.2"]  # absent from the test masks at step 0
    assert [r["iou_diamond"] for r in rows] == ["", "0.1"]  # not a class yet at step 0


def test_comparison_table_uses_the_last_step():
    table = comparison_table([{**RESULTS, "label": "ilt"}])
    assert "| ilt | 6-2-2 | current step | 40.0 | 12.3 | 30.0 | 50.0 |" in table
