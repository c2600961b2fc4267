"""Post-processing of label maps: connected components, bounding boxes.

The paper keeps the largest connected component of every organ (Sec. 2.3,
"post-processing"): an organ is one piece, and stray islands are false positives.
Tumors can be many, so they keep every component, minus specks below a minimum
volume. Both rules act on all labels in one labelling pass per label, inside that
label's bounding box.

Array code over :class:`pocketseg.runtime.arrays.ArrayModule` (NumPy or CuPy);
arrays are (z, y, x).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pocketseg.runtime.arrays import ArrayModule, cpu_module

__all__ = ["bounding_box", "keep_largest_components", "remove_small_components"]


def bounding_box(mask: Any, am: ArrayModule | None = None) -> tuple[slice, slice, slice] | None:
    """The smallest box holding every True voxel of a 3D mask, or None when it is empty."""
    am = am or cpu_module()
    xp = am.xp
    box = []
    for axis in range(mask.ndim):
        profile = mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis))
        idx = xp.flatnonzero(profile)
        if idx.size == 0:
            return None
        box.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(box)  # type: ignore[return-value]


def _component_sizes(mask: Any, am: ArrayModule) -> tuple[Any, Any]:
    components, n = am.label(mask)
    sizes = am.xp.bincount(components.ravel(), minlength=n + 1)
    sizes[0] = 0
    return components, sizes


def keep_largest_components(labels: Any, label_ids: Iterable[int], am: ArrayModule | None = None) -> Any:
    """In place: for every label in ``label_ids``, zero all but its largest 26-connected component.

    On a tie of sizes the component with the lowest id wins (libraries number components
    in different orders, so an exact tie may keep a different piece on another device).
    """
    am = am or cpu_module()
    xp = am.xp
    for value in label_ids:
        mask = labels == value
        box = bounding_box(mask, am)
        if box is None:
            continue
        components, sizes = _component_sizes(mask[box], am)
        if int((sizes > 0).sum()) <= 1:
            continue
        drop = (components != int(xp.argmax(sizes))) & (components > 0)
        region = labels[box]
        region[drop] = 0
    return labels


def remove_small_components(labels: Any, label_id: int, min_voxels: int, am: ArrayModule | None = None) -> Any:
    """In place: zero the 26-connected components of ``label_id`` smaller than ``min_voxels``."""
    am = am or cpu_module()
    xp = am.xp
    if min_voxels <= 1:
        return labels
    mask = labels == label_id
    box = bounding_box(mask, am)
    if box is None:
        return labels
    components, sizes = _component_sizes(mask[box], am)
    small = xp.flatnonzero((sizes > 0) & (sizes < min_voxels))
    if small.size:
        region = labels[box]
        region[xp.isin(components, small)] = 0
    return labels
