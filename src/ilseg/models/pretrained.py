"""Loading ImageNet weights into the ResNet body, strictly.

Three sources, all mapped onto torchvision's names (``conv1``, ``bn1``,
``layer1`` .. ``layer4``, ``downsample.0/.1``):

* ``"imagenet"``: torchvision's own weights (ResNet-50/101 ``IMAGENET1K_V2``,
  ResNet-18/34 ``IMAGENET1K_V1``), read from the torch hub cache
  (``torch.hub.get_dir()/checkpoints/``) and downloaded there if absent;
* a local torchvision-format ``.pth`` state dict (``fc.*`` ignored);
* MiB's InPlace-ABN checkpoint ``resnet101_iabn_sync.pth.tar``, recognised by
  its ``mod1..mod5`` keys, see :func:`load_iabn_checkpoint`.

InPlace-ABN does not scale by its stored BatchNorm weight ``w`` but by
``|w| + eps`` (mapillary/inplace_abn, ``src/inplace_abn_cpu.cpp``,
``forward_cpu``: ``abs_weight = weight.abs() + eps``, ``inv_std = 1 /
sqrt(var + eps)``, ``y = (x - mean) * abs_weight * inv_std + bias``, one
``eps``, the layer's; inplace_abn issue 180 tells users deploying with standard
BN to replace every weight by its absolute value).  So when reading that
format each BN ``weight`` becomes ``|w| + eps`` (:func:`iabn_bn_weight`),
which makes our plain ``nn.BatchNorm2d`` compute what InPlace-ABN computed,
also for the channels whose stored weight is negative.  Conv weights, BN biases and running
statistics are copied unchanged; torchvision-format files are never converted.

Every load is strict: a missing or unexpected key (apart from the ImageNet
classifier, which is dropped on purpose, and BN ``num_batches_tracked``
counters, which these files may lack) or a shape mismatch raises
:class:`IlsegError` listing all of them.

Example::

    >>> body = ResNet(101)
    >>> load_pretrained(body, "pretrained/resnet101_iabn_sync.pth.tar")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import re
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torchvision.models as tvm
from torch import nn

from ilseg.errors import IlsegError
from ilseg.fileio import load_failure, quiet_pickle_warnings

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

# ``module.`` prefixes left by DataParallel / DistributedDataParallel.
_WRAPPER_PREFIX = "module."
_TORCHVISION_IGNORED = ("fc.",)
_IABN_IGNORED = ("classifier.",)

# InPlace-ABN's default (and MiB's) BatchNorm epsilon; it enters both
# ``sqrt(var + eps)`` and the scale ``|w| + eps``.  Equal to nn.BatchNorm2d's
# default eps, so a default-built body computes the same normalisation.
IABN_EPS = 1e-5

_IABN_STEM = re.compile(r"^mod1\.(conv1|bn1)\.(\w+)$")
_IABN_BLOCK = re.compile(r"^mod([2-5])\.block(\d+)\.(?:convs\.(conv[123]|bn[123])|(proj_conv|proj_bn))\.(\w+)$")
_OURS_BLOCK = re.compile(r"^layer([1-4])\.(\d+)\.(?:(conv[123]|bn[123])|downsample\.([01]))\.(\w+)$")


def _imagenet_weights(depth: int) -> tvm.WeightsEnum:
    table: dict[int, tvm.WeightsEnum] = {
        18: tvm.ResNet18_Weights.IMAGENET1K_V1,
        34: tvm.ResNet34_Weights.IMAGENET1K_V1,
        50: tvm.ResNet50_Weights.IMAGENET1K_V2,
        101: tvm.ResNet101_Weights.IMAGENET1K_V2,
    }
    if depth not in table:
        raise IlsegError(f"no torchvision ImageNet weights for a ResNet of depth {depth!r}")
    return table[depth]


def imagenet_cache_path(depth: int) -> Path:
    """Where the torch hub cache keeps torchvision's ImageNet weights for ``depth``."""
    url = _imagenet_weights(depth).url
    filename = os.path.basename(urllib.parse.urlparse(url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def load_pretrained(model_body: nn.Module, pretrained: str | os.PathLike[str]) -> None:
    """Load ``"imagenet"`` or a local checkpoint file (format detected) into ``model_body``.

    ``model_body`` is a :class:`ilseg.models.backbone.ResNet`.  A file whose
    keys start with ``mod1.`` (after an optional ``module.``) is read as
    InPlace-ABN format, anything else as a torchvision state dict.
    """
    if str(pretrained) == "imagenet":
        load_imagenet_weights(model_body)
        return
    path = Path(pretrained)
    state_dict = _read_state_dict(path)
    if _is_iabn(state_dict):
        _load_iabn_state_dict(state_dict, model_body, source=str(path))
    else:
        _load_torchvision_state_dict(state_dict, model_body, source=str(path))


def load_imagenet_weights(model_body: nn.Module) -> None:
    """Load torchvision's ImageNet weights for ``model_body.depth`` from the hub cache.

    Downloads into the cache if the file is absent; if that fails, raises
    :class:`IlsegError` naming the file and the folder to put it in.
    """
    depth = int(getattr(model_body, "depth", 0))
    weights = _imagenet_weights(depth)
    cached = imagenet_cache_path(depth)
    if not cached.is_file():
        logger.info("downloading %s to %s", weights.url, cached.parent)
    try:
        state_dict = weights.get_state_dict(progress=False, weights_only=True)
    except Exception as exc:  # network, disk or unpickling problems: all user-fixable
        if cached.is_file():
            raise IlsegError(
                f"cannot read the cached ImageNet weights {cached} ({exc}); delete the file to "
                "download it again, or give a local checkpoint with --set model.pretrained=PATH"
            ) from exc
        raise IlsegError(
            f"cannot download torchvision's ImageNet weights {weights.url} ({exc}); put "
            f"{cached.name} in {cached.parent}, or give a local checkpoint with --set model.pretrained=PATH"
        ) from exc
    _load_torchvision_state_dict(state_dict, model_body, source=str(cached))


def load_iabn_checkpoint(path: str | os.PathLike[str], model_body: nn.Module) -> None:
    """Load MiB's InPlace-ABN ImageNet checkpoint (``resnet101_iabn_sync.pth.tar``) strictly.

    Format: a dict with ``"state_dict"`` (or the state dict itself), keys
    optionally prefixed ``module.``.  Mapping onto torchvision names:

    ==================================  ===================================
    InPlace-ABN                         ours
    ==================================  ===================================
    ``mod1.conv1.*``, ``mod1.bn1.*``    ``conv1.*``, ``bn1.*``
    ``modN.blockK.convs.convI.*``       ``layer{N-1}.{K-1}.convI.*``
    ``modN.blockK.convs.bnI.*``         ``layer{N-1}.{K-1}.bnI.*``
    ``modN.blockK.proj_conv.*``         ``layer{N-1}.{K-1}.downsample.0.*``
    ``modN.blockK.proj_bn.*``           ``layer{N-1}.{K-1}.downsample.1.*``
    ``classifier.*``                    dropped (the ImageNet classifier)
    ==================================  ===================================

    Every BN ``weight`` (``mod1.bn1``, ``convs.bnI``, ``proj_bn``) is loaded
    as ``|w| + eps`` (:func:`iabn_bn_weight`), because InPlace-ABN stores the
    signed ``w`` but scales by ``|w| + eps`` (inplace_abn
    ``src/inplace_abn_cpu.cpp``, ``forward_cpu``; inplace_abn issue 180);
    copying ``w`` as it is would flip every channel whose ``w`` is negative.
    ``eps`` is the target BN's ``eps`` (:data:`IABN_EPS`, 1e-5, for a
    default body; a different one is logged as a warning).  Conv weights, BN
    biases and running statistics are copied unchanged.  Every other key is
    reported.

    Raises:
        IlsegError: unreadable file, unknown, missing or mis-shaped keys.
    """
    path = Path(path)
    _load_iabn_state_dict(_read_state_dict(path), model_body, source=str(path))


def iabn_bn_weight(weight: torch.Tensor, eps: float = IABN_EPS) -> torch.Tensor:
    """The plain-BatchNorm weight equivalent to an InPlace-ABN stored ``weight``: ``|w| + eps``.

    InPlace-ABN scales the normalised input by ``weight.abs() + eps`` where
    standard BN scales by ``weight`` (inplace_abn ``src/inplace_abn_cpu.cpp``,
    ``forward_cpu``; inplace_abn issue 180), with the same ``eps`` as in
    ``sqrt(var + eps)``.
    """
    return weight.abs() + eps


def iabn_to_torchvision_names(
    state_dict: Mapping[str, torch.Tensor], bn_eps: Mapping[str, float] | None = None
) -> tuple[StateDict, list[str]]:
    """Rename an InPlace-ABN ResNet state dict to torchvision names, converting BN weights.

    Returns the renamed dict (``classifier.*`` dropped, ``module.`` stripped)
    and the list of keys that have no counterpart.  Every BN ``weight``
    (``mod1.bn1.weight``, ``convs.bnI.weight``, ``proj_bn.weight``) is replaced
    by :func:`iabn_bn_weight` of it, ``|w| + eps``, so that a standard BN gives
    InPlace-ABN's output; all other values are passed through unchanged.
    ``bn_eps`` maps our BN module names (``"bn1"``, ``"layer1.0.downsample.1"``)
    to the target BN's ``eps``; a name not in it uses :data:`IABN_EPS`.
    """
    bn_eps = bn_eps or {}
    renamed: StateDict = {}
    unknown: list[str] = []
    for key, value in _strip_wrapper_prefix(state_dict).items():
        if key.startswith(_IABN_IGNORED):
            continue
        name = iabn_to_torchvision_name(key)
        if name is None:
            unknown.append(key)
            continue
        module, attr = name.rsplit(".", 1)
        if attr == "weight" and _is_bn_module_name(module):
            value = iabn_bn_weight(value, bn_eps.get(module, IABN_EPS))
        renamed[name] = value
    return renamed, unknown


def iabn_to_torchvision_name(key: str) -> str | None:
    """One InPlace-ABN ResNet key (``module.`` already stripped) in torchvision's names, or ``None``.

    Renaming only, values untouched: ``mod1.bn1.weight`` -> ``bn1.weight``,
    ``mod3.block2.convs.conv2.weight`` -> ``layer2.1.conv2.weight``,
    ``mod2.block1.proj_bn.running_var`` -> ``layer1.0.downsample.1.running_var``.
    ``None`` for any other key (``classifier.*`` included).
    """
    stem = _IABN_STEM.match(key)
    if stem:
        return f"{stem[1]}.{stem[2]}"
    block = _IABN_BLOCK.match(key)
    if not block:
        return None
    stage, index, inner, proj, attr = block.groups()
    if int(index) < 1:
        return None
    name = inner if inner else {"proj_conv": "downsample.0", "proj_bn": "downsample.1"}[proj]
    return f"layer{int(stage) - 1}.{int(index) - 1}.{name}.{attr}"


def _is_bn_module_name(module: str) -> bool:
    """Whether a torchvision-named body module is a BatchNorm (``bn1``, ``layerN.K.bnI``, ``downsample.1``)."""
    return module.rsplit(".", 1)[-1].startswith("bn") or module.endswith("downsample.1")


def torchvision_to_iabn_name(key: str) -> str:
    """Inverse of :func:`iabn_to_torchvision_name`, for messages about missing keys (other keys unchanged)."""
    if key.startswith(("conv1.", "bn1.")):
        return f"mod1.{key}"
    match = _OURS_BLOCK.match(key)
    if not match:
        return key
    stage, index, inner, down, attr = match.groups()
    name = f"convs.{inner}" if inner else ("proj_conv" if down == "0" else "proj_bn")
    return f"mod{int(stage) + 1}.block{int(index) + 1}.{name}.{attr}"


def _read_state_dict(path: Path) -> StateDict:
    if path.is_dir():
        raise IlsegError(f"pretrained checkpoint {path} is a folder; give the path to a .pth file")
    if not path.is_file():
        raise IlsegError(f"pretrained checkpoint {path} does not exist; give the path to a .pth file")
    try:
        with quiet_pickle_warnings():
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickle with arbitrary objects, ...
        reason = load_failure(exc, path)
        raise IlsegError(f"pretrained weights file {path} is not a weights file ({reason}); give a state dict saved "
                         "with torch.save (torchvision's or InPlace-ABN's ImageNet ResNet checkpoint)") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise IlsegError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise IlsegError(f"{path} is not a state dict: these entries are not tensors: {', '.join(bad)}")
    return dict(obj)


def _strip_wrapper_prefix(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    return {k.removeprefix(_WRAPPER_PREFIX): v for k, v in state_dict.items()}


def _is_iabn(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith("mod1.") for k in _strip_wrapper_prefix(state_dict))


def _load_iabn_state_dict(state_dict: Mapping[str, torch.Tensor], model_body: nn.Module, *, source: str) -> None:
    bn_eps = _bn_eps_of(model_body)
    renamed, unknown = iabn_to_torchvision_names(state_dict, bn_eps)
    _load_strict(renamed, model_body, source=source, unexpected_extra=unknown, name_hint=torchvision_to_iabn_name)


def _bn_eps_of(model_body: nn.Module) -> dict[str, float]:
    """``eps`` of every BatchNorm in ``model_body`` by module name; warns where it is not :data:`IABN_EPS`."""
    found = {
        name: float(module.eps)
        for name, module in model_body.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
    }
    other = sorted(name for name, eps in found.items() if eps != IABN_EPS)
    if other:
        logger.warning(
            "BatchNorm eps differs from InPlace-ABN's %g in %s; converting their weights with their own eps",
            IABN_EPS,
            ", ".join(f"{name} ({found[name]:g})" for name in other),
        )
    return found


def _load_torchvision_state_dict(
    state_dict: Mapping[str, torch.Tensor], model_body: nn.Module, *, source: str
) -> None:
    cleaned = {k: v for k, v in _strip_wrapper_prefix(state_dict).items() if not k.startswith(_TORCHVISION_IGNORED)}
    _load_strict(cleaned, model_body, source=source, unexpected_extra=[], name_hint=None)


def _load_strict(
    state_dict: StateDict,
    model_body: nn.Module,
    *,
    source: str,
    unexpected_extra: list[str],
    name_hint: Callable[[str], str] | None,
) -> None:
    """Check keys and shapes against ``model_body`` and load, or raise listing every problem."""
    own = model_body.state_dict()
    optional = {k for k in own if k.endswith("num_batches_tracked")}
    missing = sorted(k for k in own if k not in state_dict and k not in optional)
    unexpected = sorted(unexpected_extra) + sorted(k for k in state_dict if k not in own)
    mismatched = sorted(
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and v.shape != own[k].shape
    )
    if missing or unexpected or mismatched:
        hint = name_hint
        parts = []
        if missing:
            shown = [f"{hint(k)} (-> {k})" if hint else k for k in missing]
            parts.append(f"missing keys: {', '.join(shown)}")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches: {', '.join(mismatched)}")
        depth = getattr(model_body, "depth", "?")
        raise IlsegError(
            f"checkpoint {source} does not fit a ResNet-{depth} body: {'; '.join(parts)}; "
            "check the backbone setting or the file"
        )
    full = dict(state_dict)
    for key in optional:
        full.setdefault(key, own[key])
    model_body.load_state_dict(full, strict=True)
