"""Import the per-step checkpoints of MiB, PLOP and cssegmentation as an ilseg run folder.

``ilseg import --format mib|plop|cssegmentation FILE... --config PRESET --out RUN`` converts one
checkpoint per step into ``RUN/step{t}.pth`` and ``RUN/config.yaml``: a run folder that
``ilseg eval``, ``ilseg predict`` and ``ilseg train --resume`` / ``--init-from`` use like one
ilseg trained (docs/importing.md).  Every check runs on every file before anything is written.

What a file must hold (REFERENCE-METHODS.md §3):

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
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ilseg.config import RunConfig
from ilseg.engine.checkpoint import save_checkpoint
from ilseg.engine.rundir import (
    CONFIG_FILE,
    LOCK_FILE,
    RunLock,
    checkpoint_identity,
    create_run_dir,
    model_from_config,
    step_checkpoint,
    training_task,
)
from ilseg.errors import IlsegError
from ilseg.fileio import load_failure
from ilseg.methods import build_method
from ilseg.metrics import mean_over_steps
from ilseg.models import IncrementalSegmenter
from ilseg.models.pretrained import iabn_bn_weight, iabn_to_torchvision_name, torchvision_to_iabn_name
from ilseg.report import write_results
from ilseg.tasks import Task, get_task

StateDict = dict[str, torch.Tensor]

FORMATS: tuple[str, ...] = ("mib", "plop", "cssegmentation")
_TITLES = {"mib": "MiB", "plop": "PLOP", "cssegmentation": "cssegmentation"}

# Where each format keeps the weights inside the saved dict, in the order looked for.
_CONTAINERS: dict[str, tuple[str, ...]] = {
    "mib": ("model_state", "state_dict"),
    "plop": ("model_state", "state_dict"),
    "cssegmentation": ("segmentor", "state_dict"),
}
_WRAPPER_PREFIX = "module."

# cssegmentation -> ilseg, first match wins.  The names of commit c125175 (REFERENCE-METHODS.md
# §3.2), whose global branch is (conv, BN, identity activation, conv): index 2 holds no tensor.
_CSS_NAMES: tuple[tuple[str, str], ...] = (
    ("encoder.", "body."),
    ("decoder.parallel_convs.", "head.map_convs."),
    ("decoder.parallel_bn.", "head.map_bn."),
    ("decoder.global_branch.0.", "head.global_pooling_conv."),
    ("decoder.global_branch.1.", "head.global_pooling_bn."),
    ("decoder.global_branch.3.", "head.pool_red_conv."),
    ("decoder.out_project.0.", "head.red_conv."),
    ("decoder.out_project.1.", "head.red_bn."),
    ("convs_cls.", "classifiers."),
)
# The same modules under the names of cssegmentation commit 22d3fc7 (BN + activation wrapped in
# a Sequential, ``bottleneck_*`` for the output projection); looked up before the table above.
_CSS_OLDER_NAMES: tuple[tuple[str, str], ...] = (
    ("decoder.parallel_bn.0.", "head.map_bn."),
    ("decoder.bottleneck_conv.", "head.red_conv."),
    ("decoder.bottleneck_bn.0.", "head.red_bn."),
)

# MiB and PLOP save ``{task}-{dataset}_{name}_{step}.pth``, e.g. ``15-5s-voc_MiB_0.pth``.
_TOOL_FILE_NAME = re.compile(r"^(?P<task>.+?)-(?P<dataset>[A-Za-z][A-Za-z0-9]*)_(?P<name>.*)_(?P<step>\d+)\.pth$")
# Task names of MiB / PLOP that ilseg spells differently (identity order in both).
_TOOL_TASK_NAMES: dict[tuple[str, str], str] = {("ade", "50"): "50-50"}
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


@dataclasses.dataclass(frozen=True)
class ToolFileName:
    """What a MiB / PLOP checkpoint's file name says: ``15-5s-voc_MiB_2.pth``."""

    task: str
    dataset: str
    name: str
    step: int


@dataclasses.dataclass
class ImportedStep:
    """One converted checkpoint: the step it is, where it came from, what was checked."""

    step: int
    source: Path
    model: StateDict
    record: dict[str, Any]  # the checkpoint's "imported" entry


