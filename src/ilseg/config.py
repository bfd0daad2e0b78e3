"""The run configuration: one frozen dataclass tree, loaded from YAML.

A run is described by :class:`RunConfig` (data, model, method, optim, eval,
runtime).  :func:`load_config` reads a YAML file with ``yaml.safe_load``
(nothing in a config file is ever executed), applies ``--set key=value``
overrides, and validates every value: an unknown key, a wrong type or an
impossible value raises :class:`~ilseg.errors.IlsegError` naming the key.
:func:`dump_config` writes the resolved config back (``config.yaml`` in the
run folder), which :func:`load_config` reads again unchanged.  A file may
build on others with ``base:`` (:func:`read_config_file`); what is dumped is
always the fully resolved config, without ``base``.

The defaults are the published VOC recipe (docs/protocol.md#model,
docs/protocol.md#training-recipe), so a file
states only what makes it that run.  Example YAML::

    name: voc-10-1-ov-ilt
    data: {dataset: voc, task: 10-1, overlap: true}
    method: {name: ilt}              # a preset from ``ilseg methods``, fields overridable
    optim: {epochs_next: 10}         # only what differs from the recipe
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from ilseg.errors import IlsegError
from ilseg.methods import METHOD_PRESETS, ILTConfig, MethodConfig, method_class
from ilseg.methods.base import method_kind
from ilseg.methods.legacy import from_legacy, is_legacy
from ilseg.tasks import Task, custom_task, get_task


# -- what each setting shapes ----------------------------------------------------------------------------
# Every field of the sections below declares its role once, with ``setting(default, ROLE)``.  A checkpoint's
# identity, what ``--resume --set`` may change, which runs the demo reuses and which runs ``ilseg report``
# groups as seeds or refuses to compare are all derived from these roles (:func:`settings_of`).
TASK = "task"  # which classes in which order and steps: recorded through the task itself (dataset, order, sizes)
MODEL = "model"  # the network: shapes the weights of every step
TRAINING = "training"  # how every step trains, step 0 included
LATER_STEPS = "later steps"  # how the steps after the first train
EVALUATION = "evaluation"  # how a finished model is scored: runs scored differently are never compared
PLACEMENT = "placement"  # where and how a run executes: nothing it learns changes beyond rounding
ROLES = (TASK, MODEL, TRAINING, LATER_STEPS, EVALUATION, PLACEMENT)
SETTING_SECTIONS = ("data", "model", "optim", "eval", "runtime")  # the sections whose fields declare a role

_T = typing.TypeVar("_T")


def setting(default: _T, role: str, *, resume: bool = False) -> _T:
    """A config field's default and its role; ``resume``: ``--resume --set`` may change it (placement always may)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")
    return dataclasses.field(default=default, metadata={"role": role, "resume": resume or role == PLACEMENT})


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which data, which incremental task, which pixels (docs/protocol.md#incremental-protocol)."""

    dataset: Literal["voc", "ade", "synth"] = setting("voc", TASK)
    root: str = setting("data/VOCdevkit", PLACEMENT)
    task: str = setting("15-1", TASK)
    overlap: bool = setting(False, TRAINING)
    class_order: tuple[int | str, ...] | None = setting(None, TASK)  # custom order (ids or names), background first
    step_sizes: tuple[int, ...] | None = setting(None, TASK)  # explicit sizes per step, background counted in step 0
    index_file: str | None = setting(None, TRAINING)  # per-step image lists instead of the filter; "{step}" is replaced
    unseen: Literal["ignore", "background"] = setting("ignore", EVALUATION)  # test label of classes not seen yet
    ade_zero: Literal["ignore", "class"] = setting("ignore", EVALUATION)  # ADE20k label 0: MiB ignores it at test
    crop_size: int = setting(512, TRAINING)
    scale: tuple[float, float] = setting((0.5, 2.0), TRAINING)
    normalize: Literal["imagenet", "caffe"] = setting("imagenet", TRAINING)  # caffe: the ILT paper's code
    augment: Literal["resized_crop", "ilt_paper"] = setting("resized_crop", TRAINING)  # ilt_paper: scale, flip, pad, crop
    fixed_crops: bool = setting(False, TRAINING)  # steps > 0: one crop per image for the whole step, in file order
    test_size: int | None = setting(512, EVALUATION)  # None: evaluate on full images
    test_crop: bool = setting(True, EVALUATION)
    workers: int = setting(8, PLACEMENT)  # data loader processes per GPU; also read the masks for the per-step image lists
    cache_dir: str | None = setting(None, PLACEMENT)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The DeepLab-v3 segmenter (docs/protocol.md#model), or DeepLab-v2 (``head: aspp_v2``, docs/methods.md)."""

    backbone: Literal["resnet18", "resnet34", "resnet50", "resnet101"] = setting("resnet101", MODEL)
    output_stride: Literal[8, 16, 32] = setting(16, MODEL)
    head_channels: int = setting(256, MODEL)  # the ASPP's width (head "aspp" only)
    width: int = setting(64, MODEL)  # ResNet base width; 64 as published, smaller for thin CPU models (no pretrained weights)
    pretrained: str | None = setting("imagenet", MODEL)  # "imagenet", a local checkpoint path, or null
    head: Literal["aspp", "aspp_v2"] = setting("aspp", MODEL)  # DeepLab-v3's ASPP + 1x1 classifiers, or DeepLab-v2's summed ASPP
    frozen_bn: bool = setting(False, MODEL)  # every BN in eval mode with frozen affine parameters from step 0 on (DeepLab-v2)
    frozen_bn_affine: bool = setting(True, MODEL)  # with frozen_bn: scale/offset frozen too (false: trained, the ILT paper's code)
    stride_on: Literal["3x3", "1x1"] = setting("3x3", MODEL)  # the conv that strides: torchvision's 3x3, or Caffe ResNet's 1x1
    activation: Literal["leaky_relu", "relu"] = setting("leaky_relu", MODEL)  # the body's: MiB's LeakyReLU(0.01), or ReLU


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The recipe of docs/protocol.md#training-recipe; ``*_next`` values apply to steps > 0.

    ``iterations`` / ``iterations_next``: when positive, the step trains that
    many iterations (whole passes over its training set, then the first
    batches of one more) instead of ``epochs`` / ``epochs_next``.  The poly
    schedule decays the learning rate from ``lr`` to ``lr_end`` (``lr_next``
    to ``lr_end_next``) over the step's iterations:
    ``lr_i = (lr - lr_end) * (1 - i / total) ** poly_power + lr_end``.
    """

    optimizer: Literal["sgd", "adamw"] = setting("sgd", TRAINING, resume=True)
    lr: float = setting(0.01, TRAINING, resume=True)
    lr_next: float = setting(0.001, LATER_STEPS, resume=True)
    epochs: int = setting(30, TRAINING, resume=True)
    epochs_next: int = setting(30, LATER_STEPS, resume=True)
    batch_size: int = setting(24, TRAINING, resume=True)  # the global batch, split over distributed ranks
    momentum: float = setting(0.9, TRAINING, resume=True)
    nesterov: bool = setting(True, TRAINING, resume=True)
    weight_decay: float = setting(1e-4, TRAINING, resume=True)
    poly_power: float = setting(0.9, TRAINING, resume=True)
    schedule: Literal["poly", "constant"] = setting("poly", TRAINING, resume=True)  # constant: cssegmentation as it ran
    iterations: int = setting(0, TRAINING, resume=True)  # 0: train ``epochs``
    iterations_next: int = setting(0, LATER_STEPS, resume=True)  # 0: train ``epochs_next``
    lr_end: float = setting(0.0, TRAINING, resume=True)  # the learning rate the poly schedule reaches at the end of step 0
    lr_end_next: float = setting(0.0, LATER_STEPS, resume=True)  # ... of the later steps
    weight_decay_on: Literal["all", "kernels"] = setting("all", TRAINING, resume=True)  # kernels: the ILT paper's code
    decay_iterations: int = setting(0, TRAINING, resume=True)  # the poly horizon of step 0 (0: the step's length)
    decay_iterations_next: int = setting(0, LATER_STEPS, resume=True)  # ... of the later steps


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """How a finished step is scored.

    ``test_images``: which validation images score step ``t``: ``"all"`` of
    them (ilseg's default: every step on the same images), ``"seen"`` those
    with at least one foreground class seen so far (MiB's and PLOP's test set:
    their image filter in overlapped mode), or ``"seen_only"`` those that, in
    addition, hold no class of a later step (cssegmentation's test set in its
    disjoint configs).  After the last step every class is seen, so the
    three agree there; the per-step curves differ (docs/fidelity.md).

    ``every``: also score the model after every ``every``-th epoch of a step
    (cssegmentation evaluates every 10 epochs and publishes the best of those
    scores, a selection on the test set).  The scores are kept in the step's
    results row under ``"evaluations"``; the step's own scores stay those of
    its final model, which is what the next step starts from.
    """

    batch_size: int = setting(8, PLACEMENT)
    test_images: Literal["all", "seen", "seen_only"] = setting("all", EVALUATION)
    every: int = setting(0, PLACEMENT)  # also score every N epochs of a step (0: only after it); results keep them


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """Where and how a run computes; none of it changes what is learned beyond rounding.

    ``amp`` and ``channels_last`` default to ``"auto"``: the recipe's mixed
    precision (bf16 autocast) and channels-last memory on CUDA, plain fp32 and
    contiguous tensors elsewhere, because bf16 autocast on a CPU without
    bf16 instructions is about 20x slower than fp32 (BENCHMARKS.md).  Resolve
    them for a device with :meth:`amp_for` and :meth:`channels_last_for`.
    """

    device: Literal["auto", "cpu", "cuda"] = setting("auto", PLACEMENT)
    amp: Literal["auto", "none", "bf16", "fp16"] = setting("auto", TRAINING, resume=True)
    channels_last: Literal["auto"] | bool = setting("auto", PLACEMENT)
    seed: int = setting(42, TRAINING)
    backend: Literal["auto", "nccl", "gloo"] = setting("auto", PLACEMENT)  # distributed backend under torchrun
    sync_bn: bool = setting(True, TRAINING)  # SyncBatchNorm in distributed runs
    collective_timeout_s: int = setting(600, PLACEMENT)
    tensorboard: bool = setting(False, PLACEMENT)
    compile: bool = setting(False, PLACEMENT)  # torch.compile the trained model; falls back to eager (with a log line) if it fails
    preview_images: int = setting(0, PLACEMENT)  # after each step: the first N test images, ground truth and prediction in RUN/preview/
    cache_teacher: bool = setting(False, PLACEMENT)  # with data.fixed_crops: the teacher's outputs computed once per step

    def amp_for(self, device_type: str) -> str:
        """The autocast mode on a device of type ``device_type`` (``torch.device.type``).

        Returns ``"none"``, ``"bf16"`` or ``"fp16"``: ``amp`` itself when it is
        set, and for ``"auto"`` bf16 on ``"cuda"`` and none on anything else.

        >>> RuntimeConfig().amp_for("cuda"), RuntimeConfig().amp_for("cpu")
        ('bf16', 'none')
        """
        if self.amp != "auto":
            return self.amp
        return "bf16" if device_type == "cuda" else "none"

    def channels_last_for(self, device_type: str) -> bool:
        """Whether images and weights use channels-last memory on a device of type ``device_type``.

        ``channels_last`` itself when it is a bool; for ``"auto"``, True on
        ``"cuda"`` (faster convolutions under autocast) and False elsewhere.

        >>> RuntimeConfig().channels_last_for("cuda"), RuntimeConfig(channels_last=True).channels_last_for("cpu")
        (True, True)
        """
        if self.channels_last == "auto":
            return device_type == "cuda"
        return bool(self.channels_last)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole incremental run."""

    name: str = "run"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    method: MethodConfig = METHOD_PRESETS["ilt"]
    optim: OptimConfig = OptimConfig()
    eval: EvalConfig = EvalConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    def __post_init__(self) -> None:
        _validate(self)

    def build_task(self) -> Task:
        """The incremental task this run trains (the full task, even for joint)."""
        d = self.data
        if d.class_order is not None:
            sizes = d.step_sizes
            if sizes is None:
                raise IlsegError("data.class_order needs data.step_sizes (classes per step, background in step 0)")
            return custom_task(d.dataset, d.task, d.class_order, sizes)
        return get_task(d.dataset, d.task, step_sizes=d.step_sizes)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def hash(self) -> str:
        """12 hex digits naming what this run learns and how it is scored (:func:`config_hash`)."""
        return config_hash(self)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One config setting: its flat key (``optim.lr``), its role and whether a resumed run may change it."""

    key: str
    role: str
    resume: bool


def settings_of(*roles: str) -> tuple[Setting, ...]:
    """The settings of the sections ``data``, ``model``, ``optim``, ``eval`` and ``runtime`` with one of ``roles``
    (all of them without an argument), in the order of the config.  The method's fields are the method's to
    describe (:meth:`~ilseg.methods.Method.identity`); ``name`` is a label.

    >>> [s.key for s in settings_of(EVALUATION)]
    ['data.unseen', 'data.ade_zero', 'data.test_size', 'data.test_crop']
    """
    hints = typing.get_type_hints(RunConfig)
    found = []
    for section in SETTING_SECTIONS:
        for field in dataclasses.fields(hints[section]):
            role = field.metadata["role"]
            if not roles or role in roles:
                found.append(Setting(f"{section}.{field.name}", role, bool(field.metadata["resume"])))
    return tuple(found)


def config_hash(cfg: RunConfig) -> str:
    """12 hex digits naming every setting that shapes what ``cfg`` learns and how it is scored.

    Left out: the name, the placement settings (paths, workers, devices:
    nothing they change survives rounding) and every setting at its default.
    So a setting added in a later version, whose default keeps what earlier
    versions did, leaves the hash of every earlier config as it was
    (``results.json`` of older runs keeps matching).  The method enters with its
    kind and the fields of its config that differ from that config's defaults.
    Changing a default changes the hash of configs that relied on it, which is
    right: they now train something else.
    """
    placement = {s.key for s in settings_of(PLACEMENT)}
    chosen: dict[str, Any] = {}
    for section in SETTING_SECTIONS:
        part = getattr(cfg, section)
        for field in dataclasses.fields(part):
            key = f"{section}.{field.name}"
            value = getattr(part, field.name)
            if key not in placement and value != field.default:
                chosen[key] = _to_plain(value)
    method = cfg.method
    chosen["method"] = method_kind(method_class(method))
    for field in dataclasses.fields(method):
        value = getattr(method, field.name)
        if field.name != "name" and value != field.default:
            chosen[f"method.{field.name}"] = _to_plain(value)
    text = json.dumps(chosen, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _validate(cfg: RunConfig) -> None:
    checks: list[tuple[bool, str]] = [
        (cfg.data.crop_size > 0, "data.crop_size must be positive"),
        (cfg.data.test_size is None or cfg.data.test_size > 0, "data.test_size must be positive or null"),
        (0 < cfg.data.scale[0] <= cfg.data.scale[1], "data.scale must be (min, max) with 0 < min <= max"),
        (cfg.data.workers >= 0, "data.workers must be >= 0"),
        (cfg.model.head_channels > 0, "model.head_channels must be positive"),
        (cfg.model.width > 0, "model.width must be positive"),
        (cfg.model.width == 64 or cfg.model.pretrained is None,
         "model.pretrained needs model.width 64 (the published ResNets); set model.pretrained=null"),
        (cfg.optim.lr > 0 and cfg.optim.lr_next > 0, "optim.lr and optim.lr_next must be positive"),
        (cfg.optim.epochs > 0 and cfg.optim.epochs_next > 0, "optim.epochs and optim.epochs_next must be >= 1"),
        (cfg.optim.batch_size >= 1, "optim.batch_size must be >= 1"),
        (cfg.optim.weight_decay >= 0, "optim.weight_decay must be >= 0"),
        (0 <= cfg.optim.momentum < 1, "optim.momentum must be in [0, 1)"),
        (cfg.optim.poly_power >= 0, "optim.poly_power must be >= 0"),
        (cfg.optim.decay_iterations >= 0 and cfg.optim.decay_iterations_next >= 0,
         "optim.decay_iterations and optim.decay_iterations_next must be >= 0 (0: the step's own length)"),
        (cfg.optim.schedule == "poly" or (cfg.optim.lr_end == 0 and cfg.optim.lr_end_next == 0),
         "optim.lr_end and optim.lr_end_next are where the poly schedule ends; with optim.schedule=constant "
         "leave them at 0"),
        (cfg.optim.iterations >= 0 and cfg.optim.iterations_next >= 0,
         "optim.iterations and optim.iterations_next must be >= 0 (0: train epochs)"),
        (0 <= cfg.optim.lr_end < cfg.optim.lr and 0 <= cfg.optim.lr_end_next < cfg.optim.lr_next,
         "optim.lr_end and optim.lr_end_next must be >= 0 and below optim.lr and optim.lr_next"),
        (cfg.model.stride_on == "3x3" or cfg.model.backbone in ("resnet50", "resnet101"),
         "model.stride_on 1x1 needs a bottleneck ResNet (resnet50 or resnet101)"),
        (not cfg.model.frozen_bn or cfg.model.head == "aspp_v2",
         "model.frozen_bn freezes every BatchNorm from step 0 on, DeepLab-v3's freshly made ASPP ones too, which "
         "would never learn; use it with model.head=aspp_v2 (DeepLab-v2, no BatchNorm in the head)"),
        (cfg.model.stride_on == "3x3" or cfg.model.pretrained != "imagenet",
         "model.stride_on 1x1 (Caffe's ResNet) does not suit torchvision's ImageNet weights, which stride on the "
         "3x3 conv; give weights of that layout as model.pretrained=PATH, or null"),
        (cfg.eval.batch_size >= 1, "eval.batch_size must be >= 1"),
        (cfg.eval.every >= 0, "eval.every must be >= 0 (0: score each step's final model only)"),
        (not cfg.runtime.cache_teacher or cfg.data.fixed_crops,
         "runtime.cache_teacher replays the teacher's outputs on the same crops every epoch: it needs "
         "data.fixed_crops=true"),
        (cfg.runtime.collective_timeout_s > 0, "runtime.collective_timeout_s must be positive"),
        (cfg.runtime.preview_images >= 0, "runtime.preview_images must be >= 0 (0: no previews)"),
        (not (cfg.optim.nesterov and cfg.optim.optimizer == "sgd" and cfg.optim.momentum == 0),
         "optim.nesterov needs optim.momentum > 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise IlsegError(f"invalid config: {message}")
    if cfg.data.dataset != "ade" and cfg.data.ade_zero != "ignore":
        raise IlsegError("invalid config: data.ade_zero only applies to dataset 'ade'")
    cfg.build_task()  # raises a clear error for an unknown task or a bad order


# -- building dataclasses from plain data, with type checks ------------------------
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return "list"
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against type ``tp``; return it converted (lists -> tuples)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            try:
                return _coerce(value, arm, key)
            except IlsegError as exc:
                errors.append(exc)
        raise IlsegError(f"config key {key!r}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
    elif origin is Literal:
        if value in typing.get_args(tp) and type(value) in {type(a) for a in typing.get_args(tp)}:
            return value
        raise IlsegError(f"config key {key!r}: {value!r} is not one of {_type_name(tp)}")
    elif origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, (list, tuple)):
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
            if len(value) == len(args):
                return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = _float_or_none(value)
        if number is not None:
            if not math.isfinite(number):
                raise IlsegError(f"config key {key!r}: {value!r} is not a finite number")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, Mapping):
            return _build(tp, value, key)
    raise IlsegError(f"config key {key!r}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


_FLOAT_TEXT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _float_or_none(value: Any) -> float | None:
    """``value`` as a float if it is a number or a number's text, else ``None``.

    PyYAML follows YAML 1.1, which reads ``1e-3`` (no dot) as a *string*; people
    write learning rates that way, so such strings are accepted where a float is
    expected.  ``inf`` and ``nan`` are floats too, refused by the caller.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
        return float(value)
    return None


def _build(cls: type, data: Mapping[str, Any], prefix: str, base: Any = None) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(str(k), names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(names)}"
        raise IlsegError(f"unknown config key {_join(prefix, str(k))!r}{hint}")
    values = {}
    for name in names:
        key = _join(prefix, name)
        if name in data:
            if dataclasses.is_dataclass(hints[name]) and isinstance(data[name], Mapping):
                sub_base = getattr(base, name) if base is not None else None
                values[name] = _build_section(hints[name], data[name], key, sub_base)
            else:
                values[name] = _coerce(data[name], hints[name], key)
        elif base is not None:
            values[name] = getattr(base, name)
    return cls(**values)


def _build_section(cls: type, data: Mapping[str, Any], key: str, base: Any) -> Any:
    if cls is MethodConfig:
        return _build_method(data, key, base)
    return _build(cls, data, key, base)


def _build_method(data: Mapping[str, Any], key: str, base: MethodConfig | None) -> MethodConfig:
    """``method: {name: ilt, kd_weight: 50}``: a preset, then its overrides."""
    name = data.get("name", base.name if base is not None else None)
    if name is None:
        raise IlsegError(f"config key {key!r} needs 'name' (one of: {', '.join(METHOD_PRESETS)})")
    if not isinstance(name, str) or name not in METHOD_PRESETS:
        raise IlsegError(f"unknown method {name!r}; choose one of: {', '.join(METHOD_PRESETS)} (see 'ilseg methods')")
    start = base if base is not None and base.name == name else METHOD_PRESETS[name]
    if is_legacy(data, type(start)):  # a run folder of ilseg 0.1: the flat method fields
        return from_legacy(start, data, key)
    if data.get("kd") == "mib" and isinstance(start, ILTConfig):  # the name before ilseg 0.2
        data = {**data, "kd": "ilt_mib_code"}
    return _build(type(start), dict(data), key, start)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


# -- files and overrides ---------------------------------------------------------
def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["optim.lr=0.02", "data.overlap=true"]`` -> a nested dict (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise IlsegError(f"--set {item!r}: expected key=value, e.g. optim.lr=0.02 (the items of --set end at "
                             "the next option: put positional arguments before --set)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise IlsegError(f"--set {item!r}: cannot parse the value: {yaml_problem(exc)}") from None
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise IlsegError(f"--set {item!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return tree


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error on one line: where it is and what is wrong, without PyYAML's quoted source excerpts."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if mark is None or problem is None:
        return " ".join(str(exc).split())
    text = f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and context_mark is not None:
        text += f" ({context} at line {context_mark.line + 1}, column {context_mark.column + 1})"
    return text


class ConfigFileError(IlsegError):
    """A config file that cannot be read as one: missing, a folder, empty, not text, not YAML, not a mapping.

    ``path`` is the file, ``reason`` what is wrong with it (the message adds what to do).
    """

    def __init__(self, path: Path, reason: str, fix: str) -> None:
        super().__init__(f"config file {path} {reason}; {fix}")
        self.path, self.reason = path, reason


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping a config file holds; :class:`ConfigFileError` if it holds none.

    An empty file (or one of comments only) is refused rather than read as
    "every default": the defaults are the VOC recipe, never what a file that
    lost its content meant.
    """
    path = Path(path)
    fix = "give a YAML file of settings (data, model, method, ...), or a preset name (see 'ilseg presets')"
    if path.is_dir():
        raise ConfigFileError(path, "is a folder, not a file", fix)
    if not path.is_file():
        raise ConfigFileError(path, "does not exist", fix)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigFileError(path, f"is not a text file (byte {exc.start} is not UTF-8)", fix) from None
    except OSError as exc:
        raise ConfigFileError(path, f"cannot be read ({exc.strerror or exc})", "fix its permissions") from None
    except yaml.YAMLError as exc:
        raise ConfigFileError(path, f"is not valid YAML: {yaml_problem(exc)}", "fix it there") from None
    except RecursionError:
        raise ConfigFileError(path, "is nested too deeply to be a config", fix) from None
    if data is None:
        raise ConfigFileError(path, "is empty (no settings)", fix)
    if not isinstance(data, dict):
        raise ConfigFileError(path, f"holds a {type(data).__name__}, not a mapping of sections", fix)
    return data


def config_from_dict(data: Mapping[str, Any]) -> RunConfig:
    """Build and validate a :class:`RunConfig` from plain data."""
    if isinstance(data.get("method"), str):
        data = {**data, "method": {"name": data["method"]}}
    return _build(RunConfig, data, "")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The plain data of a config file, its ``base:`` files merged under it.

    ``base:`` names one file or a list of files this one builds on.  Each is
    looked for as a path, relative paths against the folder of the file that
    names it, then as a bundled preset name (``base/ilt-paper`` is
    ``configs/base/ilt-paper.yaml``); ``.yaml`` may be left out.  Depth first:
    each base is resolved with its own bases, the bases are merged in list
    order (a later one wins), then the file's own keys over them (mappings
    key by key, as ``--set`` does).  A file's ``name`` is never inherited:
    it is the file's own ``name:``, or, when the file has a base, its file
    stem.  The result holds no ``base`` key.  A cycle or a missing base
    raises :class:`~ilseg.errors.IlsegError`.

    >>> read_config_file(preset_dir() / "voc-15-1-paper-joint.yaml")["model"]["head"]
    'aspp_v2'
    """
    return _resolve_bases(Path(path), ())


def _resolve_bases(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """``path``'s data with its bases merged in; ``chain``: the files that led here, outermost first."""
    seen = [p.resolve() for p in chain]
    if path.resolve() in seen:
        loop = [*chain[seen.index(path.resolve()):], path]
        shown = " -> ".join(_show_path(p, chain[0].parent) for p in loop)
        raise IlsegError(f"config files name each other as base in a cycle: {shown}; remove one of these 'base:' keys")
    data = read_yaml(path)
    if isinstance(data.get("method"), str):
        data["method"] = {"name": data["method"]}
    if "base" not in data:
        return data
    names = data.pop("base")
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise IlsegError(f"config file {path}: 'base' must be a preset name or a path, or a list of them "
                         f"(got {names!r})")
    merged: dict[str, Any] = {}
    for name in names:
        inherited = _resolve_bases(_base_path(name, path), (*chain, path))
        inherited.pop("name", None)  # a base's name must not become the name of the file built on it
        merged = _merge(merged, inherited)
    data.setdefault("name", path.stem)
    return _merge(merged, data)


def _base_path(name: str, referrer: Path) -> Path:
    """The file ``base: name`` in ``referrer`` means: next to ``referrer`` first, then a bundled preset."""
    with_suffix = name if name.endswith((".yaml", ".yml")) else f"{name}.yaml"
    for candidate in (referrer.parent / name, referrer.parent / with_suffix, preset_dir() / with_suffix):
        if candidate.is_file():
            return candidate
    bundled = [p.relative_to(preset_dir()).with_suffix("").as_posix() for p in preset_dir().rglob("*.yaml")]
    close = difflib.get_close_matches(name.removesuffix(".yaml"), bundled, n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise IlsegError(f"config file {referrer} names base {name!r}, which is neither a file next to it "
                     f"({referrer.parent / with_suffix}) nor a bundled preset.{hint}")


def _show_path(path: Path, root: Path) -> str:
    """``path`` short: relative to ``root`` or to the bundled presets when inside them."""
    for folder in (root, preset_dir()):
        try:
            return path.resolve().relative_to(folder.resolve()).as_posix()
        except ValueError:
            continue
    return str(path)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Load a YAML config (or the defaults when ``path`` is None), its bases merged in, and apply overrides."""
    data = read_config_file(path) if path is not None else {}
    data = _merge(data, parse_overrides(overrides))
    if isinstance(data.get("method"), str):
        data["method"] = {"name": data["method"]}
    return config_from_dict(data)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def config_changes(cfg: RunConfig, reference: RunConfig) -> dict[str, Any]:
    """The values of ``cfg`` that differ from ``reference``, nested by section as in a config file.

    >>> config_changes(load_config(None, ["optim.lr=0.02"]), load_config(None))
    {'optim': {'lr': 0.02}}
    """
    return _changed(cfg.to_dict(), reference.to_dict())


def _changed(values: Mapping[str, Any], reference: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        before = reference.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            inner = _changed(value, before)
            if inner:
                out[key] = inner
        elif key not in reference or value != before:
            out[key] = value
    return out


def preset_dir() -> Path:
    """The folder of bundled presets (installed with the package)."""
    return Path(__file__).parent / "configs"


def resolve_config_path(name_or_path: str) -> Path:
    """A config path, or the name of a bundled preset (``voc-15-1-ilt``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.is_dir():
        raise IlsegError(f"--config {name_or_path} is a folder; give a YAML config file (a run's config is "
                         "RUN_DIR/config.yaml) or a preset name (see 'ilseg presets')")
    candidate = preset_dir() / (name_or_path if name_or_path.endswith(".yaml") else f"{name_or_path}.yaml")
    if candidate.is_file():
        return candidate
    presets = sorted(p.stem for p in preset_dir().glob("*.yaml"))
    close = difflib.get_close_matches(name_or_path, presets, n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise IlsegError(f"config {name_or_path!r} is neither a file nor a bundled preset.{hint} List them with 'ilseg presets'.")
