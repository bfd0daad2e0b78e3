"""The informational and data commands of the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ilseg.cli import main
from ilseg.methods import METHOD_PRESETS


def test_tasks_lists_and_shows_steps_by_name(capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert "15-1" in out and "100-50" in out and "6-2-2" in out
    assert main(["tasks", "voc", "15-5s"]) == 0
    out = capsys.readouterr().out
    assert "6 step(s)" in out and "step 5 (1 classes, 21 outputs): 20:tvmonitor" in out
    assert "step 0 (16 classes, 16 outputs): 0:background, 1:aeroplane" in out


def test_methods_and_presets_listing(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in METHOD_PRESETS:
        assert name in out
    assert "100" in out  # the ilt preset's weights are shown
    assert main(["presets"]) == 0
    assert "voc-15-1-ov-ilt" in capsys.readouterr().out


def test_data_synth_then_splits_json(tmp_path, capsys):
    root = tmp_path / "synth"
    assert main(["data", "synth", "--out", str(root), "--num-images", "80", "--size", "32", "--seed", "1"]) == 0
    capsys.readouterr()
    assert main(["splits", "--dataset", "synth", "--root", str(root), "--task", "6-2-2", "--json",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    disjoint = json.loads(capsys.readouterr().out)
    assert disjoint["dataset"] == "synth" and disjoint["task"] == "6-2-2" and disjoint["overlap"] is False
    assert [s["step"] for s in disjoint["steps"]] == [0, 1, 2]
    assert disjoint["steps"][1]["classes"] == ["diamond", "star"]
    assert all(isinstance(s["count"], int) for s in disjoint["steps"])
    assert main(["splits", "--dataset", "synth", "--root", str(root), "--task", "6-2-2", "--overlap", "--json",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    overlap = json.loads(capsys.readouterr().out)
    # overlapped keeps every disjoint image and more (future classes allowed)
    assert all(o["count"] >= d["count"] for o, d in zip(overlap["steps"], disjoint["steps"]))
    assert overlap["steps"][0]["count"] > disjoint["steps"][0]["count"]
    # the last step has no future class: both modes agree
    assert overlap["steps"][2]["count"] == disjoint["steps"][2]["count"]


def test_python_dash_m_entry_point_reports_errors_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "ilseg", "tasks", "voc", "nope"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("ilseg: error: unknown task 'nope'") and "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv", [["data", "synth"], ["train", "--bogus"]])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
