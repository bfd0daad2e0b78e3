"""The data of one step: its training images and loader, and the test split after it."""

from __future__ import annotations

import atexit
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ilseg.config import RunConfig
from ilseg.data.datasets import SeededItems, SegmentationDataset, build_dataset
from ilseg.data.io import image_size
from ilseg.data.parallel import leave_signals_to_parent
from ilseg.data.splits import class_presence, step_image_indices
from ilseg.data.transforms import JointTransform, eval_transform, ilt_paper_train_transform, train_transform
from ilseg.engine import distributed
from ilseg.errors import IlsegError
from ilseg.tasks import Mode, Task, eval_lut, keep_test_image


@dataclass
class TrainingData:
    """A step's training images, seeded per image, in global batches sharded over ranks."""

    dataset: SegmentationDataset
    items: SeededItems
    batches: distributed.GlobalBatchSampler
    loader: DataLoader

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Order and augmentation of ``epoch`` (the same for any number of processes or workers),
        from its ``skip``-th batch on."""
        self.batches.set_epoch(epoch, skip)
        self.items.set_epoch(epoch)


def training_data(cfg: RunConfig, task: Task, step: int, target_lut: np.ndarray, *,
                  dist: distributed.DistInfo, progress: bool) -> TrainingData:
    """The images ``step`` trains on (filter or index file), with the method's targets.

    Every rank takes its slice of the same global batches, and each image's
    augmentation is a function of (seed, step, epoch, image).
    """
    data = cfg.data
    ds = build_dataset(data.dataset, data.root, "train", lut=target_lut,
                       transform=step_train_transform(cfg))
    index_file = data.index_file.replace("{step}", str(step)) if data.index_file else None
    mode: Mode = "overlap" if data.overlap else "disjoint"

    def image_list() -> list[int]:
        indices = step_image_indices(ds, task, step, mode, cache_dir=data.cache_dir, workers=data.workers,
                                     index_file=index_file, progress=progress, allow_empty_index=True)
        if not indices:
            raise IlsegError(
                f"step {step} of {task.dataset} {task.name} ({mode}) has no training image: no image in "
                f"{data.root} contains its classes {[task.class_names[c] for c in task.new_classes(step)]}"
            )
        return indices

    ds = ds.subset(distributed.on_main(image_list))  # rank 0 reads the masks (or the cache) once
    if keep_in_memory(cfg, ds):
        ds = ds.keep_decoded()
    batch_size = cfg.optim.batch_size
    if len(ds) < batch_size:
        raise IlsegError(f"step {step} has only {len(ds)} training images, fewer than optim.batch_size={batch_size}")
    seed = cfg.runtime.seed + 1000 * step
    items = SeededItems(ds, seed)
    fixed = data.fixed_crops and step > 0  # one crop per image for the step, in file order (docs/fidelity.md)
    batches = distributed.GlobalBatchSampler(len(ds), batch_size, rank=dist.rank, world_size=dist.world_size,
                                             seed=seed, shuffle=not fixed)
    loader = make_loader(items, batch_sampler=EpochKeys(batches, fixed=fixed), workers=data.workers,
                         persistent=True)
    return TrainingData(dataset=ds, items=items, batches=batches, loader=loader)


def step_train_transform(cfg: RunConfig) -> JointTransform:
    """The training augmentation ``data.augment`` names: the random resized crop of the recipe (``data.scale`` of the area),
    or the paper setting's rescale, flip, pad and crop (docs/fidelity.md)."""
    data = cfg.data
    if data.augment == "ilt_paper":
        return ilt_paper_train_transform(data.crop_size, normalize=data.normalize)
    return train_transform(data.crop_size, scale=data.scale, normalize=data.normalize)


