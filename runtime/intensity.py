"""CT intensity normalisation (nnU-Net's CTNormalization), shared by training and inference.

Clip to the 0.5 / 99.5 percentiles of the training set's foreground intensities,
then z-score with their mean and standard deviation. The statistics travel with
the model (:class:`pocketseg.manifest.Intensity`); the trainer and the runtime
both call :func:`ct_normalize`, so a network sees at inference exactly the values
it was trained on. Works on NumPy or CuPy arrays (``xp``).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

__all__ = ["ct_normalize"]


def ct_normalize(image: Any, *, mean: float, std: float, lower: float, upper: float, xp: ModuleType = np) -> Any:
    """float32 ``(clip(image, lower, upper) - mean) / std`` as a new array on ``xp``."""
    out = xp.clip(xp.asarray(image, dtype=xp.float32), np.float32(lower), np.float32(upper))
    out -= np.float32(mean)
    out /= np.float32(max(std, 1e-8))
    return out
