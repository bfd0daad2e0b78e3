"""Training methods, one file each: fine-tuning and joint training, ILT (each variant), MiB, PLOP, SDR, REMINDER, EWF, RCIL.

A method decides what happens at each step boundary (the student, the
teacher, the training labels: :meth:`Method.start_step`) and turns the
model's outputs (and the previous model's, when it distils) into a dict of
named losses for one batch; :mod:`ilseg.methods.base` gives the whole
contract.  See docs/methods.md for each preset's formula and source.

:data:`METHODS` maps a method's kind to its class, :data:`METHOD_PRESETS` a
preset's name (``method.name`` in a config) to its config.  A method defined
elsewhere joins both with :func:`register_method`, explicitly::

    >>> from ilseg.methods import method_config, build_method
    >>> build_method(method_config("ilt", {"kd_weight": 10})).describe()
    'ilt: L = CE(y) + 10*KD_ilt_mib_code(alpha=1) + 100*FD [labels: current step only; step 0: CE only]'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ilseg.errors import IlsegError
from ilseg.methods import ewf, finetune, ilt, mib, plop, rcil, reminder, sdr
from ilseg.methods.base import Method, MethodConfig, StepSetup
from ilseg.methods.ewf import EWF, EWFConfig
from ilseg.methods.finetune import Finetune, FinetuneConfig, Joint, JointConfig
from ilseg.methods.ilt import ILT, ILTConfig
from ilseg.methods.losses import (
    cross_entropy,
    feature_distillation,
    kd_ilt_output,
    kd_mib,
    kd_unbiased,
    unbiased_cross_entropy,
)
from ilseg.methods.mib import MiB, MiBConfig
from ilseg.methods.plop import PLOP, PLOPConfig
from ilseg.methods.rcil import RCIL, RCILConfig
from ilseg.methods.reminder import REMINDER, REMINDERConfig
from ilseg.methods.sdr import SDR, SDRConfig

METHODS: dict[str, type[Method]] = {"finetune": Finetune, "joint": Joint, "ilt": ILT, "mib": MiB, "plop": PLOP,
                                    "sdr": SDR, "reminder": REMINDER, "ewf": EWF, "rcil": RCIL}
METHOD_PRESETS: dict[str, MethodConfig] = {**finetune.PRESETS, **ilt.PRESETS, **mib.PRESETS, **plop.PRESETS,
                                           **sdr.PRESETS, **reminder.PRESETS, **ewf.PRESETS, **rcil.PRESETS}


def register_method(kind: str, cls: type[Method], presets: Mapping[str, MethodConfig]) -> None:
    """Make ``cls`` a method named ``kind``, with its presets usable as ``method.name`` in any config.

    Each preset must be a config of ``cls.config_class``; a kind or preset
    name already taken by another method is refused (registering the same
    ones again is allowed).
    """
    if METHODS.get(kind, cls) is not cls:
        raise IlsegError(f"method kind {kind!r} is taken by {METHODS[kind].__name__}")
    for name, cfg in presets.items():
        if not isinstance(cfg, cls.config_class) or cfg.name != name:
            raise IlsegError(f"preset {name!r} must be a {cls.config_class.__name__} named {name!r}")
        if name in METHOD_PRESETS and type(METHOD_PRESETS[name]) is not type(cfg):
            raise IlsegError(f"preset name {name!r} is taken by another method")
    METHODS[kind] = cls
    METHOD_PRESETS.update(presets)


def method_class(cfg: MethodConfig) -> type[Method]:
    """The registered method that runs a config of ``type(cfg)``."""
    for cls in METHODS.values():
        if type(cfg) is cls.config_class:
            return cls
    raise IlsegError(f"no registered method runs a {type(cfg).__name__}")


def build_method(cfg: MethodConfig) -> Method:
    """The :class:`Method` that runs ``cfg``."""
    return method_class(cfg)(cfg)


def method_config(name: str, overrides: Mapping[str, Any] | None = None) -> MethodConfig:
    """A preset by name, with some fields replaced.

    Raises:
        IlsegError: unknown preset or unknown field, or an invalid value.
    """
    if name not in METHOD_PRESETS:
        raise IlsegError(f"unknown method {name!r}; choose one of: {', '.join(METHOD_PRESETS)}")
    cfg = METHOD_PRESETS[name]
    if not overrides:
        return cfg
    fields = [f.name for f in dataclasses.fields(cfg)]
    unknown = [k for k in overrides if k not in fields]
    if unknown:
        raise IlsegError(f"unknown {'field' if len(unknown) == 1 else 'fields'} {', '.join(map(repr, unknown))} of method {name!r}; "
                         f"known: {', '.join(fields)}")
    return dataclasses.replace(cfg, **dict(overrides))


def describe_method(cfg: MethodConfig) -> str:
    """One line: the preset's name, its loss at steps > 0 and its protocol (:meth:`Method.describe`)."""
    return build_method(cfg).describe()


__all__ = [
    "EWF",
    "EWFConfig",
    "ILT",
    "METHODS",
    "METHOD_PRESETS",
    "PLOP",
    "RCIL",
    "REMINDER",
    "SDR",
    "Finetune",
    "FinetuneConfig",
    "ILTConfig",
    "Joint",
    "JointConfig",
    "Method",
    "MethodConfig",
    "MiB",
    "MiBConfig",
    "PLOPConfig",
    "RCILConfig",
    "REMINDERConfig",
    "SDRConfig",
    "StepSetup",
    "build_method",
    "cross_entropy",
    "describe_method",
    "feature_distillation",
    "kd_ilt_output",
    "kd_mib",
    "kd_unbiased",
    "method_class",
    "method_config",
    "register_method",
    "unbiased_cross_entropy",
]
