"""Tests of pocketseg.runtime.resample: nnU-Net-style resampling of images and label maps.

Most checks run on every backend of the ``backend`` fixture: NumPy/SciPy always,
CuPy/cupyx (marked ``gpu``) only where CuPy and a CUDA GPU are present.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import scipy.ndimage

from pocketseg.runtime.resample import (
    resample_image,
    resample_labels,
    resample_logits_to_labels,
    resample_to_spacing,
    separate_z_axis,
    target_shape,
)


def _smooth(shape: tuple[int, int, int]) -> np.ndarray:
    """A smooth (band-limited, well below Nyquist) test volume."""
    z, y, x = np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij")
    return (np.sin(2 * np.pi * z) * np.cos(np.pi * y) + 0.5 * np.sin(np.pi * x)).astype(np.float32)


def _sphere(shape: tuple[int, int, int], spacing: tuple[float, float, float], radius_mm: float, value: int) -> np.ndarray:
    grids = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)], indexing="ij")
    mask = sum(g**2 for g in grids) <= radius_mm**2
    return np.where(mask, value, 0).astype(np.uint8)


def _reference_labels(labels: np.ndarray, new_shape: tuple[int, int, int], separate_z: int | None) -> np.ndarray:
    """nnU-Net's order-1-per-label method on whole volumes, without the bounding-box crop."""
    out = np.zeros(new_shape, np.uint8)
    for c in np.unique(labels):
        if c == 0:
            continue
        res = resample_image((labels == c).astype(np.float32), new_shape, order=1, separate_z=separate_z, order_z=0)
        out[res >= 0.5] = c
    return out


# --------------------------------------------------------------------------- shape and axis rules


def test_target_shape_rounds_like_nnunet_and_keeps_at_least_one_voxel() -> None:
    assert target_shape((5, 7, 9), (1.0, 1.0, 1.0), (3.0, 3.0, 3.0)) == (2, 2, 3)
    # Python's round: half to even, as nnU-Net's compute_new_shape.
    assert target_shape((5, 7, 9), (1.0, 1.0, 1.0), (2.0, 2.0, 2.0)) == (2, 4, 4)
    assert target_shape((100, 512, 512), (2.5, 0.8, 0.8), (4.0, 1.2, 1.2)) == (62, 341, 341)
    assert target_shape((1, 2, 3), (1.0, 1.0, 1.0), (100.0, 100.0, 100.0)) == (1, 1, 1)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ((5.0, 1.0, 1.0), (5.0, 1.0, 1.0), 0),  # thick slices
        ((1.0, 1.0, 5.0), (1.0, 1.0, 1.0), 2),  # thick along x: original spacing decides
        ((1.0, 1.0, 1.0), (1.0, 1.0, 1.0), None),  # isotropic
        ((1.0, 1.0, 1.0), (4.0, 1.2, 1.2), 0),  # only the target is anisotropic (4/1.2 > 3)
        ((1.0, 1.0, 1.0), (3.0, 1.0, 1.0), None),  # ratio exactly 3 is not above the threshold
        ((5.0, 5.0, 1.0), (1.0, 1.0, 1.0), None),  # tie between two thick axes: no separation
        ((5.0, 1.0, 1.0), (1.0, 1.0, 4.0), 0),  # original spacing wins over the target's
        ((2.5, 0.8, 0.8), (2.5, 0.8, 0.8), 0),  # the detail net's spacing
    ],
)
def test_separate_z_axis_follows_nnunet_rule(old, new, expected) -> None:
    assert separate_z_axis(old, new) == expected


def test_separate_z_axis_threshold_is_configurable() -> None:
    assert separate_z_axis((2.5, 0.8, 0.8), (2.5, 0.8, 0.8), threshold=4.0) is None


# --------------------------------------------------------------------------- images


def test_identity_returns_float32_copy(backend: SimpleNamespace) -> None:
    xp = backend.xp
    image = xp.asarray(np.arange(60, dtype=np.int16).reshape(3, 4, 5))
    out = resample_to_spacing(image, (2.0, 1.0, 1.0), (2.0, 1.0, 1.0), am=backend.am)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(backend.to_np(out), np.arange(60).reshape(3, 4, 5))
    out[0, 0, 0] = 99
    assert int(image[0, 0, 0]) == 0  # a copy, not a view


