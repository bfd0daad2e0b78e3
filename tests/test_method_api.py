"""The open method API: a method defined in this file alone trains, keeps state across steps and resumes;
run folders written before the API (commit 1fd8de5, ``tests/data/legacy-runs``) still load."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tiny import InterruptAt, tiny_config
from torch import Tensor

from ilseg.config import config_from_dict
from ilseg.data.synth import generate_synth
from ilseg.engine.run import evaluate_checkpoint, run_training
from ilseg.errors import IlsegError
from ilseg.methods import ILT, METHOD_PRESETS, Method, MethodConfig, build_method, register_method
from ilseg.methods.base import POSITIVE, weighted_total
from ilseg.runs.checkpoint import load_checkpoint
from ilseg.runs.folder import read_run_config

LEGACY = Path(__file__).parent / "data" / "legacy-runs"


# -- a method written here, registered here, and nowhere else -----------------------------------
@dataclasses.dataclass(frozen=True)
class CountingKDConfig(MethodConfig):
    """Output distillation at a fixed temperature, plus a pull of the head's output towards the teacher's."""

    temperature: float = dataclasses.field(default=2.0, metadata=POSITIVE)
    weight: float = 1.0


class CountingKD(Method):
    """Counts the batches it has seen, per step, as state kept across steps."""

    config_class = CountingKDConfig
    cfg: CountingKDConfig

    def __init__(self, cfg: MethodConfig) -> None:
        super().__init__(cfg)
        self.batches: dict[int, int] = {}

    @property
    def needs_teacher(self) -> bool:
        return True

    def taps(self, step: int) -> tuple[str, ...]:
        return ("head",) if step > 0 else ()

    def loss(self, student: Mapping[str, Any], teacher: Mapping[str, Any] | None, target: Tensor,
             step: int) -> dict[str, Tensor]:
        self.batches[step] = self.batches.get(step, 0) + 1
        ce = self.cross_entropy(student["logits"], target)
        if teacher is None:
            return {"ce": ce, "loss": ce}
        t = self.cfg.temperature
        old = teacher["logits"].shape[1]
        kd = F.kl_div(F.log_softmax(student["logits"][:, :old] / t, dim=1),
                      F.softmax(teacher["logits"].float() / t, dim=1), reduction="batchmean")
        head = (student["taps"]["head"] - teacher["taps"]["head"]).pow(2).mean()
        return weighted_total({"ce": ce, "kd": kd, "head": head}, {"kd": self.cfg.weight, "head": 0.1})

    def state_dict(self) -> dict[str, Any]:
        return {"batches": {str(step): count for step, count in self.batches.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.batches = {int(step): int(count) for step, count in state.get("batches", {}).items()}


@pytest.fixture
def counting_kd(method_registry) -> None:
    """``counting-kd`` registered for one test (the registry is restored after it: no other test sees it)."""
    register_method("counting-kd", CountingKD, {"counting-kd": CountingKDConfig(name="counting-kd")})


def test_a_method_defined_in_a_test_file_trains_three_steps_keeps_its_state_and_resumes(synth_root, tmp_path,
                                                                                         counting_kd):
    cfg = tiny_config(synth_root, "optim.epochs=1", "optim.epochs_next=2", "method.name=counting-kd",
                      "method.temperature=3", cache_dir=tmp_path / "cache")
    assert cfg.method == CountingKDConfig(name="counting-kd", temperature=3.0)
    whole = tmp_path / "whole"
    results = run_training(cfg, whole, quiet=True)
    assert [s["step"] for s in results["steps"]] == [0, 1, 2]
    counts = [load_checkpoint(whole / f"step{t}.pth")["method_state"]["batches"] for t in range(3)]
    assert counts[0] == {"0": counts[2]["0"]} and set(counts[2]) == {"0", "1", "2"}  # kept across steps
    assert counts[2]["1"] == counts[1]["1"] and all(n > 0 for n in counts[2].values())
    identity = load_checkpoint(whole / "step2.pth")["identity"]
    assert identity["method.kind"] == "counting-kd" and identity["method.temperature"] == 3.0
    assert (whole / "config.yaml").read_text().count("temperature: 3.0") == 1

    # interrupted at the start of step 1's second epoch, then resumed: the same weights and the same counts
    broken = tmp_path / "broken"
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, broken, quiet=True, callbacks=InterruptAt(step=1, epoch=1))
    assert load_checkpoint(broken / "last.pth")["method_state"]["batches"] == {"0": counts[0]["0"],
                                                                               "1": counts[1]["1"] // 2}
    run_training(cfg, broken, quiet=True, resume=True)
    for t in range(3):
        a, b = load_checkpoint(whole / f"step{t}.pth"), load_checkpoint(broken / f"step{t}.pth")
        assert a["method_state"] == b["method_state"]
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), t


def test_registering_refuses_a_taken_name_or_a_config_of_another_class(counting_kd):
    with pytest.raises(IlsegError, match="taken"):
        register_method("ilt", CountingKD, {})
    with pytest.raises(IlsegError, match="taken"):
        register_method("counting-kd", ILT, {})
    with pytest.raises(IlsegError, match="CountingKDConfig"):
        register_method("counting-kd", CountingKD, {"other": METHOD_PRESETS["ilt"]})
    with pytest.raises(IlsegError, match="temperature must be > 0"):
        CountingKDConfig(name="x", temperature=0.0)


# -- run folders of ilseg 0.1 ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def legacy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic data the legacy runs were trained on (same seed, count and size)."""
    root = tmp_path_factory.mktemp("legacy-synth")
    generate_synth(root, seed=3, num_images=40, size=32, workers=1)
    return root


