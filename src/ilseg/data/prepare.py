"""Building the VOC-aug tree ilseg reads, from PASCAL VOC 2012 and SBD (``ilseg data prepare voc``).

What is built, inside the ``VOC2012`` folder (docs/data.md has the downloads)::

    SegmentationClassAug/<id>.png    palette PNGs, one per id of train_aug.txt and val.txt:
        a training id SBD annotates   <- SBD  dataset/cls/<id>.mat, struct GTcls, field Segmentation
        a training id only VOC has    <- VOC  SegmentationClass/<id>.png (255 borders kept)
        a validation id               <- VOC  SegmentationClass/<id>.png (the benchmark scores on VOC's own)
    ImageSets/Segmentation/train_aug.txt
        (SBD train + SBD val + VOC train) - VOC val, sorted, each id once (10,582 ids, docs/protocol.md#datasets)

Masks are written atomically (temporary file, then rename), so a file at its
final name is always complete; a rerun skips the masks already there and
``train_aug.txt`` is written last, only when every mask is in place.  Reading
SBD's ``.mat`` files needs SciPy (``pip install ilseg[data]``).

Example::

    >>> summary = prepare_voc("data/VOCdevkit/VOC2012", "data/benchmark_RELEASE", workers=8)
    >>> summary.train_aug_size
    10582
"""

from __future__ import annotations

import dataclasses
import os
import signal
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ilseg.data import io
from ilseg.data.datasets import find_voc_root
from ilseg.data.parallel import chunked, run_chunks
from ilseg.errors import IlsegError, Interrupted, plural
from ilseg.fileio import atomic_write_bytes, atomic_write_text, is_ilseg_temporary
from ilseg.tasks import IGNORE_INDEX, class_names

VOC_TRAIN_AUG_SIZE = 10582  # docs/protocol.md#datasets
VOC_NUM_CLASSES = len(class_names("voc"))  # 21: background and 20 objects
SCIPY_FIX = "reading SBD's .mat annotations needs SciPy: pip install 'ilseg[data]' (or pip install scipy)"
SBD_FIX = "re-download SBD's benchmark.tgz and unpack it again (docs/data.md)"
VOC_FIX = "re-download VOCtrainval_11-May-2012.tar and unpack it again (docs/data.md)"

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the empty IEND chunk every complete PNG ends with


@dataclasses.dataclass(frozen=True)
class MaskJob:
    """One mask to make: ``source`` (a ``.mat`` or a VOC PNG) -> ``target`` (a palette PNG)."""

    item: str
    source: str
    target: str
    kind: str  # "sbd", "voc-train" or "voc-val"


@dataclasses.dataclass
class PrepareSummary:
    """What :func:`prepare_voc` found and did; :meth:`lines` says it for people."""

    voc_dir: Path
    sbd_dir: Path
    sbd_found_as: str
    train_aug_file: Path
    written: int = 0
    skipped: int = 0
    from_sbd: int = 0
    from_voc_train: int = 0
    from_voc_val: int = 0
    val_excluded: int = 0
    train_aug_size: int = 0
    train_aug_written: bool = False
    temporary_removed: int = 0

    def lines(self) -> list[str]:
        size = self.train_aug_size
        verdict = ("matches the published 10,582 (docs/protocol.md#datasets)" if size == VOC_TRAIN_AUG_SIZE else
                   f"DIFFERS from the published 10,582 (docs/protocol.md#datasets) by {size - VOC_TRAIN_AUG_SIZE:+d}: "
                   "usually a partial download or another release of VOC or SBD; `ilseg data check` says more")
        out = [
            f"masks in {self.voc_dir / 'SegmentationClassAug'}: {self.written} written, "
            f"{self.skipped} already there (skipped)",
            f"  training masks: {self.from_sbd} from SBD, {self.from_voc_train} from VOC (ids SBD lacks); "
            f"validation masks: {self.from_voc_val} from VOC",
            f"  validation ids left out of train_aug (they were in SBD train/val or VOC train): {self.val_excluded}",
            f"{self.train_aug_file}: {size} ids ({'written' if self.train_aug_written else 'unchanged'}); {verdict}",
        ]
        if self.temporary_removed:
            out.insert(1, f"  removed {plural(self.temporary_removed, 'temporary file')} left by an earlier, killed run")
        return out


