"""``ilseg import --format rcil``: RCIL's checkpoints (MiB's names plus the second branches and the conv biases its
fold adds) land in ilseg's branched model, which then computes what RCIL's network computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_import import (
    BLOCKS,
    EPS,
    HEAD,
    SIZES,
    _bn,
    _refusal,
    iabn,
    is_bn_weight,
    mib_layout,
    random_weights,
    resnet50_config,
    save_tool_checkpoint,
    tool_file,
)

from ilseg.importing.command import import_run
from ilseg.importing.names import ilseg_name
from ilseg.methods.rcil import parallel_branches
from ilseg.runs.checkpoint import load_checkpoint
from ilseg.runs.folder import load_step_model


def rcil_layout(step: int) -> dict[str, tuple[int, ...]]:
    """RCIL's keys and shapes of the thin ResNet-50: MiB's, each block's and the head's second branch, and from
    step 1 on the biases of the folded first branches (run.py ``convert_model``)."""
    shapes = mib_layout(step)
    for key, shape in list(shapes.items()):
        if ".convs.conv2." in key:
            shapes[key.replace(".conv2.", ".conv2_new.")] = shape
            if step > 0:
                shapes[key.replace(".weight", ".bias")] = (shape[0],)
        elif key.startswith("head.map_convs."):
            shapes[key.replace("map_convs", "map_convs_new")] = shape
            if step > 0:
                shapes[key.replace(".weight", ".bias")] = (shape[0],)
    for stage, blocks in enumerate(BLOCKS):
        for block in range(1, blocks + 1):
            shapes |= _bn(f"body.mod{stage + 2}.block{block}.convs.bn2_new", shapes[
                f"body.mod{stage + 2}.block{block}.convs.bn2.weight"][0])
    return shapes | _bn("head.map_bn_new", 4 * HEAD)


def _iabn(x: torch.Tensor, w: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """RCIL's InPlace-ABN: slope 1, no activation."""
    return iabn(x, w, prefix, act=False)


