"""Incremental protocols: class orders, which images a step uses, label remapping.

A :class:`Task` is a class *order* (dataset class ids in the order they are
learned, background first) cut into steps.  The model's output channel ``k``
always stands for ``order[k]``; for the published tasks the order is the
identity, so channel ids equal dataset ids.  A shuffled order (PLOP's
``15-5s_b`` ...) or any custom split is just another order.

Everything that decides which pixels a step learns from lives here as pure
functions of masks and class sets:

* :func:`keep_image` - the disjoint / overlapped image filter
  (docs/protocol.md#which-images-a-step-trains-on);
* :func:`train_lut` / :func:`eval_lut` - 256-entry lookup tables that remap a
  dataset mask to a step's training or test target (docs/protocol.md#labels-at-each-step).

Example::

    >>> task = get_task("voc", "15-1")
    >>> task.num_steps, task.new_classes(1), task.classifier_sizes(2)
    (6, (16,), (16, 1, 1))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np

from ilseg.errors import IlsegError, plural

IGNORE_INDEX = 255  # the "ignore" label of masks and targets, everywhere in ilseg

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
    "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
    "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

# ADE20k SceneParsing (ADEChallengeData2016) class names, id 1..150; 0 is "other".
ADE_CLASSES: tuple[str, ...] = (
    "other", "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed",
    "windowpane", "grass", "cabinet", "sidewalk", "person", "earth", "door", "table",
    "mountain", "plant", "curtain", "chair", "car", "water", "painting", "sofa",
    "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence",
    "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box",
    "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper",
    "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop",
    "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television", "airplane", "dirt track", "apparel",
    "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike",
    "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave", "pot",
    "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen",
    "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)

# The bundled synthetic benchmark (see ilseg.data.synth): 10 foreground classes.
SYNTH_CLASSES: tuple[str, ...] = (
    "background", "disc", "square", "triangle", "ring", "cross",
    "bar", "diamond", "star", "crescent", "checker",
)

DATASET_CLASSES: dict[str, tuple[str, ...]] = {
    "voc": VOC_CLASSES,
    "ade": ADE_CLASSES,
    "synth": SYNTH_CLASSES,
}

# Published tasks as step sizes over the identity order.  The first number
# counts foreground classes; background joins step 0.
_TASK_SIZES: dict[str, dict[str, tuple[int, ...]]] = {
    "voc": {
        "19-1": (19, 1),
        "15-5": (15, 5),
        "15-1": (15, 1, 1, 1, 1, 1),
        "10-1": (10,) + (1,) * 10,
        "offline": (20,),
    },
    "ade": {
        "100-50": (100, 50),
        "100-10": (100,) + (10,) * 5,
        "100-5": (100,) + (5,) * 10,
        "50-50": (50, 50, 50),
        "offline": (150,),
    },
    "synth": {
        "6-2-2": (6, 2, 2),
        "6-4": (6, 4),
        "6-1": (6, 1, 1, 1, 1),
        "8-2": (8, 2),
        "offline": (10,),
    },
}

_ALIASES: dict[str, dict[str, str]] = {
    "voc": {"15-5s": "15-1", "joint": "offline"},
    "ade": {"joint": "offline"},
    "synth": {"joint": "offline"},
}

Mode = Literal["disjoint", "overlap"]


@dataclasses.dataclass(frozen=True)
class Task:
    """A class order cut into incremental steps.

    Attributes:
        dataset: ``"voc"``, ``"ade"`` or ``"synth"``.
        name: the task's name, e.g. ``"15-1"``.
        order: dataset class ids in learning order; ``order[0]`` is 0.
        step_sizes: number of classes of each step (step 0 counts background).
        class_names: the dataset's class names, indexed by dataset id.
    """

    dataset: str
    name: str
    order: tuple[int, ...]
    step_sizes: tuple[int, ...]
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        n = len(self.class_names)
        if sorted(self.order) != sorted(set(self.order)):
            raise IlsegError(f"task {self.name!r}: the class order repeats a class: {list(self.order)}")
        bad = [c for c in self.order if not 0 <= c < n]
        if bad:
            raise IlsegError(
                f"task {self.name!r}: class ids {bad} are not classes of {self.dataset!r} (0..{n - 1})"
            )
        if not self.order or self.order[0] != 0:
            raise IlsegError(f"task {self.name!r}: the class order must start with background (0)")
        if any(s <= 0 for s in self.step_sizes) or sum(self.step_sizes) != len(self.order):
            raise IlsegError(
                f"task {self.name!r}: step sizes {list(self.step_sizes)} must be positive and add up "
                f"to the {len(self.order)} classes of the order"
            )
        if self.step_sizes[0] < 2:  # background alone: no training image, nothing to learn at step 0
            example = next(iter(_TASK_SIZES.get(self.dataset, {"15-5": ()})))
            raise IlsegError(
                f"task {self.name!r} of {self.dataset!r}: step 0 would learn background alone; give step 0 at least "
                f"one class besides background (e.g. task {example}; explicit step sizes count background in step 0)"
            )

    # -- classes per step (all in *dataset* ids) ---------------------------
    @property
    def num_steps(self) -> int:
        return len(self.step_sizes)

    def _check_step(self, step: int) -> None:
        if not 0 <= step < self.num_steps:
            raise IlsegError(
                f"task {self.dataset}/{self.name} has steps 0..{self.num_steps - 1}; step {step} does not exist"
            )

    def new_classes(self, step: int) -> tuple[int, ...]:
        """Dataset ids learned at ``step`` (step 0 includes background)."""
        self._check_step(step)
        start = sum(self.step_sizes[:step])
        return self.order[start:start + self.step_sizes[step]]

    def old_classes(self, step: int) -> tuple[int, ...]:
        """Dataset ids learned before ``step`` (empty at step 0)."""
        self._check_step(step)
        return self.order[: sum(self.step_sizes[:step])]

    def seen_classes(self, step: int) -> tuple[int, ...]:
        """Dataset ids learned up to and including ``step``."""
        self._check_step(step)
        return self.order[: sum(self.step_sizes[: step + 1])]

    def future_classes(self, step: int) -> tuple[int, ...]:
        self._check_step(step)
        return self.order[sum(self.step_sizes[: step + 1]):]

    def classifier_sizes(self, step: int) -> tuple[int, ...]:
        """Output channels of each classifier of the model at ``step``."""
        self._check_step(step)
        return self.step_sizes[: step + 1]

    def num_outputs(self, step: int) -> int:
        """Total output channels of the model at ``step``."""
        return sum(self.classifier_sizes(step))

    def channel_names(self, step: int) -> tuple[str, ...]:
        """Class name of every output channel at ``step`` (channel k is ``order[k]``)."""
        return tuple(self.class_names[c] for c in self.seen_classes(step))

    def describe(self) -> str:
        lines = [f"{self.dataset} {self.name}: {plural(self.num_steps, 'step')}, {plural(len(self.order), 'class')}"]
        for t in range(self.num_steps):
            names = ", ".join(f"{c}:{self.class_names[c]}" for c in self.new_classes(t))
            lines.append(f"  step {t} ({plural(self.step_sizes[t], 'class')}, {plural(self.num_outputs(t), 'output')}): "
                         f"{names}")
        return "\n".join(lines)

    def fingerprint(self) -> dict:
        """What identifies the task in caches and checkpoints."""
        return {"dataset": self.dataset, "name": self.name, "order": list(self.order),
                "step_sizes": list(self.step_sizes)}


# -- building tasks -----------------------------------------------------------
def dataset_names() -> tuple[str, ...]:
    return tuple(DATASET_CLASSES)


def class_names(dataset: str) -> tuple[str, ...]:
    try:
        return DATASET_CLASSES[dataset]
    except KeyError:
        raise IlsegError(
            f"unknown dataset {dataset!r}; choose one of {', '.join(DATASET_CLASSES)}"
        ) from None


def task_names(dataset: str) -> tuple[str, ...]:
    """Names of the built-in tasks of ``dataset`` (aliases excluded)."""
    class_names(dataset)
    return tuple(_TASK_SIZES[dataset])


def parse_step_sizes(name: str) -> tuple[int, ...] | None:
    """``"6-2-2"`` -> (6, 2, 2); ``None`` if ``name`` is not of that form."""
    parts = name.split("-")
    if len(parts) < 2 or not all(p.isdigit() for p in parts):
        return None
    return tuple(int(p) for p in parts)


def _sizes_to_steps(first: int, rest: Sequence[int], num_fg: int) -> tuple[int, ...]:
    """Expand "first-rest" notation into step sizes covering ``num_fg`` classes.

    ``15-1`` means 15 classes then steps of 1 until the classes run out;
    ``6-2-2`` lists every step.  Returns sizes with background added to step 0.
    """
    if len(rest) == 1:
        remaining = num_fg - first
        if remaining <= 0 or remaining % rest[0]:
            raise ValueError
        sizes = (first,) + (rest[0],) * (remaining // rest[0])
    else:
        sizes = (first, *rest)
    if sum(sizes) != num_fg:
        raise ValueError
    return (sizes[0] + 1, *sizes[1:])


def get_task(
    dataset: str,
    name: str,
    *,
    order: Sequence[int] | None = None,
    step_sizes: Sequence[int] | None = None,
) -> Task:
    """Return a built-in or custom task.

    Args:
        dataset: ``"voc"``, ``"ade"`` or ``"synth"``.
        name: a built-in task (``"15-1"``, alias ``"15-5s"``, ``"offline"``),
            or any ``"N-M"`` / ``"N-M-K..."`` pattern over the dataset's classes.
        order: optional class order (dataset ids, background first); the
            default is the identity.  ``order`` may cover a subset of classes
            only when ``step_sizes`` says so.
        step_sizes: optional explicit sizes of every step, background
            counted in step 0 (overrides the sizes implied by ``name``).
    """
    names = class_names(dataset)
    canonical = _ALIASES[dataset].get(name, name)
    num_fg = len(names) - 1
    if step_sizes is not None:
        sizes = tuple(int(s) for s in step_sizes)
    elif canonical in _TASK_SIZES[dataset]:
        fg = _TASK_SIZES[dataset][canonical]
        sizes = (fg[0] + 1, *fg[1:])
    else:
        parsed = parse_step_sizes(canonical)
        sizes = None
        if parsed is not None:
            total = len(order) - 1 if order is not None else num_fg
            try:
                sizes = _sizes_to_steps(parsed[0], parsed[1:], total)
            except ValueError:
                sizes = None
        if sizes is None:
            known = ", ".join(list(_TASK_SIZES[dataset]) + list(_ALIASES[dataset]))
            raise IlsegError(
                f"unknown task {name!r} for dataset {dataset!r}; built-in tasks: {known}; "
                f"or give 'N-M' whose steps add up to {num_fg} classes, or a custom order and step sizes"
            )
    assert sizes is not None  # narrowed for the type checker: the branch above raised
    full_order = tuple(int(c) for c in order) if order is not None else tuple(range(len(names)))
    return Task(dataset=dataset, name=name, order=full_order, step_sizes=sizes, class_names=names)


def resolve_class(dataset: str, value: int | str) -> int:
    """A class id from an id or a name (``"person"`` -> 15 on VOC)."""
    names = class_names(dataset)
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        cid = int(value)
        if 0 <= cid < len(names):
            return cid
        raise IlsegError(f"class id {cid} is not a class of {dataset!r} (0..{len(names) - 1})")
    lowered = value.strip().lower()
    for cid, n in enumerate(names):
        if n == lowered:
            return cid
    raise IlsegError(f"unknown class name {value!r} for dataset {dataset!r}; run 'ilseg tasks {dataset} offline' to list them")


def custom_task(dataset: str, name: str, order: Iterable[int | str], step_sizes: Sequence[int]) -> Task:
    """A task from a config: a class order (ids or names) and explicit step sizes."""
    ids = [resolve_class(dataset, c) for c in order]
    if ids and ids[0] != 0:
        ids = [0, *ids] if 0 not in ids else ids
    return get_task(dataset, name, order=ids, step_sizes=step_sizes)


# -- which images a step uses (docs/protocol.md#which-images-a-step-trains-on) --
def keep_image(classes_in_image: Iterable[int], task: Task, step: int, mode: Mode) -> bool:
    """Whether an image with these mask values belongs to ``step``'s training set.

    overlapped: at least one of the step's new classes (not background) appears.
    disjoint: that, and every value is old, new, background or ignore (255).
    Classes outside the task's order (possible with a partial custom order)
    count as future classes.
    """
    present = set(int(c) for c in classes_in_image)
    new = set(task.new_classes(step)) - {0}
    if not present & new:
        return False
    if mode == "overlap":
        return True
    if mode != "disjoint":
        raise IlsegError(f"unknown mode {mode!r}; use 'disjoint' or 'overlap'")
    allowed = set(task.seen_classes(step)) | {0, IGNORE_INDEX}
    return present <= allowed


TestImages = Literal["all", "seen", "seen_only"]


def keep_test_image(classes_in_image: Iterable[int], task: Task, step: int, rule: TestImages) -> bool:
    """Whether a validation image with these mask values scores the model after ``step``.

    ``"all"``: every image.  ``"seen"``: at least one foreground class seen so
    far appears (MiB's and PLOP's test set).  ``"seen_only"``: that, and no
    class of a later step appears (cssegmentation's disjoint test set).
    """
    if rule == "all":
        return True
    present = set(int(c) for c in classes_in_image)
    seen = set(task.seen_classes(step))
    if not present & (seen - {0}):
        return False
    if rule == "seen":
        return True
    if rule != "seen_only":
        raise IlsegError(f"unknown test-image rule {rule!r}; use 'all', 'seen' or 'seen_only'")
    return present <= seen | {0, IGNORE_INDEX}


def step_indices(class_sets: Sequence[Iterable[int]], task: Task, step: int, mode: Mode) -> list[int]:
    """Indices of the images (given by their mask values) that ``step`` trains on."""
    return [i for i, cs in enumerate(class_sets) if keep_image(cs, task, step, mode)]


# -- label remapping (docs/protocol.md#labels-at-each-step) --------------------
def _identity_ignore_lut() -> np.ndarray:
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    return lut


def train_lut(task: Task, step: int, *, keep_old: bool = False) -> np.ndarray:
    """Lookup table turning dataset mask values into step ``step``'s training target.

    The step's new classes map to their output channel; old and future classes
    become background 0 ("background shift"), unless ``keep_old`` (the ILT
    paper's own protocol) keeps old classes at their channel.  255 stays 255.
    Values that are not classes of the dataset map to 255; loaders reject them
    before they get here.
    """
    lut = _identity_ignore_lut()
    lut[: len(task.class_names)] = 0
    channel = {c: k for k, c in enumerate(task.order)}
    for c in task.new_classes(step):
        lut[c] = channel[c]
    if keep_old:
        for c in task.old_classes(step):
            lut[c] = channel[c]
    lut[IGNORE_INDEX] = IGNORE_INDEX
    return lut


Unseen = Literal["ignore", "background"]


def eval_lut(task: Task, step: int, *, unseen: Unseen = "ignore", ignore_background: bool = False) -> np.ndarray:
    """Lookup table turning dataset mask values into the test target after ``step``.

    Seen classes map to their output channel.  Classes not yet seen become 255
    (``unseen="ignore"``, MiB) or background 0 (``unseen="background"``,
    cssegmentation / PLOP).  ``ignore_background`` maps label 0 to 255 (MiB's
    ADE20k convention, where 0 is "other").
    """
    if unseen not in ("ignore", "background"):
        raise IlsegError(f"unknown unseen-class rule {unseen!r}; use 'ignore' or 'background'")
    lut = _identity_ignore_lut()
    lut[: len(task.class_names)] = IGNORE_INDEX if unseen == "ignore" else 0
    for k, c in enumerate(task.seen_classes(step)):
        lut[c] = k
    if ignore_background:
        lut[0] = IGNORE_INDEX
    lut[IGNORE_INDEX] = IGNORE_INDEX
    return lut
