"""The demo command end to end (quick mode: one epoch per step; slow)."""

from __future__ import annotations

import json

import pytest

from ilseg.cli import main
from ilseg.demo import DEMO_METHODS


@pytest.mark.slow
def test_demo_quick_runs_every_method_and_prints_the_table(tmp_path, capsys):
    assert main(["demo", "--quick", "--quiet", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    table = (tmp_path / "comparison-quick.md").read_text()
    for name in DEMO_METHODS:
        assert f"| {name} |" in table and f"| {name} |" in out
        results = json.loads((tmp_path / "runs-quick" / name / "results.json").read_text())
        assert results["method"] == name
        assert results["steps"][-1]["classes_seen"] == 11
    # every incremental method reused the fine-tuning run's step-0 model
    ilt = json.loads((tmp_path / "runs-quick" / "ilt" / "results.json").read_text())
    assert ilt["steps"][0]["adopted_from"].endswith("finetune/step0.pth")
    assert (tmp_path / "data" / "synth" / "ilseg_synth.json").is_file()
    # the demo ends with the report of its runs
    assert "report-quick/report.html" in out
    report = json.loads((tmp_path / "report-quick" / "report.json").read_text())
    assert [g["label"] for g in report["groups"]] == list(DEMO_METHODS)
    assert (tmp_path / "report-quick" / "miou_by_step.png").is_file()
    # a second run reuses the data and the finished runs instead of training again
    assert main(["demo", "--quick", "--quiet", "--out", str(tmp_path)]) == 0
    assert "already complete" in (tmp_path / "runs-quick" / "ilt" / "train.log").read_text()