# -- names -------------------------------------------------------------------------------
def ilseg_name(key: str, fmt: str) -> str | None:
    """The ilseg model key of a tool's key (``module.`` already stripped), or ``None`` if none.

    ``"body.mod3.block2.convs.bn1.weight"`` (MiB, PLOP) -> ``"body.layer2.1.bn1.weight"``;
    ``"cls.1.bias"`` -> ``"classifiers.1.bias"``; head names are ilseg's already.
    ``"encoder.layer2.1.bn1.weight"`` (cssegmentation) -> ``"body.layer2.1.bn1.weight"``;
    ``"decoder.global_branch.3.weight"`` -> ``"head.pool_red_conv.weight"``;
    ``"convs_cls.1.bias"`` -> ``"classifiers.1.bias"``.  The result may still be a name the
    model does not have (a deeper body, an extra module): the caller checks.
    """
    if fmt in ("mib", "plop"):
        if key.startswith("body."):
            body = iabn_to_torchvision_name(key.removeprefix("body."))
            return None if body is None else f"body.{body}"
        if key.startswith("head."):
            return key
        if key.startswith("cls."):
            return "classifiers." + key.removeprefix("cls.")
        return None
    if fmt == "cssegmentation":
        for theirs, ours in (*_CSS_OLDER_NAMES, *_CSS_NAMES):
            if key.startswith(theirs):
                return ours + key.removeprefix(theirs)
        return None
    raise IlsegError(f"unknown checkpoint format {fmt!r}; use one of {', '.join(FORMATS)}")


def tool_name(key: str, fmt: str) -> str:
    """The key a tool would use for ilseg's ``key`` (the inverse of :func:`ilseg_name`), for messages."""
    if fmt in ("mib", "plop"):
        if key.startswith("body."):
            return "body." + torchvision_to_iabn_name(key.removeprefix("body."))
        if key.startswith("classifiers."):
            return "cls." + key.removeprefix("classifiers.")
        return key
    for theirs, ours in _CSS_NAMES:
        if key.startswith(ours):
            return theirs + key.removeprefix(ours)
    return key


def parse_tool_file_name(path: Path) -> ToolFileName | None:
    """Task, dataset, run name and step of a MiB / PLOP checkpoint file name, or ``None``.

    >>> parse_tool_file_name(Path("15-5s-voc_MiB_2.pth"))
    ToolFileName(task='15-5s', dataset='voc', name='MiB', step=2)
    """
    match = _TOOL_FILE_NAME.match(path.name)
    if not match:
        return None
    return ToolFileName(match["task"], match["dataset"], match["name"], int(match["step"]))


