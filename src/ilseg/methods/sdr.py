"""SDR (Michieli & Zanuttigh, "Continual Semantic Segmentation via Repulsion-Attraction of Sparse and Disentangled
Latent Representations", CVPR 2021).

SDR shapes the latent space: the **body's output** (ResNet layer4 after its last activation, the model's
``"features"``; the authors' ``features['body']``, ``segmentation_module.py:125, 160``), not the ASPP head.
Every term compares per-pixel feature vectors with labels brought to the feature resolution by nearest
interpolation.  From step 1 on the loss is

* MiB's unbiased cross-entropy and unbiased distillation (``--method SDR`` sets ``--unce --unkd
  --loss_kd 100``, ``argparser.py:53-55``), each averaged over all pixels;
* **prototypes matching** (:func:`prototype_matching`, weight 0.01): the mean feature of each old class in the
  batch (pixels where the label is background and the previous model predicts that old class) is pulled to
  the class's prototype;
* **contrastive learning**: an attractive term (:func:`attraction`, 0.001) pulling each feature to its
  class's prototype, and a repulsive one (:func:`repulsion`, 0.001), the mean inverse distance between the
  mean features of the classes of the batch;
* **features sparsification** (:func:`sparsity`, 0.001): the ratio of ``sum_k exp(f^_k)`` to ``sum_k f^_k``
  of each pixel's features, normalised by the largest feature of its class in the batch.

The **prototypes** are running means of each class's features over every batch of every step, the student's
features at that batch, updated before the batch's losses (:func:`class_sums`, :meth:`SDR.loss`); at step 0
they are all the method does (the authors' step 0 is plain fine-tuning run with ``--loss_de_prototypes 1``
"only for having the prototypes computed", README.md).  They are the method's state
(:meth:`SDR.state_dict`), saved with every checkpoint.  Under several processes the per-batch class sums
and counts are summed over the processes, so the prototypes are those of one process on the whole batch.

Sources (LTTM/SDR at 8638296, 2022-04-18): ``train.py`` (``Trainer.__init__``, ``Trainer.train``,
``_update_running_stats``), ``utils/loss.py`` (``FeaturesClusteringSeparationLoss``,
``DistillationEncoderPrototypesLoss``, ``FeaturesSparsificationLoss``, ``UnbiasedCrossEntropy``,
``UnbiasedKnowledgeDistillationLoss``), ``argparser.py`` (``--method SDR``), ``run.py`` (prototypes kept in
the step checkpoint), ``script_19_1_step{0,1}.slurm``.  cssegmentation has no SDR (its runner is an empty
class).  Formulas, line numbers and every deliberate difference: docs/methods.md "SDR", docs/fidelity.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ilseg.errors import IlsegError
from ilseg.methods.base import (
    NON_NEGATIVE,
    POSITIVE,
    ClassifierInit,
    Method,
    MethodConfig,
    StepSetup,
    boundary_text,
    ce_text,
    weight_text,
    weighted_total,
)
from ilseg.methods.losses import CEReduction, kd_unbiased, unbiased_cross_entropy
from ilseg.models import IncrementalSegmenter
from ilseg.tasks import IGNORE_INDEX, Task

# Which steps let background pixels update the background prototype (the authors' rule,
# train.py:465-466: excluded when overlapped, or at steps > 0 unless old labels are kept).
BackgroundPrototype = Literal["step0", "never", "always"]
# How a class's pixels are laid out as feature vectors: "channels" (one K-vector per pixel, the paper's
# definition) or "sdr_code" (the authors' reshape of a masked selection, which mixes channels; see
# :func:`class_matrix`).
FeatureLayout = Literal["channels", "sdr_code"]
# How the attractive term averages its classes: "sdr_code" divides the running sum by the number of classes
# after every class (utils/loss.py:393-395), "classes" is a plain mean over the classes.
AttractionMean = Literal["sdr_code", "classes"]

SPARSITY_EPS = 1e-15  # utils/loss.py:521 (self.eps)


# ---------------------------------------------------------------- labels and class features


def downsample_labels(target: Tensor, size: tuple[int, int]) -> Tensor:
    """``BxHxW`` labels brought to ``size`` by nearest interpolation (PyTorch's ``"nearest"``, as SDR).

    Every SDR term reads labels at the feature resolution this way (e.g. ``train.py:161-163``,
    ``utils/loss.py:371``): for a 512 crop and 32x32 features, pixel ``(i, j)`` takes the label at
    ``(16 i, 16 j)``.  Returns ``Bxhxw`` int64.
    """
    return F.interpolate(target[:, None].float(), size=size, mode="nearest")[:, 0].long()


def class_matrix(features: Tensor, mask: Tensor, layout: FeatureLayout) -> Tensor:
    """The features of the pixels in ``mask`` as a ``K x n`` matrix (column = one pixel, for ``"channels"``).

    Args:
        features: ``BxKxhxw``.
        mask: ``Bxhxw`` bool, ``n`` pixels set.
        layout: ``"channels"``: column ``j`` is the K-vector of the ``j``-th masked pixel (images, then rows,
            then columns).  ``"sdr_code"``: the authors' ``features[mask.expand(-1, K, -1, -1)].view(K, -1)``
            (``train.py:474``, ``utils/loss.py:383``): the masked values in memory order (image, channel,
            pixel) cut into K rows of ``n``, which for more than one image puts several channels, and
            several images, in one row.

    Example::

        >>> f = torch.arange(12.0).view(2, 3, 1, 2); m = torch.tensor([[[True, True]], [[True, False]]])
        >>> class_matrix(f, m, "channels")[:, 2], class_matrix(f, m, "sdr_code")[:, 2]
        (tensor([ 6.,  8., 10.]), tensor([ 2.,  5., 10.]))
    """
    if layout == "channels":
        return features.transpose(0, 1)[:, mask]
    if layout == "sdr_code":
        return features[mask[:, None].expand_as(features)].view(features.shape[1], -1)
    raise ValueError(f"unknown feature layout {layout!r}; use 'channels' or 'sdr_code'")


def class_sums(features: Tensor, labels: Tensor, classes: list[int], num_classes: int,
               layout: FeatureLayout = "channels") -> tuple[Tensor, Tensor]:
    """Per-class feature sums and pixel counts of one batch, as dense tensors (rows of absent classes 0).

    Args:
        features: ``BxKxhxw`` (detached here, summed in float32).
        labels: ``Bxhxw`` channel ids or 255, at the features' resolution.
        classes: the classes to sum (present or not).
        num_classes: ``C``, the rows.

    Returns:
        ``(sums CxK float32, counts C int64)``.
    """
    f = features.detach().float()
    sums = torch.zeros(num_classes, f.shape[1], device=f.device)
    counts = torch.zeros(num_classes, dtype=torch.long, device=f.device)
    for c in classes:
        mask = labels == c
        n = int(mask.sum())
        if n:
            sums[c] = class_matrix(f, mask, layout).sum(dim=1)
            counts[c] = n
    return sums, counts


def update_prototypes(prototypes: Tensor, counts: Tensor, sums: Tensor, batch_counts: Tensor) -> None:
    """SDR's cumulative moving average, in place: for every class ``c`` with ``n_c > 0`` pixels in the batch,

    ``p_c <- (S_c + N_c p_c) / (N_c + n_c)`` and ``N_c <- N_c + n_c``

    with ``S_c`` the batch's feature sum of class ``c`` and ``N_c`` the pixels seen so far
    (``train.py:475-483``; the same float32 arithmetic, counts as int64).
    """
    seen = (batch_counts > 0).nonzero().flatten().tolist()
    for c in seen:
        prototypes[c] = (sums[c] + counts[c] * prototypes[c]) / (counts[c] + batch_counts[c])
        counts[c] += batch_counts[c]


def prototype_classes(labels: Tensor, num_classes: int, *, background: bool) -> list[int]:
    """The classes of ``labels`` whose prototypes a batch updates: its labels ``< num_classes`` (255 never),
    background (0) only when ``background``.

    The authors drop the first of the sorted labels present, 0 or not, when background is excluded
    (``train.py:465-466``); ilseg drops background only (docs/fidelity.md).
    """
    present = [int(c) for c in torch.unique(labels).tolist() if c < num_classes]
    return [c for c in present if c != 0 or background]


def present_classes(labels: Tensor) -> list[int]:
    """The sorted labels of ``labels`` other than 255."""
    return [int(c) for c in torch.unique(labels).tolist() if c != IGNORE_INDEX]


# ---------------------------------------------------------------- the loss terms


def attraction(features: Tensor, labels: Tensor, prototypes: Tensor, *, mean: AttractionMean = "sdr_code",
               layout: FeatureLayout = "channels") -> Tensor:
    """SDR's attractive term: each feature pulled to its class's prototype (``utils/loss.py:369-395``).

    For the ``J`` classes ``c_1 < ... < c_J`` of ``labels`` (background included, 255 not), with
    ``m_j = mean over the K x n_j entries of (f - p_{c_j})^2``:

    * ``mean="sdr_code"``: ``L = (...((m_1 / J + m_2) / J + m_3) / J ... + m_J) / J``: the authors divide the
      running sum by ``J`` after every class, so class ``c_j`` weighs ``J^-(J-j+1)``;
    * ``mean="classes"``: ``L = (1/J) sum_j m_j``.

    The prototypes are constants (no gradient).  No class: 0.

    Args:
        features: ``BxKxhxw`` student features.
        labels: ``Bxhxw`` at their resolution.
        prototypes: ``CxK``, already updated with this batch (the authors update them first).
    """
    f = features.float()
    classes = present_classes(labels)
    total = f.new_zeros(())
    for c in classes:
        matrix = class_matrix(f, labels == c, layout)
        term = (matrix - prototypes[c].detach()[:, None]).pow(2).mean()
        if mean == "sdr_code":
            total = (total + term) / len(classes)
        else:
            total = total + term / len(classes)
    return total


def class_means(features: Tensor, labels: Tensor, classes: list[int], layout: FeatureLayout) -> Tensor:
    """``J x K``: the mean feature of each class of ``classes`` over its pixels (with gradient)."""
    f = features.float()
    return torch.stack([class_matrix(f, labels == c, layout).mean(dim=1) for c in classes])


def repulsion(features: Tensor, labels: Tensor, *, layout: FeatureLayout = "channels") -> Tensor:
    """SDR's repulsive term: the mean inverse distance between the classes' mean features in the batch.

    ``L = mean over ordered pairs (c, c'), c != c', d > 0, of 1 / d(mu_c, mu_c')`` with ``mu_c`` the mean
    feature of class ``c`` over the batch (background included, 255 not) and ``d`` the Euclidean distance
    (``utils/loss.py:397-408``: ``1 / torch.cdist`` with its infinite entries, the diagonal and any two equal
    means, left out).  Fewer than two classes (or no finite entry): 0.  Distances are computed pair by pair,
    never on the diagonal, so no gradient is NaN.
    """
    classes = present_classes(labels)
    if len(classes) < 2:
        return features.float().new_zeros(())
    means = class_means(features, labels, classes, layout)
    first, second = torch.triu_indices(len(classes), len(classes), offset=1, device=means.device)
    squared = (means[first] - means[second]).pow(2).sum(dim=1)
    kept = squared[squared > 0]
    if kept.numel() == 0:
        return means.new_zeros(())
    return kept.rsqrt().mean()  # each unordered pair stands for both of its ordered pairs: the same mean


def old_class_pseudo_labels(labels: Tensor, teacher_logits: Tensor, num_old: int, *, keep_old_labels: bool) -> Tensor:
    """Where SDR matches old classes' prototypes, at the labels' resolution (``utils/loss.py:486-493``).

    Old labels kept (the authors' ``--no_mask``): ``y * (y < C_old)``.  Otherwise: the previous model's
    prediction (argmax of its logits at the target's resolution, brought to the labels' resolution by nearest
    interpolation) on background pixels, 0 elsewhere.  Returns ``Bxhxw`` int64.
    """
    if keep_old_labels:
        return labels * (labels < num_old)
    predicted = teacher_logits.argmax(dim=1)
    predicted = downsample_labels(predicted, (labels.shape[1], labels.shape[2]))
    return predicted * (labels == 0)


def prototype_matching(features: Tensor, pseudo: Tensor, prototypes: Tensor, *,
                       layout: FeatureLayout = "channels") -> Tensor:
    """SDR's prototypes matching, in its ``--loss_de_prototypes_sumafter`` form (``utils/loss.py:494-505``):

    ``L = (1/J) sum_{old c in pseudo, c != 0} (1/K) || mu_c - p_c ||^2``

    with ``mu_c`` the mean feature of the batch's pixels of ``c`` (the student's, with gradient) and ``p_c``
    the class's prototype (a constant).  With ``layout="sdr_code"``, ``mu_c`` is the authors'
    ``features[mask].view(-1, K).mean(0)``: element ``k`` is the mean of every ``K``-th masked value from
    ``k`` on, in memory order (channels and pixels mixed even for one image).  No old class: 0.
    """
    f = features.float()
    classes = [c for c in torch.unique(pseudo).tolist() if c != 0]
    total = f.new_zeros(())
    for c in classes:
        mask = pseudo == c
        if layout == "sdr_code":
            mean = f[mask[:, None].expand_as(f)].view(-1, f.shape[1]).mean(dim=0)
        else:
            mean = class_matrix(f, mask, layout).mean(dim=1)
        total = total + (mean - prototypes[int(c)].detach()).pow(2).mean() / len(classes)
    return total


def sparsity(features: Tensor, labels: Tensor) -> Tensor:
    """SDR's features sparsification, as ``--method SDR`` sets it (``max_maskedforclass``, ``exponential``,
    ``ratio``; ``utils/loss.py:527-572``).

    Each pixel's features are divided by the largest feature value (any channel, any image of the batch) of
    its label's pixels, ``f^ = f / (max_{class} f + 1e-15)``; 255 pixels form a class of their own.  Then

    ``L = mean over all B*h*w pixels of  sum_k exp(f^_k) / (sum_k f^_k + 1e-15)``.

    As in the code: when the only label present is background, every ``f^`` is 0 and the loss is 0 (the code
    then skips its normalisation); a batch whose normalised features sum to 0 or less gives 0.
    """
    f = features.float()
    classes = torch.unique(labels).tolist()
    if classes == [0]:
        return f.new_zeros(())
    normalised = torch.zeros_like(f)
    for c in classes:
        mask = (labels == c)[:, None]
        largest = f[mask.expand_as(f)].max()
        normalised = normalised + f / (largest + SPARSITY_EPS) * mask
    if not normalised.sum() > 0:
        return f.new_zeros(())
    ratio = normalised.exp().sum(dim=1) / (normalised.sum(dim=1) + SPARSITY_EPS)
    return ratio.mean()


# ---------------------------------------------------------------- the method


@dataclasses.dataclass(frozen=True)
class SDRConfig(MethodConfig):
    """SDR's settings (and the common fields of :class:`~ilseg.methods.base.MethodConfig`, with SDR's defaults).

    Defaults: ``--method SDR`` (``argparser.py:44-63``): CE over all pixels (``train.py:38, 44, 168-172``), new
    classifiers from PyTorch's init (``--method SDR`` does not set ``--init_balanced``).

    Attributes:
        kd_weight: weight of MiB's unbiased distillation (``--loss_kd 100``); 0 = off.
        kd_alpha: the teacher-logit scale in it (``--alpha``, 1).
        pm_weight: prototypes matching (``--loss_de_prototypes 0.01``).
        attraction_weight: attractive contrastive term (``--loss_fc 0.001``).
        repulsion_weight: repulsive contrastive term (``--lfc_sep_clust 0.001``).
        sparsity_weight: features sparsification (``--loss_featspars 0.001``).
        background_prototype: which steps' background pixels update the background prototype: ``"step0"``
            (disjoint), ``"never"`` (overlapped), ``"always"`` (old labels kept, disjoint); the authors derive
            it from ``--overlap`` and ``--no_mask`` (``train.py:465-466``).
        feature_layout: ``"sdr_code"`` (the authors' reshape, :func:`class_matrix`: the default, as the code
            runs; its prototypes depend on how a batch is split over processes, as in the code) or
            ``"channels"`` (the paper's per-class mean feature vectors; two processes keep one's prototypes).
        attraction_mean: ``"sdr_code"`` (the authors' division after every class) or ``"classes"``.
    """

    ce_reduction: CEReduction = "all"
    classifier_init: ClassifierInit = "default"
    kd_weight: float = dataclasses.field(default=100.0, metadata=NON_NEGATIVE)
    kd_alpha: float = dataclasses.field(default=1.0, metadata=POSITIVE)
    pm_weight: float = dataclasses.field(default=0.01, metadata=NON_NEGATIVE)
    attraction_weight: float = dataclasses.field(default=0.001, metadata=NON_NEGATIVE)
    repulsion_weight: float = dataclasses.field(default=0.001, metadata=NON_NEGATIVE)
    sparsity_weight: float = dataclasses.field(default=0.001, metadata=NON_NEGATIVE)
    background_prototype: BackgroundPrototype = "step0"
    feature_layout: FeatureLayout = "sdr_code"
    attraction_mean: AttractionMean = "sdr_code"

    @property
    def uses_prototypes(self) -> bool:
        """Whether a term reads the prototypes (and so the method keeps them, from step 0 on)."""
        return self.pm_weight > 0 or self.attraction_weight > 0


class SDR(Method):
    """``L = UNCE + kd_weight UNKD + pm_weight PM + attraction_weight CL_att + repulsion_weight CL_rep
    + sparsity_weight FS`` from step 1 on; ``CE(y)`` at step 0, where the prototypes start.

    State: ``prototypes`` (``CxK`` float32, one row per class seen so far, zeros until a class's first pixel)
    and ``counts`` (``C`` int64, the pixels each prototype averages).
    """

    config_class = SDRConfig
    cfg: SDRConfig

    def __init__(self, cfg: MethodConfig) -> None:
        super().__init__(cfg)
        self.prototypes: Tensor | None = None
        self.counts: Tensor | None = None
        self._num_classes = 0  # classes seen up to the step start_step prepared

    @property
    def needs_teacher(self) -> bool:
        return True  # the unbiased CE needs the teacher's channel count, prototypes matching its prediction

    def identity(self, step: int) -> dict[str, Any]:
        """Step 0 trains with CE alone but starts the prototypes the later steps need: it names them, so a
        step 0 without them (another method's) is not taken for this one's."""
        identity = super().identity(step)
        if step == 0 and self.cfg.uses_prototypes:
            identity["prototypes"] = (f"sdr running class means (background: {self.cfg.background_prototype}, "
                                      f"layout: {self.cfg.feature_layout})")
        return identity

    def start_step(self, model: IncrementalSegmenter, task: Task, step: int) -> StepSetup:
        """The default step boundary; the prototypes grow (zero rows) to the classes seen up to ``step``."""
        self._num_classes = sum(task.step_sizes[: step + 1])
        if step > 0 and self.cfg.uses_prototypes and self.prototypes is None:
            raise IlsegError(f"method {self.cfg.name!r} needs the class prototypes of the steps before step {step}, "
                             "but the previous step's checkpoint holds none (was step 0 trained by another method?)")
        if self.prototypes is not None and self.counts is not None and self.prototypes.shape[0] < self._num_classes:
            extra = self._num_classes - self.prototypes.shape[0]
            self.prototypes = torch.cat([self.prototypes, self.prototypes.new_zeros(extra, self.prototypes.shape[1])])
            self.counts = torch.cat([self.counts, self.counts.new_zeros(extra)])
        return super().start_step(model, task, step)

    def state_dict(self) -> dict[str, Any]:
        if self.prototypes is None or self.counts is None:
            return {}
        return {"prototypes": self.prototypes.detach().cpu().clone(), "counts": self.counts.detach().cpu().clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            self.prototypes = self.counts = None
            return
        if set(state) != {"prototypes", "counts"}:
            raise IlsegError(f"method {self.cfg.name!r} keeps 'prototypes' and 'counts', but the checkpoint holds "
                             f"method state {sorted(state)}: it was written by another method")
        prototypes, counts = state["prototypes"], state["counts"]
        if prototypes.dim() != 2 or counts.shape != prototypes.shape[:1]:
            raise IlsegError(f"method {self.cfg.name!r}: prototypes {tuple(prototypes.shape)} and counts "
                             f"{tuple(counts.shape)} do not fit each other")
        self.prototypes = prototypes.detach().clone().float()
        self.counts = counts.detach().clone().long()

    def loss(self, student: Mapping[str, Any], teacher: Mapping[str, Any] | None, target: Tensor,
             step: int) -> dict[str, Tensor]:
        cfg = self.cfg
        logits = student["logits"]
        features = student["features"]
        labels = downsample_labels(target, (features.shape[2], features.shape[3]))
        if cfg.uses_prototypes:
            self._update(features, labels, step)
        if teacher is None:
            return self.cross_entropy_only(logits, target)
        old_logits = teacher["logits"]
        num_old = old_logits.shape[1]
        losses = {"ce": unbiased_cross_entropy(logits, target, num_old, reduction=cfg.ce_reduction)}
        if cfg.kd_weight > 0:
            losses["kd"] = kd_unbiased(logits, old_logits, alpha=cfg.kd_alpha)
        prototypes = self.prototypes
        if cfg.pm_weight > 0 and prototypes is not None:
            pseudo = old_class_pseudo_labels(labels, old_logits, num_old, keep_old_labels=cfg.keep_old_labels)
            losses["pm"] = prototype_matching(features, pseudo, prototypes, layout=cfg.feature_layout)
        if cfg.attraction_weight > 0 and prototypes is not None:
            losses["cl_att"] = attraction(features, labels, prototypes, mean=cfg.attraction_mean,
                                          layout=cfg.feature_layout)
        if cfg.repulsion_weight > 0:
            losses["cl_rep"] = repulsion(features, labels, layout=cfg.feature_layout)
        if cfg.sparsity_weight > 0:
            losses["fs"] = sparsity(features, labels)
        return weighted_total(losses, {"kd": cfg.kd_weight, "pm": cfg.pm_weight, "cl_att": cfg.attraction_weight,
                                       "cl_rep": cfg.repulsion_weight, "fs": cfg.sparsity_weight})

    def _update(self, features: Tensor, labels: Tensor, step: int) -> None:
        """This batch's contribution to the prototypes (summed over the processes when distributed)."""
        if self._num_classes < 1:
            raise ValueError("the SDR loss needs the step's start_step first (it sets the number of classes)")
        rule = self.cfg.background_prototype
        background = rule == "always" or (rule == "step0" and step == 0)
        classes = prototype_classes(labels, self._num_classes, background=background)
        sums, batch_counts = class_sums(features, labels, classes, self._num_classes, self.cfg.feature_layout)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
            dist.all_reduce(batch_counts)
        if self.prototypes is None or self.counts is None:
            self.prototypes = sums.new_zeros(self._num_classes, sums.shape[1])
            self.counts = batch_counts.new_zeros(self._num_classes)
        self.prototypes = self.prototypes.to(sums.device)
        self.counts = self.counts.to(sums.device)
        if self.prototypes.shape != sums.shape:
            raise IlsegError(f"method {self.cfg.name!r}: the prototypes are {tuple(self.prototypes.shape)}, but this "
                             f"step has {self._num_classes} classes of {sums.shape[1]} features")
        with torch.no_grad():
            update_prototypes(self.prototypes, self.counts, sums, batch_counts)

    def describe(self) -> str:
        cfg = self.cfg
        terms = [ce_text(cfg, unbiased=True)]
        named = [(cfg.kd_weight, f"UNKD(alpha={weight_text(cfg.kd_alpha)})"), (cfg.pm_weight, "PM"),
                 (cfg.attraction_weight, "CL_att"), (cfg.repulsion_weight, "CL_rep"), (cfg.sparsity_weight, "FS")]
        terms += [f"{weight_text(w)}*{name}" for w, name in named if w > 0]
        notes = [f"body-feature prototypes (background: {cfg.background_prototype})"] if cfg.uses_prototypes else []
        return f"{cfg.name}: L = {' + '.join(terms)} {boundary_text(self, distils=True, notes=notes)}"


PRESETS: dict[str, MethodConfig] = {
    # SDR as its code's `--method SDR` sets it (argparser.py:53-63): unbiased CE + 100 x unbiased KD, prototypes
    # matching 0.01, attraction 0.001, repulsion 0.001, sparsification 0.001, CE over all pixels, new
    # classifiers from PyTorch's init.  The overlapped presets set background_prototype: never.
    "sdr": SDRConfig(name="sdr"),
}