@pytest.mark.parametrize("new_shape", [(5, 3, 7), (1, 1, 1), (13, 17, 2), (9, 11, 8)])
def test_exact_output_shapes_for_odd_factors(backend: SimpleNamespace, new_shape) -> None:
    image = backend.xp.asarray(_smooth((9, 11, 8)))
    out = resample_image(image, new_shape, am=backend.am)
    assert tuple(out.shape) == new_shape
    assert out.dtype == np.float32


@pytest.mark.parametrize(("order", "separate_z"), [(0, None), (1, None), (3, None), (3, 0), (3, 2), (1, 1)])
def test_constant_image_stays_constant(backend: SimpleNamespace, order: int, separate_z) -> None:
    image = backend.xp.full((6, 7, 5), -123.5, dtype=backend.xp.float32)
    out = resample_image(image, (11, 4, 9), order=order, separate_z=separate_z, am=backend.am)
    np.testing.assert_allclose(backend.to_np(out), -123.5, rtol=0, atol=1e-4)


def test_downsample_then_upsample_reconstructs_smooth_volume(backend: SimpleNamespace) -> None:
    xp = backend.xp
    image = _smooth((24, 24, 24))
    down = resample_to_spacing(xp.asarray(image), (1.0, 1.0, 1.0), (2.0, 2.0, 2.0), am=backend.am)
    assert tuple(down.shape) == (12, 12, 12)
    up = backend.to_np(resample_to_spacing(down, (2.0, 2.0, 2.0), (1.0, 1.0, 1.0), am=backend.am))
    assert up.shape == image.shape
    inner = (slice(2, -2),) * 3  # edge extension bends the border voxels
    assert np.abs(up[inner] - image[inner]).max() < 0.05
    assert np.abs(up - image).mean() < 0.02


def test_cubic_axis_by_axis_with_normalisation_on_the_way_matches_the_3d_spline(backend: SimpleNamespace) -> None:
    """The cubic path resamples one axis after the other over chunks of slices, normalising raw int16 chunks on
    the way; it must equal SciPy's 3D spline of the normalised volume (float64), clipped to its range."""
    rng = np.random.default_rng(3)
    raw = rng.integers(-1100, 1600, size=(41, 23, 50)).astype(np.int16)  # more slices than a chunk

    def prepare(a):
        a = backend.xp.clip(backend.xp.asarray(a, dtype=backend.xp.float32), -900, 1200)
        return (a - 40) / 300

    new_shape = (13, 23, 71)  # shrink, keep, grow
    normalised = (np.clip(raw.astype(np.float64), -900, 1200) - 40) / 300
    expected = scipy.ndimage.zoom(normalised, [n / o for n, o in zip(new_shape, raw.shape)], order=3, mode="nearest",
                                  grid_mode=True)
    expected = np.clip(expected, normalised.min(), normalised.max())
    out = resample_image(backend.xp.asarray(raw), new_shape, order=3, prepare=prepare, am=backend.am)
    assert out.dtype == np.float32 and tuple(out.shape) == new_shape
    np.testing.assert_allclose(backend.to_np(out), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("n_in", "n_out"), [(1, 5), (2, 7), (33, 32), (40, 97), (215, 113), (512, 422)])
def test_banded_operator_equals_the_spline_filter_path(n_in: int, n_out: int) -> None:
    """On the CPU each axis is resampled by a product with a banded matrix (its small entries dropped); it must
    give the recursive prefilter + four-tap evaluation's values, at block borders and scan sizes too."""
    from pocketseg.runtime.resample import _axis_operator, _cubic_along

    rows = np.zeros((n_out, n_in))
    for blk in _axis_operator(n_in, n_out):
        rows[blk.rows, blk.cols] = blk.matrix
    np.testing.assert_allclose(rows.sum(axis=1), 1.0, rtol=0, atol=1e-6)  # a constant stays that constant
    for blk in _axis_operator(n_in, n_out):  # no subnormals: Intel CPUs multiply by them ~10x slower
        small = blk.matrix[blk.matrix != 0]
        assert np.abs(small).min(initial=1.0) > 1e-7 * np.abs(blk.matrix).max() > np.finfo(np.float32).tiny
    rng = np.random.default_rng(n_in)
    for axis in range(3):
        shape = [5, 6, 7]
        shape[axis] = n_in
        x = (rng.normal(size=shape) * 1000).astype(np.float32)
        banded = _cubic_along(x, n_out, axis, np, scipy.ndimage, banded=True)
        filtered = _cubic_along(x, n_out, axis, np, scipy.ndimage, banded=False)
        assert banded.shape == filtered.shape and banded.shape[axis] == n_out
        np.testing.assert_allclose(banded, filtered, rtol=0, atol=2e-3)  # 2e-6 of the values' scale