class EpochKeys(Sampler[list[tuple[int, int]]]):
    """A :class:`~ilseg.engine.distributed.GlobalBatchSampler`'s batches with each index sent as
    ``(epoch, index)``, so that persistent DataLoader workers augment with the current epoch's seeds.

    ``fixed``: every epoch sends epoch 0, so each image gets the same crop in every epoch (``data.fixed_crops``).
    """

    def __init__(self, batches: distributed.GlobalBatchSampler, *, fixed: bool = False) -> None:
        self.batches, self.fixed = batches, fixed

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = 0 if self.fixed else self.batches.epoch
        for batch in self.batches:
            yield [(epoch, i) for i in batch]

    def __len__(self) -> int:
        return len(self.batches)


def step_image_counts(cfg: RunConfig, task: Task, steps: range) -> dict[int, int]:
    """How many training images each of ``steps`` has (read from the per-step lists' cache, which
    :func:`check_data` filled before training), e.g. to estimate how long the later steps take."""
    data = cfg.data
    mode: Mode = "overlap" if data.overlap else "disjoint"
    train = build_dataset(data.dataset, data.root, "train")
    counts = {}
    for step in steps:
        index_file = data.index_file.replace("{step}", str(step)) if data.index_file else None
        counts[step] = len(step_image_indices(train, task, step, mode, cache_dir=data.cache_dir, workers=data.workers,
                                              index_file=index_file, progress=False, allow_empty_index=True))
    return counts


def check_data(cfg: RunConfig, task: Task, steps: range, *, progress: bool) -> None:
    """What can be checked in seconds before hours of training, so a bad input fails now, not at step 5.

    * every step to train has training images, at least one global batch of
      them (the message names the step and its classes);
    * every test mask is readable and holds only the dataset's labels (read
      once and cached, as the training masks are), and every test image's
      header is readable and matches its mask's size.

    Pixel data of the test *images* is decoded only when they are evaluated.
    """
    data = cfg.data
    mode: Mode = "overlap" if data.overlap else "disjoint"
    train = build_dataset(data.dataset, data.root, "train")
    for step in steps:
        index_file = data.index_file.replace("{step}", str(step)) if data.index_file else None
        indices = step_image_indices(train, task, step, mode, cache_dir=data.cache_dir, workers=data.workers,
                                     index_file=index_file, progress=progress, allow_empty_index=True)
        classes = [task.class_names[c] for c in task.new_classes(step)]
        if not indices:
            raise IlsegError(f"step {step} of {task.dataset} {task.name} ({mode}) has no training image: no image "
                             f"in {data.root} contains its classes {classes}")
        if len(indices) < cfg.optim.batch_size:
            raise IlsegError(f"step {step} of {task.dataset} {task.name} ({mode}, classes {classes}) has only "
                             f"{len(indices)} training images, fewer than optim.batch_size={cfg.optim.batch_size}")
    test = build_dataset(data.dataset, data.root, "val")
    class_presence(test, workers=data.workers, cache_dir=data.cache_dir, progress=progress)
    for image, mask in zip(test.images, test.masks):
        if image_size(image) != image_size(mask, "mask"):
            raise IlsegError(f"mask {mask} is not the size of its image {image}; the mask does not belong to the "
                             "image: check the dataset's lists or re-download it")


IN_MEMORY_LIMIT = 2 * 2**30  # bytes of decoded images and masks


def keep_in_memory(cfg: RunConfig, ds: SegmentationDataset) -> bool:
    """Whether a step's training images are decoded once and kept: the synthetic set, read in this process.

    With loader workers each worker would hold (and, at every new step,
    rebuild) its own copy, so only ``data.workers: 0`` keeps them.
    """
    if cfg.data.dataset != "synth" or cfg.data.workers != 0 or len(ds) == 0:
        return False
    height, width = image_size(ds.images[0])
    return len(ds) * height * width * 4 <= IN_MEMORY_LIMIT


def eval_dataset(cfg: RunConfig, task: Task, step: int) -> SegmentationDataset:
    """The test split with the labels of docs/protocol.md#labels-at-each-step after ``step``: all of its
    images, or those ``eval.test_images`` keeps (:func:`~ilseg.tasks.keep_test_image`)."""
    data = cfg.data
    lut = eval_lut(task, step, unseen=data.unseen,
                   ignore_background=(data.dataset == "ade" and data.ade_zero == "ignore"))
    ds = build_dataset(data.dataset, data.root, "val", transform=eval_transform(data.test_size, crop=data.test_crop,
                                                                 normalize=data.normalize),
                       lut=lut)
    rule = cfg.eval.test_images
    if rule == "all":
        return ds
    presence = class_presence(ds, workers=data.workers, cache_dir=data.cache_dir, progress=False)
    return ds.subset([i for i, present in enumerate(presence) if keep_test_image(present, task, step, rule)])


