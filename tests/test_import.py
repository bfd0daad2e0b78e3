"""``ilseg import``: MiB / PLOP / cssegmentation step checkpoints become an ilseg run.

The checkpoints are generated here, with each tool's key names, wrappers and shapes written
out for a thin ResNet-50 DeepLab-v3 (docs/protocol.md#checkpoint-formats), independently of the library's
renaming.  The converted model's forward is compared with a forward computed here from the
original tensors with InPlace-ABN's formula (BN scaled by |w| + eps, LeakyReLU 0.01).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_config, tiny_sets

from ilseg.cli import main
from ilseg.errors import IlsegError
from ilseg.importing.command import import_run
from ilseg.importing.convert import NUMPY_SCALARS
from ilseg.importing.names import parse_tool_file_name
from ilseg.runs.checkpoint import load_checkpoint
from ilseg.runs.folder import load_step_model

WIDTH, HEAD = 4, 8  # thin ResNet-50 body, 8-channel ASPP
BLOCKS = (3, 4, 6, 3)  # ResNet-50
SIZES = (7, 2, 2)  # synth 6-2-2: classifier sizes, background in step 0
EPS = 1e-5  # InPlace-ABN's and BatchNorm's eps
MODEL = ["model.backbone=resnet50", f"model.width={WIDTH}", f"model.head_channels={HEAD}", "model.output_stride=16"]
RESNET50_ONE_EPOCH = [*MODEL, "optim.epochs=1", "optim.epochs_next=1"]


# -- the tools' checkpoints, written out -------------------------------------------------------
def _bn(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{name}": (channels,) for name in ("weight", "bias", "running_mean", "running_var")}


def mib_layout(step: int) -> dict[str, tuple[int, ...]]:
    """MiB's and PLOP's key names (without ``module.``) and shapes of the thin ResNet-50 at ``step``."""
    shapes: dict[str, tuple[int, ...]] = {"body.mod1.conv1.weight": (WIDTH, 3, 7, 7), **_bn("body.mod1.bn1", WIDTH)}
    in_ch = WIDTH
    for stage, blocks in enumerate(BLOCKS):
        mid, out = WIDTH * 2**stage, 4 * WIDTH * 2**stage
        for block in range(1, blocks + 1):
            p = f"body.mod{stage + 2}.block{block}"
            shapes |= {f"{p}.convs.conv1.weight": (mid, in_ch, 1, 1), **_bn(f"{p}.convs.bn1", mid),
                       f"{p}.convs.conv2.weight": (mid, mid, 3, 3), **_bn(f"{p}.convs.bn2", mid),
                       f"{p}.convs.conv3.weight": (out, mid, 1, 1), **_bn(f"{p}.convs.bn3", out)}
            if block == 1:
                shapes |= {f"{p}.proj_conv.weight": (out, in_ch, 1, 1), **_bn(f"{p}.proj_bn", out)}
            in_ch = out
    shapes |= {"head.map_convs.0.weight": (HEAD, in_ch, 1, 1),
               **{f"head.map_convs.{i}.weight": (HEAD, in_ch, 3, 3) for i in (1, 2, 3)},
               **_bn("head.map_bn", 4 * HEAD),
               "head.global_pooling_conv.weight": (HEAD, in_ch, 1, 1), **_bn("head.global_pooling_bn", HEAD),
               "head.red_conv.weight": (HEAD, 4 * HEAD, 1, 1), "head.pool_red_conv.weight": (HEAD, HEAD, 1, 1),
               **_bn("head.red_bn", HEAD)}
    for t in range(step + 1):
        shapes |= {f"cls.{t}.weight": (SIZES[t], HEAD, 1, 1), f"cls.{t}.bias": (SIZES[t],)}
    return shapes


def is_bn_weight(mib_key: str, shape: tuple[int, ...]) -> bool:
    return mib_key.endswith(".weight") and len(shape) == 1


def random_weights(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Values that keep activations in range: He-scaled convs, BN weights of either sign."""
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for key, shape in shapes.items():
        if key.endswith("running_var"):
            value = torch.rand(shape, generator=g) + 0.5
        elif key.endswith(("running_mean", ".bias")):
            value = 0.1 * torch.randn(shape, generator=g)
        elif is_bn_weight(key, shape):  # |w| in [0.5, 1.5], about half negative
            sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
            value = sign * (torch.rand(shape, generator=g) + 0.5)
        else:
            value = torch.randn(shape, generator=g) * math.sqrt(2 / math.prod(shape[1:]))
        weights[key] = value
    return weights


