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

from ilseg.config import RuntimeConfig, load_config, preset_dir
from ilseg.data.synth import generate_synth
from ilseg.engine.loop import Precision, build_optimizer, poly_schedule, train_one_epoch
from ilseg.engine.plain import plain_iteration, plain_sgd
from ilseg.engine.run import evaluate_checkpoint, run_training
from ilseg.methods import METHOD_PRESETS, Method
from ilseg.models import build_segmenter, copy_for_teacher, fold_batchnorm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def _batch(seed: int, classes: int, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(4, 3, size, size, generator=g)
    target = torch.randint(0, classes, (4, size, size), generator=g)
    target[:, :6] = 255
    return images.to(CUDA), target.to(CUDA)


@pytest.mark.parametrize("name", ["finetune", "ilt", "ilt-kd-out"])
def test_bf16_channels_last_iteration_follows_the_fp32_plain_one(name):
    """The engine's CUDA path (bf16 autocast, channels_last, folded teacher, fused SGD) against plain fp32.

    bf16 rounds to about 3 significant digits, so equality is out of reach:
    the losses agree to a few percent and every weight moves the same way
    (the cosine of the two updates near 1), which a wrong layout, a
    mis-folded teacher or a loss computed on the wrong dtype would break.
    """
    cfg = METHOD_PRESETS[name]
    needs_teacher = Method(cfg).needs_teacher
    torch.manual_seed(0)
    model = build_segmenter(backbone="resnet18", backbone_width=16, head_channels=32, classes_per_step=[5])
    teacher = copy_for_teacher(model)
    model.add_step(2)
    model.to(CUDA)
    teacher.to(CUDA)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    plain_model, plain_teacher = copy.deepcopy(model), copy.deepcopy(teacher)
    precision = Precision.for_runtime(RuntimeConfig(), CUDA)
    assert precision.amp == "bf16" and precision.channels_last
    fold_batchnorm(teacher)
    model.to(memory_format=torch.channels_last)
    teacher.to(memory_format=torch.channels_last)
    batch = [_batch(0, 7)]
    opt = build_optimizer(model.parameters(), kind="sgd", lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    progress = train_one_epoch(model=model, teacher=teacher if needs_teacher else None, method=Method(cfg),
                               loader=batch, optimizer=opt, scheduler=poly_schedule(opt, 10, 0.9), scaler=None,
                               precision=precision, step=1)
    plain_opt = plain_sgd(list(plain_model.parameters()), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    values = plain_iteration(plain_model, plain_teacher if needs_teacher else None, cfg, *batch[0], plain_opt, 1)
    assert progress.sums.keys() == values.keys()
    for key, plain_value in values.items():
        assert progress.sums[key] == pytest.approx(plain_value, rel=0.05, abs=1e-3), key
    fast_state, plain_state = model.state_dict(), plain_model.state_dict()
    for key, plain_value in plain_state.items():
        if not plain_value.is_floating_point() or plain_value.numel() < 64:
            continue
        fast_update = (fast_state[key] - start[key]).flatten().double()
        plain_update = (plain_value - start[key]).flatten().double()
        if plain_update.norm() == 0:
            assert fast_update.norm() == 0, key  # frozen or untouched in both
            continue
        cosine = torch.nn.functional.cosine_similarity(fast_update, plain_update, dim=0)
        assert cosine > 0.95, f"{name} {key}: cosine {float(cosine):.3f}"


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
