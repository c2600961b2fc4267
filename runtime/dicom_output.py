"""What the DICOM output writers share: the output types, the producing algorithm, the labels on a series.

The writers themselves (:mod:`pocketseg.runtime.dicom_seg`, :mod:`pocketseg.runtime.rtstruct`) need the
``dicom`` extra; this module does not, so ``predict`` can check its arguments without it.

Axis order: a label map handed to a writer is on the source series' grid in the (i, j, k) order of
:func:`pocketseg.dicom.read_dicom_series`: i = column, j = row, k = slice ascending along the normal,
the slice files given in the same k order.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

from pocketseg import labels as L
from pocketseg.dicom import SeriesGrid
from pocketseg.errors import InputError
from pocketseg.manifest import CONTENT_DIGEST, Manifest
from pocketseg.version import __version__

#: ``--output-type`` name -> the ending of its file beside ``NAME`` (``NAME.nii.gz``, ``NAME.seg.dcm``, ...).
OUTPUT_TYPES: Mapping[str, str] = {"nifti": ".nii.gz", "dicom-seg": ".seg.dcm", "dicom-rtstruct": ".rtstruct.dcm"}
DICOM_OUTPUT_TYPES = ("dicom-seg", "dicom-rtstruct")

#: Series numbers of the outputs: high, so viewers list them after the images they were derived from.
SEG_SERIES_NUMBER = 9901
RTSTRUCT_SERIES_NUMBER = 9902


@dataclass(frozen=True)
class Algorithm:
    """The producer recorded in DICOM outputs: pocketseg's version and the model package that ran."""

    model_name: str
    model_digest: str  # the manifest's content_sha256
    version: str = __version__

    @property
    def description(self) -> str:
        return f"pocketseg {self.version}, model {self.model_name} (manifest sha256 {self.model_digest[:16]})"


def algorithm_of(package_dir: str | Path, manifest: Manifest) -> Algorithm:
    """The :class:`Algorithm` of a loaded model package."""
    digest = json.loads(manifest.to_json())[CONTENT_DIGEST]
    return Algorithm(model_name=Path(package_dir).resolve().name, model_digest=digest)


def output_types(value: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """The requested output types, in table order without repeats (None: NIfTI); an unknown one is refused."""
    names = [value] if isinstance(value, str) else list(value or ["nifti"])
    unknown = [n for n in names if n not in OUTPUT_TYPES]
    if unknown:
        raise InputError(None, f"--output-type {unknown[0]!r} is not one of {', '.join(OUTPUT_TYPES)} "
                               f"(output_type= from Python)")
    return tuple(n for n in OUTPUT_TYPES if n in names)


def present_labels(labels: np.ndarray, label_names: Mapping[str, int] | None) -> list[L.Label]:
    """The foreground labels of the label set that occur in ``labels``, by id; a value outside the set is refused."""
    rows = {lab.id: lab for lab in L.label_set(label_names) if lab.id != 0}
    if labels.dtype == np.uint8:  # a histogram is several times faster than np.unique on a whole CT's labels
        found = [int(v) for v in np.flatnonzero(np.bincount(labels.ravel(), minlength=256)) if v != 0]
    else:
        found = [int(v) for v in np.unique(labels) if v != 0]
    unknown = [v for v in found if v not in rows]
    if unknown:
        raise InputError(None, f"label value(s) {unknown} are not in the model's label set ({sorted(rows)})")
    return [rows[v] for v in found]


#: Largest difference between a NIfTI grid and its DICOM reference (mm, in any affine entry) still taken as the
#: same grid: NIfTI stores its affine in float32, which rounds positions of a few hundred mm by ~1e-5 mm.
GRID_TOL_MM = 1e-2


def to_series_grid(data: np.ndarray, affine: np.ndarray, grid: SeriesGrid, source: Path | None) -> np.ndarray:
    """``data`` (on the grid ``affine``) in the (i, j, k) order of the DICOM series ``grid``.

    The two grids must be the same voxels in space: the NIfTI may store them in another axis order or
    direction (dcm2niix flips the rows), which is undone, but any other difference (shape, spacing,
    origin, orientation) is refused, naming both grids, since a DICOM output would then be misplaced.
    """
    transform = ornt_transform(io_orientation(affine), io_orientation(grid.affine))
    moved = apply_orientation(data, transform)
    moved_affine = affine @ inv_ornt_aff(transform, data.shape)
    if moved.shape != grid.shape or not np.allclose(moved_affine, grid.affine, rtol=0, atol=GRID_TOL_MM):
        def describe(shape, aff):
            spacing = np.linalg.norm(aff[:3, :3], axis=0)
            return (f"shape {tuple(int(n) for n in shape)}, spacing {tuple(round(float(v), 4) for v in spacing)} mm, "
                    f"origin {tuple(round(float(v), 3) for v in aff[:3, 3])} (RAS mm)")
        raise InputError(source, f"its grid does not match the DICOM reference {grid.folder} "
                                 f"({describe(moved.shape, moved_affine)} vs {describe(grid.shape, grid.affine)}): "
                                 "--dicom-reference must be the series the image was converted from")
    return np.ascontiguousarray(moved)
