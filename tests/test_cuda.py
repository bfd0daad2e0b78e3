"""What only shows on a GPU: bf16 autocast + channels_last training, a run on CUDA, its checkpoints on the CPU.

Skipped where there is no CUDA device (CI); ``benchmarks/gpu.sh`` runs them
on a lent GPU before its measurements.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from plain import plain_iteration, plain_sgd
from test_plain_vs_fast import assert_fast_update_is_plain

from ilseg.config import RuntimeConfig, load_config, preset_dir
from ilseg.data.synth import generate_synth
from ilseg.engine.loop import train_one_epoch
from ilseg.engine.optim import build_optimizer, poly_schedule
from ilseg.engine.run import evaluate_checkpoint, run_training
from ilseg.methods import METHOD_PRESETS, build_method
from ilseg.models import build_segmenter, copy_for_teacher, fold_batchnorm
from ilseg.placement import Placement

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def _batch(seed: int, classes: int, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(4, 3, size, size, generator=g)
    target = torch.randint(0, classes, (4, size, size), generator=g)
    target[:, :6] = 255
    return images.to(CUDA), target.to(CUDA)


def _models() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    model = build_segmenter(backbone="resnet18", backbone_width=16, head_channels=32, classes_per_step=[5])
    teacher = copy_for_teacher(model)
    model.add_step(2)
    return model.to(CUDA), teacher.to(CUDA)


def _fast(model: torch.nn.Module, teacher: torch.nn.Module, placement: Placement) -> None:
    """What the engine does to the models before training: fold the teacher's BNs, set the layout."""
    fold_batchnorm(teacher)
    if placement.channels_last:
        model.to(memory_format=torch.channels_last)
        teacher.to(memory_format=torch.channels_last)


@pytest.fixture
def strict_fp32():
    """Full fp32 in cuDNN and cuBLAS (no TF32), restored afterwards."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("name", ["finetune", "ilt", "ilt-kd-out"])
def test_channels_last_folded_fused_iteration_on_cuda_makes_the_plain_update(name, strict_fp32):
    """In fp32, the CUDA fast path (channels_last, folded teacher, fused SGD) makes the plain update.

    Placement is held at fp32 so that only the layout, the folding and the
    optimiser are compared; bf16 is the next test's.
    """
    model, teacher = _models()
    assert_fast_update_is_plain(name, model, teacher, _batch(0, 7), Placement(CUDA, amp="none", channels_last=True),
                                loss_rel=1e-4, update_rel=1e-3, update_abs=1e-6)


@pytest.mark.parametrize("name", ["finetune", "ilt", "ilt-kd-out"])
def test_bf16_training_follows_the_fp32_plain_training(name):
    """Fifteen iterations on one batch: the engine's CUDA defaults (bf16 autocast + channels_last) against fp32.

    bf16 keeps about 3 significant digits, and on a randomly initialised
    network the per-layer gradients differ from fp32's by more than that
    (the cosine of one iteration's bf16 and fp32 updates measured 0.77-0.96
    per layer on the CPU and on an H100), so single updates are not compared;
    the losses along the way are, and they stay within a few percent
    (measured within 4%), while a loss computed in the wrong dtype, lost
    gradients or a broken layout would move them apart.
    """
    cfg = METHOD_PRESETS[name]
    needs_teacher = build_method(cfg).needs_teacher
    model, teacher = _models()
    plain_model, plain_teacher = copy.deepcopy(model), copy.deepcopy(teacher)
    placement = Placement.for_runtime(RuntimeConfig(), CUDA)
    assert placement.amp == "bf16" and placement.channels_last
    _fast(model, teacher, placement)
    images, target = _batch(0, 7)
    opt = build_optimizer(model.parameters(), kind="sgd", lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    sched = poly_schedule(opt, 10**6, 0.9)
    plain_opt = plain_sgd(list(plain_model.parameters()), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    fast, plain = [], []
    for _ in range(15):
        progress = train_one_epoch(model=model, teacher=teacher if needs_teacher else None, method=build_method(cfg),
                                   loader=[(images, target)], optimizer=opt, scheduler=sched, scaler=None,
                                   placement=placement, step=1)
        fast.append(progress.sums["loss"])
        plain.append(plain_iteration(plain_model, plain_teacher if needs_teacher else None, cfg, images, target,
                                     plain_opt, 1)["loss"])
    assert fast == pytest.approx(plain, rel=0.1)
    assert fast[-1] == pytest.approx(plain[-1], rel=0.05)
    assert fast[-1] < 0.99 * fast[0] and plain[-1] < 0.99 * plain[0]  # both learned


def test_a_run_on_cuda_trains_evaluates_and_its_checkpoints_load_on_the_cpu(tmp_path: Path):
    root = tmp_path / "synth"
    generate_synth(root, seed=3, num_images=60, size=32, workers=1)
    overrides = [f"data.root={root}", "model.width=8", "model.head_channels=8", "optim.batch_size=4",
                 "optim.epochs=2", "optim.epochs_next=1", "data.crop_size=32", "eval.batch_size=16",
                 "runtime.device=cuda", "method.name=ilt"]
    cfg = load_config(preset_dir() / "synth-demo.yaml", overrides)
    results = run_training(cfg, tmp_path / "run", quiet=True)
    assert [s["step"] for s in results["steps"]] == [0, 1, 2]
    for s in results["steps"]:
        assert 0.0 <= s["miou_all"] <= 100.0
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(line["train/loss"])) for line in lines if "train/loss" in line)
    saved = torch.load(tmp_path / "run" / "step2.pth", map_location="cpu", weights_only=True)
    assert all(t.device.type == "cpu" for t in saved["model"].values() if isinstance(t, torch.Tensor))
    # The same checkpoint scored on the CPU in fp32: the bf16 CUDA evaluation moved few pixels.
    on_cpu = evaluate_checkpoint(cfg, tmp_path / "run" / "step2.pth", device="cpu")
    assert on_cpu["pixel_accuracy"] == pytest.approx(results["steps"][-1]["pixel_accuracy"], abs=1.0)
