"""Training loss: nnU-Net v2's Dice + cross-entropy with deep supervision, extended to partial labels.

What follows nnU-Net v2 (``nnunetv2/training/loss``):

* ``DC_and_CE_loss``: the sum of a cross-entropy and a soft Dice on softmax
  probabilities, both with weight 1; the Dice returns ``-dc`` (so a perfect
  prediction scores -1), skips the background class (``do_bg=False``), uses
  ``smooth=1e-5`` and, for 3D full-res, "batch Dice": tp/fp/fn are summed over
  the batch before the per-class Dice, which makes small or absent structures in
  one sample far less noisy.
* ``ignore_label``: voxels with the ignore value count in neither term; they are
  mapped to class 0 before one-hot encoding and removed with a validity mask.
* ``DeepSupervisionWrapper``: one loss per decoder output, weighted 1/2^i from
  full resolution down, the lowest resolution weighted 0, weights normalised to
  sum 1; targets are nearest-neighbour downsampled to each output's scale
  (``DownsampleSegForDSTransform2``) with scales from the cumulative pooling.

What is added for FLARE 2023's partially labelled cases: a per-sample
``class_mask`` (B, C) of annotated classes. A class that a case does not
annotate may be present in it as "background", so its Dice terms in that
sample are meaningless and are left out, and ``partial_label_target`` turns the
background of such a case into ignore voxels (the cross-entropy then learns
only from voxels whose class is known).

Tensors are (B, C, z, y, x) for logits and (B, 1, z, y, x) or (B, z, y, x) for
integer targets.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pocketseg.labels import FOREGROUND_IDS, NUM_CLASSES

#: Target value of voxels whose class is unknown: no cross-entropy and no Dice there.
IGNORE_INDEX = 255

Scale = tuple[float, float, float]

__all__ = [
    "IGNORE_INDEX",
    "DeepSupervisionLoss",
    "DiceCELoss",
    "SoftDiceLoss",
    "deep_supervision_scales",
    "deep_supervision_weights",
    "downsample_target",
    "partial_label_target",
    "soft_dice",
]


def _target_channel_first(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Check logits against target and return the target as int64 (B, 1, *spatial).

    Both target layouts are accepted because nnU-Net's data loader gives (B, 1, ...)
    while ``cross_entropy`` wants (B, ...); mistakes in either show up here with a
    readable message instead of a shape error deep inside ``scatter``.
    """
    if logits.dim() < 3:
        raise ValueError(f"logits must be (B, C, *spatial), got shape {tuple(logits.shape)}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer class ids, got dtype {target.dtype}")
    if target.dim() == logits.dim() - 1:
        target = target.unsqueeze(1)
    if target.dim() != logits.dim() or target.shape[1] != 1:
        raise ValueError(f"target must be (B, 1, *spatial) or (B, *spatial) for logits {tuple(logits.shape)}, "
                         f"got shape {tuple(target.shape)}")
    if target.shape[0] != logits.shape[0] or target.shape[2:] != logits.shape[2:]:
        raise ValueError(f"target shape {tuple(target.shape)} does not match logits shape {tuple(logits.shape)} "
                         "(batch and spatial sizes must agree)")
    target = target.long()
    num_classes = logits.shape[1]
    bad = (target != IGNORE_INDEX) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        values = sorted({int(v) for v in target[bad].unique()[:10]})
        raise ValueError(f"target holds values {values} outside 0..{num_classes - 1} that are not IGNORE_INDEX "
                         f"({IGNORE_INDEX})")
    return target


