"""Data layer: image/mask I/O, datasets, the synthetic benchmark, transforms, per-step image lists.

* :mod:`ilseg.data.io` - ``read_image``, ``read_mask``, ``write_mask_png``, ``palette``, ``overlay``;
* :mod:`ilseg.data.datasets` - ``build_dataset``, ``SegmentationDataset`` (VOC, ADE20k, synth);
* :mod:`ilseg.data.synth` - ``generate_synth``, ``synth_matches``;
* :mod:`ilseg.data.transforms` - ``train_transform``, ``eval_transform``;
* :mod:`ilseg.data.splits` - ``class_presence``, ``step_image_indices``, ``split_report``,
  ``PUBLISHED_COUNTS``;
* :mod:`ilseg.data.prepare` - ``prepare_voc``: SBD's ``.mat`` masks to ``SegmentationClassAug/`` and
  ``train_aug.txt`` (``ilseg data prepare voc``, docs/data.md);
* :mod:`ilseg.data.check` - ``check_tree``: lists, overlap, labels, sizes and published counts of a
  tree (``ilseg data check``).
"""

from ilseg.data.datasets import SegmentationDataset, build_dataset
from ilseg.data.io import overlay, palette, read_image, read_mask, write_mask_png
from ilseg.data.splits import (
    PUBLISHED_COUNTS,
    class_presence,
    load_index_file,
    split_report,
    step_image_indices,
)
from ilseg.data.synth import generate_synth, synth_matches
from ilseg.data.transforms import eval_transform, train_transform

__all__ = [
    "PUBLISHED_COUNTS",
    "SegmentationDataset",
    "build_dataset",
    "class_presence",
    "generate_synth",
    "load_index_file",
    "overlay",
    "palette",
    "read_image",
    "read_mask",
    "split_report",
    "step_image_indices",
    "synth_matches",
    "eval_transform",
    "train_transform",
    "write_mask_png",
]
