"""Import the per-step checkpoints of MiB, PLOP and cssegmentation as an ilseg run folder.

``ilseg import --format mib|plop|cssegmentation FILE... --config PRESET --out RUN`` converts one
checkpoint per step into ``RUN/step{t}.pth`` and ``RUN/config.yaml``: a run folder that
``ilseg eval``, ``ilseg predict`` and ``ilseg train --resume`` / ``--init-from`` use like one
ilseg trained (docs/importing.md).  Every check runs on every file before anything is written.

What a file must hold (docs/protocol.md#checkpoint-formats):

* **wrappers**: the weights sit in ``model_state`` (MiB, PLOP), ``segmentor`` (cssegmentation)
  or ``state_dict``; the other entries (optimiser, scheduler, epoch, scores, amp ...) are not
  weights: scalars among them are recorded, the rest ignored.  DDP's ``module.`` prefix is
  stripped.  Files are read with ``weights_only=True``, as every file ilseg reads;
* **names**: every tensor maps to exactly one tensor of the config's model
  (:func:`ilseg_name`), and every tensor of the model comes from the file, with the same
  shape.  Anything else is refused, every offending key listed in one :class:`IlsegError`
  naming the file.  Only BatchNorm ``num_batches_tracked`` counters may be missing
  (inplace-abn 1.0.7, MiB and PLOP) or extra;
* **values**: all three tools normalise with InPlace-ABN, in the body *and* the head, which
  scales by ``|w| + eps`` where BatchNorm scales by ``w``: every BN weight is stored as
  :func:`~ilseg.models.pretrained.iabn_bn_weight` of the file's, so that ilseg's BN + LeakyReLU
  computes what InPlace-ABN computed.  Everything else is copied unchanged (as float32);
* **classes**: classifier ``t`` must have the size of step ``t`` of the config's task (step 0
  counts background).  MiB and PLOP name their files ``{task}-{dataset}_{name}_{step}.pth``;
  when the file name gives a task of the identity class order (``15-5s``, ``100-50`` ...), the
  config's task must have the same order and step sizes.  Otherwise the weights cannot tell
  the class order, and the config's is recorded as unchecked;
* **model**: MiB's and PLOP's DeepLab-v3 is ilseg's (same names, strides, dilations, eval-mode
  pooling of the ASPP, LeakyReLU(0.01)), so is cssegmentation's for its bottleneck ResNets.
  What does not match is refused with the reason (:func:`check_architecture`).

The step of each file is the one its name (MiB, PLOP) or its ``task_id`` (cssegmentation)
records, else its position on the command line; the steps must be 0, 1, ... without a gap.
An imported step records where it came from (``"imported"``) and leaves what it cannot know
empty: no optimiser, no epochs, no training time, and no scores unless ``evaluate``.

Example::

    >>> cfg = load_config(resolve_config_path("voc-15-1-disjoint-mib"))  # doctest: +SKIP
    >>> import_run(cfg, [Path("checkpoints/step/15-5s-voc_MiB_0.pth"), ...], Path("runs/mib-15-1"),
    ...            fmt="mib")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ilseg.config import RunConfig
from ilseg.errors import IlsegError
from ilseg.fileio import load_failure, quiet_pickle_warnings
from ilseg.importing.names import (
    CONTAINERS,
    MIB_LIKE,
    TITLES,
    WRAPPER_PREFIX,
    ilseg_name,
    tool_name,
)
from ilseg.models import IncrementalSegmenter
from ilseg.models.pretrained import (
    iabn_bn_weight,
)
from ilseg.runs.folder import (
    model_from_config,
    training_task,
)
from ilseg.tasks import Task

StateDict = dict[str, torch.Tensor]

# -- reading a file --------------------------------------------------------------------------
# numpy scalars (cssegmentation's best_score, a float64 mean): rebuilt from a dtype and raw bytes, no code run.
# A pickled scalar names numpy's rebuilding function by the path of the numpy that wrote the file:
# `numpy.core.multiarray.scalar` (numpy 1.x) or `numpy._core.multiarray.scalar` (numpy 2.x).  torch's
# weights_only loader matches that text, so both names are allowed, mapped to the function of the
# numpy installed here (found through a scalar's own pickling, as neither path exists in every
# numpy); the dtype classes are matched by identity.
_NUMPY_SCALAR_FUNCTION: Any = np.float64(0.0).__reduce__()[0]
NUMPY_SCALARS: list[Any] = [
    *((_NUMPY_SCALAR_FUNCTION, f"{module}.scalar") for module in ("numpy.core.multiarray", "numpy._core.multiarray")),
    np.dtype, *(type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")),
]

_CLASSIFIER_WEIGHT = re.compile(r"^classifiers\.(\d+)\.weight$")
_BODY_BLOCK = re.compile(r"^body\.layer([1-4])\.(\d+)\.")
_RESNET_LAYOUTS = {((2, 2, 2, 2), False): "resnet18", ((3, 4, 6, 3), False): "resnet34",
                   ((3, 4, 6, 3), True): "resnet50", ((3, 4, 23, 3), True): "resnet101"}
_MAX_LISTED = 20  # keys listed per kind of problem in one error message
# Model settings whose value must be that of the three tools' network, and why.  Read with a
# default: a config without the setting has only that value.
_TOOL_MODEL: tuple[tuple[str, str, str], ...] = (
    ("head", "aspp", "their head is DeepLab-v3's ASPP followed by one 1x1 classifier per step"),
    ("stride_on", "3x3", "their ResNets stride on the 3x3 conv"),
    ("activation", "leaky_relu", "InPlace-ABN activates with LeakyReLU(0.01)"),
)


@dataclasses.dataclass
class ImportedStep:
    """One converted checkpoint: the step it is, where it came from, what was checked."""

    step: int
    source: Path
    model: StateDict
    record: dict[str, Any]  # the checkpoint's "imported" entry


# -- names -------------------------------------------------------------------------------
def read_tool_checkpoint(path: Path, fmt: str) -> tuple[StateDict, dict[str, Any]]:
    """The weights of one checkpoint (``module.`` stripped) and what else it records.

    Returns ``(weights, info)``; ``info`` holds ``"container"`` (the entry the weights came
    from, or ``None`` for a bare state dict), ``"entries"`` (the other entries that are plain
    numbers or strings: ``epoch``, ``best_score``, ``task_id`` ...) and ``"ignored"`` (the names
    of the rest: optimiser, scheduler, amp ...).
    """
    title = TITLES[fmt]
    _check_readable_path(path, fmt)
    try:
        with torch.serialization.safe_globals(NUMPY_SCALARS), quiet_pickle_warnings():
            saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated, not a torch file, or pickled objects
        entry = CONTAINERS[fmt][0]
        raise IlsegError(
            f"{path} cannot be read as a {title} checkpoint ({load_failure(exc, path)}); ilseg reads tensors only "
            f"(weights_only=True). If the file is one and holds pickled objects besides the weights, and you trust "
            f"it, save the '{entry}' entry alone with the tool's own environment (torch.save of that state dict) "
            "and import that file"
        ) from None
    if not isinstance(saved, Mapping) or not saved:
        raise IlsegError(f"{path} holds no dict of weights, so it is not a {title} checkpoint")
    container = next((k for k in CONTAINERS[fmt] if isinstance(saved.get(k), Mapping)), None)
    if container is not None:
        weights: Mapping[Any, Any] = saved[container]
    elif all(isinstance(v, torch.Tensor) for v in saved.values()):
        weights = saved  # a bare state dict
    else:
        raise IlsegError(f"{path} is not a {title} checkpoint: it has no "
                         f"{' or '.join(repr(k) for k in CONTAINERS[fmt])} entry{_other_format_hint(saved, fmt)} "
                         f"(its entries: {', '.join(sorted(map(str, saved)))})")
    bad = sorted(str(k) for k, v in weights.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor))
    if bad:
        raise IlsegError(f"{path}: these entries of {container or 'the state dict'!r} are not tensors: "
                         f"{_listed(bad)}")
    others = {str(k): v.item() if isinstance(v, np.generic) else v for k, v in saved.items() if k != container} \
        if container is not None else {}
    entries = {k: v for k, v in others.items() if v is None or isinstance(v, (bool, int, float, str))}
    info = {"container": container, "entries": entries, "ignored": sorted(k for k in others if k not in entries)}
    return {k.removeprefix(WRAPPER_PREFIX): v for k, v in weights.items()}, info


def _check_readable_path(path: Path, fmt: str) -> None:
    """Refuse a missing file and cssegmentation's own ``latest.pth`` / ``best.pth`` links (others are followed).

    cssegmentation links ``task_k/latest.pth`` to the text ``<work_dir>/task_k/epoch_e.pth``,
    relative to the folder it was started from, not to the link's own folder
    (docs/protocol.md#cssegmentation-checkpoints): followed from anywhere else it finds nothing (or another file).
    """
    if fmt == "cssegmentation" and path.is_symlink() and path.name in ("latest.pth", "best.pth"):
        target = os.readlink(path)
        if not os.path.isabs(target):
            beside = path.parent / Path(target).name
            hint = f" ({beside})" if beside.is_file() else f" (the link names {Path(target).name})"
            raise IlsegError(
                f"{path} is a symbolic link to {target!r}, a path relative to the folder cssegmentation was "
                f"started from (it writes latest.pth and best.pth that way), so it cannot be followed from here: "
                f"pass the epoch_*.pth file it names instead{hint}")
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise IlsegError(f"checkpoint {path} {what}; give the .pth file of each step")


def _other_format_hint(saved: Mapping[Any, Any], fmt: str) -> str:
    if fmt != "cssegmentation" and "segmentor" in saved:
        return "; its 'segmentor' entry is how cssegmentation saves: use --format cssegmentation"
    if fmt == "cssegmentation" and "model_state" in saved:
        return "; its 'model_state' entry is how MiB and PLOP save: use --format mib or --format plop"
    return ""


# -- architecture -------------------------------------------------------------------------------
def check_architecture(cfg: RunConfig, fmt: str) -> None:
    """Refuse a config whose model computes something else than the tool's with the same weights.

    * output stride 32: MiB and PLOP build 8 or 16 only, and ilseg's ASPP dilations at 32
      (3, 6, 9) are none of the tools';
    * cssegmentation with ResNet-18/34 at output stride 8 or 16: its BasicBlock dilates the
      first 3x3 conv of a dilated stage but not the second (encoders/resnet.py), ilseg's (and
      MiB's) dilate both.  Its published models are ResNet-101;
    * another head than DeepLab-v3's ASPP, a ResNet that strides on the 1x1 conv, or ReLU
      instead of LeakyReLU(0.01) (:data:`_TOOL_MODEL`).
    """
    model = cfg.model
    for setting, theirs, why in _TOOL_MODEL:
        ours = getattr(model, setting, theirs)
        if ours != theirs:
            raise IlsegError(f"model.{setting} {ours} is not {TITLES[fmt]}'s network ({why}): set "
                             f"model.{setting}={theirs} to import its checkpoints")
    if model.output_stride == 32:
        raise IlsegError(f"model.output_stride 32 has no {TITLES[fmt]} counterpart (MiB and PLOP build output "
                         "stride 8 or 16, and ilseg's ASPP dilations at 32 are its own): set model.output_stride to "
                         "the stride the checkpoints were trained with (16 in the published runs)")
    if fmt == "rcil":
        _check_rcil_method(cfg)
    if fmt == "cssegmentation" and model.backbone in ("resnet18", "resnet34"):
        raise IlsegError(f"cssegmentation's {model.backbone} does not dilate the second 3x3 conv of its blocks and "
                         "ilseg's does, so the same weights would compute something else at output stride "
                         f"{model.output_stride}; only ResNet-50/101 checkpoints of cssegmentation can be imported")


def _check_rcil_method(cfg: RunConfig) -> None:
    """An RCIL checkpoint needs an RCIL config: its model has the parallel branches and no stem activation."""
    from ilseg.methods.rcil import RCILConfig  # the method that shapes the model

    method = cfg.method
    if not isinstance(method, RCILConfig):
        raise IlsegError(f"RCIL checkpoints hold RCIL's parallel branches, which only a config of method rcil builds "
                         f"(this one's is {method.name!r}): use an RCIL preset, e.g. --config voc-15-1-ov-rcil")
    if method.stem_activation:
        raise IlsegError("RCIL's code has no activation after the stem's BN (its InPlace-ABN layers have slope 1): "
                         "set method.stem_activation=false to import its checkpoints")


# -- converting one file -----------------------------------------------------------------------
def convert_checkpoint(path: Path, fmt: str, cfg: RunConfig, step: int) -> ImportedStep:
    """Read ``path`` and convert it to the state dict of ``cfg``'s model at ``step``; refuse any mismatch."""
    weights, info = read_tool_checkpoint(path, fmt)
    imported = convert_weights(weights, info, path, fmt, cfg, step)
    imported.record["sha256"] = _sha256(path)
    return imported


def convert_weights(weights: StateDict, info: Mapping[str, Any], path: Path, fmt: str, cfg: RunConfig,
             step: int) -> ImportedStep:
    task = training_task(cfg)
    model = model_from_config(cfg, task.classifier_sizes(step), pretrained=False)
    if fmt == "rcil":
        weights = fold_rcil_biases(weights, path)
    state = _convert_strictly(weights, model, fmt=fmt, path=path, task=task, step=step)
    model.load_state_dict(state, strict=True)
    record = {
        "format": fmt, "source": str(path.resolve()), "step": step,
        "container": info["container"], "entries": info["entries"], "ignored_entries": info["ignored"],
        "tensors": len(weights), "bn_weights": "InPlace-ABN: stored w, loaded as |w| + eps",
    }
    return ImportedStep(step=step, source=path, model=model.state_dict(), record=record)


def fold_rcil_biases(weights: StateDict, path: Path) -> StateDict:
    """RCIL's conv biases moved into the BN after each conv: ``BN(Kx + b)`` with running mean ``m`` is
    ``BN(Kx)`` with running mean ``m - b``, exactly.

    RCIL's code folds its two branches into the first at the start of every step > 0 and gives that
    conv a bias (run.py ``convert_model``): ``body.*.convs.conv2.bias`` before ``convs.bn2``, and
    ``head.map_convs.I.bias`` before slice ``I`` of ``head.map_bn``.  ilseg's folded branch keeps its
    bias in the BN (:meth:`~ilseg.methods.rcil.ParallelBranches.merge_into_first`), so the biases move
    there and the keys go; nothing else changes.
    """
    out = dict(weights)
    for key in [k for k in weights if k.endswith(".bias")]:
        if key.startswith("body.") and key.endswith(".convs.conv2.bias"):
            targets = [(key.removesuffix("conv2.bias") + "bn2.running_mean", slice(None))]
        elif key.startswith("head.map_convs.") and key.count(".") == 3:
            index = int(key.split(".")[2])
            size = weights[key].shape[0]
            targets = [("head.map_bn.running_mean", slice(index * size, (index + 1) * size))]
        else:
            continue
        for mean_key, part in targets:
            mean = out.get(mean_key)
            if mean is None or mean[part].shape != weights[key].shape:
                raise IlsegError(f"{path}: {key} has no BatchNorm of its size after it ({mean_key}); the file is no "
                                 "RCIL checkpoint of this layout")
            mean = mean.clone()
            mean[part] -= weights[key].to(mean.dtype)
            out[mean_key] = mean
        del out[key]
    return out


def _convert_strictly(weights: StateDict, model: IncrementalSegmenter, *, fmt: str, path: Path, task: Task,
                      step: int) -> StateDict:
    """Rename, check against ``model`` (all problems in one error), convert BN weights."""
    own = model.state_dict()
    renamed: StateDict = {}
    origin: dict[str, str] = {}
    unmapped: list[str] = []
    duplicates: list[str] = []
    named: StateDict = {}  # every tensor that has an ilseg name, in the model or not (for the hint)
    for key, value in weights.items():
        name = ilseg_name(key, fmt)
        if name is not None:
            named[name] = value
        if name is None or name not in own:
            if not key.endswith(".num_batches_tracked"):  # an extra counter is tolerated
                unmapped.append(key if name is None or name == key else f"{key} (-> {name})")
            continue
        if name in renamed:
            duplicates.append(f"{origin[name]} and {key} (-> {name})")
            continue
        renamed[name], origin[name] = value, key
    missing = [k for k in own if k not in renamed and not k.endswith(".num_batches_tracked")]
    mismatched = [f"{origin[k]}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in renamed.items() if v.shape != own[k].shape]
    non_finite = [origin[k] for k, v in renamed.items() if v.is_floating_point() and not bool(v.isfinite().all())]
    parts = _model_hints(named, own, unmapped, missing, mismatched, model)
    parts += _classifier_problems(weights, named, fmt=fmt, task=task, step=step)
    if unmapped:
        parts.append(f"tensors with no counterpart in ilseg's model: {_listed(sorted(unmapped))}")
    if missing:
        parts.append(f"missing tensors: {_listed([f'{tool_name(k, fmt)} (-> {k})' for k in missing])}")
    if mismatched:
        parts.append(f"shape mismatches: {_listed(sorted(mismatched))}")
    if duplicates:
        parts.append(f"tensors given twice: {_listed(duplicates)}")
    if non_finite:
        parts.append(f"non-finite values in: {_listed(sorted(non_finite))}")
    if parts:
        raise IlsegError(f"{path} does not fit step {step} of this config's model as a {TITLES[fmt]} checkpoint: "
                         + "; ".join(parts))
    state: StateDict = {}
    for key, target in own.items():
        loaded = renamed.get(key)
        state[key] = target.clone() if loaded is None else loaded.to(dtype=target.dtype).clone()
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
            state[f"{name}.weight"] = iabn_bn_weight(state[f"{name}.weight"], module.eps)
    return state


def _classifier_problems(weights: StateDict, named: StateDict, *, fmt: str, task: Task, step: int) -> list[str]:
    """The file's classifier sizes against the task's step sizes, and PLOP's classifiers ilseg has not."""
    problems = []
    if "scalar" in weights:
        problems.append("it has PLOP's cosine classifier ('scalar', --cosine), which ilseg's 1x1 classifiers "
                        "cannot compute")
    indices = sorted(int(m[1]) for k in named if (m := _CLASSIFIER_WEIGHT.match(k)))
    found = tuple(int(named[f"classifiers.{i}.weight"].shape[0]) for i in indices)
    expected = task.classifier_sizes(step)
    if found != expected:
        cls = "cls" if fmt in MIB_LIKE else "convs_cls"
        multimodal = len(found) == len(expected) + 1 and found[1:2] == (expected[0] - 1,)
        extra = (" (PLOP's multimodal background, --nb_background_modes, puts a classifier of background modes "
                 "in front, which ilseg has not)" if multimodal and fmt in MIB_LIKE else "")
        problems.append(f"its classifiers {cls}.* have {list(found)} outputs, but step {step} of {task.dataset} "
                        f"{task.name} has {list(expected)} (step 0 counts background){extra}: check the file's step "
                        "and the config's task (data.task, data.class_order, data.step_sizes)")
    return problems


def _model_hints(named: StateDict, own: StateDict, unmapped: list[str], missing: list[str],
                 mismatched: list[str], model: IncrementalSegmenter) -> list[str]:
    """Which model setting differs from the file's, when the body or the head does not fit."""
    hints = []
    if any(k.startswith(("body.", "encoder.")) for k in [*unmapped, *missing, *mismatched]):
        theirs, ours = _describe_body(named), _describe_body(own)
        if theirs != ours:
            hints.append(f"the file's body is {theirs}, the config's (model.backbone, model.width) is {ours}")
    red_conv = named.get("head.red_conv.weight")
    if red_conv is not None and red_conv.shape[0] != model.head_channels:
        hints.append(f"the file's ASPP head has {red_conv.shape[0]} channels, the config's model.head_channels is "
                     f"{model.head_channels}")
    return hints


def _describe_body(state: Mapping[str, torch.Tensor]) -> str:
    """``"resnet101 (blocks 3/4/23/3, bottleneck, width 64)"`` from a state dict's body keys."""
    blocks = [0, 0, 0, 0]
    for key in state:
        match = _BODY_BLOCK.match(key)
        if match:
            stage = int(match[1]) - 1
            blocks[stage] = max(blocks[stage], int(match[2]) + 1)
    bottleneck = any(".conv3." in k for k in state if k.startswith("body."))
    stem = state.get("body.conv1.weight")
    width = f", width {stem.shape[0]}" if stem is not None else ""
    name = _RESNET_LAYOUTS.get(((blocks[0], blocks[1], blocks[2], blocks[3]), bottleneck), "a ResNet")
    kind = "bottleneck" if bottleneck else "basic blocks"
    return f"{name} (blocks {'/'.join(map(str, blocks))}, {kind}{width})"


def _listed(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" (and {len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -- steps and class order ---------------------------------------------------------------------
