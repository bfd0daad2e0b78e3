"""Checking a dataset tree before training on it (``ilseg data check``).

:func:`check_tree` resolves the train and val splits exactly as training does
(:func:`ilseg.data.datasets.split_files`), then reads every listed file once,
in worker processes, and reports each of these checks as passed or failed:

- ``lists``: which list files it read; VOC's silent fallback from the
  augmented ``train_aug.txt`` to VOC's own ``train.txt`` fails here;
- ``overlap``: ids in both the train and the val list, ids listed twice;
- ``pairs``: a listed id without its image or its mask;
- ``files``: an image header or a mask that cannot be read (corrupt, RGB mask);
- ``labels``: mask values outside the dataset's classes and not 255, in both splits;
- ``sizes``: a mask whose size is not its image's;
- ``counts``: list sizes and per-step image counts against the published
  ones (docs/protocol.md#datasets and #which-images-a-step-trains-on),
  always shown, with what a difference usually means.

Images are checked by their header (size, format), not decoded.  Nothing is
cached: the check is meant to see the files as they are now.

Example::

    >>> report = check_tree("voc", "data/VOCdevkit", workers=8)
    >>> print("\\n".join(report.lines()))
    >>> report.failed                       # [] when every check passed
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import numpy as np
from tqdm import tqdm

from ilseg.data import io
from ilseg.data.datasets import SplitFiles, split_files
from ilseg.data.parallel import chunked, run_chunks
from ilseg.data.splits import PUBLISHED_COUNTS, published_counts
from ilseg.errors import IlsegError, plural
from ilseg.tasks import IGNORE_INDEX, Mode, Task, class_names, get_task, step_indices

CHECKS = ("lists", "overlap", "pairs", "files", "labels", "sizes", "counts")
SHOWN = 5  # problems named per check in the text report (all of them in the JSON)

# Published split sizes: (count, where the number comes from).
KNOWN_SIZES: dict[str, dict[str, tuple[int, str]]] = {
    "voc": {"train": (10582, "split sizes, docs/protocol.md#datasets"),
            "val": (1449, "split sizes, docs/protocol.md#datasets")},
    "ade": {"train": (20210, "split sizes, docs/protocol.md#datasets"),
            "val": (2000, "split sizes, docs/protocol.md#datasets")},
}
VOC_TRAIN_TXT_SIZE = 1464  # lines of VOC 2012's own ImageSets/Segmentation/train.txt (VOCtrainval_11-May-2012.tar)


@dataclasses.dataclass
class Finding:
    """One check: passed or not, one line saying so, and the offending files or ids."""

    check: str
    ok: bool
    summary: str
    details: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class CountRow:
    """Expected (published) against found: a list size or a task's per-step image counts."""

    what: str
    found: list[int] | None
    expected: list[int] | None
    source: str = ""

    @property
    def match(self) -> bool | None:
        if self.expected is None or self.found is None:
            return None
        return self.found == self.expected


@dataclasses.dataclass
class TreeReport:
    """What :func:`check_tree` found; :meth:`lines` and :meth:`summary_line` say it for people."""

    dataset: str
    base: str
    sources: dict[str, str]
    mask_folders: dict[str, int]
    findings: list[Finding]
    counts: list[CountRow]
    hints: list[str]

    @property
    def failed(self) -> list[str]:
        return [f.check for f in self.findings if not f.ok]

    def summary_line(self) -> str:
        n = len(self.findings)
        if not self.failed:
            return f"data check: OK, all {n} checks passed ({self.dataset} at {self.base})"
        return (f"data check: FAILED {', '.join(self.failed)} ({len(self.failed)} of {n} checks); "
                "fix what is listed above and run the check again")

    def lines(self) -> list[str]:
        out = [f"{self.dataset} tree: {self.base}"]
        for split, text in self.sources.items():
            out.append(f"  {split + ' items:':<12} {text}")
        if self.mask_folders:
            folders = ", ".join(f"{name}/ for {n} ids" for name, n in self.mask_folders.items())
            out.append(f"  {'masks:':<12} {folders}")
        for f in self.findings:
            out.append(f"  {'ok' if f.ok else 'FAIL':<5} {f.check:<8} {f.summary}")
            shown = f.details if f.ok else f.details[:SHOWN]
            out.extend(f"{'':17}{d}" for d in shown)
            if len(f.details) > len(shown):
                out.append(f"{'':17}... and {len(f.details) - len(shown)} more (--json lists them all)")
        if self.counts:
            out.append(f"  {'counts':<26} {'expected':<30} found")
            for row in self.counts:
                expected = "/".join(map(str, row.expected)) if row.expected is not None else "-"
                found = "/".join(map(str, row.found)) if row.found is not None else "not computed"
                verdict = {True: "match", False: "DIFFER", None: ""}[row.match]
                out.append(f"    {row.what:<24} {expected:<30} {found:<30} {verdict}".rstrip())
            sources = sorted({row.source for row in self.counts if row.expected is not None and row.source})
            if sources:
                out.append(f"    (expected: {'; '.join(sources)})")
        if self.hints:
            out.append("  what the differences usually mean:")
            out.extend(f"    - {h}" for h in self.hints)
        return out

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        for row, raw in zip(self.counts, data["counts"]):
            raw["match"] = row.match
        data["failed"] = self.failed
        data["ok"] = not self.failed
        return data


