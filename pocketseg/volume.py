"""The in-memory CT volume and the one entry point that reads any supported input.

Axis order: ``Volume.data`` is in the file's voxel order (i, j, k); ``affine``
maps those indices to RAS+ millimetres (see :mod:`pocketseg.types`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from pocketseg import geometry
from pocketseg.errors import InputError
from pocketseg.types import Affine, ArrayIJK, Shape3, Spacing3

NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3D image in voxel order (i, j, k) with its voxel-to-RAS affine.

    ``header`` is the NIfTI header the volume was read from (None for DICOM or
    synthetic volumes); writers use it to reproduce qform/sform codes exactly.
    """

    data: ArrayIJK
    affine: Affine
    source: Path | None = None
    header: nib.Nifti1Header | None = field(default=None, repr=False)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> Shape3:
        return tuple(int(n) for n in self.data.shape)  # type: ignore[return-value]

    @property
    def spacing_mm(self) -> Spacing3:
        """Spacing along i, j, k in millimetres."""
        return geometry.spacing_from_affine(self.affine)

    @property
    def orientation(self) -> str:
        return geometry.orientation_codes(self.affine)


def is_nifti_path(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def load_volume(path: str | os.PathLike, *, series_uid: str | None = None) -> Volume:
    """Read a NIfTI file (``.nii``/``.nii.gz``) or a DICOM series folder.

    ``series_uid`` picks one series when a DICOM folder holds several.
    Raises :class:`InputError` naming the path and the problem.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(p, "does not exist")
    if p.is_dir():
        from pocketseg.dicom import read_dicom_series

        return read_dicom_series(p, series_uid=series_uid)
    if is_nifti_path(p):
        from pocketseg.nifti import read_nifti

        return read_nifti(p)
    raise InputError(p, "unsupported input: expected a .nii/.nii.gz file or a DICOM series folder")


def volume_info(path: str | os.PathLike, *, series_uid: str | None = None) -> dict[str, Any]:
    """Shape, spacing (mm, i/j/k order), orientation codes, dtype and intensity range of an image."""
    vol = load_volume(path, series_uid=series_uid)
    data = vol.data
    return {
        "path": str(path),
        "shape": list(vol.shape),
        "spacing_mm": [round(s, 6) for s in vol.spacing_mm],
        "orientation": vol.orientation,
        "oblique": geometry.is_oblique(vol.affine),
        "dtype": str(data.dtype),
        "min": float(np.min(data)) if data.size else None,
        "max": float(np.max(data)) if data.size else None,
    }
