"""Each setting's role is declared once, in config.py; identity, resume, the demo's reuse and the report's
grouping follow it.  These pin the disagreements the six earlier lists had."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from ilseg.config import (
    EVALUATION,
    LATER_STEPS,
    MODEL,
    PLACEMENT,
    ROLES,
    TRAINING,
    RunConfig,
    load_config,
    preset_dir,
    settings_of,
)
from ilseg.errors import IlsegError
from ilseg.reports.collect import Run, check_comparable
from ilseg.runs.folder import checkpoint_identity, resume_changes


def _replace(cfg: RunConfig, key: str, value: object) -> RunConfig:
    section, name = key.split(".")
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: value})})


def test_every_setting_of_every_section_declares_a_known_role():
    hints = typing.get_type_hints(RunConfig)
    fields = [f"{s}.{f.name}" for s in ("data", "model", "optim", "eval", "runtime")
              for f in dataclasses.fields(hints[s])]
    settings = settings_of()
    assert [s.key for s in settings] == fields
    assert all(s.role in ROLES for s in settings)
    assert all(s.resume for s in settings if s.role == PLACEMENT)
    assert not any(s.resume for s in settings if s.role in (MODEL, EVALUATION))


def test_the_identity_of_a_step_is_its_model_and_training_settings_and_later_steps_add_theirs():
    cfg = load_config(preset_dir() / "synth-demo.yaml")
    zero, one = checkpoint_identity(cfg, 0), checkpoint_identity(cfg, 1)
    assert {s.key for s in settings_of(MODEL, TRAINING)} <= set(zero)
    assert not {s.key for s in settings_of(LATER_STEPS, EVALUATION, PLACEMENT)} & set(zero)
    assert {s.key for s in settings_of(LATER_STEPS)} <= set(one)
    # the earlier lists disagreed on these two: both shape what is learned
    assert "runtime.amp" in zero and "runtime.sync_bn" in zero
    assert zero["method.ce_reduction"] == "valid" and zero["method.joint"] is False
    assert one["method.kind"] == "ilt" and one["method.fd_weight"] == 100.0


@pytest.mark.parametrize("key, value, refused", [
    ("optim.lr_next", 0.5, False), ("runtime.amp", "bf16", False), ("data.workers", 3, False),
    ("runtime.sync_bn", False, True), ("runtime.seed", 1, True), ("data.unseen", "background", True),
    ("model.width", 16, True),
])
def test_a_resumed_run_may_change_what_the_roles_allow(key, value, refused):
    cfg = load_config(preset_dir() / "synth-demo.yaml")
    changed = _replace(cfg, key, value)
    if refused:
        with pytest.raises(IlsegError, match=f"--resume cannot change {key}"):
            resume_changes(cfg, changed)
    else:
        assert resume_changes(cfg, changed) == [key]


def _run(path: str, cfg: RunConfig) -> Run:
    return Run(path=__import__("pathlib").Path(path), config=cfg.to_dict(),
               results={"method": cfg.method.name, "dataset": "synth", "task": "6-2-2", "overlap": False,
                        "order": list(range(11)), "steps": []})


def test_the_report_groups_seeds_and_placement_but_not_precision():
    cfg = load_config(preset_dir() / "synth-demo.yaml")
    runs = [_run("a", cfg), _run("b", _replace(cfg, "runtime.seed", 7)), _run("c", _replace(cfg, "data.root", "x")),
            _run("d", _replace(cfg, "runtime.amp", "bf16")), _run("e", _replace(cfg, "runtime.sync_bn", False))]
    groups: dict[str, list[str]] = {}
    for run in runs:  # what group_runs buckets by
        groups.setdefault(run.identity(), []).append(run.path.name)
    assert list(groups.values()) == [["a", "b", "c"], ["d"], ["e"]]


def test_the_report_refuses_runs_scored_under_different_evaluation_protocols():
    cfg = load_config(preset_dir() / "synth-demo.yaml")
    check_comparable([_run("a", cfg), _run("b", _replace(cfg, "runtime.seed", 3))])
    for key, value in (("data.unseen", "background"), ("data.test_size", 48)):
        with pytest.raises(IlsegError, match=f"different evaluation protocols.*{key}"):
            check_comparable([_run("a", cfg), _run("b", _replace(cfg, key, value))])