def _check_class_mask(class_mask: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
    """Return a bool (B, C) mask, all True when ``class_mask`` is None."""
    b, c = logits.shape[:2]
    if class_mask is None:
        return torch.ones((b, c), dtype=torch.bool, device=logits.device)
    if not isinstance(class_mask, torch.Tensor) or class_mask.dtype != torch.bool:
        raise ValueError(f"class_mask must be a bool tensor, got "
                         f"{class_mask.dtype if isinstance(class_mask, torch.Tensor) else type(class_mask).__name__}")
    if tuple(class_mask.shape) != (b, c):
        raise ValueError(f"class_mask must have shape (batch, classes) = {(b, c)}, got {tuple(class_mask.shape)}")
    return class_mask.to(logits.device)


def soft_dice(logits: torch.Tensor, target: torch.Tensor, class_mask: torch.Tensor | None = None, *,
              batch_dice: bool = True, do_bg: bool = False, smooth: float = 1e-5) -> torch.Tensor:
    """Negative mean soft Dice of softmax(logits) against an integer target, as nnU-Net's SoftDiceLoss.

    tp, fp and fn are summed over space per (sample, class) with ignore voxels
    removed from both probabilities and one-hot target. ``class_mask`` (B, C,
    bool) leaves out the (sample, class) pairs that a sample does not annotate.
    With ``batch_dice`` the sums run over the batch too (only over samples that
    annotate the class) and the Dice is per class; otherwise it is per
    (sample, class). ``do_bg=False`` drops class 0. Samples whose voxels are all
    IGNORE_INDEX are left out like masked ones (nnU-Net would count them as a
    constant Dice of 1). The result is ``-mean(dice)`` over the included
    entries, or 0 (still attached to the graph, so ``backward`` works) when
    nothing is included.

    Computed in float32 whatever the logits' dtype: the sums run over whole
    patches (millions of voxels), which half precision cannot hold accurately.
    """
    _check_dice_args(logits, smooth, do_bg)
    target = _target_channel_first(logits, target)
    mask = _check_class_mask(class_mask, logits)
    return _soft_dice(logits, target, mask, batch_dice=batch_dice, do_bg=do_bg, smooth=smooth)


def _check_dice_args(logits: torch.Tensor, smooth: float, do_bg: bool) -> None:
    if smooth < 0:
        raise ValueError(f"smooth must be >= 0, got {smooth}")
    if not do_bg and logits.dim() >= 2 and logits.shape[1] < 2:
        raise ValueError("do_bg=False needs at least two classes (class 0 is dropped)")


def _soft_dice(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *, batch_dice: bool, do_bg: bool,
               smooth: float) -> torch.Tensor:
    """:func:`soft_dice` on already checked inputs: int64 target (B, 1, *S), bool mask (B, C)."""
    probs = torch.softmax(logits.float(), dim=1)
    valid = target != IGNORE_INDEX  # (B, 1, *S)
    safe = torch.where(valid, target, torch.zeros_like(target))  # ignore -> 0 so one-hot stays in range
    validf = valid.to(probs.dtype)
    onehot = torch.zeros_like(probs).scatter_(1, safe, 1.0) * validf

    # As nnU-Net's MemoryEfficientSoftDiceLoss: fp = sum(p) - tp and fn = sum(y) - tp, so only
    # tp and the two sums are reduced over the volume, without full-size (1 - p) or (1 - y) copies.
    axes = tuple(range(2, logits.dim()))
    tp = (probs * onehot).sum(axes)  # (B, C); onehot is 0 at ignore voxels
    sum_pred = (probs * validf).sum(axes)
    sum_gt = onehot.sum(axes)
    fp, fn = sum_pred - tp, sum_gt - tp

    # A sample without a single labelled voxel says nothing about any class; nnU-Net would score
    # it Dice 1 (smooth / smooth), a constant that only dilutes the mean. Leave it out instead.
    mask = mask & valid.flatten(1).any(1)[:, None]
    maskf = mask.to(tp.dtype)
    if batch_dice:
        tp, fp, fn = (tp * maskf).sum(0), (fp * maskf).sum(0), (fn * maskf).sum(0)  # (C,)
        included = mask.any(0)
    else:
        included = mask
    dice = (2.0 * tp + smooth) / torch.clamp(2.0 * tp + fp + fn + smooth, min=1e-8)
    if not do_bg:
        dice, included = dice[..., 1:], included[..., 1:]
    if not bool(included.any()):
        return logits.sum() * 0.0
    return -dice[included].mean()


class SoftDiceLoss(nn.Module):
    """Module form of :func:`soft_dice` (nnU-Net v2 defaults: batch Dice, no background, smooth 1e-5)."""

    def __init__(self, *, batch_dice: bool = True, do_bg: bool = False, smooth: float = 1e-5):
        super().__init__()
        if smooth < 0:
            raise ValueError(f"smooth must be >= 0, got {smooth}")
        self.batch_dice = batch_dice
        self.do_bg = do_bg
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor,
                class_mask: torch.Tensor | None = None) -> torch.Tensor:
        return soft_dice(logits, target, class_mask, batch_dice=self.batch_dice, do_bg=self.do_bg,
                         smooth=self.smooth)

    def extra_repr(self) -> str:
        return f"batch_dice={self.batch_dice}, do_bg={self.do_bg}, smooth={self.smooth}"


