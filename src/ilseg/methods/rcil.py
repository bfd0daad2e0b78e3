"""RCIL (Zhang et al., "Representation Compensation Networks for Continual Semantic Segmentation", CVPR 2022).

RCIL changes the model and the loss:

* **Representation compensation.**  Every 3x3 conv + BN of the ResNet's
  blocks, and the ASPP's four parallel convs + their BN, get a second,
  parallel conv + BN (:class:`ParallelBranches`, added by
  :meth:`RCIL.adapt_model` to every model of an RCIL run).  In training each
  output channel takes, at random, the first branch, the second, or their
  average ("drop-path"); in evaluation the average.  Both branches are linear
  (conv then BN), so at the start of every step after the first the two are
  folded into the first branch's conv and BN - the same function, one conv -
  which is then frozen, while the second branch goes on training
  (:meth:`ParallelBranches.merge_into_first`).  The teacher's pairs are folded
  the same way and its second branches dropped (:meth:`ParallelBranches.collapse`).
* **Pooled cube knowledge distillation** (:func:`pckd_spatial`,
  :func:`pckd_channel`): the squared maps of every ResNet stage, the head and
  the logits, average-pooled over space at six window sizes and over channels
  with a window of 3, pulled towards the teacher's.
* MiB's unbiased cross-entropy and unbiased output distillation (weight 100),
  new classifiers from the background's.

Sources: zhangchbin/RCIL ``modules/residual.py`` (the branches and the
drop-path in ``ResidualBlock``), ``modules/deeplab.py`` (the ASPP's branches),
``run.py`` (``merge``, ``mergex``, ``convert_model``: the fold at the start of a
step; the freezing in the epoch loop), ``train.py``
(``features_distillation_spatial``, ``features_distillation_channel``),
``argparser.py`` (``--method RCIL``), ``scripts/voc/RCIL_15-1-overlap.sh``,
``scripts/ade/RCIL_ade_100-10.sh``.  docs/methods.md gives every formula and
each deliberate difference from that code.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
from ilseg.methods.plop import merge_extra_channels
from ilseg.models import IncrementalSegmenter
from ilseg.models.aspp import ASPP
from ilseg.models.backbone import LEAKY_SLOPE, BasicBlock, Bottleneck, ResNet
from ilseg.tasks import Task

# The maps PCKD compares, in RCIL's order: the four stage outputs, the head's output, the logits.
PCKD_TAPS: tuple[str, ...] = ("layer1", "layer2", "layer3", "layer4", "head", "logits_lowres")
# The spatial pooling windows of features_distillation_spatial (train.py), each with stride 1 and padding k/2.
PCKD_SCALES: tuple[int, ...] = (4, 8, 12, 16, 20, 24)
# Drop-path: a channel whose uniform draw is below the first bound takes the first branch only, below the
# second the second branch only, otherwise the average of both (modules/residual.py, modules/deeplab.py).
DROP_PATH_BOUNDS: tuple[float, float] = (0.33, 0.66)


class ParallelBranches(nn.Module):
    """Two parallel ``convs -> BN`` branches on the same input, mixed per output channel.

    ``convs`` is one conv (a ResNet block's 3x3 conv) or several whose
    outputs are concatenated before the BN (the ASPP's four convs).  The
    second branch (``convs_new``, ``bn_new``) starts as a copy of the first.

    * training: channel ``c`` is ``w1_c * first_c + w2_c * second_c`` with
      ``(w1, w2)`` drawn per channel and per forward pass: ``(1, 0)``,
      ``(0, 1)`` or ``(1/2, 1/2)`` with probabilities 0.33, 0.33, 0.34
      (from :attr:`generator` when set, else torch's global generator);
      ``drop_path = False`` always averages;
    * evaluation: ``(first + second) / 2``.

    Module names follow RCIL's (``conv2``/``bn2`` and ``conv2_new``/``bn2_new``
    there; ``map_convs``/``map_bn`` and ``map_convs_new``/``map_bn_new`` in the
    head), which ``ilseg import`` maps.
    """

    def __init__(self, convs: Sequence[nn.Conv2d], bn: nn.BatchNorm2d) -> None:
        super().__init__()
        self.convs = nn.ModuleList(convs)
        self.bn = bn
        self.convs_new: nn.ModuleList | None = copy.deepcopy(self.convs)
        self.bn_new: nn.Module | None = copy.deepcopy(bn)
        self.first_frozen = False  # merged and frozen: its BN stays in eval mode
        self.drop_path = True
        self.generator: torch.Generator | None = None

    @property
    def collapsed(self) -> bool:
        """Whether the second branch was folded into the first and dropped (a teacher)."""
        return self.convs_new is None

    def forward(self, x: Tensor) -> Tensor:
        first = _branch(self.convs, self.bn, x)
        if self.convs_new is None or self.bn_new is None:
            return first
        second = _branch(self.convs_new, self.bn_new, x)
        if not (self.training and self.drop_path):
            return first * 0.5 + second * 0.5
        w_first, w_second = drop_path_weights(first.shape[1], self.generator)
        shape = (1, -1, 1, 1)
        return (first * w_first.to(first.device, first.dtype).view(shape)
                + second * w_second.to(second.device, second.dtype).view(shape))

    def train(self, mode: bool = True) -> ParallelBranches:
        super().train(mode)
        if self.first_frozen:
            self.bn.eval()
        return self

    def folded(self) -> tuple[list[Tensor], Tensor]:
        """The evaluation-mode function as kernels and one bias: ``(first + second) / 2 = conv(x; K) + B``.

        With each BN's scale ``s = gamma / sqrt(var + eps)`` and shift
        ``t = beta - mean * s``: ``K_j = (s1 * W1_j + s2 * W2_j) / 2`` for each
        conv ``j`` (its slice of the BN's channels), ``B = (t1 + t2) / 2``.
        """
        if self.convs_new is None or self.bn_new is None:
            raise ValueError("the branches are already collapsed into one")
        scale1, shift1 = _bn_affine(self.bn)
        scale2, shift2 = _bn_affine(self.bn_new)
        kernels, start = [], 0
        for conv1, conv2 in zip(self.convs, self.convs_new, strict=True):
            assert isinstance(conv1, nn.Conv2d) and isinstance(conv2, nn.Conv2d)
            end = start + conv1.out_channels
            s1, s2 = scale1[start:end].view(-1, 1, 1, 1), scale2[start:end].view(-1, 1, 1, 1)
            kernels.append((s1 * conv1.weight + s2 * conv2.weight) * 0.5)
            start = end
        return kernels, (shift1 + shift2) * 0.5

    @torch.no_grad()
    def merge_into_first(self) -> None:
        """Fold both branches into the first (same evaluation output) and freeze it (RCIL, each step > 0).

        The first branch's convs take the folded kernels and its BN becomes
        the folded bias: scale 1, shift ``B``, running mean 0 and running
        variance ``1 - eps`` (so that ``var + eps = 1``), in eval mode.  The
        second branch is left as it is and goes on training.
        """
        kernels, bias = self.folded()
        for conv, kernel in zip(self.convs, kernels, strict=True):
            assert isinstance(conv, nn.Conv2d)
            conv.weight.copy_(kernel)
        bn = self.bn
        assert isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.running_var is not None
        bn.weight.fill_(1.0)
        bn.bias.copy_(bias)
        bn.running_mean.zero_()  # type: ignore[union-attr]
        bn.running_var.fill_(1.0 - bn.eps)
        self.convs.requires_grad_(False)
        bn.requires_grad_(False)
        self.first_frozen = True
        bn.eval()

    def collapse(self) -> None:
        """Fold both branches into the first and drop the second: one conv, the evaluation output (a teacher)."""
        self.merge_into_first()
        self.convs_new = None
        self.bn_new = None


def _branch(convs: nn.ModuleList, bn: nn.Module, x: Tensor) -> Tensor:
    out = convs[0](x) if len(convs) == 1 else torch.cat([conv(x) for conv in convs], dim=1)
    return bn(out)


def _bn_affine(bn: nn.Module) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` of an evaluation-mode BN: ``bn(x) = scale * x + shift`` per channel."""
    assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
    assert bn.running_mean is not None and bn.running_var is not None
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def drop_path_weights(channels: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Per-channel ``(w_first, w_second)``: ``(1, 0)`` if ``r < 0.33``, ``(0, 1)`` if ``r < 0.66``, else
    ``(1/2, 1/2)``, with ``r`` uniform in [0, 1) drawn on the CPU (RCIL's ``torch.rand(1, C, 1, 1)``)."""
    r = torch.rand(channels, generator=generator, dtype=torch.float32)
    low, high = DROP_PATH_BOUNDS
    only_first, only_second = r < low, (r >= low) & (r < high)
    w_first = torch.where(only_first, 1.0, torch.where(only_second, 0.0, 0.5))
    return w_first, 1.0 - w_first


def add_branches(model: IncrementalSegmenter) -> None:
    """Give ``model`` RCIL's parallel branches, in place (same outputs in evaluation: both start equal).

    Each bottleneck's 3x3 conv + BN (``conv2``/``bn2``), each basic block's
    first 3x3 conv + BN (``conv1``/``bn1``: ResNet-18/34, which RCIL's code does
    not branch), and the ASPP's four parallel convs + their BN.  The second
    branch copies the first, except in the head, where its convs get the
    ASPP's own random init (RCIL's head builds both branches with it).
    """
    if isinstance(model.body, ResNet):
        for block in list(model.body.modules()):
            names = ("conv2", "bn2") if isinstance(block, Bottleneck) else ("conv1", "bn1")
            if not isinstance(block, (Bottleneck, BasicBlock)) or isinstance(getattr(block, names[0]),
                                                                               ParallelBranches):
                continue
            setattr(block, names[0], ParallelBranches([getattr(block, names[0])], getattr(block, names[1])))
            setattr(block, names[1], nn.Identity())
    head = model.head
    if isinstance(head, ASPP) and not isinstance(head.map_convs[0], ParallelBranches):
        branches = ParallelBranches(list(head.map_convs), head.map_bn)  # type: ignore[arg-type]
        assert branches.convs_new is not None
        gain = nn.init.calculate_gain("leaky_relu", head.act.negative_slope)
        for conv in branches.convs_new:
            nn.init.xavier_normal_(conv.weight, gain)  # type: ignore[arg-type]
        head.map_convs = nn.ModuleList([branches])
        head.map_bn = nn.Identity()


def parallel_branches(model: nn.Module | None) -> Iterator[ParallelBranches]:
    """Every :class:`ParallelBranches` of ``model`` (none of ``None``)."""
    if model is not None:
        yield from (m for m in model.modules() if isinstance(m, ParallelBranches))


# -- pooled cube knowledge distillation ---------------------------------------------------------------
def pckd_spatial(teacher_map: Tensor, student_map: Tensor, scales: Sequence[int] = PCKD_SCALES) -> Tensor:
    """RCIL's spatial term for one map: ``(1/S) sum_k mean_b || P_k(a^2) - P_k(b^2) ||_F``.

    ``a``, ``b``: the teacher's and the student's ``BxCxhxw`` maps (same
    shape), squared element-wise; ``P_k``: average pooling with a ``k x k``
    window, stride 1, zero padding ``k // 2`` counted in the average (an
    ``(h+1)x(w+1)`` map for even ``k``); the Frobenius norm runs over one
    image's pooled map; ``S`` = the number of windows.
    """
    # P_k is linear, so P_k(a^2) - P_k(b^2) = P_k(a^2 - b^2): one pooling per window instead of two
    diff = teacher_map.float().pow(2) - student_map.float().pow(2)
    total = diff.new_zeros(())
    for k in scales:
        total = total + torch.linalg.vector_norm(box_average(diff, k).flatten(1), dim=1).mean()
    return total / len(scales)


def box_average(x: Tensor, k: int) -> Tensor:
    """``avg_pool2d(x, k, stride=1, padding=k // 2)`` (zero padding counted), as a column then a row average.

    The ``k x k`` mean with the padding counted is the mean over ``k`` rows of the means over ``k``
    columns, so the two 1-D poolings give the same values (to float rounding) with ``2k`` instead of
    ``k^2`` additions per output: RCIL's windows reach 24 on maps of up to 128 x 128 (layer1 of a 512
    crop).
    """
    x = F.avg_pool2d(x, (k, 1), stride=1, padding=(k // 2, 0))
    return F.avg_pool2d(x, (1, k), stride=1, padding=(0, k // 2))


def pckd_channel(teacher_map: Tensor, student_map: Tensor) -> Tensor:
    """RCIL's channel term for one map: ``mean_b || Q(a^2) - Q(b^2) ||_F``, ``Q`` the average of each
    channel with its two neighbours (window 3, stride 1, one zero channel padded on each side, counted)."""
    diff = teacher_map.float().pow(2) - student_map.float().pow(2)  # Q is linear: Q(a^2) - Q(b^2) = Q(a^2 - b^2)
    pooled = F.avg_pool2d(diff.transpose(1, 2), (3, 1), stride=1, padding=(1, 0))
    return torch.linalg.vector_norm(pooled.flatten(1), dim=1).mean()


def pckd_losses(teacher_maps: Sequence[Tensor], student_maps: Sequence[Tensor], *, num_old_channels: int,
                num_classes_total: int, factor: float, last_factor: float) -> dict[str, Tensor]:
    """RCIL's two PCKD sums over the maps of :data:`PCKD_TAPS` (the logits last, the others activated).

    ``spatial = (1/M) sum_m f_m sqrt(N_all/N) spatial_m`` over all ``M = 6`` maps,
    ``channel = (1/(M-1)) sum_m f_m sqrt(N_all/N) channel_m`` over all but the logits;
    ``f_m`` is ``last_factor`` for the last map of each sum (the logits in the
    spatial sum, the head in the channel sum: RCIL's ``i == len(...) - 1``)
    and ``factor`` for the others.  The student's logits are brought to the
    teacher's channels first (background plus the new classes' logits).
    """
    if len(teacher_maps) != len(student_maps) or len(teacher_maps) < 2:
        raise ValueError(f"PCKD needs as many teacher as student maps (at least 2), got {len(teacher_maps)} "
                         f"and {len(student_maps)}")
    num_new = num_classes_total - num_old_channels
    if num_new < 1:
        raise ValueError(f"PCKD needs new classes: {num_classes_total} outputs for {num_old_channels} old ones")
    schedule = math.sqrt(num_classes_total / num_new)
    student_maps = [*student_maps[:-1], merge_extra_channels(student_maps[-1], num_old_channels)]
    count = len(teacher_maps)
    spatial = teacher_maps[0].new_zeros((), dtype=torch.float32)
    for i, (a, b) in enumerate(zip(teacher_maps, student_maps, strict=True)):
        spatial = spatial + (last_factor if i == count - 1 else factor) * schedule * pckd_spatial(a, b)
    channel = teacher_maps[0].new_zeros((), dtype=torch.float32)
    for i, (a, b) in enumerate(zip(teacher_maps[:-1], student_maps[:-1], strict=True)):
        channel = channel + (last_factor if i == count - 2 else factor) * schedule * pckd_channel(a, b)
    return {"pckd_spatial": spatial / count, "pckd_channel": channel / (count - 1)}


# -- the method ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RCILConfig(MethodConfig):
    """RCIL's settings: its code's ``--method RCIL`` (argparser.py) with the PCKD factors of ``train.py``.

    Attributes:
        kd_weight: weight of MiB's unbiased output distillation (``--loss_kd 100``); 0 turns it off.
        kd_alpha: scale of the teacher's logits in it.
        pckd_factor: PCKD factor of each stage map and of the head in the spatial sum (VOC 0.01, ADE 5e-6).
        pckd_last_factor: PCKD factor of the last map of each sum (VOC 0.0005, ADE 5e-7).
        drop_path: random per-channel choice of branch in training (RCIL); ``false`` always averages.
        stem_activation: the LeakyReLU after the ResNet's first conv and BN.  RCIL's code has none there
            (its InPlace-ABN layers have slope 1, an identity, and only the blocks and head add explicit
            LeakyReLUs: segmentation_module.py ``make_model``, models/resnet.py ``mod1``), so ``false`` by
            default; ``true`` keeps the standard stem the ImageNet weights were trained with.
    """

    ce_reduction: CEReduction = "all"
    classifier_init: ClassifierInit = "background"
    kd_weight: float = dataclasses.field(default=100.0, metadata=NON_NEGATIVE)
    kd_alpha: float = dataclasses.field(default=1.0, metadata=POSITIVE)
    pckd_factor: float = dataclasses.field(default=0.01, metadata=NON_NEGATIVE)
    pckd_last_factor: float = dataclasses.field(default=0.0005, metadata=NON_NEGATIVE)
    drop_path: bool = True
    stem_activation: bool = False


class RCIL(Method):
    """``L = UNCE(y) + kd_weight * UNKD + PCKD_spatial + PCKD_channel`` from step 1 on; ``CE(y)`` at step 0;
    the model with parallel branches, folded and frozen at each step."""

    config_class = RCILConfig
    cfg: RCILConfig

    def __init__(self, cfg: MethodConfig) -> None:
        super().__init__(cfg)
        self.draws_step = -1  # the step whose drop-path draws are counted
        self.batches = 0  # batches trained in that step: the drop-path generator is seeded from it
        self.seed = 0
        self.generator: torch.Generator | None = None
        self.slope = LEAKY_SLOPE

    @property
    def needs_teacher(self) -> bool:
        return True

    def identity(self, step: int) -> dict[str, Any]:
        # Step 0 already trains the branched model: its checkpoint fits no other method's model.
        return {**super().identity(step), "architecture": "rcil parallel branches"}

    def adapt_model(self, model: IncrementalSegmenter) -> None:
        add_branches(model)
        if not self.cfg.stem_activation and isinstance(model.body, ResNet):
            model.body.act = nn.Identity()  # type: ignore[assignment]  # the stem's only (blocks have their own)

    def taps(self, step: int) -> tuple[str, ...]:
        return PCKD_TAPS if step > 0 and self._pckd_on else ()

    @property
    def _pckd_on(self) -> bool:
        return self.cfg.pckd_factor > 0 or self.cfg.pckd_last_factor > 0

    def start_step(self, model: IncrementalSegmenter, task: Task, step: int) -> StepSetup:
        """The default boundary, then (step > 0) the student's branches folded into their first, frozen, and
        the teacher's collapsed; the drop-path generator seeded for this step (resumed: where it stopped)."""
        setup = super().start_step(model, task, step)
        if step > 0:
            for branches in parallel_branches(setup.teacher):
                branches.collapse()
            for branches in parallel_branches(setup.student):
                branches.merge_into_first()
        if self.draws_step != step:
            self.draws_step, self.batches = step, 0
        # torch's generator is seeded by the engine before each step (the same on every process and on resume)
        self.seed = int(torch.randint(0, 2**62, ()).item())
        self.generator = torch.Generator().manual_seed(self.seed + self.batches)
        for branches in parallel_branches(setup.student):
            branches.generator = self.generator
            branches.drop_path = self.cfg.drop_path
        self.slope = next((m.negative_slope for m in model.body.modules() if isinstance(m, nn.LeakyReLU)),
                          LEAKY_SLOPE)  # the blocks' (the stem's may be gone)
        return setup

    def loss(self, student: Mapping[str, Any], teacher: Mapping[str, Any] | None, target: Tensor,
             step: int) -> dict[str, Tensor]:
        self._count_batch()
        cfg = self.cfg
        logits = student["logits"]
        if teacher is None:
            return self.cross_entropy_only(logits, target)
        old_logits = teacher["logits"]
        num_old = old_logits.shape[1]
        losses = {"ce": unbiased_cross_entropy(logits, target, num_old, reduction=cfg.ce_reduction)}
        if cfg.kd_weight > 0:
            losses["kd"] = kd_unbiased(logits, old_logits, alpha=cfg.kd_alpha)
        if self._pckd_on:
            losses |= pckd_losses(self._pckd_maps(teacher), self._pckd_maps(student), num_old_channels=num_old,
                                  num_classes_total=logits.shape[1], factor=cfg.pckd_factor,
                                  last_factor=cfg.pckd_last_factor)
        return weighted_total(losses, {"kd": cfg.kd_weight})

    def _pckd_maps(self, outputs: Mapping[str, Any]) -> list[Tensor]:
        """The stage outputs after their activation (RCIL keeps them so), the head's output, the logits."""
        taps = outputs["taps"]
        stages = [F.leaky_relu(taps[name], self.slope) for name in PCKD_TAPS[:4]]
        return [*stages, taps["head"], taps["logits_lowres"]]

    def _count_batch(self) -> None:
        """One more batch trained: the next forward pass draws from the generator seeded for it."""
        self.batches += 1
        if self.generator is not None:
            self.generator.manual_seed(self.seed + self.batches)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.draws_step, "batches": self.batches}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.draws_step = int(state.get("step", -1))
        self.batches = int(state.get("batches", 0))

    def describe(self) -> str:
        cfg = self.cfg
        terms = [ce_text(cfg, unbiased=True)]
        if cfg.kd_weight > 0:
            terms.append(f"{weight_text(cfg.kd_weight)}*UNKD(alpha={weight_text(cfg.kd_alpha)})")
        if self._pckd_on:
            terms.append(f"PCKD(spatial+channel; {weight_text(cfg.pckd_factor)} per map, "
                         f"{weight_text(cfg.pckd_last_factor)} last)")
        mix = "drop-path" if cfg.drop_path else "averaged"
        stem = "" if cfg.stem_activation else ", no stem activation"
        note = f"parallel branches ({mix}), folded and frozen at each step{stem}"
        return f"{cfg.name}: L = {' + '.join(terms)} {boundary_text(self, distils=True, notes=[note])}"


PRESETS: dict[str, MethodConfig] = {
    # RCIL as its code's `--method RCIL` runs VOC (argparser.py; train.py's VOC PCKD factors).
    "rcil": RCILConfig(name="rcil"),
    # ADE20k: the same flags (scripts/ade/RCIL_ade_100-10.sh) with train.py's ADE PCKD factors.
    "rcil-ade": RCILConfig(name="rcil-ade", pckd_factor=5e-6, pckd_last_factor=5e-7),
}