# -- reading a file --------------------------------------------------------------------------
# numpy scalars (cssegmentation's best_score, a float64 mean): rebuilt from a dtype and raw bytes, no code run.
NUMPY_SCALARS: list[Any] = [np._core.multiarray.scalar, np.dtype,  # type: ignore[attr-defined]
                             *(type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool"))]

def read_tool_checkpoint(path: Path, fmt: str) -> tuple[StateDict, dict[str, Any]]:
    """The weights of one checkpoint (``module.`` stripped) and what else it records.

    Returns ``(weights, info)``; ``info`` holds ``"container"`` (the entry the weights came
    from, or ``None`` for a bare state dict), ``"entries"`` (the other entries that are plain
    numbers or strings: ``epoch``, ``best_score``, ``task_id`` ...) and ``"ignored"`` (the names
    of the rest: optimiser, scheduler, amp ...).
    """
    title = _TITLES[fmt]
    _check_readable_path(path, fmt)
    try:
        with torch.serialization.safe_globals(NUMPY_SCALARS):
            saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated, not a torch file, or pickled objects
        entry = _CONTAINERS[fmt][0]
        raise IlsegError(
            f"{path} cannot be read as a {title} checkpoint ({load_failure(exc)}); ilseg reads tensors only "
            f"(weights_only=True). If the file is one and holds pickled objects besides the weights, and you trust "
            f"it, save the '{entry}' entry alone with the tool's own environment (torch.save of that state dict) "
            "and import that file"
        ) from None
    if not isinstance(saved, Mapping) or not saved:
        raise IlsegError(f"{path} holds no dict of weights, so it is not a {title} checkpoint")
    container = next((k for k in _CONTAINERS[fmt] if isinstance(saved.get(k), Mapping)), None)
    if container is not None:
        weights: Mapping[Any, Any] = saved[container]
    elif all(isinstance(v, torch.Tensor) for v in saved.values()):
        weights = saved  # a bare state dict
    else:
        raise IlsegError(f"{path} is not a {title} checkpoint: it has no "
                         f"{' or '.join(repr(k) for k in _CONTAINERS[fmt])} entry{_other_format_hint(saved, fmt)} "
                         f"(its entries: {', '.join(sorted(map(str, saved)))})")
    bad = sorted(str(k) for k, v in weights.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor))
    if bad:
        raise IlsegError(f"{path}: these entries of {container or 'the state dict'!r} are not tensors: "
                         f"{_listed(bad)}")
    others = {str(k): v.item() if isinstance(v, np.generic) else v for k, v in saved.items() if k != container} \
        if container is not None else {}
    entries = {k: v for k, v in others.items() if v is None or isinstance(v, (bool, int, float, str))}
    info = {"container": container, "entries": entries, "ignored": sorted(k for k in others if k not in entries)}
    return {k.removeprefix(_WRAPPER_PREFIX): v for k, v in weights.items()}, info


def _check_readable_path(path: Path, fmt: str) -> None:
    """Refuse a missing file and cssegmentation's own ``latest.pth`` / ``best.pth`` links (others are followed).

    cssegmentation links ``task_k/latest.pth`` to the text ``<work_dir>/task_k/epoch_e.pth``,
    relative to the folder it was started from, not to the link's own folder
    (REFERENCE-METHODS.md §3.2): followed from anywhere else it finds nothing (or another file).
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
            raise IlsegError(f"model.{setting} {ours} is not {_TITLES[fmt]}'s network ({why}): set "
                             f"model.{setting}={theirs} to import its checkpoints")
    if model.output_stride == 32:
        raise IlsegError(f"model.output_stride 32 has no {_TITLES[fmt]} counterpart (MiB and PLOP build output "
                         "stride 8 or 16, and ilseg's ASPP dilations at 32 are its own): set model.output_stride to "
                         "the stride the checkpoints were trained with (16 in the published runs)")
    if fmt == "cssegmentation" and model.backbone in ("resnet18", "resnet34"):
        raise IlsegError(f"cssegmentation's {model.backbone} does not dilate the second 3x3 conv of its blocks and "
                         "ilseg's does, so the same weights would compute something else at output stride "
                         f"{model.output_stride}; only ResNet-50/101 checkpoints of cssegmentation can be imported")


# -- converting one file -----------------------------------------------------------------------
def convert_checkpoint(path: Path, fmt: str, cfg: RunConfig, step: int) -> ImportedStep:
    """Read ``path`` and convert it to the state dict of ``cfg``'s model at ``step``; refuse any mismatch."""
    weights, info = read_tool_checkpoint(path, fmt)
    imported = _convert(weights, info, path, fmt, cfg, step)
    imported.record["sha256"] = _sha256(path)
    return imported


def _convert(weights: StateDict, info: Mapping[str, Any], path: Path, fmt: str, cfg: RunConfig,
             step: int) -> ImportedStep:
    task = training_task(cfg)
    model = model_from_config(cfg, task.classifier_sizes(step), pretrained=False)
    state = _convert_strictly(weights, model, fmt=fmt, path=path, task=task, step=step)
    model.load_state_dict(state, strict=True)
    record = {
        "format": fmt, "source": str(path.resolve()), "step": step,
        "container": info["container"], "entries": info["entries"], "ignored_entries": info["ignored"],
        "tensors": len(weights), "bn_weights": "InPlace-ABN: stored w, loaded as |w| + eps",
    }
    return ImportedStep(step=step, source=path, model=model.state_dict(), record=record)


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
        raise IlsegError(f"{path} does not fit step {step} of this config's model as a {_TITLES[fmt]} checkpoint: "
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
        cls = "cls" if fmt in ("mib", "plop") else "convs_cls"
        multimodal = len(found) == len(expected) + 1 and found[1:2] == (expected[0] - 1,)
        extra = (" (PLOP's multimodal background, --nb_background_modes, puts a classifier of background modes "
                 "in front, which ilseg has not)" if multimodal and fmt in ("mib", "plop") else "")
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
def step_hint(path: Path, fmt: str) -> int | None:
    """The step a MiB / PLOP file name gives (``..._2.pth`` -> 2); ``None`` for cssegmentation or other names.

    cssegmentation records its step as ``task_id`` inside the file, read with the weights.
    """
    if fmt not in ("mib", "plop"):
        return None
    named = parse_tool_file_name(path)
    return None if named is None else named.step


def check_named_task(path: Path, fmt: str, task: Task) -> str:
    """Check what a MiB / PLOP file name says about the task against ``task``; say how the order was checked.

    The dataset must be the config's.  A task name of the identity class order that ilseg
    knows (``15-5s``, ``19-1``, ``100-50``, ``50`` ...) must give the config's order and step
    sizes; a shuffled one (``15-5s_b``, ``100-50b``) cannot be checked from the file.
    """
    named = parse_tool_file_name(path) if fmt in ("mib", "plop") else None
    if named is None:
        return "the config's, unchecked (the file does not record it)"
    if named.dataset != task.dataset:
        raise IlsegError(f"{path.name} is a checkpoint of dataset {named.dataset!r} (task {named.task}), the config's "
                         f"dataset is {task.dataset!r}: choose the matching --config")
    try:
        theirs = get_task(named.dataset, _TOOL_TASK_NAMES.get((named.dataset, named.task), named.task))
    except IlsegError:
        return f"the config's, unchecked (the file name's task {named.task!r} has an order ilseg does not know)"
    if (theirs.order, theirs.step_sizes) != (task.order, task.step_sizes):
        raise IlsegError(
            f"{path.name} is a checkpoint of {named.dataset} task {named.task} (step sizes {list(theirs.step_sizes)}, "
            f"classes in id order), but the config's task {task.name} has step sizes {list(task.step_sizes)} and "
            f"order {list(task.order)}: choose the --config of that task")
    return f"checked against the file name (task {named.task})"


def _check_steps(steps: Sequence[int], paths: Sequence[Path]) -> None:
    """The steps of the files must be 0..k-1, each once (a run is imported from its step 0 on)."""
    seen: dict[int, Path] = {}
    for step, path in zip(steps, paths, strict=True):
        if step in seen:
            raise IlsegError(f"{seen[step]} and {path} are both step {step}; give one file per step, in step order")
        seen[step] = path
    gaps = [s for s in range(max(steps) + 1) if s not in seen]
    if gaps:
        raise IlsegError(f"no file for step(s) {', '.join(map(str, gaps))}: a run is imported from its step 0 on, "
                         "with every step up to the last one given")


# -- the whole import ---------------------------------------------------------------------------
def import_run(cfg: RunConfig, files: Sequence[Path], out: Path, *, fmt: str, evaluate: bool = False,
               device: str | None = None, log: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Convert ``files`` (one per step) into the run folder ``out``; return a summary.

    Every file is read, converted and checked before ``out`` is created; ``out`` must be a
    new or empty folder.  With ``evaluate``, each step is then scored with ilseg's protocol
    (the test split of ``cfg.data``) and ``results.json`` written, as a trained run has it.
    Returns ``{"steps": [{"step", "source", "class_order"}...], "results": dict or None}``.
    """
    if fmt not in FORMATS:
        raise IlsegError(f"unknown checkpoint format {fmt!r}; use one of {', '.join(FORMATS)}")
    if not files:
        raise IlsegError("give the checkpoint file of each step to import")
    paths = [Path(f) for f in files]
    _check_out(out)
    check_architecture(cfg, fmt)
    task = training_task(cfg)
    orders = [check_named_task(p, fmt, task) for p in paths]
    steps = []
    for position, path in enumerate(paths):  # every file read and checked before anything is written
        weights, info = read_tool_checkpoint(path, fmt)
        hint = step_hint(path, fmt) if fmt != "cssegmentation" else _task_id(info)
        step = position if hint is None else hint
        if step >= task.num_steps:
            raise IlsegError(f"{path} is step {step}, but the config's task {task.dataset} {task.name} has steps "
                             f"0..{task.num_steps - 1}: choose the --config of the file's task")
        _convert(weights, info, path, fmt, cfg, step)
        steps.append(step)
    _check_steps(steps, paths)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with RunLock(out):
            try:
                written = write_imported_steps(cfg, out, fmt, paths, steps, orders, log)
            except BaseException:  # a full disk, a file changed since it was checked, Ctrl-C: leave no half run
                for leftover in out.iterdir():
                    if leftover.name != LOCK_FILE:
                        leftover.unlink()
                raise
            results = evaluate_imported(cfg, out, fmt, written, device=device, log=log) if evaluate else None
    except BaseException:
        if created and not any(p.name != LOCK_FILE for p in out.iterdir()):
            shutil.rmtree(out)
        raise
    return {"steps": written, "results": results}


def write_imported_steps(cfg: RunConfig, out: Path, fmt: str, paths: Sequence[Path], steps: Sequence[int],
                         orders: Sequence[Any], log: Callable[[str], None]) -> list[dict[str, Any]]:
    """``config.yaml`` and each step's ``step{t}.pth`` in the locked, empty ``out``."""
    create_run_dir(cfg, out, overwrite=False)
    written = []
    for path, step, order in sorted(zip(paths, steps, orders, strict=True), key=lambda item: item[1]):
        imported = convert_checkpoint(path, fmt, cfg, step)
        imported.record["class_order"] = order
        save_checkpoint(step_checkpoint(out, step), imported_state(cfg, imported))
        written.append({"step": step, "source": str(path), "class_order": order})
        log(f"step {step}: {path} -> {step_checkpoint(out, step)}; class order: {order}")
    return written


def imported_state(cfg: RunConfig, imported: ImportedStep) -> dict[str, Any]:
    """The ``step{t}.pth`` of an imported step: ilseg's layout, with what is unknown left empty.

    Like :func:`~ilseg.engine.checkpoint.training_state`, whose identity lets ``eval``,
    ``predict``, ``--resume`` and ``--init-from`` accept it; no optimiser, scheduler or scaler
    state (a next step starts its own), no epochs or training time, and no scores (they are
    added by :func:`evaluate_imported`).
    """
    step = imported.step
    return {
        "model": imported.model, "optimizer": None, "scheduler": None, "scaler": None,
        "step": step, "epoch": None, "epochs": None, "train_seconds": None,
        "identity": checkpoint_identity(cfg, step), "config": cfg.to_dict(),
        "imported": dict(imported.record),
    }


def evaluate_imported(cfg: RunConfig, out: Path, fmt: str, written: Sequence[Mapping[str, Any]], *,
                      device: str | None, log: Callable[[str], None]) -> dict[str, Any]:
    """Score every imported step as ``ilseg eval`` does, store the scores in its checkpoint, write the results."""
    from ilseg.engine.checkpoint import load_checkpoint
    from ilseg.engine.run import evaluate_checkpoint, new_results

    method = build_method(cfg.method)
    task = method.training_task(cfg.build_task())
    rows = []
    for item in written:
        step, path = int(item["step"]), step_checkpoint(out, int(item["step"]))
        try:
            scores = evaluate_checkpoint(cfg, path, step=step, device=device)
        except IlsegError as exc:
            raise IlsegError(f"{exc} (the imported run {out} is complete without scores: evaluate it with "
                             f"ilseg eval --run {out} once the data are there)") from None
        row = {
            "step": step, "classes_seen": task.num_outputs(step),
            "new_classes": [task.class_names[c] for c in task.new_classes(step)],
            **{k: v for k, v in scores.items() if k not in ("confusion_matrix", "step", "classes_seen")},
            "num_train_images": None, "epochs": None, "train_seconds": None, "imported_from": item["source"],
        }
        state = load_checkpoint(path)
        save_checkpoint(path, {k: v for k, v in state.items() if k != "format_version"}
                        | {"metrics": row, "confusion_matrix": scores["confusion_matrix"]})
        rows.append(row)
        log(f"step {step}: mIoU all {100 * row['miou_all']:.1f}" if row.get("miou_all") is not None
            else f"step {step}: evaluated")
    results = new_results(cfg, method) | {"steps": rows, "imported": {"format": fmt}}
    results["mean_miou_over_steps"] = mean_over_steps([r["miou_all"] for r in rows])
    write_results(out, results)
    return results


def _task_id(info: Mapping[str, Any]) -> int | None:
    """cssegmentation's ``task_id`` entry (its step), or ``None`` if absent."""
    task_id = info["entries"].get("task_id")
    return task_id if isinstance(task_id, int) and not isinstance(task_id, bool) else None


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise IlsegError(f"--out {out} is a file, not a folder; choose a new folder for the imported run")
    if out.is_dir():
        if (out / CONFIG_FILE).is_file():
            raise IlsegError(f"--out {out} already holds a run; choose a new folder for the imported run")
        if any(not p.name.startswith(".") for p in out.iterdir()):
            raise IlsegError(f"--out {out} exists and is not empty; choose a new or empty folder")