class DiceCELoss(nn.Module):
    """``weight_ce * CE + weight_dice * soft Dice``, nnU-Net v2's DC_and_CE_loss with an ignore label.

    The cross-entropy is the mean over non-ignored voxels, the value of
    ``F.cross_entropy(..., ignore_index=IGNORE_INDEX, reduction="mean")``, but
    computed as sum / max(count, 1): a patch with only ignore voxels (a crop of
    a partially labelled case's background) then gives 0 instead of NaN, which
    nnU-Net gets by skipping the CE when no voxel is labelled, and without a
    host-device sync. ``class_mask`` only affects the Dice: the CE needs none,
    since unknown voxels are already ``IGNORE_INDEX`` (see
    :func:`partial_label_target`).
    """

    def __init__(self, *, weight_ce: float = 1.0, weight_dice: float = 1.0, batch_dice: bool = True,
                 do_bg: bool = False, smooth: float = 1e-5):
        super().__init__()
        if weight_ce < 0 or weight_dice < 0:
            raise ValueError(f"loss weights must be >= 0, got weight_ce={weight_ce}, weight_dice={weight_dice}")
        if smooth < 0:
            raise ValueError(f"smooth must be >= 0, got {smooth}")
        self.weight_ce = float(weight_ce)
        self.weight_dice = float(weight_dice)
        self.batch_dice = batch_dice
        self.do_bg = do_bg
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor,
                class_mask: torch.Tensor | None = None) -> torch.Tensor:
        target = _target_channel_first(logits, target)
        mask = _check_class_mask(class_mask, logits)
        terms = []
        if self.weight_ce:
            ce_sum = F.cross_entropy(logits.float(), target[:, 0], ignore_index=IGNORE_INDEX, reduction="sum")
            n_valid = (target != IGNORE_INDEX).sum().clamp_min(1)
            terms.append(self.weight_ce * (ce_sum / n_valid))
        if self.weight_dice:
            _check_dice_args(logits, self.smooth, self.do_bg)
            dice = _soft_dice(logits, target, mask, batch_dice=self.batch_dice, do_bg=self.do_bg, smooth=self.smooth)
            terms.append(self.weight_dice * dice)
        if not terms:
            return logits.sum() * 0.0
        return terms[0] if len(terms) == 1 else terms[0] + terms[1]

    def extra_repr(self) -> str:
        return (f"weight_ce={self.weight_ce}, weight_dice={self.weight_dice}, batch_dice={self.batch_dice}, "
                f"do_bg={self.do_bg}, smooth={self.smooth}")


