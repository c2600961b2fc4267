"""Post-processing of label maps: connected components.

The paper keeps the largest connected component of every organ (Sec. 2.3,
"post-processing"): an organ is one piece, and stray islands are false positives.
Tumors can be many, so they keep every component, minus specks below a minimum
volume. :func:`clean_components` applies both rules after one labelling of all
values (connected-components-3d on the CPU and cuCIM on a GPU label a multi-label
map in a single pass; with scipy.ndimage or cupyx alone each value is labelled
inside its bounding box), then decides per component from its size and value.

Array code over :class:`pocketseg.runtime.arrays.ArrayModule` (NumPy or CuPy);
arrays are (z, y, x).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pocketseg.runtime.arrays import ArrayModule, bounding_box, cpu_module

#: Slices per slab when counting and masking components (bounds the int64 temporaries).
SLAB = 16

__all__ = ["clean_components", "keep_largest_components", "label_each_value",
           "remove_small_components"]


def label_each_value(labels: Any, values: Iterable[int], am: ArrayModule) -> tuple[Any, int]:
    """int32 ids 1..n of the 26-connected components of each of ``values`` (other voxels 0), and n."""
    xp = am.xp
    values = [int(v) for v in values if int(v) != 0]
    if am.label_multi is not None:
        # Mask out other values only when some may be present: max() is one cheap pass, unlike unique().
        top = int(labels.max()) if labels.size else 0
        needed = not set(range(1, top + 1)) <= set(values)
        source = xp.where(xp.isin(labels, xp.asarray(values)), labels, 0) if needed else labels
        return am.label_multi(source)
    out = xp.zeros(labels.shape, dtype=xp.int32)
    count = 0
    for value in values:
        mask = labels == value
        box = bounding_box(mask, am)
        if box is None:
            continue
        components, n = am.label(mask[box])
        region = out[box]
        inside = components > 0
        region[inside] = components[inside] + count
        count += n
    return out, count


def clean_components(labels: Any, largest: Iterable[int] = (), min_voxels: Mapping[int, int] | None = None,
                     am: ArrayModule | None = None) -> Any:
    """In place: keep only the largest component of each value in ``largest``, and drop the
    components of each value in ``min_voxels`` smaller than its minimum. Returns ``labels``.

    On a tie of sizes the component with the lowest id wins (libraries number components
    in different orders, so an exact tie may keep a different piece on another device).
    """
    am = am or cpu_module()
    xp = am.xp
    largest = [int(v) for v in largest]
    min_voxels = {int(k): int(v) for k, v in (min_voxels or {}).items() if int(v) > 1}
    values = sorted(set(largest) | set(min_voxels))
    if not values:
        return labels
    components, n = label_each_value(labels, values, am)
    if n == 0:
        return labels
    # Slab by slab: bincount and the scatter widen ids to int64, which for a whole crop would
    # cost 8 bytes per voxel more than the label map itself.
    sizes = xp.zeros(n + 1, dtype=xp.int64)
    owner = xp.zeros(n + 1, dtype=labels.dtype)
    for first in range(0, components.shape[0], SLAB):
        part = components[first : first + SLAB].ravel()
        sizes += xp.bincount(part, minlength=n + 1)
        owner[part] = labels[first : first + SLAB].ravel()  # every voxel of a component has its value
    keep = xp.ones(n + 1, dtype=bool)
    for value in largest:
        ids = xp.flatnonzero(owner == value)
        ids = ids[ids > 0]
        if ids.size > 1:
            keep[ids] = False
            keep[ids[int(xp.argmax(sizes[ids]))]] = True
    for value, minimum in min_voxels.items():
        ids = xp.flatnonzero((owner == value) & (sizes < minimum))
        keep[ids[ids > 0]] = False
    keep[0] = True
    if not bool(keep.all()):
        drop = ~keep
        for first in range(0, components.shape[0], SLAB):
            region = labels[first : first + SLAB]
            region[drop[components[first : first + SLAB]]] = 0
    return labels


def keep_largest_components(labels: Any, label_ids: Iterable[int], am: ArrayModule | None = None) -> Any:
    """In place: for every label in ``label_ids``, zero all but its largest 26-connected component."""
    return clean_components(labels, largest=label_ids, am=am)


def remove_small_components(labels: Any, label_id: int, min_voxels: int, am: ArrayModule | None = None) -> Any:
    """In place: zero the 26-connected components of ``label_id`` smaller than ``min_voxels``."""
    return clean_components(labels, min_voxels={label_id: min_voxels}, am=am)