def ilseg_key(mib_key: str) -> str:
    """Where a MiB key must land in ilseg's model (torchvision body names, ``classifiers``)."""
    if mib_key.startswith("body.mod1."):
        return "body." + mib_key.removeprefix("body.mod1.")
    block = re.fullmatch(r"body\.mod(\d)\.block(\d+)\.(.+)", mib_key)
    if block:
        rest = block[3].removeprefix("convs.").replace("proj_conv", "downsample.0").replace("proj_bn", "downsample.1")
        return f"body.layer{int(block[1]) - 1}.{int(block[2]) - 1}.{rest}"
    if mib_key.startswith("cls."):
        return "classifiers." + mib_key.removeprefix("cls.")
    return mib_key


CSS_HEAD = {"head.map_convs.": "decoder.parallel_convs.", "head.map_bn.": "decoder.parallel_bn.",
            "head.global_pooling_conv.": "decoder.global_branch.0.", "head.global_pooling_bn.": "decoder.global_branch.1.",
            "head.pool_red_conv.": "decoder.global_branch.3.", "head.red_conv.": "decoder.out_project.0.",
            "head.red_bn.": "decoder.out_project.1.", "classifiers.": "convs_cls.", "body.": "encoder."}


def css_key(mib_key: str) -> str:
    """cssegmentation's name of a MiB key (docs/protocol.md#cssegmentation-checkpoints)."""
    ours = ilseg_key(mib_key)
    for prefix, theirs in CSS_HEAD.items():
        if ours.startswith(prefix):
            return theirs + ours.removeprefix(prefix)
    raise AssertionError(ours)