@pytest.mark.parametrize("order", [0, 1, 3])
def test_matches_scipy_zoom_grid_mode(backend: SimpleNamespace, order: int) -> None:
    """skimage.resize / nnU-Net alignment is zoom(grid_mode=True, mode='nearest')."""
    rng = np.random.default_rng(0)
    image = rng.normal(size=(7, 9, 11)).astype(np.float32)
    new_shape = (10, 5, 16)
    expected = scipy.ndimage.zoom(
        image.astype(np.float64), [n / o for n, o in zip(new_shape, image.shape)],
        order=order, mode="nearest", grid_mode=True,
    )
    assert expected.shape == new_shape
    expected = np.clip(expected, image.min(), image.max())  # skimage's clip=True, kept by nnU-Net
    out = resample_image(backend.xp.asarray(image), new_shape, order=order, am=backend.am)
    np.testing.assert_allclose(backend.to_np(out), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("n_in", "n_out", "order"), [(9, 27, 1), (9, 3, 1), (9, 27, 3), (9, 15, 3), (9, 5, 0)])
def test_centre_plane_stays_centred(backend: SimpleNamespace, n_in: int, n_out: int, order: int) -> None:
    image = np.zeros((n_in, 4, 4), np.float32)
    image[n_in // 2] = 1.0
    out = backend.to_np(resample_image(backend.xp.asarray(image), (n_out, 4, 4), order=order, am=backend.am))
    profile = out[:, 1, 2]
    np.testing.assert_allclose(profile, profile[::-1], atol=1e-6)  # symmetric about the centre
    assert int(np.argmax(profile)) == n_out // 2
    assert profile.max() > 0


def test_separate_z_upsampling_duplicates_slices_exactly(backend: SimpleNamespace) -> None:
    xp = backend.xp
    rng = np.random.default_rng(1)
    image = rng.normal(size=(4, 9, 10)).astype(np.float32)
    out = backend.to_np(resample_image(xp.asarray(image), (8, 6, 13), order=3, separate_z=0, order_z=0, am=backend.am))
    np.testing.assert_array_equal(out[0::2], out[1::2])  # nearest along z: each slice twice
    for k in range(4):  # ... and each is the 2D cubic resize of one input slice
        expected = scipy.ndimage.zoom(image[k], (6 / 9, 13 / 10), order=3, mode="nearest", grid_mode=True)
        np.testing.assert_allclose(out[2 * k], expected, atol=1e-5)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_separate_z_downsampling_picks_slices_and_uses_order_z(backend: SimpleNamespace, axis: int) -> None:
    xp = backend.xp
    image = np.moveaxis(np.broadcast_to(np.arange(6, dtype=np.float32)[:, None, None], (6, 5, 5)), 0, axis).copy()
    new_shape = [5, 5, 5]
    new_shape[axis] = 3
    nearest = backend.to_np(resample_image(xp.asarray(image), tuple(new_shape), separate_z=axis, order_z=0, am=backend.am))
    # Output o samples input coordinate 2 * o + 0.5, a tie rounded up: slices 1, 3, 5.
    np.testing.assert_array_equal(np.unique(np.moveaxis(nearest, axis, 0)[:, 2, 2]), [1.0, 3.0, 5.0])
    linear = backend.to_np(resample_image(xp.asarray(image), tuple(new_shape), separate_z=axis, order_z=1, am=backend.am))
    np.testing.assert_allclose(np.moveaxis(linear, axis, 0)[:, 2, 2], [0.5, 2.5, 4.5], atol=1e-5)


def test_resample_to_spacing_separates_thick_axis_for_images() -> None:
    image = np.zeros((3, 8, 8), np.float32)
    image[1] = 1.0
    out = resample_to_spacing(image, (5.0, 1.0, 1.0), (2.5, 1.0, 1.0))
    assert out.shape == (6, 8, 8)
    # Nearest along z: values stay 0 or 1, no spline overshoot between thick slices.
    np.testing.assert_array_equal(np.unique(out), [0.0, 1.0])
    np.testing.assert_array_equal(out[:, 4, 4], [0, 0, 1, 1, 0, 0])


def test_image_dtypes_accepted_and_output_float32() -> None:
    for dtype in (np.int16, np.uint8, np.float64, np.bool_):
        out = resample_image(np.ones((4, 4, 4), dtype=dtype), (2, 3, 5))
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, 1.0, atol=1e-5)