@dataclasses.dataclass
class PairScan:
    """What one image/mask pair looked like on disk (sizes are ``(height, width)``)."""

    image_size: tuple[int, int] | None = None
    image_problem: str = ""  # "missing" or the reader's message
    mask_size: tuple[int, int] | None = None
    mask_problem: str = ""
    values: list[int] = dataclasses.field(default_factory=list)


def inspect_pair(image: str, mask: str) -> PairScan:
    """Read the image's header and the whole mask; every problem is recorded, none raised."""
    scan = PairScan()
    if not os.path.isfile(image):
        scan.image_problem = "missing"
    else:
        try:
            scan.image_size = io.image_size(image)
        except IlsegError as exc:
            scan.image_problem = str(exc)
    if not os.path.isfile(mask):
        scan.mask_problem = "missing"
    else:
        try:  # 256 "classes": values are judged by the caller, which names every bad one
            array, counts = io.read_mask_and_counts(mask, 256)
            scan.mask_size = (int(array.shape[0]), int(array.shape[1]))
            scan.values = [int(v) for v in np.flatnonzero(counts)]
        except IlsegError as exc:
            scan.mask_problem = str(exc)
    return scan


def _inspect_pairs(chunk: list[tuple[str, str]]) -> list[PairScan]:
    return [inspect_pair(image, mask) for image, mask in chunk]


def scan_pairs(images: Sequence[Path], masks: Sequence[Path], *, workers: int = 1,
               progress: bool = True) -> list[PairScan]:
    """:func:`inspect_pair` for every pair, in ``workers`` processes, in the given order."""
    pairs = [(str(i), str(m)) for i, m in zip(images, masks)]
    chunks = chunked(pairs, workers)
    results: list[list[PairScan]] = [[] for _ in chunks]
    with tqdm(total=len(pairs), desc="reading masks", unit="mask", disable=not progress, leave=False) as bar:
        for index, part in run_chunks(_inspect_pairs, chunks, workers=workers):
            results[index] = part
            bar.update(len(part))
    return [scan for part in results for scan in part]


def _list_name(files: SplitFiles) -> str:
    return files.list_file.name if files.list_file is not None else files.source


def _lists_finding(dataset: str, train: SplitFiles, val: SplitFiles) -> Finding:
    problems = []
    for split, files in (("train", train), ("val", val)):
        if not files.ids:
            problems.append(f"the {split} {files.source} holds no ids")
    if dataset != "ade" and train.list_file is not None and train.list_file.name == "train.txt":
        size = f"{len(train.ids)} ids" + (f"; VOC's own list has {VOC_TRAIN_TXT_SIZE}" if dataset == "voc" else "")
        fix = (f"make it with `ilseg data prepare voc --voc {train.base} --sbd SBD_DIR` (docs/data.md)"
               if dataset == "voc" else "regenerate the tree with `ilseg data synth --out DIR`")
        problems.insert(0, f"{train.list_file.with_name('train_aug.txt')} is missing, so training would use "
                           f"{train.list_file} ({size}) instead of the augmented list: {fix}")
    if problems:
        return Finding("lists", False, problems[0], problems[1:])
    return Finding("lists", True, f"train: {_list_name(train)}, val: {_list_name(val)}")


def _are(items: Sequence[object]) -> str:
    return "is" if len(items) == 1 else "are"


