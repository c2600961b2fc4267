"""Intensity normalisation of a stage's input, shared by training and inference.

nnU-Net's schemes, by the name the model package records
(:data:`pocketseg.manifest.NORMALIZATION_SCHEMES`):

* ``ct`` (nnU-Net's CTNormalization): clip to the 0.5 / 99.5 percentiles of the
  training set's foreground intensities, then z-score with their mean and
  standard deviation. The statistics travel with the model
  (:class:`pocketseg.manifest.Intensity`); the trainer and the runtime both call
  :func:`ct_normalize`, so a network sees at inference exactly the values it was
  trained on.
* ``zscore``: z-score with the image's own mean and standard deviation (over the
  non-zero voxels, holes filled, with ``use_mask``; the voxels outside become 0).
* ``rescale_to_0_1``: min-max to [0, 1] per image. ``none``: float32 as it is.

Elementwise schemes are applied while resampling, slice chunk by slice chunk
(:func:`normalizer`); the per-image ones measure the region first. Works on
NumPy or CuPy arrays (the array module ``am``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from pocketseg.manifest import Intensity, Stage
from pocketseg.runtime.arrays import ArrayModule, cpu_module

__all__ = ["ct_normalize", "normalizer"]


def ct_normalize(image: Any, intensity: Intensity, *, am: ArrayModule | None = None) -> Any:
    """float32 ``(clip(image, p0.5, p99.5) - mean) / std`` with the stage's statistics, as a new array of ``am``."""
    xp = (am or cpu_module()).xp
    out = xp.array(image, dtype=xp.float32)  # a copy even of float32 input: the clip below is in place
    xp.clip(out, np.float32(intensity.percentile_00_5), np.float32(intensity.percentile_99_5), out=out)
    out -= np.float32(intensity.mean)
    out /= np.float32(max(intensity.std, 1e-8))
    return out


def _filled_nonzero(region: Any, am: ArrayModule) -> Any:
    """nnU-Net's non-zero mask: the voxels that are not 0, with the holes inside filled."""
    return am.ndi.binary_fill_holes(region != 0)


def normalizer(stage: Stage, region: Any, *, am: ArrayModule | None = None) -> tuple[Any, Callable[[Any], Any] | None]:
    """``(image, prepare)`` for ``resample_image(image, ..., prepare=prepare)``: the stage's normalisation of ``region``.

    Elementwise schemes return the raw region and a function of raw voxels (float32 out), applied to chunks
    of the region while it is resampled; per-image statistics (``zscore``, ``rescale_to_0_1``) are measured on
    the whole region first. ``zscore`` within a mask needs the whole region's mask, so it returns the
    normalised region itself and no function.
    """
    am = am or cpu_module()
    xp = am.xp
    scheme = stage.normalization.scheme
    if scheme == "ct":
        intensity = stage.intensity

        def normalize(raw: Any) -> Any:
            return ct_normalize(raw, intensity, am=am)

        return region, normalize
    if scheme == "none":
        return region, lambda raw: xp.asarray(raw, dtype=xp.float32)
    values = xp.asarray(region, dtype=xp.float32)
    if scheme == "rescale_to_0_1":
        low, high = float(values.min()), float(values.max())
        span = max(high - low, 1e-8)
        return region, lambda raw: (xp.asarray(raw, dtype=xp.float32) - np.float32(low)) / np.float32(span)
    if scheme != "zscore":
        raise ValueError(f"unknown normalisation scheme {scheme!r}")
    if not stage.normalization.use_mask:
        mean, std = float(values.mean()), float(values.std())
        return region, lambda raw: (xp.asarray(raw, dtype=xp.float32) - np.float32(mean)) / np.float32(max(std, 1e-8))
    mask = _filled_nonzero(values, am)
    inside = values[mask]
    mean, std = (float(inside.mean()), float(inside.std())) if inside.size else (0.0, 1.0)
    return xp.where(mask, (values - np.float32(mean)) / np.float32(max(std, 1e-8)), np.float32(0)), None
