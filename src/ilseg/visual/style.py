"""One colour and one marker per method, the same in every figure: reports, the README's, predict panels.

The built-in method presets have fixed entries (:data:`METHOD_STYLES`), from
the Okabe-Ito set, which stays distinguishable for the common colour-vision
deficiencies, plus grey; the six the README's figures show (fine-tuning,
ILT, ILT-kd-out, joint, MiB, PLOP) have six different colours.  Any other
method name gets a stable pick from its name's hash (:func:`method_style`),
so it also keeps its look from one report to the next, whatever the order
in which runs are given.

    >>> method_style("ilt")
    MethodStyle(colour='#E69F00', marker='s', dashes='-')
    >>> method_style("my-method") == method_style("my-method")
    True
"""

from __future__ import annotations

import hashlib
from typing import Literal, NamedTuple

OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
GREY = "#999999"
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "p")


LineStyle = Literal["-", "--", "-.", ":"]


class MethodStyle(NamedTuple):
    """How a method is drawn: line and bar colour, line marker, line style (matplotlib's names)."""

    colour: str
    marker: str
    dashes: LineStyle  # "-" solid; joint training, the upper bound, is drawn "--"


METHOD_STYLES: dict[str, MethodStyle] = {
    "finetune": MethodStyle("#0072B2", "o", "-"),
    "ilt": MethodStyle("#E69F00", "s", "-"),
    "ilt-kd-out": MethodStyle("#009E73", "^", "-"),
    "joint": MethodStyle("#D55E00", "D", "--"),
    "mib": MethodStyle("#CC79A7", "v", "-"),
    "plop": MethodStyle("#56B4E9", "P", "-"),
    "ilt-kd-feat": MethodStyle("#000000", "X", "-"),
    "ilt-kd-out-feat": MethodStyle(GREY, "*", "-"),
    "ilt-ef": MethodStyle("#F0E442", "h", "-"),
    "ilt-ef-kd-out": MethodStyle("#E69F00", "p", "-."),  # ILT's colour, another marker and line style
    # The methods of 2021-2023: black and grey, or the colour of the method each builds on (REMINDER on PLOP,
    # EWF on PLOP or MiB) with another marker and line style.
    "sdr": MethodStyle("#000000", "o", "-."),
    "reminder": MethodStyle("#56B4E9", "s", ":"),
    "ewf": MethodStyle("#56B4E9", "^", "-."),  # on PLOP
    "ewf-mib": MethodStyle("#CC79A7", "^", "-."),  # on MiB
    "rcil": MethodStyle(GREY, "D", "-"),
}
# ADE20k's presets of a method are drawn as the method.
METHOD_STYLES |= {f"{name}-ade": METHOD_STYLES[name] for name in ("sdr", "reminder", "ewf", "rcil")}


def method_style(method: str) -> MethodStyle:
    """The style of ``method`` (a method preset name, ``results.json``'s ``"method"``).

    A name outside :data:`METHOD_STYLES` gets a colour and a marker chosen
    by a hash of the name: stable across runs, reports and Python versions
    (not Python's randomised ``hash``).
    """
    if method in METHOD_STYLES:
        return METHOD_STYLES[method]
    digest = int.from_bytes(hashlib.sha256(method.encode()).digest()[:8], "big")
    colours = (*OKABE_ITO, GREY)
    return MethodStyle(colours[digest % len(colours)], MARKERS[(digest // len(colours)) % len(MARKERS)], "-")


# Line styles for a second, third, ... experiment of one method in one report (same colour and marker).
REPEAT_DASHES: tuple[LineStyle, ...] = (":", "-.")


def step_title(label: str, step: int, *, all_at_once: bool) -> str:
    """The title of a prediction by ``label`` (a method, or a run's folder name) after ``step``.

    A method trained on every class at once (joint training) has a single
    step, and is named as reports name it:

    >>> step_title("ilt", 2, all_at_once=False), step_title("joint", 0, all_at_once=True)
    ('ilt step 2', 'joint, all classes at once')
    """
    return f"{label}, all classes at once" if all_at_once else f"{label} step {step}"