def _overlap_finding(train: SplitFiles, val: SplitFiles) -> Finding:
    both = sorted(set(train.ids) & set(val.ids))
    repeated = [f"{split} list names {item!r} {n} times"
                for split, files in (("train", train), ("val", val))
                for item, n in sorted(collections.Counter(files.ids).items()) if n > 1]
    if both:
        return Finding("overlap", False, f"{plural(len(both), 'id')} {_are(both)} in both the train and the val list "
                                         "(validation images must not be trained on)", both + repeated)
    if repeated:
        return Finding("overlap", False, f"{plural(len(repeated), 'id')} {_are(repeated)} listed more than once", repeated)
    return Finding("overlap", True, "no id is in both the train and the val list, none is listed twice")


def _file_findings(dataset: str, items: list[tuple[str, Path, Path]], scans: list[PairScan]) -> list[Finding]:
    num_classes = len(class_names(dataset))
    missing, unreadable, labels, sizes = [], [], [], []
    for (split, image, mask), scan in zip(items, scans):
        for path, problem in ((image, scan.image_problem), (mask, scan.mask_problem)):
            if problem == "missing":
                missing.append(f"{split}: {path} does not exist")
            elif problem:
                unreadable.append(f"{split}: {problem}")
        bad = [v for v in scan.values if v >= num_classes and v != IGNORE_INDEX]
        if bad:
            labels.append(f"{split}: {mask} has {', '.join(map(str, bad))}")
        if scan.image_size is not None and scan.mask_size is not None and scan.image_size != scan.mask_size:
            (mh, mw), (ih, iw) = scan.mask_size, scan.image_size
            sizes.append(f"{split}: {mask} is {mw}x{mh} but {image.name} is {iw}x{ih} (WxH)")
    allowed = f"0..{num_classes - 1} and {IGNORE_INDEX}"
    return [
        Finding("pairs", not missing, f"{plural(len(missing), 'listed file')} {'does' if len(missing) == 1 else 'do'} not exist (partial download or a wrong list)"
                if missing else "every listed id has its image and its mask", missing),
        Finding("files", not unreadable, f"{plural(len(unreadable), 'file')} cannot be read" if unreadable
                else "every image header and mask is readable", unreadable),
        Finding("labels", not labels, f"{plural(len(labels), 'mask')} {'holds' if len(labels) == 1 else 'hold'} values outside {allowed} (file: values)"
                if labels else f"every mask holds values in {allowed} only", labels),
        Finding("sizes", not sizes, f"{plural(len(sizes), 'mask')} {'differs' if len(sizes) == 1 else 'differ'} in size from {'its' if len(sizes) == 1 else 'their'} image" if sizes
                else "every mask has its image's size", sizes),
    ]


def _task_rows(dataset: str, presence: list[frozenset[int]] | None, task: Task | None,
               mode: Mode) -> list[CountRow]:
    wanted: list[tuple[Task, Mode]]
    if task is not None:
        wanted = [(task, mode)]
    elif dataset == "voc":
        wanted = [(get_task("voc", name), cast(Mode, m)) for name, m in PUBLISHED_COUNTS]
    else:
        wanted = []
    rows = []
    for t, m in wanted:
        found = None if presence is None else [len(step_indices(presence, t, s, m)) for s in range(t.num_steps)]
        expected = published_counts(t, m)
        label = f"{t.name} {'overlapped' if m == 'overlap' else 'disjoint'}"
        rows.append(CountRow(label, found, list(expected) if expected is not None else None,
                             "per-step counts on train_aug, docs/protocol.md#which-images-a-step-trains-on"))
    return rows