def _legacy_run(name: str, tmp_path: Path, root: Path) -> tuple[Path, Any]:
    run = tmp_path / name
    shutil.copytree(LEGACY / name, run)
    return run, read_run_config(run, [f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}"])


@pytest.mark.parametrize("name", ["finetune", "ilt", "ilt-kd-out", "mib", "plop", "joint"])
def test_a_run_folder_of_ilseg_0_1_reads_and_its_checkpoints_evaluate_to_their_recorded_scores(
        name, tmp_path, legacy_root):
    run, cfg = _legacy_run(name, tmp_path, legacy_root)
    assert cfg.method == METHOD_PRESETS[name]  # the flat section read into the method's own config
    step = 0 if name == "joint" else 1
    recorded = load_checkpoint(run / f"step{step}.pth")["metrics"]
    scores = evaluate_checkpoint(cfg, run / f"step{step}.pth")
    assert scores["miou_all"] == pytest.approx(recorded["miou_all"], abs=1e-9)


def test_a_run_of_ilseg_0_1_resumes_with_this_version(tmp_path, legacy_root):
    run, cfg = _legacy_run("ilt", tmp_path, legacy_root)
    results = run_training(cfg, run, resume=True, quiet=True)
    assert [s["step"] for s in results["steps"]] == [0, 1, 2]
    assert load_checkpoint(run / "step2.pth")["identity"]["method.kind"] == "ilt"


def test_a_checkpoint_of_ilseg_0_1_is_still_refused_by_a_run_with_other_settings(tmp_path, legacy_root):
    run, cfg = _legacy_run("ilt", tmp_path, legacy_root)
    other = dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, fd_weight=50.0))
    with pytest.raises(IlsegError, match="method.fd_weight: checkpoint has 100.0, this run has 50.0"):
        evaluate_checkpoint(other, run / "step1.pth")


def test_a_flat_method_section_that_the_method_cannot_express_is_refused():
    section = {"name": "ilt", "unbiased_ce": True, "kd": "mib", "kd_weight": 100.0}
    with pytest.raises(IlsegError, match="unbiased_ce = True"):
        config_from_dict({"method": section})
    assert config_from_dict({"method": {"name": "ilt", "kd": "mib"}}).method.kd == "ilt_mib_code"
    assert build_method(METHOD_PRESETS["ilt"]).identity(1)["kind"] == "ilt"
