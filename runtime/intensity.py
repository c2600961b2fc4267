"""CT intensity normalisation (nnU-Net's CTNormalization), shared by training and inference.

Clip to the 0.5 / 99.5 percentiles of the training set's foreground intensities,
then z-score with their mean and standard deviation. The statistics travel with
the model (:class:`pocketseg.manifest.Intensity`); the trainer and the runtime
both call :func:`ct_normalize`, so a network sees at inference exactly the values
it was trained on. Works on NumPy or CuPy arrays (the array module ``am``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pocketseg.manifest import Intensity
from pocketseg.runtime.arrays import ArrayModule, cpu_module

__all__ = ["ct_normalize"]


def ct_normalize(image: Any, intensity: Intensity, *, am: ArrayModule | None = None) -> Any:
    """float32 ``(clip(image, p0.5, p99.5) - mean) / std`` with the stage's statistics, as a new array of ``am``."""
    xp = (am or cpu_module()).xp
    out = xp.clip(xp.asarray(image, dtype=xp.float32), np.float32(intensity.percentile_00_5),
                  np.float32(intensity.percentile_99_5))
    out -= np.float32(intensity.mean)
    out /= np.float32(max(intensity.std, 1e-8))
    return out
