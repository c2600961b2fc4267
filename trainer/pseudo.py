"""Pseudo labels for self-training: the merge rule, the uncertainty score (paper Eq. 1) and case selection.

Array code over one :class:`~pocketseg.runtime.arrays.ArrayModule` (``am``, the CPU's by default); label maps are
integer arrays of one shape in any axis order, ids as :mod:`pocketseg.labels`
(0 background, 1-13 organs, 14 tumor).

Merge rule of a partially labelled case (FLARE 2023 partial labels): for the
classes the case annotates, the ground truth is the whole truth. A voxel the
ground truth gives an annotated class keeps it, whatever the pseudo label says;
a voxel the pseudo label calls an annotated class but the ground truth does not
is *not* that class, and since no annotated class claims it and the pseudo
label's only guess is ruled out, it becomes background. The unannotated classes
come from the pseudo label. An unlabelled case is its pseudo label.

Uncertainty (paper Eq. 1): for consecutive rounds r -> r+1, the number of
voxels whose label changed divided by the number of foreground voxels of round
r+1, averaged over the round pairs. A round pair whose later label map has no
foreground at all gives +inf: the ratio is undefined, and an empty label map of
an abdominal CT is a failed prediction that must never be selected (a stable
empty map would otherwise score 0, the best possible score).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from pocketseg import labels as L
from pocketseg.runtime.arrays import ArrayModule, cpu_module
from pocketseg.trainer.loss import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX",
    "TUMOR_PSEUDO_FILL",
    "default_threshold",
    "infer_annotated",
    "label_change",
    "merge_pseudo_label",
    "select_cases",
    "uncertainty_from_changes",
    "uncertainty_score",
]

#: What the tumor voxels of a pseudo label become when tumor pseudo labels are kept out
#: (``--no-tumor-pseudo``). Ignoring them (IGNORE_INDEX, no gradient) would be the better
#: rule: calling them background teaches the net that tumor-looking tissue is background.
#: But ``trainer.dataset.validate_cases`` refuses label files with values above 14, so
#: ``train()`` cannot read 255 from a derived data set today; background is what the trainer
#: accepts unchanged. Switch to IGNORE_INDEX once validate_cases accepts it (docs/training.md
#: already says voxels labelled 255 are ignored); merge_pseudo_label supports both.
TUMOR_PSEUDO_FILL = L.BACKGROUND


def _classes(ids: Iterable[int], what: str) -> set[int]:
    out = {int(c) for c in ids} - {L.BACKGROUND}
    bad = sorted(c for c in out if c not in L.FOREGROUND_IDS)
    if bad:
        raise ValueError(f"{what} {bad} are not FLARE 2023 foreground classes 1-{L.TUMOR}")
    return out


def merge_pseudo_label(pseudo: Any, ground_truth: Any = None, annotated: Iterable[int] = (), *,
                       tumor_pseudo: bool = True, tumor_fill: int = TUMOR_PSEUDO_FILL, am: ArrayModule | None = None) -> Any:
    """The training label of a partially labelled (``ground_truth`` given) or unlabelled case; uint8.

    ``annotated``: the classes the ground truth annotates (the rule is in the module docstring).
    ``tumor_pseudo=False``: tumor voxels that come from the pseudo label become ``tumor_fill``
    (background, or IGNORE_INDEX); a ground-truth tumor of a case that annotates tumors is kept.
    Raises ValueError for mismatched shapes, a ground truth holding classes it does not annotate,
    or label values outside 0-14.
    """
    xp = (am or cpu_module()).xp
    ps = xp.asarray(pseudo)
    if ps.dtype.kind not in "iu":
        raise ValueError(f"pseudo label must be an integer array, got {ps.dtype}")
    if ps.size and (int(ps.min()) < 0 or int(ps.max()) > L.TUMOR):
        raise ValueError(f"pseudo label values must lie in 0-{L.TUMOR}, got {int(ps.min())}..{int(ps.max())}")
    if tumor_fill not in (L.BACKGROUND, IGNORE_INDEX):
        raise ValueError(f"tumor_fill must be {L.BACKGROUND} (background) or {IGNORE_INDEX} (ignore), got {tumor_fill}")
    known = _classes(annotated, "annotated classes")
    if ground_truth is None and known:
        raise ValueError(f"annotated classes {sorted(known)} given without a ground truth")
    out = ps.astype(xp.uint8, copy=True)
    if known:  # the pseudo label's claims on annotated classes are overruled by the ground truth
        out[xp.isin(out, xp.asarray(sorted(known), dtype=xp.uint8))] = L.BACKGROUND
    if not tumor_pseudo and L.TUMOR not in known:
        out[out == L.TUMOR] = tumor_fill
    if ground_truth is not None:
        gt = xp.asarray(ground_truth)
        if gt.shape != ps.shape:
            raise ValueError(f"ground truth shape {tuple(gt.shape)} differs from the pseudo label's {tuple(ps.shape)}")
        if gt.dtype.kind not in "iu":
            raise ValueError(f"ground truth must be an integer array, got {gt.dtype}")
        present = {int(v) for v in xp.unique(gt).tolist()} - {L.BACKGROUND}
        unclaimed = sorted(present - known)
        if unclaimed:
            raise ValueError(f"ground truth holds classes {unclaimed} that are not among the annotated classes "
                             f"{sorted(known)}")
        fg = gt > 0
        out[fg] = gt[fg].astype(xp.uint8)
    return out


def infer_annotated(ground_truth: Any, *, am: ArrayModule | None = None) -> tuple[tuple[int, ...], bool]:
    """Annotated classes of a label map taken as "the classes present", and whether that makes it fully labelled.

    For data sets without a ``pocketseg`` record. A case counts as fully labelled when all 13 organs are
    present: a full annotation of a scan without tumors has no tumor voxels, so a missing tumor class
    cannot tell full from partial; such a case is then taken to annotate tumors too (as "none here").
    """
    xp = (am or cpu_module()).xp
    present = {int(v) for v in xp.unique(xp.asarray(ground_truth)).tolist()} - {L.BACKGROUND}
    bad = sorted(c for c in present if c not in L.FOREGROUND_IDS)
    if bad:
        raise ValueError(f"label map holds values {bad} outside 0-{L.TUMOR}")
    full = set(L.ORGAN_IDS) <= present
    return (tuple(L.FOREGROUND_IDS) if full else tuple(sorted(present))), full


def label_change(previous: Any, later: Any, *, am: ArrayModule | None = None) -> tuple[int, int]:
    """(voxels whose label differs between two rounds, foreground voxels of the later round)."""
    xp = (am or cpu_module()).xp
    a, b = xp.asarray(previous), xp.asarray(later)
    if a.shape != b.shape:
        raise ValueError(f"label maps of consecutive rounds differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return int(xp.count_nonzero(a != b)), int(xp.count_nonzero(b))


def uncertainty_from_changes(changes: Sequence[tuple[int, int]]) -> float:
    """Eq. 1 from (changed, later foreground) counts of each consecutive round pair; +inf if a later map is empty."""
    if not changes:
        raise ValueError("the uncertainty needs at least two rounds (one consecutive pair)")
    terms = []
    for changed, foreground in changes:
        if changed < 0 or foreground < 0:
            raise ValueError(f"voxel counts must be >= 0, got changed={changed}, foreground={foreground}")
        terms.append(math.inf if foreground == 0 else changed / foreground)
    return float(sum(terms) / len(terms))


def uncertainty_score(label_maps: Sequence[Any], *, am: ArrayModule | None = None) -> float:
    """Paper Eq. 1 of one case from its pseudo label maps of rounds 1..R (R >= 2), in round order."""
    if len(label_maps) < 2:
        raise ValueError(f"the uncertainty needs the label maps of at least two rounds, got {len(label_maps)}")
    return uncertainty_from_changes([label_change(a, b, am=am) for a, b in zip(label_maps[:-1], label_maps[1:])])


def default_threshold(scores: Mapping[str, float]) -> float:
    """The selection threshold when none is given: the median of the finite scores (see docs/training.md).

    The scale of Eq. 1 depends on how good the net already is (a net still learning changes a
    large share of its labels between rounds, a converged one a few percent), so no fixed number
    carries from one data set and budget to another; the median keeps the more stable half.
    Returns +inf when no score is finite (nothing can be selected then).
    """
    finite = sorted(v for v in scores.values() if math.isfinite(v))
    if not finite:
        return math.inf
    return float(np.median(finite))


def select_cases(scores: Mapping[str, float], threshold: float) -> tuple[list[str], list[str]]:
    """(kept, rejected) case names: kept are those scoring under ``threshold``; +inf scores never are."""
    if not (isinstance(threshold, (int, float)) and threshold > 0):
        raise ValueError(f"threshold must be a positive number, got {threshold!r}")
    kept = sorted(c for c, s in scores.items() if math.isfinite(s) and s < threshold)
    return kept, sorted(set(scores) - set(kept))
