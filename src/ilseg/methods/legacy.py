"""Run folders of ilseg 0.1 (up to commit 1fd8de5), whose methods were points of one flat config.

Before each method had its own config, every run saved the same 18 method
fields (``unbiased_ce``, ``kd``, ``pod_factor``, ``joint`` ...) in
``config.yaml`` and in each checkpoint's identity.  :func:`from_legacy`
reads such a section into the method's own config, and refuses (naming the
fields) a combination the method cannot express; :func:`to_legacy` writes a
config of a built-in method in that form, which is how the two are checked
against each other.  ``kd: mib`` is now ``kd: ilt_mib_code``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ilseg.errors import IlsegError
from ilseg.methods.base import MethodConfig
from ilseg.methods.finetune import FinetuneConfig, JointConfig
from ilseg.methods.ilt import ILTConfig
from ilseg.methods.mib import MiBConfig
from ilseg.methods.plop import PLOPConfig

# The flat fields and their defaults (the defaults switched every term off).
LEGACY_FIELDS: dict[str, Any] = {
    "ce_reduction": "valid", "unbiased_ce": False, "kd": "none", "kd_weight": 0.0, "kd_alpha": 1.0,
    "kd_temperature": 1.0, "kd_mask": "old_bgr", "fd_weight": 0.0, "pod_factor": 0.0, "pod_logits_factor": 0.0,
    "pseudo_labels": "none", "pseudo_threshold": "median", "pseudo_floor": 0.001, "freeze_encoder": False,
    "freeze_bn": False, "classifier_init": "default", "keep_old_labels": False, "joint": False,
}
_KD_NAMES = {"mib": "ilt_mib_code"}  # old name -> new name of ILT's output distillation kinds


def is_legacy(section: Mapping[str, Any], config_class: type[MethodConfig]) -> bool:
    """Whether a ``method`` section has fields of the flat layout that ``config_class`` lacks."""
    own = {f.name for f in dataclasses.fields(config_class)}
    extra = set(section) - own - {"name"}
    return bool(extra) and extra <= set(LEGACY_FIELDS)


def to_legacy(cfg: MethodConfig) -> dict[str, Any] | None:
    """``cfg`` as the 18 flat fields (no ``name``), or ``None`` for a method the flat layout never had."""
    flat = dict(LEGACY_FIELDS)
    flat |= {k: getattr(cfg, k) for k in ("ce_reduction", "classifier_init", "freeze_encoder", "freeze_bn",
                                          "keep_old_labels")}
    if isinstance(cfg, JointConfig):
        flat["joint"] = True
    elif isinstance(cfg, ILTConfig):
        flat |= {k: getattr(cfg, k) for k in ("kd_weight", "kd_alpha", "kd_temperature", "kd_mask", "fd_weight")}
        flat["kd"] = {new: old for old, new in _KD_NAMES.items()}.get(cfg.kd, cfg.kd)
    elif isinstance(cfg, MiBConfig):
        flat |= {"unbiased_ce": True, "kd": "unbiased", "kd_weight": cfg.kd_weight, "kd_alpha": cfg.kd_alpha}
    elif isinstance(cfg, PLOPConfig):
        flat |= {k: getattr(cfg, k) for k in ("pod_factor", "pod_logits_factor", "pseudo_labels",
                                              "pseudo_threshold", "pseudo_floor")}
    elif not isinstance(cfg, FinetuneConfig):
        return None
    return flat


def from_legacy(start: MethodConfig, section: Mapping[str, Any], where: str) -> MethodConfig:
    """The config of ``start``'s method that the flat ``section`` describes.

    Args:
        start: the preset named by the section (its class is the method).
        section: the flat fields (``name`` and any subset of :data:`LEGACY_FIELDS`).
        where: the config key, for messages (``"method"``).

    Raises:
        IlsegError: a flat field whose value the method cannot have, named with the value the method implies.
    """
    own = {f.name for f in dataclasses.fields(type(start))} - {"name"}
    values = {k: _KD_NAMES.get(v, v) if k == "kd" else v for k, v in section.items() if k in own}
    cfg = dataclasses.replace(start, **values)
    implied = to_legacy(cfg)
    if implied is None:
        raise IlsegError(f"{where}: method {start.name!r} has no field {sorted(set(section) - own - {'name'})[0]!r}")
    given = {**implied, **{k: _KD_NAMES.get(v, v) if k == "kd" else v for k, v in section.items() if k != "name"}}
    implied_new = {k: _KD_NAMES.get(v, v) if k == "kd" else v for k, v in implied.items()}
    wrong = [f"{k} = {section.get(k, given[k])!r} (method {start.name!r} has {implied_new[k]!r})" for k in LEGACY_FIELDS
             if k not in own and given[k] != implied_new[k] and not _same_number(given[k], implied_new[k])]
    if wrong:
        raise IlsegError(f"{where}: {', '.join(wrong)}: a setting of ilseg 0.1's flat method config that this method "
                         f"cannot have; remove it, or choose the method that has it (see 'ilseg methods')")
    return cfg


def _same_number(a: Any, b: Any) -> bool:
    return (isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool)
            and not isinstance(b, bool) and float(a) == float(b))