# --------------------------------------------------------------------------- labels


def test_labels_identity_and_dtype() -> None:
    labels = np.arange(24, dtype=np.int64).reshape(2, 3, 4)
    out = resample_labels(labels, (2, 3, 4))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, labels)
    assert resample_labels(labels.astype(bool), (4, 6, 8)).dtype == np.uint8


def test_labels_values_preserved_including_ignore_label(backend: SimpleNamespace) -> None:
    xp = backend.xp
    labels = np.zeros((10, 12, 14), np.uint8)
    labels[2:7, 3:9, 2:8] = 3
    labels[5:9, 6:11, 8:13] = 255
    labels[1:3, 1:3, 10:13] = 14
    for new_shape in [(7, 9, 19), (20, 24, 28), (5, 6, 7)]:
        out = backend.to_np(resample_labels(xp.asarray(labels), new_shape, am=backend.am))
        assert out.dtype == np.uint8 and out.shape == new_shape
        assert set(np.unique(out)) <= {0, 3, 14, 255}
        assert {3, 255} <= set(np.unique(out))


@pytest.mark.parametrize(("spacing", "new_spacing"), [(1.0, 2.0), (2.0, 0.8)])
def test_labels_sphere_volume_preserved(backend: SimpleNamespace, spacing: float, new_spacing: float) -> None:
    xp = backend.xp
    n = int(round(60 / spacing))
    sphere = _sphere((n, n, n), (spacing,) * 3, radius_mm=20.0, value=7)
    volume_in = (sphere == 7).sum() * spacing**3
    out = backend.to_np(
        resample_to_spacing(xp.asarray(sphere), (spacing,) * 3, (new_spacing,) * 3, is_labels=True, am=backend.am)
    )
    assert out.dtype == np.uint8
    volume_out = (out == 7).sum() * new_spacing**3
    exact = 4 / 3 * np.pi * 20.0**3
    assert abs(volume_out - volume_in) / volume_in < 0.03
    assert abs(volume_out - exact) / exact < 0.03


def test_labels_halving_is_block_mean_at_least_half() -> None:
    """Exactly 2x down, linear interpolation samples each 2x2x2 block's mean; >= 0.5 keeps ties.

    This pins nnU-Net's method, including its small outward bias on exact ties (a
    12 mm sphere centred on a voxel corner gains about 7% volume at 1 -> 2 mm).
    """
    sphere = _sphere((40, 40, 40), (1.0, 1.0, 1.0), radius_mm=12.0, value=1)
    block_mean = sphere.reshape(20, 2, 20, 2, 20, 2).mean(axis=(1, 3, 5))
    out = resample_labels(sphere, (20, 20, 20))
    np.testing.assert_array_equal(out, (block_mean >= 0.5).astype(np.uint8))
    assert (block_mean == 0.5).any()  # the case really contains ties


def test_later_label_wins_a_tie() -> None:
    labels = np.broadcast_to(np.array([1, 1, 1, 2, 2, 2], np.uint8), (2, 2, 6)).copy()
    # Output x=1 samples input 2.5: both masks are exactly 0.5 there, label 2 comes later.
    out = resample_labels(labels, (2, 2, 3))
    np.testing.assert_array_equal(out[0, 0], [1, 2, 2])


