"""Voxel-grid geometry derived from a 4x4 voxel-to-RAS affine.

See :mod:`pocketseg.types` for the axis-order conventions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np

from pocketseg.types import Affine, Shape3, Spacing3


#: Margin (mm) added on every side of the abdomen box the ROI net finds, before the detail stage crops
#: (paper Sec. 2.1); the trainer crops its detail patches the same way. Packages record their own.
ROI_MARGIN_MM = 20.0

Box = tuple[slice, slice, slice]


def grow_box(box: Sequence[slice], spacing_mm: Sequence[float], margin_mm: Any, shape: Sequence[int]) -> Box:
    """``box`` widened by ``margin_mm`` on each side and clipped to ``shape``: the one box-plus-margin rule.

    ``margin_mm`` is one number, or a (3, 2) array of per-side margins (the trainer jitters each
    side). A margin becomes whole voxels by rounding outwards (``ceil(margin / spacing)``), so
    the box never grows by less than asked; the result holds at least one voxel per axis.
    """
    margins = np.broadcast_to(np.maximum(np.asarray(margin_mm, dtype=np.float64), 0.0), (3, 2))
    out = []
    for axis, (sl, sp, n) in enumerate(zip(box, spacing_mm, shape)):
        lo = max(sl.start - math.ceil(margins[axis, 0] / float(sp)), 0)
        hi = min(sl.stop + math.ceil(margins[axis, 1] / float(sp)), int(n))
        out.append(slice(int(lo), int(max(hi, lo + 1))))
    return tuple(out)  # type: ignore[return-value]


def spacing_from_affine(affine: Affine) -> Spacing3:
    """Voxel spacing in mm along i, j, k: the lengths of the affine's first three columns."""
    lengths = np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
    return (float(lengths[0]), float(lengths[1]), float(lengths[2]))


def orientation_codes(affine: Affine) -> str:
    """Three-letter axis codes, e.g. 'RAS' or 'LPS': the direction each voxel axis increases towards."""
    return "".join(nib.aff2axcodes(affine))


def is_oblique(affine: Affine, tol_deg: float = 0.5) -> bool:
    """True when a voxel axis is more than ``tol_deg`` away from the nearest world axis."""
    rot = np.asarray(affine, dtype=np.float64)[:3, :3]
    unit = rot / np.linalg.norm(rot, axis=0, keepdims=True)
    cos_max = np.abs(unit).max(axis=0)
    return bool(np.any(np.degrees(np.arccos(np.clip(cos_max, -1.0, 1.0))) > tol_deg))


def voxel_to_world(affine: Affine, ijk: np.ndarray) -> np.ndarray:
    """Map voxel indices, shape (..., 3), to RAS mm, shape (..., 3)."""
    ijk = np.asarray(ijk, dtype=np.float64)
    aff = np.asarray(affine, dtype=np.float64)
    return ijk @ aff[:3, :3].T + aff[:3, 3]


def world_to_voxel(affine: Affine, xyz: np.ndarray) -> np.ndarray:
    """Map RAS mm, shape (..., 3), to (fractional) voxel indices, shape (..., 3)."""
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    return np.asarray(xyz, dtype=np.float64) @ inv[:3, :3].T + inv[:3, 3]


@dataclass(frozen=True, eq=False)
class CanonicalGrid:
    """How a file's voxel order (i, j, k) maps to the network order (z, y, x) on the nearest RAS grid.

    Only flips and axis permutations (nibabel's ``io_orientation``): no interpolation,
    so the mapping is exact both ways and, on NumPy or CuPy, returns views.
    ``ornt[i] = (RAS axis of voxel axis i, +1 or -1)``.
    """

    ornt: np.ndarray
    shape_ijk: Shape3

    @property
    def _perm(self) -> np.ndarray:
        # For each RAS axis, the (flipped) voxel axis that becomes it (nibabel's apply_orientation).
        return np.argsort(self.ornt[:, 0]).astype(int)

    @property
    def shape_zyx(self) -> Shape3:
        ras = tuple(self.shape_ijk[i] for i in self._perm)
        return (ras[2], ras[1], ras[0])

    def spacing_zyx(self, affine: Affine) -> Spacing3:
        ijk = spacing_from_affine(affine)
        ras = [ijk[i] for i in self._perm]
        return (ras[2], ras[1], ras[0])

    def to_zyx(self, data_ijk: Any) -> Any:
        """The (z, y, x) view of an (i, j, k) array (same result as nibabel's apply_orientation).

        Flips are negative-step slices and the permutation a transpose, so NumPy and CuPy
        arrays alike give a view, never a copy.
        """
        flips = tuple(slice(None, None, -1) if flip == -1 else slice(None) for flip in self.ornt[:, 1])
        return data_ijk[flips].transpose(tuple(self._perm)).transpose(2, 1, 0)

    def from_zyx(self, data_zyx: Any) -> Any:
        """The (i, j, k) view of a (z, y, x) array: the inverse of :meth:`to_zyx`."""
        out = data_zyx.transpose(2, 1, 0).transpose(tuple(int(a) for a in self.ornt[:, 0]))
        flips = tuple(slice(None, None, -1) if flip == -1 else slice(None) for flip in self.ornt[:, 1])
        return out[flips]


def canonical_grid(affine: Affine, shape_ijk: Shape3) -> CanonicalGrid:
    """The :class:`CanonicalGrid` of an image with this affine and shape."""
    ornt = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))
    return CanonicalGrid(ornt, tuple(int(s) for s in shape_ijk))  # type: ignore[arg-type]
