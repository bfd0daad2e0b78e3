"""The names of MiB's, PLOP's, RCIL's and cssegmentation's checkpoints: their tensors' keys mapped to ilseg's, and the
task and step their file names record (docs/importing.md).

MiB and PLOP use ilseg's own module names (both descend from the same DeepLab-v3 code), and so does RCIL
(PLOP's code) for what it shares with them; its second branches (``conv2_new``/``bn2_new``,
``map_convs_new``/``map_bn_new``) go to ilseg's :class:`~ilseg.methods.rcil.ParallelBranches`.
cssegmentation's differ by a prefix table.  The body's keys follow :mod:`ilseg.models.pretrained`, which loads ImageNet
weights under the same names.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from ilseg.errors import IlsegError
from ilseg.models.pretrained import (
    iabn_to_torchvision_name,
    torchvision_to_iabn_name,
)
from ilseg.tasks import Task, get_task

FORMATS: tuple[str, ...] = ("mib", "plop", "rcil", "cssegmentation")
TITLES = {"mib": "MiB", "plop": "PLOP", "rcil": "RCIL", "cssegmentation": "cssegmentation"}
# The formats that name their files ``{task}-{dataset}_{name}_{step}.pth`` and their modules as MiB does.
MIB_LIKE: tuple[str, ...] = ("mib", "plop", "rcil")

# Where each format keeps the weights inside the saved dict, in the order looked for.
CONTAINERS: dict[str, tuple[str, ...]] = {
    "mib": ("model_state", "state_dict"),
    "plop": ("model_state", "state_dict"),
    "rcil": ("model_state", "state_dict"),
    "cssegmentation": ("segmentor", "state_dict"),
}
WRAPPER_PREFIX = "module."

# cssegmentation -> ilseg, first match wins.  The names of commit c125175
# (docs/protocol.md#cssegmentation-checkpoints), whose global branch is (conv, BN, identity activation, conv): index 2 holds no tensor.
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

# RCIL's branched modules: (its block module, which branch) -> ilseg's name inside ParallelBranches.
_RCIL_BLOCK = re.compile(r"^(body\.mod\d+\.block\d+\.convs\.)(conv2|bn2)(_new)?\.(.+)$")
_RCIL_HEAD = re.compile(r"^head\.(map_convs|map_bn)(_new)?\.(.+)$")

_OUR_BRANCHES = re.compile(r"^body\.(layer\d\.\d+)\.conv2\.(convs\.0|convs_new\.0|bn|bn_new)\.([^.]+)$")
_OUR_HEAD_BRANCHES = re.compile(r"^head\.map_convs\.0\.(convs|convs_new|bn|bn_new)\.(.+)$")

# MiB and PLOP save ``{task}-{dataset}_{name}_{step}.pth``, e.g. ``15-5s-voc_MiB_0.pth``.
_TOOL_FILE_NAME = re.compile(r"^(?P<task>.+?)-(?P<dataset>[A-Za-z][A-Za-z0-9]*)_(?P<name>.*)_(?P<step>\d+)\.pth$")
# Task names of MiB / PLOP that ilseg spells differently (identity order in both).
_TOOL_TASK_NAMES: dict[tuple[str, str], str] = {("ade", "50"): "50-50"}

@dataclasses.dataclass(frozen=True)
class ToolFileName:
    """What a MiB / PLOP checkpoint's file name says: ``15-5s-voc_MiB_2.pth``."""

    task: str
    dataset: str
    name: str
    step: int