@pytest.mark.parametrize("separate_z", [None, 0, 2])
@pytest.mark.parametrize("new_shape", [(7, 17, 9), (19, 8, 13), (4, 4, 30)])
def test_labels_match_whole_volume_reference(separate_z, new_shape) -> None:
    """The per-label bounding-box crop gives the same result as resampling whole masks."""
    rng = np.random.default_rng(3)
    labels = np.zeros((11, 13, 12), np.uint8)
    labels[rng.random(labels.shape) < 0.05] = 9  # scattered voxels, some on the borders
    labels[0:4, 2:9, 3:5] = 1
    labels[6:11, 8:13, 0:12] = 2
    labels[5, 5, 5] = 255
    out = resample_labels(labels, new_shape, separate_z=separate_z)
    np.testing.assert_array_equal(out, _reference_labels(labels, new_shape, separate_z))


def test_labels_break_exact_ties_as_the_3d_transform_does() -> None:
    """Small random masks put voxels exactly halfway (0.5) between inside and outside. The CPU's separable passes
    compute in float64 and round to float32 before the threshold, as the 3D transform's output is, so every tie
    goes the same way (float32 passes lose about one map in twenty here)."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        shape_in = tuple(int(n) for n in rng.integers(2, 7, 3))
        shape_out = tuple(int(n) for n in rng.integers(1, 12, 3))
        labels = (rng.random(shape_in) < 0.5).astype(np.uint8)
        np.testing.assert_array_equal(resample_labels(labels, shape_out), _reference_labels(labels, shape_out, None),
                                      err_msg=f"{shape_in} -> {shape_out}")


class _RecordingNdi:
    """scipy.ndimage, recording the output shape of every affine_transform; with cupyx's keyword
    ``float64_coords`` (CuPy >= 14) it also records what it was given."""

    def __init__(self, with_float64_coords: bool):
        self.shapes: list[tuple[int, ...]] = []
        self.float64_coords: list[bool] = []
        self.spline_filter1d = scipy.ndimage.spline_filter1d
        if with_float64_coords:
            def affine_transform(input, matrix, offset=0.0, output_shape=None, output=None, order=3,
                                 mode="constant", cval=0.0, prefilter=True, *, texture_memory=False,
                                 float64_coords=False):
                self.float64_coords.append(float64_coords)
                return self._run(input, matrix, offset, output_shape, output, order, mode, cval, prefilter)
        else:
            def affine_transform(input, matrix, offset=0.0, output_shape=None, output=None, order=3,
                                 mode="constant", cval=0.0, prefilter=True):
                return self._run(input, matrix, offset, output_shape, output, order, mode, cval, prefilter)
        self.affine_transform = affine_transform

    def _run(self, input, matrix, offset, output_shape, output, order, mode, cval, prefilter):
        self.shapes.append(tuple(output_shape) if output_shape is not None else tuple(input.shape))
        return scipy.ndimage.affine_transform(input, matrix, offset=offset, output_shape=output_shape, output=output,
                                              order=order, mode=mode, cval=cval, prefilter=prefilter)


def _organs(seed: int, shape=(37, 45, 41)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint8)
    for value in range(1, 14):  # boxes of every size, some touching the borders
        lo = [int(rng.integers(0, n - 2)) for n in shape]
        hi = [min(n, a + int(rng.integers(1, n // 2))) for a, n in zip(lo, shape)]
        labels[tuple(slice(a, b) for a, b in zip(lo, hi))] = value
    labels[rng.random(shape) < 0.01] = 14  # specks
    return labels


@pytest.mark.parametrize("separate_z", [None, 0, 2])
@pytest.mark.parametrize("new_shape", [(50, 61, 33), (19, 30, 77)])
def test_bucketed_label_windows_give_identical_results(separate_z, new_shape) -> None:
    """The GPU's window sizes rounded up to multiples of 32 (one cupyx kernel per size) change nothing."""
    bucketed, plain = _RecordingNdi(False), _RecordingNdi(False)
    for seed in range(3):
        labels = _organs(seed)
        am_b = SimpleNamespace(xp=np, ndi=bucketed, device="cpu")
        am_p = SimpleNamespace(xp=np, ndi=plain, device="cpu")
        out = resample_labels(labels, new_shape, separate_z=separate_z, am=am_b, window_bucket=32)
        np.testing.assert_array_equal(out, resample_labels(labels, new_shape, separate_z=separate_z, am=am_p,
                                                           window_bucket=1))
        np.testing.assert_array_equal(out, _reference_labels(labels, new_shape, separate_z))
    assert all(n % 32 == 0 for shape in bucketed.shapes for n in shape)
    # ~40 windows of different sizes share a few kernels' worth of output shapes
    assert len(set(bucketed.shapes)) < len(bucketed.shapes) / 3
    # Unrounded on the CPU, the windows take the separable passes (_linear_separable), not affine_transform.
    assert not plain.shapes