def _hints(dataset: str, train: SplitFiles, rows: list[CountRow], overlap: int, incomplete: int) -> list[str]:
    hints = []
    if dataset == "voc" and train.list_file is not None and train.list_file.name == "train.txt":
        hints.append(f"the training list is train.txt ({len(train.ids)} ids; VOC's own has {VOC_TRAIN_TXT_SIZE}), "
                     "not train_aug.txt: run `ilseg data prepare voc` (docs/data.md)")
    if overlap:
        hints.append(f"{plural(overlap, 'validation id')} {'is' if overlap == 1 else 'are'} in the training list: the augmented list must leave out "
                     "every id of val.txt (`ilseg data prepare voc` writes it so)")
    by_name = {row.what: row for row in rows}
    for split, what in (("train", "train list"), ("val", "val list")):
        row = by_name.get(what)
        if row is None or row.match is not False or row.found is None or row.expected is None:
            continue
        diff = row.found[0] - row.expected[0]
        if dataset == "voc" and split == "train" and train.list_file is not None \
                and train.list_file.name == "train.txt":
            continue  # said above
        if diff < 0:
            if dataset == "ade":
                cause = "a partial download or unzip of ADEChallengeData2016.zip"
            elif split == "train":
                cause = ("a partial download of VOC or SBD, an interrupted `ilseg data prepare voc` (run it again), "
                         "or a list from another source")
            else:
                cause = "an edited val.txt or another VOC release (VOCtrainval_11-May-2012.tar's has 1,449 ids)"
            hints.append(f"the {split} split has {-diff} fewer images than published: usually {cause}")
        else:
            hints.append(f"the {split} split has {diff} more images than published: usually ids of the other "
                         "split or of another release in the list")
    lists_match = all(by_name[w].match is not False for w in ("train list", "val list") if w in by_name)
    task_differ = [row for row in rows if row.what not in ("train list", "val list") and row.match is False]
    if task_differ and lists_match:
        hints.append("the lists have the published sizes but per-step counts differ: the masks' class values are "
                     "not SBD's / VOC's (masks converted another way, e.g. colour PNGs mapped to other ids, or "
                     "SBD masks used for validation images)")
    elif task_differ:
        hints.append("per-step counts follow the training list: they can only match once its size does")
    if incomplete:
        hints.append(f"{plural(incomplete, 'training mask')} {'is' if incomplete == 1 else 'are'} missing or unreadable, so per-step counts were not "
                     "computed")
    return hints


def check_tree(
    dataset: str,
    root: str | os.PathLike[str],
    *,
    task: Task | None = None,
    mode: Mode = "disjoint",
    workers: int = 1,
    ignore_counts: bool = False,
    progress: bool = True,
) -> TreeReport:
    """Check the ``dataset`` tree at ``root`` (module docstring); every file is read once.

    Args:
        task: count this task's per-step images (in ``mode``); by default, on
            VOC, every task with published counts in both modes.
        workers: processes reading the files (1: this process).
        ignore_counts: report count differences without failing the ``counts`` check.

    Raises:
        IlsegError: the tree cannot be resolved at all (no root, no list, no
            mask folder); everything after that is a finding, not an error.
    """
    if workers < 1:
        raise IlsegError(f"--workers must be 1 or more, got {workers}")
    if task is not None and task.dataset != dataset:
        raise IlsegError(f"task {task.dataset}/{task.name} does not belong to dataset {dataset!r}")
    train = split_files(dataset, root, "train")
    val = split_files(dataset, root, "val")
    findings = [_lists_finding(dataset, train, val), _overlap_finding(train, val)]

    items = [("train", i, m) for i, m in zip(train.images, train.masks)]
    items += [("val", i, m) for i, m in zip(val.images, val.masks)]
    scans = scan_pairs([i for _, i, _ in items], [m for _, _, m in items], workers=workers, progress=progress)
    findings += _file_findings(dataset, items, scans)

    train_scans = scans[:len(train.ids)]
    incomplete = sum(1 for s in train_scans if s.mask_problem)
    presence = None if incomplete else [frozenset(s.values) for s in train_scans]
    rows = []
    for split, files in (("train", train), ("val", val)):
        known = KNOWN_SIZES.get(dataset, {}).get(split)
        rows.append(CountRow(f"{split} list", [len(files.ids)], [known[0]] if known else None,
                             known[1] if known else ""))
    rows += _task_rows(dataset, presence, task, mode)
    differ = [row.what for row in rows if row.match is False]
    if not any(row.expected is not None for row in rows):
        counts = Finding("counts", True, f"no published counts for {dataset}: found counts shown for information")
    elif differ:
        note = " (not failing: --ignore-counts)" if ignore_counts else ""
        counts = Finding("counts", ignore_counts, f"{plural(len(differ), 'count')} {'differs' if len(differ) == 1 else 'differ'} from the published ones{note}: "
                                                  f"{', '.join(differ)}")
    else:
        counts = Finding("counts", True, "every count with a published value matches it")
    findings.append(counts)
    overlap = len(set(train.ids) & set(val.ids))
    hints = _hints(dataset, train, rows, overlap, incomplete) if differ or overlap or incomplete else []

    folders = collections.Counter(m.parent.name for (_, _, m), s in zip(items, scans) if s.mask_problem != "missing")
    sources = {"train": f"{train.source} ({len(train.ids)} ids)", "val": f"{val.source} ({len(val.ids)} ids)"}
    return TreeReport(dataset=dataset, base=str(train.base), sources=sources, mask_folders=dict(folders),
                      findings=findings, counts=rows, hints=hints)
