"""The in-memory CT volume.

Axis order: ``Volume.data`` is in the file's voxel order (i, j, k); ``affine``
maps those indices to RAS+ millimetres (see :mod:`pocketseg.types`). Reading
any supported input into a Volume: :func:`pocketseg.imageio.load_volume`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from pocketseg import geometry
from pocketseg.types import Affine, ArrayIJK, Shape3, Spacing3


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


def canonical_zyx(volume: Volume) -> tuple[np.ndarray, Spacing3]:
    """The volume on the nearest RAS grid as a (z, y, x) view, with its spacing in the same order."""
    grid = geometry.canonical_grid(volume.affine, volume.shape)
    return grid.to_zyx(volume.data), grid.spacing_zyx(volume.affine)