def test_label_windows_are_bucketed_on_a_gpu_only_by_default() -> None:
    labels = _organs(0)
    for device, multiple in (("cuda", True), ("cpu", False)):
        ndi = _RecordingNdi(False)
        resample_labels(labels, (50, 61, 33), am=SimpleNamespace(xp=np, ndi=ndi, device=device))
        if multiple:
            assert ndi.shapes and all(n % 32 == 0 for shape in ndi.shapes for n in shape)
        else:  # unrounded windows on the CPU: the separable passes, no affine_transform
            assert not ndi.shapes
    with pytest.raises(ValueError, match="window_bucket"):
        resample_labels(labels, (50, 61, 33), window_bucket=0)


def test_float64_coordinates_are_asked_for_where_affine_transform_has_the_keyword() -> None:
    labels = _organs(1)
    image = _smooth((20, 24, 22))
    newer, older = _RecordingNdi(True), _RecordingNdi(False)
    for ndi in (newer, older):
        am = SimpleNamespace(xp=np, ndi=ndi, device="cuda")  # the label windows of a GPU go through affine_transform
        resample_labels(labels, (30, 31, 29), am=am)
        resample_image(image, (11, 30, 40), order=3, am=am)
        resample_image(image, (11, 30, 40), order=3, separate_z=0, am=am)  # the slice-wise path
    assert newer.float64_coords and all(newer.float64_coords)
    assert len(newer.float64_coords) == len(newer.shapes) == len(older.shapes) > 0


def test_labels_separate_z_is_nearest_along_that_axis() -> None:
    labels = np.zeros((3, 6, 6), np.uint8)
    labels[1, 1:5, 1:5] = 4
    out = resample_to_spacing(labels, (5.0, 1.0, 1.0), (2.5, 1.0, 1.0), is_labels=True)
    assert out.shape == (6, 6, 6)
    np.testing.assert_array_equal(out[:, 3, 3], [0, 0, 4, 4, 0, 0])
    np.testing.assert_array_equal(out[2], out[3])