def find_sbd_dir(path: str | os.PathLike[str]) -> tuple[Path, str]:
    """SBD's ``dataset`` folder (``cls/``, ``train.txt``, ``val.txt``) given it or a folder above it.

    Returns:
        ``(folder, how it was found)``, e.g. ``(.../benchmark_RELEASE/dataset, "its dataset/ subfolder")``.

    Raises:
        IlsegError: none of ``path``, ``path/dataset``, ``path/benchmark_RELEASE/dataset`` holds SBD.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise IlsegError(f"SBD folder {root} does not exist; unpack SBD's benchmark.tgz and give its "
                         "benchmark_RELEASE/dataset folder (or benchmark_RELEASE) as --sbd (docs/data.md)")
    candidates = [(root, "the folder given"), (root / "dataset", "its dataset/ subfolder"),
                  (root / "benchmark_RELEASE" / "dataset", "its benchmark_RELEASE/dataset/ subfolder")]
    for folder, how in candidates:
        if (folder / "cls").is_dir() and (folder / "train.txt").is_file():
            return folder, how
    searched = ", ".join(str(c) for c, _ in candidates)
    raise IlsegError(f"no SBD cls/ folder with train.txt in {searched}; give SBD's benchmark_RELEASE/dataset "
                     "folder (or its parent) as --sbd (docs/data.md)")


def read_ids(path: Path, fix: str) -> list[str]:
    """The ids of a list file (first word of each non-empty line)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise IlsegError(f"list file {path} does not exist; {fix}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise IlsegError(f"cannot read list file {path} ({exc}); {fix}") from None
    return [line.split()[0] for line in text.splitlines() if line.strip()]


def train_aug_ids(sbd_train: Sequence[str], sbd_val: Sequence[str], voc_train: Sequence[str],
                  voc_val: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(train_aug ids, validation ids left out)``: the union of the three training sources minus VOC val, sorted."""
    pool = set(sbd_train) | set(sbd_val) | set(voc_train)
    val = set(voc_val)
    return sorted(pool - val), sorted(pool & val)


def is_complete_png(path: Path) -> bool:
    """Whether ``path`` starts with the PNG signature and ends with the IEND chunk (read: 20 bytes)."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(_PNG_SIGNATURE))
            f.seek(0, os.SEEK_END)
            if f.tell() < len(_PNG_SIGNATURE) + len(_PNG_END):
                return False
            f.seek(-len(_PNG_END), os.SEEK_END)
            return head == _PNG_SIGNATURE and f.read() == _PNG_END
    except OSError:
        return False


def read_sbd_mat(path: str | os.PathLike[str]) -> np.ndarray:
    """The ``HxW`` ``uint8`` class mask of an SBD ``cls/<id>.mat`` file (``GTcls.Segmentation``).

    Raises:
        IlsegError: SciPy missing; the file missing, unreadable or not an
            SBD class annotation; values outside 0..20 (and 255).
    """
    try:
        from scipy.io import loadmat
    except ImportError:
        raise IlsegError(SCIPY_FIX) from None
    path = Path(path)
    if not path.is_file():
        raise IlsegError(f"SBD annotation {path} does not exist although SBD's lists name it; {SBD_FIX}")
    try:
        content = loadmat(str(path), squeeze_me=True, struct_as_record=False)
    except Exception as exc:  # scipy's reader fails with many types (ValueError, TypeError, zlib.error, ...)
        reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise IlsegError(f"cannot read SBD annotation {path} ({reason}); the file is corrupt: {SBD_FIX}") from None
    struct = content.get("GTcls")
    segmentation = getattr(struct, "Segmentation", None)
    if segmentation is None:
        raise IlsegError(f"SBD annotation {path} has no GTcls.Segmentation field; it is not a file of SBD's "
                         f"dataset/cls/ folder: {SBD_FIX}")
    mask = np.asarray(segmentation)
    if mask.ndim != 2 or mask.size == 0 or not np.issubdtype(mask.dtype, np.integer):
        raise IlsegError(f"SBD annotation {path} holds a GTcls.Segmentation {mask.dtype} array of shape "
                         f"{mask.shape}, not an HxW integer mask; {SBD_FIX}")
    values = np.unique(mask)
    bad = [int(v) for v in values if not (0 <= v < VOC_NUM_CLASSES or v == IGNORE_INDEX)]
    if bad:
        shown = ", ".join(str(v) for v in bad[:10])
        raise IlsegError(f"SBD annotation {path} has class values {shown} outside 0..{VOC_NUM_CLASSES - 1}; "
                         f"{SBD_FIX}")
    return mask.astype(np.uint8)


def _make_mask(job: MaskJob, overwrite: bool) -> tuple[str, str]:
    """``("written" | "skipped" | "error", message)`` for one mask; a failed write raises :class:`WriteError`."""
    target = Path(job.target)
    if not overwrite and is_complete_png(target):
        return "skipped", ""
    try:
        if job.kind == "sbd":
            mask = read_sbd_mat(job.source)
        else:
            mask = io.read_mask(job.source, VOC_NUM_CLASSES)
    except IlsegError as exc:  # a bad source: reported with the others at the end
        return "error", str(exc)
    atomic_write_bytes(target, lambda f: io.write_mask_png(f, mask))
    return "written", ""


def _make_masks(chunk: list[tuple[MaskJob, bool]]) -> list[tuple[str, str]]:
    return [_make_mask(job, overwrite) for job, overwrite in chunk]


def _remove_temporary_files(folder: Path) -> int:
    """Delete the temporary files of mask writes a killed run left behind (renamed files are never partial):
    ilseg's ``.ilseg-tmp-<id>.png.<hex>.tmp`` and the older ``.<id>.png.<hex>.tmp``, never another file."""
    removed = 0
    if folder.is_dir():
        for path in folder.glob(".*.tmp"):
            if path.is_file() and is_ilseg_temporary(path.name, lambda target: target.endswith(".png")):
                path.unlink(missing_ok=True)
                removed += 1
    return removed


def plan_voc_aug(voc_dir: Path, sbd_dir: Path) -> tuple[list[MaskJob], list[str], list[str]]:
    """``(masks to make, train_aug ids, validation ids left out)`` from the four list files."""
    voc_lists = voc_dir / "ImageSets" / "Segmentation"
    voc_train = read_ids(voc_lists / "train.txt", VOC_FIX)
    voc_val = read_ids(voc_lists / "val.txt", VOC_FIX)
    sbd_train = read_ids(sbd_dir / "train.txt", SBD_FIX)
    sbd_val = read_ids(sbd_dir / "val.txt", SBD_FIX)
    train, excluded = train_aug_ids(sbd_train, sbd_val, voc_train, voc_val)
    in_sbd = set(sbd_train) | set(sbd_val)
    out_dir = voc_dir / "SegmentationClassAug"
    jobs = []
    for item in train:
        if item in in_sbd:
            jobs.append(MaskJob(item, str(sbd_dir / "cls" / f"{item}.mat"), str(out_dir / f"{item}.png"), "sbd"))
        else:
            jobs.append(MaskJob(item, str(voc_dir / "SegmentationClass" / f"{item}.png"),
                                str(out_dir / f"{item}.png"), "voc-train"))
    for item in sorted(set(voc_val)):
        jobs.append(MaskJob(item, str(voc_dir / "SegmentationClass" / f"{item}.png"), str(out_dir / f"{item}.png"),
                            "voc-val"))
    return jobs, train, excluded


def prepare_voc(
    voc: str | os.PathLike[str],
    sbd: str | os.PathLike[str],
    *,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], object] = print,
    rerun_hint: str | None = None,
) -> PrepareSummary:
    """Write ``SegmentationClassAug/`` and ``train_aug.txt`` into the ``VOC2012`` folder (module docstring).

    Args:
        voc: the ``VOC2012`` folder (or ``VOCdevkit``, or the folder above it).
        sbd: SBD's ``dataset`` folder, or ``benchmark_RELEASE``, or the folder above that.
        workers: processes converting masks (1: this process).
        overwrite: rewrite masks that already exist.
        log: where the one line naming the folders found goes, before the work starts.
        rerun_hint: the command to repeat, said when interrupted.

    Raises:
        IlsegError: a folder or list is missing; SciPy is missing; some
            sources could not be converted (the message names the first files;
            every other mask is written, ``train_aug.txt`` is not).
        Interrupted: Ctrl-C; the masks written so far are kept.
    """
    if workers < 1:
        raise IlsegError(f"--workers must be 1 or more, got {workers}")
    voc_dir = find_voc_root(voc)
    sbd_dir, how = find_sbd_dir(sbd)
    try:
        import scipy.io  # noqa: F401  (checked once here rather than in every worker)
    except ImportError:
        raise IlsegError(SCIPY_FIX) from None
    log(f"VOC 2012: {voc_dir}; SBD: {sbd_dir} ({how})")
    jobs, train, excluded = plan_voc_aug(voc_dir, sbd_dir)
    summary = PrepareSummary(voc_dir=voc_dir, sbd_dir=sbd_dir, sbd_found_as=how,
                             train_aug_file=voc_dir / "ImageSets" / "Segmentation" / "train_aug.txt",
                             val_excluded=len(excluded), train_aug_size=len(train))
    summary.temporary_removed = _remove_temporary_files(voc_dir / "SegmentationClassAug")
    for job in jobs:
        if job.kind == "sbd":
            summary.from_sbd += 1
        elif job.kind == "voc-train":
            summary.from_voc_train += 1
        else:
            summary.from_voc_val += 1
    _write_masks(jobs, summary, workers=workers, overwrite=overwrite, progress=progress, rerun_hint=rerun_hint)
    _write_list(summary.train_aug_file, train, summary)
    return summary