def rcil_forward(w: dict[str, torch.Tensor], x: torch.Tensor, steps: int) -> torch.Tensor:
    """RCIL's network (models/resnet.py, modules/residual.py, modules/deeplab.py) at output stride 16, eval mode:
    no activation after the stem, explicit LeakyReLUs in the blocks and head, the two branches averaged."""
    h = F.max_pool2d(_iabn(F.conv2d(x, w["body.mod1.conv1.weight"], stride=2, padding=3), w, "body.mod1.bn1"),
                     3, stride=2, padding=1)
    dilations = (1, 1, 1, 2)
    for stage, blocks in enumerate(BLOCKS):
        d = dilations[stage]
        for block in range(1, blocks + 1):
            p = f"body.mod{stage + 2}.block{block}.convs"
            stride = 2 if d == 1 and block == 1 and stage > 0 else 1
            out = F.leaky_relu(_iabn(F.conv2d(h, w[f"{p}.conv1.weight"]), w, f"{p}.bn1"), 0.01)
            first = _iabn(F.conv2d(out, w[f"{p}.conv2.weight"], w.get(f"{p}.conv2.bias"), stride=stride, padding=d,
                                   dilation=d), w, f"{p}.bn2")
            second = _iabn(F.conv2d(out, w[f"{p}.conv2_new.weight"], stride=stride, padding=d, dilation=d), w,
                           f"{p}.bn2_new")
            out = F.leaky_relu(first * 0.5 + second * 0.5, 0.01)
            out = _iabn(F.conv2d(out, w[f"{p}.conv3.weight"]), w, f"{p}.bn3")
            q = f"body.mod{stage + 2}.block{block}"
            shortcut = _iabn(F.conv2d(h, w[f"{q}.proj_conv.weight"], stride=stride), w, f"{q}.proj_bn") \
                if block == 1 else h
            h = F.leaky_relu(out + shortcut, 0.01)

    def aspp(name: str) -> torch.Tensor:
        maps = [F.conv2d(h, w[f"head.{name}.0.weight"], w.get(f"head.{name}.0.bias"))]
        maps += [F.conv2d(h, w[f"head.{name}.{i}.weight"], w.get(f"head.{name}.{i}.bias"), padding=r, dilation=r)
                 for i, r in ((1, 6), (2, 12), (3, 18))]
        return torch.cat(maps, 1)

    mixed = _iabn(aspp("map_convs"), w, "head.map_bn") * 0.5 + _iabn(aspp("map_convs_new"), w, "head.map_bn_new") * 0.5
    out = F.conv2d(F.leaky_relu(mixed, 0.01), w["head.red_conv.weight"])
    kh, kw = min(32, h.shape[2]), min(32, h.shape[3])
    pool = F.pad(F.avg_pool2d(h, (kh, kw), stride=1),
                 ((kw - 1) // 2, kw - 1 - (kw - 1) // 2, (kh - 1) // 2, kh - 1 - (kh - 1) // 2), mode="replicate")
    pool = F.leaky_relu(_iabn(F.conv2d(pool, w["head.global_pooling_conv.weight"]), w, "head.global_pooling_bn"), 0.01)
    out = F.leaky_relu(_iabn(out + F.conv2d(pool, w["head.pool_red_conv.weight"]), w, "head.red_bn"), 0.01)
    logits = torch.cat([F.conv2d(out, w[f"cls.{t}.weight"], w[f"cls.{t}.bias"]) for t in range(steps)], 1)
    return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _rcil_files(folder: Path, seed: int) -> tuple[list[Path], list[dict[str, torch.Tensor]]]:
    files = [tool_file(folder, "rcil", t) for t in range(3)]
    weights = [save_tool_checkpoint(f, "rcil", t, seed=seed + t, weights=random_weights(rcil_layout(t), seed + t))
               for t, f in enumerate(files)]
    return files, weights


def test_rcil_names_land_in_the_branches():
    assert ilseg_name("body.mod2.block1.convs.conv2_new.weight", "rcil") == "body.layer1.0.conv2.convs_new.0.weight"
    assert ilseg_name("body.mod5.block3.convs.bn2.running_var", "rcil") == "body.layer4.2.conv2.bn.running_var"
    assert ilseg_name("body.mod3.block2.convs.bn2_new.weight", "rcil") == "body.layer2.1.conv2.bn_new.weight"
    assert ilseg_name("head.map_convs_new.2.weight", "rcil") == "head.map_convs.0.convs_new.2.weight"
    assert ilseg_name("head.map_bn.bias", "rcil") == "head.map_convs.0.bn.bias"
    assert ilseg_name("body.mod2.block1.convs.conv1.weight", "rcil") == "body.layer1.0.conv1.weight"
    assert ilseg_name("head.red_bn.weight", "rcil") == "head.red_bn.weight"
    assert ilseg_name("cls.2.bias", "rcil") == "classifiers.2.bias"


def test_an_imported_rcil_run_computes_rcils_network(synth_root: Path, tmp_path: Path) -> None:
    cfg = resnet50_config(synth_root, "method.name=rcil")
    files, weights = _rcil_files(tmp_path / "tool", seed=40)
    import_run(cfg, files, tmp_path / "run", fmt="rcil")
    for step in (0, 2):  # without and with the folded branches' conv biases
        state = load_checkpoint(tmp_path / "run" / f"step{step}.pth")
        assert state["imported"]["format"] == "rcil"
        assert state["model"]["body.layer1.0.conv2.bn_new.weight"].equal(
            weights[step]["body.mod2.block1.convs.bn2_new.weight"].abs() + EPS)
        model, _ = load_step_model(cfg, tmp_path / "run" / f"step{step}.pth")
        assert sum(1 for _ in parallel_branches(model)) == sum(BLOCKS) + 1
        torch.manual_seed(0)
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            ours = model.eval()(x)["logits"]
            theirs = rcil_forward(weights[step], x, steps=step + 1)
        assert ours.shape == (2, sum(SIZES[:step + 1]), 64, 64)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * float(theirs.abs().max()))
    assert any(bool((v < 0).any()) for k, v in weights[2].items() if is_bn_weight(k, tuple(v.shape)))


@pytest.mark.parametrize("what", ["not-rcil-config", "stem-activation", "mib-file"])
def test_rcil_checkpoints_need_an_rcil_config_and_rcil_files(what: str, synth_root: Path, tmp_path: Path) -> None:
    files, _ = _rcil_files(tmp_path / "tool", seed=50)
    if what == "not-rcil-config":
        message = _refusal(resnet50_config(synth_root, "method.name=plop"), files, tmp_path / "run", "rcil")
        assert "only a config of method rcil builds" in message and "voc-15-1-ov-rcil" in message
    elif what == "stem-activation":
        cfg = resnet50_config(synth_root, "method.name=rcil", "method.stem_activation=true")
        assert "method.stem_activation=false" in _refusal(cfg, files, tmp_path / "run", "rcil")
    else:  # a MiB file has no second branches: every missing one is named
        mib = [tool_file(tmp_path / "mib", "rcil", t) for t in range(3)]
        for t, f in enumerate(mib):
            save_tool_checkpoint(f, "rcil", t, seed=60 + t)
        message = _refusal(resnet50_config(synth_root, "method.name=rcil"), mib, tmp_path / "run", "rcil")
        assert "missing tensors" in message and "conv2_new" in message
