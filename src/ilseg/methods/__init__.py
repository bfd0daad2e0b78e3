"""Training methods: fine-tuning, ILT (each variant), MiB and joint training.

A method decides what happens at each step boundary (the student, the
teacher, the training labels: :meth:`Method.start_step`) and turns the
model's outputs (and the previous model's, when it distils) into a dict of
named losses for one batch.  See docs/methods.md for
each preset's formula and source.
"""

from ilseg.methods.base import (
    METHOD_PRESETS,
    Method,
    MethodConfig,
    StepSetup,
    build_method,
    describe_method,
    method_config,
)
from ilseg.methods.losses import (
    cross_entropy,
    feature_distillation,
    kd_ilt_output,
    kd_mib,
    kd_unbiased,
    unbiased_cross_entropy,
)

__all__ = [
    "METHOD_PRESETS",
    "Method",
    "MethodConfig",
    "StepSetup",
    "build_method",
    "cross_entropy",
    "describe_method",
    "feature_distillation",
    "kd_ilt_output",
    "kd_mib",
    "kd_unbiased",
    "method_config",
    "unbiased_cross_entropy",
]