def save_tool_checkpoint(path: Path, fmt: str, step: int, seed: int,
                         weights: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Write one step as ``fmt`` saves it; return the weights under MiB's names."""
    weights = random_weights(mib_layout(step), seed) if weights is None else weights
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "cssegmentation":  # inplace-abn >= 1.1.0: every ABN counts its batches
        segmentor = {f"module.{css_key(k)}": v for k, v in weights.items()}
        segmentor |= {f"module.{css_key(k).removesuffix('running_mean')}num_batches_tracked": torch.tensor(123)
                      for k in weights if k.endswith("running_mean")}
        # best_score is numpy's float64 (the mean of its evaluator's IoUs) in every file saved after an evaluation
        torch.save({"cur_epoch": 30, "cur_iter": 900, "best_score": np.float64(0.61), "segmentor": segmentor,
                    "task_id": step,
                    "optimizer": {"state": {}, "param_groups": [{"lr": 0.001, "params": [0, 1]}]},
                    "amp": {"loss_scaler0": {"loss_scale": 65536.0, "unskipped": 0}}}, path)
    else:  # MiB / PLOP: apex DDP's module. prefix, inside model_state; inplace-abn 1.0.7 has no counters
        torch.save({"epoch": 30, "model_state": {f"module.{k}": v for k, v in weights.items()},
                    "optimizer_state": {"state": {0: {"momentum_buffer": torch.zeros(3)}},
                                        "param_groups": [{"lr": 0.001, "params": [0]}]},
                    "scheduler_state": {"last_epoch": 450, "base_lrs": [0.001]}, "best_score": 0.0,
                    "trainer_state": {"regularizer": None}}, path)
    return weights


def load_tool_file(path: Path) -> dict:
    """A file written by save_tool_checkpoint, read as ilseg reads them (tensors and numpy scalars only)."""
    with torch.serialization.safe_globals(NUMPY_SCALARS):
        return torch.load(path, weights_only=True)


def tool_file(folder: Path, fmt: str, step: int) -> Path:
    if fmt == "cssegmentation":
        return folder / "synth-6-2-2" / f"task_{step}" / "epoch_30.pth"
    return folder / f"6-2-2-synth_{fmt.upper()}_{step}.pth"


# -- the InPlace-ABN network, written out ------------------------------------------------------
def iabn(x: torch.Tensor, w: dict[str, torch.Tensor], prefix: str, act: bool = True) -> torch.Tensor:
    """InPlace-ABN in eval mode: ``(x - mean) / sqrt(var + eps) * (|w| + eps) + b``, then LeakyReLU(0.01)."""
    def channel(name: str) -> torch.Tensor:
        return w[f"{prefix}.{name}"][None, :, None, None]

    y = (x - channel("running_mean")) / torch.sqrt(channel("running_var") + EPS) * (channel("weight").abs() + EPS)
    y = y + channel("bias")
    return F.leaky_relu(y, 0.01) if act else y


def reference_forward(w: dict[str, torch.Tensor], x: torch.Tensor, steps: int) -> torch.Tensor:
    """MiB's DeepLab-v3 (models/resnet.py, modules/residual.py, modules/deeplab.py) at output stride 16, eval mode."""
    h = F.max_pool2d(iabn(F.conv2d(x, w["body.mod1.conv1.weight"], stride=2, padding=3), w, "body.mod1.bn1"),
                     3, stride=2, padding=1)
    dilations = (1, 1, 1, 2)
    for stage, blocks in enumerate(BLOCKS):
        d = dilations[stage]
        for block in range(1, blocks + 1):
            p = f"body.mod{stage + 2}.block{block}"
            stride = 2 if d == 1 and block == 1 and stage > 0 else 1
            out = iabn(F.conv2d(h, w[f"{p}.convs.conv1.weight"]), w, f"{p}.convs.bn1")
            out = iabn(F.conv2d(out, w[f"{p}.convs.conv2.weight"], stride=stride, padding=d, dilation=d), w,
                       f"{p}.convs.bn2")
            out = iabn(F.conv2d(out, w[f"{p}.convs.conv3.weight"]), w, f"{p}.convs.bn3", act=False)
            shortcut = (iabn(F.conv2d(h, w[f"{p}.proj_conv.weight"], stride=stride), w, f"{p}.proj_bn", act=False)
                        if block == 1 else h)
            h = F.leaky_relu(out + shortcut, 0.01)
    maps = [F.conv2d(h, w["head.map_convs.0.weight"])]
    maps += [F.conv2d(h, w[f"head.map_convs.{i}.weight"], padding=r, dilation=r) for i, r in ((1, 6), (2, 12), (3, 18))]
    out = F.conv2d(iabn(torch.cat(maps, 1), w, "head.map_bn"), w["head.red_conv.weight"])
    kh, kw = min(32, h.shape[2]), min(32, h.shape[3])
    pool = F.pad(F.avg_pool2d(h, (kh, kw), stride=1),
                 ((kw - 1) // 2, kw - 1 - (kw - 1) // 2, (kh - 1) // 2, kh - 1 - (kh - 1) // 2), mode="replicate")
    pool = iabn(F.conv2d(pool, w["head.global_pooling_conv.weight"]), w, "head.global_pooling_bn")
    out = iabn(out + F.conv2d(pool, w["head.pool_red_conv.weight"]), w, "head.red_bn")
    logits = torch.cat([F.conv2d(out, w[f"cls.{t}.weight"], w[f"cls.{t}.bias"]) for t in range(steps)], 1)
    return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


# -- fixtures ----------------------------------------------------------------------------------
def resnet50_config(root: Path, *extra: str):
    """The tiny run (tests/tiny.py) with the thin ResNet-50 the tools' checkpoints have, one epoch per step."""
    return tiny_config(root, *RESNET50_ONE_EPOCH, *extra)


def cli_config_args(root: Path, *extra: str) -> list[str]:
    """:func:`resnet50_config` as ``ilseg import`` options."""
    return ["--config", "synth-demo", "--set", *tiny_sets(root, *RESNET50_ONE_EPOCH, *extra)]


# -- every tensor lands where it should; the forward is InPlace-ABN's --------------------------
@pytest.mark.parametrize("fmt", ["mib", "plop", "cssegmentation"])
def test_every_tensor_lands_where_it_should(fmt: str, synth_root: Path, tmp_path: Path) -> None:
    cfg = resnet50_config(synth_root)
    files = [tool_file(tmp_path / "tool", fmt, t) for t in range(3)]
    weights = [save_tool_checkpoint(f, fmt, t, seed=10 + t) for t, f in enumerate(files)]
    out = tmp_path / "run"
    summary = import_run(cfg, [files[2], files[0], files[1]], out, fmt=fmt)  # the files say their step
    assert [s["step"] for s in summary["steps"]] == [0, 1, 2] and summary["results"] is None
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "step0.pth", "step1.pth", "step2.pth"]
    for step, original in enumerate(weights):
        state = load_checkpoint(out / f"step{step}.pth")
        model = state["model"]
        assert {k for k in model if not k.endswith("num_batches_tracked")} == {ilseg_key(k) for k in original}
        for key, value in original.items():
            expected = value.abs() + EPS if is_bn_weight(key, tuple(value.shape)) else value
            assert torch.equal(model[ilseg_key(key)], expected), key
        counters = {v.item() for k, v in model.items() if k.endswith("num_batches_tracked")}
        assert counters == ({123} if fmt == "cssegmentation" else {0})  # copied when present, else BN's default
        assert state["step"] == step and state["optimizer"] is None and state["epochs"] is None
        assert "metrics" not in state  # never scored
        record = state["imported"]
        assert record["format"] == fmt and record["source"] == str(files[step].resolve()) and record["step"] == step
        assert len(record["sha256"]) == 64
        if fmt == "cssegmentation":
            assert record["entries"]["task_id"] == step and "optimizer" in record["ignored_entries"]
            assert record["class_order"].startswith("the config's, unchecked")
        else:
            assert record["entries"]["epoch"] == 30 and "optimizer_state" in record["ignored_entries"]
            assert record["class_order"] == "checked against the file name (task 6-2-2)"
        load_step_model(cfg, out / f"step{step}.pth")  # ilseg's own loader accepts it (identity, strict keys)


@pytest.mark.parametrize("fmt", ["mib", "cssegmentation"])
def test_converted_forward_equals_the_inplace_abn_network(fmt: str, synth_root: Path, tmp_path: Path) -> None:
    cfg = resnet50_config(synth_root)
    files = [tool_file(tmp_path / "tool", fmt, t) for t in range(3)]
    weights = [save_tool_checkpoint(f, fmt, t, seed=20 + t) for t, f in enumerate(files)]
    assert any(bool((v < 0).any()) for k, v in weights[2].items() if is_bn_weight(k, tuple(v.shape)))
    import_run(cfg, files, tmp_path / "run", fmt=fmt)
    model, _ = load_step_model(cfg, tmp_path / "run" / "step2.pth")
    torch.manual_seed(0)
    for size in ((64, 64), (80, 48)):
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            ours = model.eval()(x)["logits"]
            theirs = reference_forward(weights[2], x, steps=3)
        assert ours.shape == (2, sum(SIZES), *size)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * float(theirs.abs().max()))


# -- refusals ----------------------------------------------------------------------------------
def _refusal(cfg, files: list[Path], out: Path, fmt: str) -> str:
    with pytest.raises(IlsegError) as info:
        import_run(cfg, files, out, fmt=fmt)
    assert not out.exists()  # refused before anything is written
    return str(info.value)


@pytest.mark.parametrize("fmt", ["mib", "cssegmentation"])
def test_a_missing_and_an_extra_tensor_are_both_named(fmt: str, synth_root: Path, tmp_path: Path) -> None:
    weights = random_weights(mib_layout(0), seed=1)
    del weights["body.mod3.block2.convs.conv2.weight"]
    saved = tool_file(tmp_path, fmt, 0)
    save_tool_checkpoint(saved, fmt, 0, seed=1, weights=weights)
    css = fmt == "cssegmentation"
    missing = "encoder.layer2.1.conv2.weight" if css else "body.mod3.block2.convs.conv2.weight"
    extra = "decoder.extra_conv.weight" if css else "head.extra_conv.weight"
    state = load_tool_file(saved)
    state["segmentor" if css else "model_state"][f"module.{extra}"] = torch.zeros(HEAD, HEAD, 1, 1)
    torch.save(state, saved)
    message = _refusal(resnet50_config(synth_root), [saved], tmp_path / "run", fmt)
    assert str(saved) in message and missing in message and extra in message
    assert "missing tensors" in message and "no counterpart" in message


def test_a_classifier_that_does_not_fit_the_task_is_refused(synth_root: Path, tmp_path: Path) -> None:
    weights = random_weights(mib_layout(0), seed=2)
    weights["cls.0.weight"], weights["cls.0.bias"] = torch.zeros(8, HEAD, 1, 1), torch.zeros(8)
    saved = tool_file(tmp_path, "mib", 0)
    save_tool_checkpoint(saved, "mib", 0, seed=2, weights=weights)
    message = _refusal(resnet50_config(synth_root), [saved], tmp_path / "run", "mib")
    assert "[8] outputs" in message and "has [7]" in message and "step 0 counts background" in message


def test_plop_cosine_classifier_is_refused(synth_root: Path, tmp_path: Path) -> None:
    weights = {k: v for k, v in random_weights(mib_layout(0), seed=3).items() if k != "cls.0.bias"}
    weights["scalar"] = torch.tensor(1.0)
    saved = tool_file(tmp_path, "plop", 0)
    save_tool_checkpoint(saved, "plop", 0, seed=3, weights=weights)
    message = _refusal(resnet50_config(synth_root), [saved], tmp_path / "run", "plop")
    assert "cosine classifier" in message and "cls.0.bias" in message


def test_a_body_of_another_depth_names_both(synth_root: Path, tmp_path: Path) -> None:
    saved = tool_file(tmp_path, "mib", 0)
    save_tool_checkpoint(saved, "mib", 0, seed=4)
    message = _refusal(resnet50_config(synth_root, "model.backbone=resnet101"), [saved], tmp_path / "run", "mib")
    assert "resnet50 (blocks 3/4/6/3, bottleneck, width 4)" in message
    assert "resnet101 (blocks 3/4/23/3" in message and "body.mod4.block7.convs.conv1.weight" in message


def test_cssegmentation_latest_link_says_which_file_to_pass(synth_root: Path, tmp_path: Path) -> None:
    real = tool_file(tmp_path / "launch", "cssegmentation", 0)
    save_tool_checkpoint(real, "cssegmentation", 0, seed=5)
    latest = real.parent / "latest.pth"  # what cssegmentation writes: the path from its launch folder
    latest.symlink_to(Path("synth-6-2-2") / "task_0" / "epoch_30.pth")
    message = _refusal(resnet50_config(synth_root), [latest], tmp_path / "run", "cssegmentation")
    assert "relative to the folder cssegmentation was started from" in message and str(real) in message


@pytest.mark.parametrize("what", ["other-format", "pickled-objects", "non-finite", "gap", "other-task",
                                  "other-dataset", "stride-32", "css-basic-block", "deeplab-v2-head"])
def test_files_and_configs_that_cannot_be_imported_are_refused(what: str, synth_root: Path, tmp_path: Path) -> None:
    fmt, extra, expected = "mib", [], ""
    files = [tool_file(tmp_path, "mib", t) for t in range(2)]
    for t, f in enumerate(files):
        save_tool_checkpoint(f, "mib", t, seed=6 + t)
    if what == "other-format":
        files = [tool_file(tmp_path, "cssegmentation", 0)]
        save_tool_checkpoint(files[0], "cssegmentation", 0, seed=6)
        expected = "use --format cssegmentation"
    elif what == "pickled-objects":  # a fork that also saves its argparse options
        state = load_tool_file(files[0]) | {"opts": argparse.Namespace(lr=0.01)}
        torch.save(state, files[0])
        files, expected = files[:1], "save the 'model_state' entry alone"
    elif what == "non-finite":  # e.g. a run that diverged in its last epoch
        state = load_tool_file(files[0])
        state["model_state"]["module.head.red_bn.running_var"][0] = float("nan")
        torch.save(state, files[0])
        files, expected = files[:1], "non-finite values in: head.red_bn.running_var"
    elif what == "gap":
        files = [files[0], tool_file(tmp_path, "mib", 2)]
        save_tool_checkpoint(files[1], "mib", 2, seed=8)
        expected = "no file for step 1"
    elif what == "other-task":
        files = [files[0].rename(tmp_path / "6-4-synth_MIB_0.pth")]
        expected = "task 6-4 (step sizes [7, 4]"
    elif what == "other-dataset":
        files = [files[0].rename(tmp_path / "15-5s-voc_MIB_0.pth")]
        expected = "dataset 'voc'"
    elif what == "stride-32":
        extra, expected = ["model.output_stride=32"], "model.output_stride 32"
    elif what == "css-basic-block":
        fmt, extra, expected = "cssegmentation", ["model.backbone=resnet18"], "does not dilate the second 3x3 conv"
    elif what == "deeplab-v2-head":
        extra, expected = ["model.head=aspp_v2"], "model.head aspp_v2 is not MiB's network"
    message = _refusal(resnet50_config(synth_root, *extra), files, tmp_path / "run", fmt)
    assert expected in message, message


def test_cssegmentation_older_decoder_names_import_and_a_module_given_twice_is_refused(
        synth_root: Path, tmp_path: Path) -> None:
    saved = tool_file(tmp_path / "tool", "cssegmentation", 0)
    weights = save_tool_checkpoint(saved, "cssegmentation", 0, seed=11)
    state = load_tool_file(saved)
    older = {"decoder.parallel_bn.": "decoder.parallel_bn.0.", "decoder.out_project.0.": "decoder.bottleneck_conv.",
             "decoder.out_project.1.": "decoder.bottleneck_bn.0."}  # cssegmentation commit 22d3fc7
    renamed = {}
    for key, value in state["segmentor"].items():
        new = next((key.replace(a, b) for a, b in older.items() if a in key), key)
        renamed[new] = value
    torch.save(state | {"segmentor": renamed}, saved)
    cfg = resnet50_config(synth_root)
    import_run(cfg, [saved], tmp_path / "run", fmt="cssegmentation")
    model = load_checkpoint(tmp_path / "run" / "step0.pth")["model"]
    assert torch.equal(model["head.red_conv.weight"], weights["head.red_conv.weight"])
    assert torch.equal(model["head.map_bn.weight"], weights["head.map_bn.weight"].abs() + EPS)
    renamed["module.decoder.out_project.0.weight"] = renamed["module.decoder.bottleneck_conv.weight"]
    torch.save(state | {"segmentor": renamed}, saved)
    message = _refusal(cfg, [saved], tmp_path / "run2", "cssegmentation")
    assert "given twice" in message and "decoder.bottleneck_conv.weight" in message


def test_out_must_be_a_new_folder(synth_root: Path, tmp_path: Path) -> None:
    saved = tool_file(tmp_path / "tool", "mib", 0)
    save_tool_checkpoint(saved, "mib", 0, seed=9)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(IlsegError, match="not empty"):
        import_run(resnet50_config(synth_root), [saved], tmp_path / "run", fmt="mib")
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["notes.txt"]


def test_file_names_give_task_dataset_and_step() -> None:
    named = parse_tool_file_name(Path("15-5s_b-voc_PLOP_run_2.pth"))
    assert named is not None and (named.task, named.dataset, named.name, named.step) == ("15-5s_b", "voc", "PLOP_run", 2)
    named = parse_tool_file_name(Path("10-5-5-voc_MiB_0.pth"))
    assert named is not None and (named.task, named.dataset, named.step) == ("10-5-5", "voc", 0)
    assert parse_tool_file_name(Path("epoch_30.pth")) is None


# -- the imported run is an ilseg run ----------------------------------------------------------
def test_imported_run_evaluates_predicts_and_resumes(synth_root: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    files = [tool_file(tmp_path / "tool", "mib", t) for t in range(2)]
    for t, f in enumerate(files):
        save_tool_checkpoint(f, "mib", t, seed=30 + t)
    run = tmp_path / "run"
    assert main(["import", "--format", "mib", *map(str, files), "--out", str(run), *cli_config_args(synth_root)]) == 0
    assert "imported 2 steps of mib" in capsys.readouterr().out
    assert main(["eval", "--run", str(run), "--step", "1", "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["step"] == 1 and scores["classes_seen"] == 9 and 0 <= scores["miou_all"] <= 1
    image = sorted((synth_root / "JPEGImages").glob("*.jpg"))[0]
    assert main(["predict", "--run", str(run), str(image), "--out", str(tmp_path / "pred")]) == 0
    assert (tmp_path / "pred" / f"{image.stem}_mask.png").is_file()
    capsys.readouterr()
    before = [(run / f"step{t}.pth").read_bytes() for t in range(2)]
    assert main(["train", "--resume", str(run), "--quiet"]) == 0  # trains step 2 from the imported step 1
    results = json.loads((run / "results.json").read_text())
    assert [s["step"] for s in results["steps"]] == [2]  # the imported steps were never scored
    assert [(run / f"step{t}.pth").read_bytes() for t in range(2)] == before
    assert load_checkpoint(run / "step2.pth")["metrics"]["classes_seen"] == 11
    assert main(["train", "--resume", str(run), "--quiet"]) == 0  # a finished imported run resumes to nothing


def test_init_from_an_imported_run_and_evaluate_on_import(synth_root: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    saved = tool_file(tmp_path / "tool", "plop", 0)
    save_tool_checkpoint(saved, "plop", 0, seed=40)
    imported = tmp_path / "imported"
    assert main(["import", "--format", "plop", str(saved), "--out", str(imported), "--evaluate",
                 *cli_config_args(synth_root)]) == 0
    row = json.loads((imported / "results.json").read_text())["steps"][0]
    assert row["step"] == 0 and row["imported_from"] == str(saved) and row["epochs"] is None
    assert load_checkpoint(imported / "step0.pth")["metrics"] == row
    capsys.readouterr()
    assert main(["eval", "--run", str(imported), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["miou_all"] == row["miou_all"]
    new = tmp_path / "new"
    assert main(["train", "--init-from", str(imported), "--out", str(new), "--quiet", *cli_config_args(synth_root)]) == 0
    results = json.loads((new / "results.json").read_text())
    assert [s["step"] for s in results["steps"]] == [0, 1, 2]
    assert results["steps"][0]["adopted_from"] == str(imported / "step0.pth")
    assert results["steps"][0]["miou_all"] == row["miou_all"]


def test_init_from_an_unscored_import_scores_step0_and_keeps_its_row(synth_root: Path, tmp_path: Path) -> None:
    saved = tool_file(tmp_path / "tool", "mib", 0)
    save_tool_checkpoint(saved, "mib", 0, seed=50)
    cfg = resnet50_config(synth_root)
    import_run(cfg, [saved], tmp_path / "imported", fmt="mib")
    new = tmp_path / "new"
    assert main(["train", "--init-from", str(tmp_path / "imported"), "--out", str(new), "--steps", "0:2", "--quiet",
                 *cli_config_args(synth_root)]) == 0
    assert "imported" in load_checkpoint(new / "step0.pth")  # the copied file keeps its provenance, no metrics
    assert main(["train", "--resume", str(new), "--quiet"]) == 0  # results rebuilt: step 0's row is kept
    results = json.loads((new / "results.json").read_text())
    assert [s["step"] for s in results["steps"]] == [0, 1, 2] and results["steps"][0]["miou_all"] is not None


def test_cssegmentations_numpy_best_score_is_read_as_a_number(tmp_path: Path) -> None:
    from ilseg.importing.convert import read_tool_checkpoint

    path = tool_file(tmp_path, "cssegmentation", 0)
    save_tool_checkpoint(path, "cssegmentation", 0, seed=7)
    _, info = read_tool_checkpoint(path, "cssegmentation")
    assert info["entries"]["best_score"] == 0.61 and type(info["entries"]["best_score"]) is float
    # other pickled objects are still refused, numpy arrays included
    torch.save({"segmentor": {"module.x": torch.zeros(1)}, "history": np.zeros(3)}, tmp_path / "array.pth")
    with pytest.raises(IlsegError, match="cannot be read as a cssegmentation checkpoint"):
        read_tool_checkpoint(tmp_path / "array.pth", "cssegmentation")


@pytest.mark.parametrize("writer", ["numpy.core.multiarray", "numpy._core.multiarray"], ids=["numpy1", "numpy2"])
def test_a_numpy_scalar_pickled_by_either_numpy_is_read(writer: str, tmp_path: Path) -> None:
    """numpy 1.x pickles a scalar as a call of numpy.core.multiarray.scalar, numpy 2.x of numpy._core...:
    a file written under either is read under the numpy installed here (which lacks one of the paths)."""
    import zipfile

    from ilseg.importing.convert import read_tool_checkpoint

    written = tmp_path / "written.pth"
    torch.save({"segmentor": {"module.x": torch.zeros(1)}, "best_score": np.float64(0.61)}, written)
    path = tmp_path / "epoch_30.pth"
    with zipfile.ZipFile(written) as source, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename.endswith("/data.pkl"):  # the module path as the other numpy writes it
                data = re.sub(rb"numpy\.(_?core)\.multiarray\n", writer.encode() + b"\n", data)
                assert writer.encode() + b"\nscalar\n" in data
            target.writestr(item, data)
    _, info = read_tool_checkpoint(path, "cssegmentation")
    assert info["entries"]["best_score"] == 0.61


def test_a_failure_while_writing_leaves_no_half_imported_run(synth_root: Path, tmp_path: Path, monkeypatch) -> None:
    import ilseg.importing.command as importing

    files = [tool_file(tmp_path / "ckpt", "mib", t) for t in range(3)]
    for t, f in enumerate(files):
        save_tool_checkpoint(f, "mib", t, seed=10 + t)
    real_save, saved = importing.save_checkpoint, []

    def disk_full_on_step_2(path, state):
        if path.name == "step2.pth":
            raise IlsegError(f"cannot write {path}: No space left on device")
        saved.append(path.name)
        return real_save(path, state)

    monkeypatch.setattr(importing, "save_checkpoint", disk_full_on_step_2)
    out = tmp_path / "run"
    with pytest.raises(IlsegError, match="No space left on device"):
        import_run(resnet50_config(synth_root), files, out, fmt="mib")
    assert saved == ["step0.pth", "step1.pth"] and not out.exists()  # what was written is gone with the folder
    monkeypatch.setattr(importing, "save_checkpoint", real_save)
    assert [s["step"] for s in import_run(resnet50_config(synth_root), files, out, fmt="mib")["steps"]] == [0, 1, 2]


def test_a_users_own_relative_link_is_followed(synth_root: Path, tmp_path: Path) -> None:
    real = tool_file(tmp_path, "cssegmentation", 0)
    save_tool_checkpoint(real, "cssegmentation", 0, seed=5)
    link = real.parent / "step0.pth"
    link.symlink_to(real.name)  # relative to the link's own folder, as `ln -s epoch_30.pth step0.pth` makes it
    done = import_run(resnet50_config(synth_root), [link], tmp_path / "run", fmt="cssegmentation")
    assert [s["step"] for s in done["steps"]] == [0]