def deep_supervision_weights(n: int) -> list[float]:
    """Loss weight of each of ``n`` outputs (full resolution first), as nnU-Net v2.

    1/2^i, the lowest resolution set to 0 (nnU-Net: it is too coarse to help),
    normalised to sum 1. With a single output there is nothing to drop and it
    gets weight 1.
    """
    if n < 1:
        raise ValueError(f"need at least one output, got {n}")
    if n == 1:
        return [1.0]
    raw = [1.0 / 2**i for i in range(n)]
    raw[-1] = 0.0
    total = sum(raw)
    return [w / total for w in raw]


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of ``loss`` over the decoder outputs, nnU-Net v2's DeepSupervisionWrapper.

    Weights come from :func:`deep_supervision_weights` for the number of outputs
    given; terms with weight 0 are not computed at all (saves the lowest
    resolution's loss and keeps its head out of the graph's gradient).
    """

    def __init__(self, loss: nn.Module):
        super().__init__()
        if not callable(loss):
            raise ValueError(f"loss must be callable, got {type(loss).__name__}")
        self.loss = loss

    def forward(self, outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                class_mask: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor) or isinstance(targets, torch.Tensor):
            raise ValueError("outputs and targets must be lists (one entry per resolution, full resolution first); "
                             "build the network with deep_supervision=True and use downsample_target")
        if len(outputs) != len(targets):
            raise ValueError(f"got {len(outputs)} outputs but {len(targets)} targets; need one target per output")
        if not outputs:
            raise ValueError("outputs is empty")
        weights = deep_supervision_weights(len(outputs))
        terms = [w * self.loss(out, tgt, class_mask) for w, out, tgt in zip(weights, outputs, targets) if w != 0]
        return sum(terms[1:], terms[0])  # never empty: only the last of >= 2 outputs has weight 0


def deep_supervision_scales(strides: Sequence[Sequence[int]]) -> list[Scale]:
    """Scale (z, y, x) of each decoder output relative to the input, full resolution first.

    As nnU-Net v2: ``1 / cumprod(strides)`` over the stages, without the
    bottleneck (it has no segmentation head). ``strides`` are the per-stage
    strides of the U-Net, the first being (1, 1, 1).
    """
    if len(strides) < 2:
        raise ValueError(f"need the strides of at least two stages, got {len(strides)}")
    scales: list[Scale] = []
    total = [1, 1, 1]
    for i, stride in enumerate(strides):
        if len(stride) != 3 or any(int(s) != s or s < 1 for s in stride):
            raise ValueError(f"stride {i} must be three positive integers (z, y, x), got {tuple(stride)}")
        total = [t * int(s) for t, s in zip(total, stride)]
        scales.append((1.0 / total[0], 1.0 / total[1], 1.0 / total[2]))
    return scales[:-1]


def downsample_target(target: torch.Tensor, scales: Iterable[Sequence[float]]) -> list[torch.Tensor]:
    """Nearest-neighbour copies of an integer target at each scale, for the deep-supervision outputs.

    As nnU-Net v2's DownsampleSegForDSTransform2: size ``round(shape * scale)``
    and ``interpolate(mode="nearest-exact")`` on a float copy, cast back to the
    target's dtype, so label ids and IGNORE_INDEX are kept (nearest neighbour
    only copies values). A scale of (1, 1, 1) returns ``target`` itself.
    ``target`` is (B, 1, z, y, x) or (B, z, y, x); outputs keep its layout.
    """
    if target.is_floating_point() or target.is_complex():
        raise ValueError(f"target must hold integer class ids, got dtype {target.dtype}")
    if target.dim() not in (4, 5):
        raise ValueError(f"target must be (B, 1, z, y, x) or (B, z, y, x), got shape {tuple(target.shape)}")
    if target.dim() == 5 and target.shape[1] != 1:
        raise ValueError(f"target must have one channel, got shape {tuple(target.shape)}")
    spatial = target.shape[-3:]
    out = []
    for scale in scales:
        scale = tuple(float(s) for s in scale)
        if len(scale) != 3 or any(not 0 < s <= 1 for s in scale):
            raise ValueError(f"each scale must be three factors in (0, 1] (z, y, x), got {scale}")
        if scale == (1.0, 1.0, 1.0):
            out.append(target)
            continue
        size = tuple(max(1, round(n * s)) for n, s in zip(spatial, scale))
        as5d = target if target.dim() == 5 else target.unsqueeze(1)
        small = F.interpolate(as5d.float(), size=size, mode="nearest-exact").to(target.dtype)
        out.append(small if target.dim() == 5 else small[:, 0])
    return out


def partial_label_target(target: torch.Tensor, annotated_classes: Iterable[int], *,
                         num_classes: int = NUM_CLASSES,
                         foreground_classes: Iterable[int] = FOREGROUND_IDS) -> tuple[torch.Tensor, torch.Tensor]:
    """Target and class-mask row of one case that may annotate only some classes.

    In a partially labelled case (FLARE 2023: many sources annotate one or a few
    organs) a voxel labelled 0 may belong to an organ nobody annotated, so
    training it as background would teach the network to miss that organ. Such
    voxels become IGNORE_INDEX and the case's Dice skips background and the
    unannotated classes. A case that annotates every foreground class is
    returned unchanged (as a new tensor) with background included.

    ``annotated_classes``: the case's annotated label ids (0 may be listed; it
    is implied). Returns ``(new_target, class_mask_row)``, the row a bool tensor
    (num_classes,) for the ``class_mask`` of :class:`DiceCELoss`. Raises
    ValueError if the target holds a foreground label the case does not claim to
    annotate, which means the annotation list and the label map disagree.
    """
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer class ids, got dtype {target.dtype}")
    if torch.iinfo(target.dtype).max < IGNORE_INDEX:
        raise ValueError(f"target dtype {target.dtype} cannot hold IGNORE_INDEX ({IGNORE_INDEX}); use uint8 or wider")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    foreground = {int(c) for c in foreground_classes}
    if not foreground or any(not 1 <= c < num_classes for c in foreground):
        raise ValueError(f"foreground_classes must be non-empty ids in 1..{num_classes - 1}, got {sorted(foreground)}")
    annotated = {int(c) for c in annotated_classes} - {0}
    unknown = annotated - foreground
    if unknown:
        raise ValueError(f"annotated_classes {sorted(unknown)} are not foreground classes {sorted(foreground)}")

    present = {int(v) for v in torch.unique(target)} - {0, IGNORE_INDEX}
    out_of_range = sorted(v for v in present if not 0 <= v < num_classes)
    if out_of_range:
        raise ValueError(f"target holds values {out_of_range} outside 0..{num_classes - 1} that are not "
                         f"IGNORE_INDEX ({IGNORE_INDEX})")
    unclaimed = sorted(present - annotated)
    if unclaimed:
        raise ValueError(f"target holds labels {unclaimed} that are not in annotated_classes {sorted(annotated)}")

    fully = foreground <= annotated
    row = torch.zeros(num_classes, dtype=torch.bool)
    row[sorted(annotated)] = True
    if fully:
        row[0] = True
        return target.clone(), row
    ignore = torch.full_like(target, IGNORE_INDEX)
    return torch.where(target == 0, ignore, target), row
