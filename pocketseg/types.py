"""Shape-annotated array aliases and the axis-order conventions of each layer.

Axis order, said once:

* I/O layer (:class:`pocketseg.volume.Volume`): arrays are kept in the file's
  voxel order ``(i, j, k)`` exactly as NIfTI stores them, with a 4x4 affine
  that maps voxel indices to world coordinates in millimetres, RAS+ (nibabel's
  convention: +x towards the patient's Right, +y Anterior, +z Superior).
  DICOM series are converted to the same convention on reading.
* Network layer (trainer, runtime, model package): arrays are ``(z, y, x)`` =
  ``(k, j, i)`` after reorientation to the canonical RAS grid; spacings and
  patch sizes are given in that order (e.g. detail spacing 2.5x0.8x0.8 mm).
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
import numpy.typing as npt

#: A 3D array in file voxel order (i, j, k).
ArrayIJK = Annotated[npt.NDArray, "shape (i, j, k)"]
#: A 3D array in network order (z, y, x).
ArrayZYX = Annotated[npt.NDArray, "shape (z, y, x)"]
#: A label map, uint8 with FLARE 2023 ids.
LabelMap = Annotated[npt.NDArray[np.uint8], "label ids"]
#: 4x4 voxel-to-world affine, world in RAS+ millimetres.
Affine = Annotated[npt.NDArray[np.float64], "shape (4, 4), voxel -> RAS mm"]
#: Three spacings in millimetres, in the order the name says (e.g. spacing_mm_zyx).
Spacing3 = tuple[float, float, float]
Shape3 = tuple[int, int, int]
