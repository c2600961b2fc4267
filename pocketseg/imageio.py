"""The one entry point that reads any supported image: a NIfTI file or a DICOM series folder.

Returns a :class:`pocketseg.volume.Volume` in the file's voxel order (i, j, k)
with its voxel-to-RAS affine. DICOM needs the ``dicom`` extra (pydicom); the
DICOM reader imports it when a folder is read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from pocketseg import geometry
from pocketseg.dicom import is_study_tree, read_dicom_series, scan_study_tree
from pocketseg.errors import InputError
from pocketseg.layout import is_nifti_path
from pocketseg.nifti import read_nifti
from pocketseg.volume import Volume

__all__ = ["load_volume", "volume_info"]


def load_volume(path: str | os.PathLike, *, series_uid: str | None = None) -> Volume:
    """Read a NIfTI file (``.nii``/``.nii.gz``) or a DICOM series folder.

    Args:
        path: the file or folder.
        series_uid: picks one series when a DICOM folder holds several.

    Raises:
        InputError: naming the path and the problem (missing, unreadable, not an image, ...).
    """
    p = Path(path)
    if not p.exists():
        raise InputError(p, "does not exist")
    if p.is_dir():
        return read_dicom_series(p, series_uid=series_uid)
    if is_nifti_path(p):
        return read_nifti(p)
    raise InputError(p, "unsupported input: expected a .nii/.nii.gz file or a DICOM series folder")


def volume_info(path: str | os.PathLike, *, series_uid: str | None = None) -> dict[str, Any]:
    """Shape, spacing (mm, i/j/k order), orientation codes, dtype and intensity range of an image.

    For a DICOM study tree (a folder of series folders) instead ``{"path", "series": [...]}``: every image
    series found, with its case name, folder, patient, study date, series number, description, modality,
    file count and why it is skipped (None for the CT series ``predict`` segments).
    """
    if series_uid is None and is_study_tree(path):
        root = Path(path)
        rows = [{"case": s.case, "folder": str(s.folder.relative_to(root)) if s.folder != root else ".",
                 "patient_id": s.patient_id, "study_date": s.study_date, "series_number": s.series_number,
                 "description": s.description, "modality": s.modality, "n_files": s.n_files,
                 "series_uid": s.uid, "skipped": s.skipped} for s in scan_study_tree(root)]
        return {"path": str(path), "series": rows}
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
