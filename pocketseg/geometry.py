"""Voxel-grid geometry derived from a 4x4 voxel-to-RAS affine.

See :mod:`pocketseg.types` for the axis-order conventions.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np

from pocketseg.types import Affine, Spacing3


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