def ilseg_name(key: str, fmt: str) -> str | None:
    """The ilseg model key of a tool's key (``module.`` already stripped), or ``None`` if none.

    ``"body.mod3.block2.convs.bn1.weight"`` (MiB, PLOP) -> ``"body.layer2.1.bn1.weight"``;
    ``"cls.1.bias"`` -> ``"classifiers.1.bias"``; head names are ilseg's already.
    ``"encoder.layer2.1.bn1.weight"`` (cssegmentation) -> ``"body.layer2.1.bn1.weight"``;
    ``"decoder.global_branch.3.weight"`` -> ``"head.pool_red_conv.weight"``;
    ``"convs_cls.1.bias"`` -> ``"classifiers.1.bias"``.  The result may still be a name the
    model does not have (a deeper body, an extra module): the caller checks.
    """
    if fmt == "rcil":
        branched = _rcil_branch_name(key)
        if branched is not None:
            return branched
    if fmt in MIB_LIKE:
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


def _rcil_branch_name(key: str) -> str | None:
    """ilseg's name of one of RCIL's branched tensors, or ``None`` for any other key.

    ``body.mod2.block1.convs.conv2_new.weight`` -> ``body.layer1.0.conv2.convs_new.0.weight``;
    ``body.mod2.block1.convs.bn2.running_mean`` -> ``body.layer1.0.conv2.bn.running_mean``;
    ``head.map_convs_new.3.weight`` -> ``head.map_convs.0.convs_new.3.weight``;
    ``head.map_bn.weight`` -> ``head.map_convs.0.bn.weight``.  The conv biases RCIL adds when it
    folds the branches (``conv2.bias``, ``map_convs.I.bias``) are no model tensors: they go into the
    BN after them (:func:`ilseg.importing.convert.fold_rcil_biases`) before names are looked up.
    """
    block = _RCIL_BLOCK.match(key)
    if block:
        prefix, module, new, attr = block.groups()
        body = iabn_to_torchvision_name(f"{prefix.removeprefix('body.')}{module}.{attr}")
        if body is None:
            return None
        place = body.removesuffix(f".{module}.{attr}")
        inner = ("convs_new.0" if new else "convs.0") if module == "conv2" else ("bn_new" if new else "bn")
        return f"body.{place}.conv2.{inner}.{attr}"
    head = _RCIL_HEAD.match(key)
    if head:
        module, new, rest = head.groups()
        inner = ("convs_new" if new else "convs") if module == "map_convs" else ("bn_new" if new else "bn")
        return f"head.map_convs.0.{inner}.{rest}"
    return None


def tool_name(key: str, fmt: str) -> str:
    """The key a tool would use for ilseg's ``key`` (the inverse of :func:`ilseg_name`), for messages."""
    if fmt == "rcil":
        branched = _OUR_BRANCHES.match(key)
        if branched:
            place, inner, attr = branched.groups()
            module = "conv2" if inner.startswith("convs") else "bn2"
            theirs = torchvision_to_iabn_name(f"{place}.{module}.{attr}")
            new = "_new" if "_new" in inner else ""
            return "body." + theirs.replace(f".{module}.", f".{module}{new}.")
        head = _OUR_HEAD_BRANCHES.match(key)
        if head:
            inner, rest = head.groups()
            return "head." + {"convs": "map_convs.", "convs_new": "map_convs_new.", "bn": "map_bn.",
                              "bn_new": "map_bn_new."}[inner] + rest
    if fmt in MIB_LIKE:
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


def step_hint(path: Path, fmt: str) -> int | None:
    """The step a MiB / PLOP file name gives (``..._2.pth`` -> 2); ``None`` for cssegmentation or other names.

    cssegmentation records its step as ``task_id`` inside the file, read with the weights.
    """
    if fmt not in MIB_LIKE:
        return None
    named = parse_tool_file_name(path)
    return None if named is None else named.step


def check_named_task(path: Path, fmt: str, task: Task) -> str:
    """Check what a MiB / PLOP file name says about the task against ``task``; say how the order was checked.

    The dataset must be the config's.  A task name of the identity class order that ilseg
    knows (``15-5s``, ``19-1``, ``100-50``, ``50`` ...) must give the config's order and step
    sizes; a shuffled one (``15-5s_b``, ``100-50b``) cannot be checked from the file.
    """
    named = parse_tool_file_name(path) if fmt in MIB_LIKE else None
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