def _write_masks(jobs: list[MaskJob], summary: PrepareSummary, *, workers: int, overwrite: bool, progress: bool,
                 rerun_hint: str | None) -> None:
    """Make every mask of ``jobs`` (counted into ``summary``); one error naming the first failures, after the
    others are written; :class:`Interrupted` on Ctrl-C, every mask written so far complete."""
    errors: list[tuple[MaskJob, str]] = []
    chunks = chunked([(job, overwrite) for job in jobs], workers, largest=32)
    bar = tqdm(total=len(jobs), desc="writing SegmentationClassAug", unit="mask", disable=not progress, leave=False)
    try:
        for index, results in run_chunks(_make_masks, chunks, workers=workers):
            for (job, _), (outcome, message) in zip(chunks[index], results):
                if outcome == "written":
                    summary.written += 1
                elif outcome == "skipped":
                    summary.skipped += 1
                else:
                    errors.append((job, message))
            bar.update(len(results))
    except KeyboardInterrupt:
        bar.close()
        again = rerun_hint or "the same command"
        raise Interrupted(
            f"interrupted: every mask written so far is complete and kept; run {again} again to finish "
            "(masks already written are skipped)", signal.SIGINT) from None
    bar.close()
    if errors:
        _, first = errors[0]
        others = ", ".join(Path(job.source).name for job, _ in errors[1:4])
        more = f" (also {others}{' and more' if len(errors) > 4 else ''})" if others else ""
        raise IlsegError(
            f"{len(errors)} of {len(jobs)} masks could not be made; first: {first}{more}; the other masks are in "
            f"place and train_aug.txt was not written: fix those files, then run the command again")


def _write_list(path: Path, ids: list[str], summary: PrepareSummary) -> None:
    """``train_aug.txt`` with ``ids``, one a line; left untouched when it already says exactly that."""
    text = "".join(f"{item}\n" for item in ids)
    current = path.read_text() if path.is_file() else None
    if current != text:
        atomic_write_text(path, text)
        summary.train_aug_written = True