# --------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: resample_image(np.zeros((3, 3)), (2, 2, 2)), "3D"),
        (lambda: resample_image(np.zeros((3, 3, 3)), (2, 2)), "new_shape"),
        (lambda: resample_image(np.zeros((3, 3, 3)), (2, 0, 2)), "new_shape"),
        (lambda: resample_image(np.zeros((3, 3, 3)), (2, 2.5, 2)), "new_shape"),
        (lambda: resample_image(np.zeros((3, 3, 3)), (2, 2, 2), order=6), "order"),
        (lambda: resample_image(np.zeros((3, 3, 3)), (2, 2, 2), separate_z=3), "separate_z"),
        (lambda: resample_image(np.zeros((3, 3, 3), np.complex64), (2, 2, 2)), "dtype"),
        (lambda: resample_labels(np.zeros((3, 3, 3), np.float32), (2, 2, 2)), "integer"),
        (lambda: resample_labels(np.full((3, 3, 3), 256, np.int32), (2, 2, 2)), "0..255"),
        (lambda: resample_labels(np.full((3, 3, 3), -1, np.int32), (2, 2, 2)), "0..255"),
        (lambda: target_shape((3, 3, 3), (1.0, 0.0, 1.0), (1.0, 1.0, 1.0)), "spacing_mm_zyx"),
        (lambda: target_shape((3, 3, 3), (1.0, 1.0, 1.0), (1.0, float("nan"), 1.0)), "new_spacing_mm_zyx"),
        (lambda: separate_z_axis((1.0, 1.0), (1.0, 1.0, 1.0)), "spacing_mm_zyx"),
        (lambda: separate_z_axis((1.0, 1.0, 1.0), (1.0, 1.0, 1.0), threshold=0.5), "threshold"),
    ],
)
def test_bad_arguments_raise_value_error(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


# --------------------------------------------------------------------------- prepare (normalise on the way)

@pytest.mark.parametrize("spacing,new_spacing", [
    ((5.0, 0.8, 0.8), (2.5, 0.8, 0.8)),   # thick slices, z upsampled: in-plane unchanged
    ((0.8, 0.7, 0.7), (2.5, 0.8, 0.8)),   # z shrinks first, on the raw int16 slices
    ((1.0, 1.0, 1.0), (1.5, 2.0, 2.0)),   # isotropic: the 3D path
    ((3.0, 0.9, 0.9), (4.0, 1.2, 1.2)),   # both passes, chunked in-plane spline
])
def test_prepare_equals_normalising_first(backend, spacing, new_spacing):
    from pocketseg.runtime import resample as R

    xp = backend.xp
    rng = np.random.default_rng(0)
    raw = rng.integers(-1024, 1500, size=(2 * R.CHUNK_SLICES + 5, 23, 21)).astype(np.int16)

    def normalize(a):
        return (xp.clip(xp.asarray(a, dtype=xp.float32), -100, 300) - 40) / 70

    shape = target_shape(raw.shape, spacing, new_spacing)
    axis = separate_z_axis(spacing, new_spacing)
    first = resample_image(normalize(xp.asarray(raw)), shape, separate_z=axis, am=backend.am)
    on_the_way = resample_image(xp.asarray(raw), shape, separate_z=axis, prepare=normalize, am=backend.am)
    assert on_the_way.dtype == np.float32 and tuple(on_the_way.shape) == shape
    np.testing.assert_allclose(backend.to_np(on_the_way), backend.to_np(first), rtol=0, atol=1e-5)


def test_cubic_result_is_clipped_to_the_input_range_per_slice(backend):
    """A step edge makes a cubic spline overshoot; nnU-Net (skimage clip=True) clips it, per slice
    when the thick axis is resampled separately."""
    xp = backend.xp
    image = np.zeros((4, 16, 16), np.float32)
    image[:, :, 8:] = 1.0
    image[1] *= 3.0  # another range on slice 1
    raw = scipy.ndimage.zoom(image[0].astype(np.float64), 1.7, order=3, mode="nearest", grid_mode=True)
    assert raw.max() > 1.01 and raw.min() < -0.01  # the spline does overshoot here
    out = backend.to_np(resample_image(xp.asarray(image), (4, 27, 27), separate_z=0, am=backend.am))
    assert out[0].min() >= 0.0 and out[0].max() <= 1.0
    assert out[1].max() == pytest.approx(3.0) and out[1].min() >= 0.0
    full = backend.to_np(resample_image(xp.asarray(image), (6, 27, 27), am=backend.am))
    assert full.min() >= 0.0 and full.max() <= 3.0


def test_prepare_runs_once_with_a_linear_thick_axis():
    rng = np.random.default_rng(1)
    raw = rng.integers(-1000, 1000, size=(40, 12, 12)).astype(np.int16)

    def normalize(a):
        return (np.clip(np.asarray(a, dtype=np.float32), -100, 300) - 40) / 70

    first = resample_image(normalize(raw), (13, 9, 9), separate_z=0, order_z=1)
    on_the_way = resample_image(raw, (13, 9, 9), separate_z=0, order_z=1, prepare=normalize)
    np.testing.assert_allclose(on_the_way, first, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------ logits back, nnU-Net's way

def _reference_logits_to_labels(logits: np.ndarray, new_shape, separate_z) -> np.ndarray:
    """nnU-Net's way in full: every output voxel interpolated in float64 (linear; nearest along a separate
    axis), stored as float16, argmax."""
    from scipy.ndimage import map_coordinates

    axes = []
    for ax, (n_in, n_out) in enumerate(zip(logits.shape[1:], new_shape)):
        t = (n_in / n_out) * (np.arange(n_out) + 0.5) - 0.5
        axes.append(np.clip(np.floor(t + 0.5), 0, n_in - 1) if ax == separate_z else t)
    grid = np.meshgrid(*axes, indexing="ij")
    out = np.stack([map_coordinates(c.astype(np.float64), grid, order=1, mode="nearest") for c in logits])
    return np.argmax(out.astype(np.float16), axis=0).astype(np.uint8)


@pytest.mark.parametrize("in_shape,new_shape,separate_z", [
    ((7, 9, 11), (13, 20, 6), None),      # up and down, linear everywhere
    ((5, 16, 16), (23, 40, 33), 0),       # thick slices: nearest along z
    ((12, 6, 10), (12, 14, 25), 1),       # a thick in-plane axis: nearest along it
    ((9, 8, 8), (9, 8, 8), None),         # no change
])
@pytest.mark.parametrize("smooth", [False, True], ids=["noisy", "smooth"])
def test_logits_back_streamed_match_nnunets_full_resolution_way(in_shape, new_shape, separate_z, smooth):
    """Noisy logits (an untrained net) take the whole-block path; smooth ones (regions, as a trained net gives)
    are mostly decided by their corners and interpolated only near the class borders."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, *in_shape)) * 3
    if smooth:
        logits = np.stack([gaussian_filter(c, 1.5) * 10 for c in logits])
    logits = logits.astype(np.float16)
    expected = _reference_logits_to_labels(logits, new_shape, separate_z)
    got = resample_logits_to_labels(logits, new_shape, separate_z=separate_z, round_to=np.float16,
                                    block_elements=6 * new_shape[1] * new_shape[2] * 2)  # 2 slices per block
    assert got.dtype == np.uint8 and got.shape == tuple(new_shape)
    # float32 products instead of float64 may move a value across a float16 rounding boundary: rare ties only
    assert np.mean(got == expected) >= 0.9999
    assert len(np.unique(expected)) == 6


@pytest.mark.parametrize("banded", [True, False])  # the CPU's operator, the GPU's filter path
def test_fused_in_plane_passes_equal_the_passes_one_after_the_other(monkeypatch, banded):
    """Axes 1 and 2 resampled chunk by chunk in one go (no volume between them) give the values of two
    separate passes, whatever the chunk size; a pass on the chunking axis cannot join them."""
    import pocketseg.runtime.resample as R

    rng = np.random.default_rng(7)
    x = (rng.normal(size=(9, 40, 33)) * 300).astype(np.int16)
    prep = lambda a: np.asarray(a, dtype=np.float32) / 100  # noqa: E731
    first = R._cubic_along(x, 17, 1, np, scipy.ndimage, prep=prep, banded=banded)
    two = R._cubic_along(first, 50, 2, np, scipy.ndimage, banded=banded)
    fused = R._cubic_along(x, 17, 1, np, scipy.ndimage, prep=prep, then=[(2, 50)], banded=banded)
    assert fused.shape == (9, 17, 50)
    np.testing.assert_allclose(fused, two, rtol=0, atol=1e-5)
    monkeypatch.setattr(R, "CPU_CHUNK_BYTES", 4 * 40 * 33 * 2)  # two slices a chunk: 5 chunks, the last short
    ranges: list = []
    small = R._cubic_along(x, 17, 1, np, scipy.ndimage, prep=prep, then=[(2, 50)], value_range=ranges,
                           banded=banded)
    np.testing.assert_allclose(small, two, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(ranges[0], prep(x).min(axis=(1, 2)))
    np.testing.assert_array_equal(ranges[1], prep(x).max(axis=(1, 2)))
    with pytest.raises(ValueError, match="cannot share chunks"):
        R._cubic_along(x, 17, 1, np, scipy.ndimage, then=[(0, 4)])


@pytest.mark.parametrize(("shape", "new", "order"), [
    ((215, 512, 512), (76, 169, 169), [1, 2, 0]),  # the in-plane axes shrink most: together, then z
    ((215, 512, 512), (113, 422, 422), [0, 1, 2]),  # z shrinks most: first
    ((100, 50, 80), (100, 60, 40), [2, 1]),
    ((40, 50, 80), (30, 25, 70), [1, 2, 0]),  # by ratio z would come between y and x: after both
])
def test_pass_order_keeps_the_in_plane_axes_together(shape, new, order):
    from pocketseg.runtime.resample import _pass_order

    assert _pass_order(shape, new) == order
