"""nnU-Net v2's training augmentation, built from batchgeneratorsv2 (the library nnU-Net itself uses).

Transforms and probabilities follow nnU-Net v2's default trainer: rotation and
scaling (p 0.2 each), Gaussian noise (0.1), Gaussian blur (0.2), multiplicative
brightness (0.15), contrast (0.15), low-resolution simulation (0.25), inverted
and plain gamma (0.1 / 0.3), and mirroring along all axes. For anisotropic
patches (largest edge more than 3x the slice axis, true of both FLARE stages)
nnU-Net augments in 2D: rotation and scaling act in-plane only and the
low-resolution simulation leaves the slice axis alone; the same is done here.

batchgeneratorsv2 draws its parameters from the global NumPy and torch
generators, so the caller seeds both per sample (see :mod:`pocketseg.trainer.data`):
the parameters are then a pure function of (seed, epoch, sample).
"""

from __future__ import annotations

import math

import numpy as np

from pocketseg.errors import MissingDependencyError

ROTATION_DEG = 30.0
SCALING = (0.7, 1.4)
ANISOTROPY_FOR_2D = 3.0


def is_anisotropic(patch_zyx) -> bool:
    """nnU-Net's do_dummy_2d_data_aug rule: max patch edge / slice-axis edge > 3."""
    return max(patch_zyx) / patch_zyx[0] > ANISOTROPY_FOR_2D


def initial_patch_size(patch_zyx, *, augment: bool = True) -> tuple[int, int, int]:
    """Patch to extract before the spatial transform so rotated/scaled corners stay inside real data.

    The in-plane edge grows by the bounding box of a square rotated by 30 degrees,
    and by the smallest zoom factor nnU-Net samples for this computation (0.85).
    """
    if not augment:
        return tuple(int(p) for p in patch_zyx)  # type: ignore[return-value]
    a = math.radians(ROTATION_DEG)
    grow = (abs(math.cos(a)) + abs(math.sin(a))) / 0.85
    z = patch_zyx[0] if is_anisotropic(patch_zyx) else math.ceil(patch_zyx[0] * grow)
    return (int(z), math.ceil(patch_zyx[1] * grow), math.ceil(patch_zyx[2] * grow))


class _InPlaneScale:
    """One isotropic in-plane zoom per sample; the slice axis is not scaled (2D augmentation)."""

    def __init__(self, low: float, high: float):
        self.low, self.high = low, high
        self.value = 1.0

    def __call__(self, image=None, dim=None, **_):
        if dim == 0:
            return 1.0
        if dim == 1 or dim is None:
            self.value = float(np.random.uniform(self.low, self.high))
        return self.value


def _in_plane_rotation(image=None, dim=None, **_):
    # Rotation about axis 0 (z) turns the (y, x) plane; the other two angles stay 0.
    return float(np.random.uniform(-math.radians(ROTATION_DEG), math.radians(ROTATION_DEG))) if dim == 0 else 0.0


def training_transforms(patch_zyx, *, mirror_axes=(0, 1, 2)):
    """The batchgeneratorsv2 pipeline for one sample dict {'image': (1,z,y,x), 'segmentation': (1,z,y,x)}."""
    try:
        # optional (train extra), imported when the pipeline is built; a missing one is named with its extra
        from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
        from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
        from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
        from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
        from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
        from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
        from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
        from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
        from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
        from batchgeneratorsv2.transforms.utils.random import RandomTransform
    except ImportError:
        raise MissingDependencyError("batchgeneratorsv2", "Training augmentation", "train") from None

    aniso = is_anisotropic(patch_zyx)
    rot = math.radians(ROTATION_DEG)
    spatial = SpatialTransform(
        tuple(patch_zyx), patch_center_dist_from_border=0, random_crop=False, p_elastic_deform=0,
        p_rotation=0.2, rotation=_in_plane_rotation if aniso else (-rot, rot),
        p_scaling=0.2, scaling=_InPlaneScale(*SCALING) if aniso else SCALING,
        p_synchronize_scaling_across_axes=0 if aniso else 1,
        bg_style_seg_sampling=False, mode_seg="bilinear",
    )
    return ComposeTransforms([
        spatial,
        RandomTransform(GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_channel=1, synchronize_channels=True),
                        apply_probability=0.1),
        RandomTransform(GaussianBlurTransform(blur_sigma=(0.5, 1.0), synchronize_channels=False, synchronize_axes=False,
                                              p_per_channel=0.5, benchmark=False), apply_probability=0.2),
        RandomTransform(MultiplicativeBrightnessTransform(multiplier_range=BGContrast((0.75, 1.25)),
                                                          synchronize_channels=False, p_per_channel=1),
                        apply_probability=0.15),
        RandomTransform(ContrastTransform(contrast_range=BGContrast((0.75, 1.25)), preserve_range=True,
                                          synchronize_channels=False, p_per_channel=1), apply_probability=0.15),
        RandomTransform(SimulateLowResolutionTransform(scale=(0.5, 1), synchronize_channels=False, synchronize_axes=True,
                                                       ignore_axes=(0,) if aniso else None, allowed_channels=None,
                                                       p_per_channel=0.5), apply_probability=0.25),
        RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=1, synchronize_channels=False,
                                       p_per_channel=1, p_retain_stats=1), apply_probability=0.1),
        RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=0, synchronize_channels=False,
                                       p_per_channel=1, p_retain_stats=1), apply_probability=0.3),
        *([MirrorTransform(allowed_axes=tuple(mirror_axes))] if mirror_axes else []),
    ])