def eval_loader(cfg: RunConfig, task: Task, step: int, dist: distributed.DistInfo) -> DataLoader:
    """The test split after ``step``, sharded over ranks without repeats; batched when images share a size.

    Images share a size when the evaluation crops them to ``data.test_size``,
    or when every test image has the same size anyway (the synthetic
    benchmark; read from the files' headers).  Full VOC / ADE20k images are
    evaluated one per batch.
    """
    ds = eval_dataset(cfg, task, step)
    batch = eval_batch_size(cfg, ds)
    sampler = distributed.ShardSampler(len(ds), dist.rank, dist.world_size)
    return make_loader(ds, batch_size=batch, sampler=sampler, workers=cfg.data.workers)


def eval_batch_size(cfg: RunConfig, ds: SegmentationDataset) -> int:
    """``eval.batch_size`` when the test images share a size after the eval transform, else 1."""
    cropped = cfg.data.test_size is not None and cfg.data.test_crop
    same_size = cropped or (cfg.data.test_size is None and len({image_size(p) for p in ds.images}) == 1)
    return cfg.eval.batch_size if same_size else 1


def make_loader(ds: Dataset, *, workers: int, batch_size: int = 1, sampler: Sampler | None = None,
                batch_sampler: Sampler | None = None, persistent: bool = False) -> DataLoader:
    """A DataLoader with ilseg's settings; the (batch) sampler decides order and sharding.

    ``persistent`` keeps the worker processes between passes (the training
    loader, read once per epoch: restarting the workers cost more than the
    decoding itself on a GPU machine, BENCHMARKS.md); the dataset must then
    not depend on state set between passes (:class:`EpochKeys` sends the
    epoch with the indices).  Memory is pinned for copies to a GPU.
    """
    pin = torch.cuda.is_available()
    keep = persistent and workers > 0
    init = leave_signals_to_parent if workers > 0 else None  # Ctrl-C / SIGTERM are the main process's to handle
    if batch_sampler is not None:
        return _Loader(ds, batch_sampler=batch_sampler, num_workers=workers, pin_memory=pin,
                       persistent_workers=keep, worker_init_fn=init)
    return _Loader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin,
                   persistent_workers=keep, worker_init_fn=init)


# -- ending the worker processes --------------------------------------------------------------------
# ilseg's loader workers ignore SIGTERM (leave_signals_to_parent).  Python's multiprocessing ends the
# children still alive at exit with SIGTERM and then waits for them, so workers of an iterator that
# nothing freed yet (the persistent training loader's, or one an error left in a reference cycle) would
# keep the process from ever exiting.  ilseg therefore shuts its iterators down itself: at the end of
# every run (run_training) and, as a last resort, at exit, before multiprocessing's own clean-up.
_ITERATORS: weakref.WeakSet[Any] = weakref.WeakSet()


class _Loader(DataLoader):
    """A DataLoader whose iterators :func:`shut_down_workers` can find."""

    def __iter__(self) -> Any:
        iterator = super().__iter__()
        if self.num_workers > 0:
            _ITERATORS.add(iterator)
        return iterator


def shut_down_workers() -> None:
    """End the worker processes of every iterator of ilseg's loaders still alive (each is told to stop and
    waited for, as when the iterator is freed); later use of a persistent loader starts new workers."""
    for iterator in list(_ITERATORS):
        shutdown = getattr(iterator, "_shutdown_workers", None)  # torch's own clean-up of an iterator
        if shutdown is not None:
            shutdown()
        _ITERATORS.discard(iterator)


atexit.register(shut_down_workers)  # registered after multiprocessing's exit handler, so it runs first
