"""Tests of pocketseg.runtime.sliding_window: tiling, Gaussian weights and blended prediction.

The prediction checks run on every backend of the ``backend`` fixture: NumPy always,
CuPy (marked ``gpu``) only where CuPy and a CUDA GPU are present.
"""

from __future__ import annotations

import itertools
import logging
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest

from pocketseg.runtime.sliding_window import (
    compute_steps,
    count_tiles,
    gaussian_importance_map,
    sliding_window_labels,
    sliding_window_predict,
)


class RecordingNet:
    """A per-voxel 'network': logits = (x, -x, x**2); records every batch it sees."""

    num_classes = 3

    def __init__(self, xp: ModuleType):
        self.xp = xp
        self.batches: list[tuple[int, ...]] = []

    def __call__(self, batch):
        assert batch.dtype == np.float32 and batch.ndim == 5 and batch.shape[1] == 1
        self.batches.append(tuple(batch.shape))
        x = batch[:, 0]
        return self.xp.stack([x, -x, x * x], axis=1)

    @staticmethod
    def expected(image: np.ndarray) -> np.ndarray:
        return np.stack([image, -image, image * image])


# --------------------------------------------------------------------------- steps


@pytest.mark.parametrize(
    ("size", "tile", "overlap", "expected"),
    [
        # n = ceil(68 / 32) + 1 = 4, stride 68 / 3 = 22.67 -> rounded starts
        (100, 32, 0.0, [0, 23, 45, 68]),
        # n = ceil(68 / 16) + 1 = 6, stride 13.6
        (100, 32, 0.5, [0, 14, 27, 41, 54, 68]),
        (64, 32, 0.0, [0, 32]),  # divisible: tiles touch, no overlap
        (64, 32, 0.5, [0, 16, 32]),
        (33, 32, 0.0, [0, 1]),
        (32, 32, 0.5, [0]),
        (10, 32, 0.0, [0]),  # smaller than the tile: padded, one tile
        (20, 7, 2.0 / 3, [0, 2, 4, 6, 9, 11, 13]),  # stride 13 / 6 = 2.17
    ],
)
def test_compute_steps_known_cases(size: int, tile: int, overlap: float, expected: list[int]) -> None:
    assert compute_steps(size, tile, overlap) == expected


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.7])
def test_steps_cover_the_axis_with_bounded_stride(overlap: float) -> None:
    for size, tile in itertools.product(range(1, 80, 7), (4, 16, 31)):
        steps = compute_steps(size, tile, overlap)
        assert steps[0] == 0
        assert steps[-1] == max(size - tile, 0)  # the last tile ends at the (padded) border
        assert all(0 < b - a <= tile * (1 - overlap) + 1 for a, b in zip(steps, steps[1:]))


def test_count_tiles_is_the_product_of_steps_and_pads_small_axes() -> None:
    assert count_tiles((100, 64, 10), (32, 32, 32), 0.0) == 4 * 2 * 1
    assert count_tiles((100, 64, 10), (32, 32, 32), 0.5) == 6 * 3 * 1
    assert count_tiles((5, 5, 5), (8, 8, 8), 0.5) == 1


# --------------------------------------------------------------------------- gaussian


@pytest.mark.parametrize("patch", [(8, 8, 8), (5, 12, 7), (16, 4, 9)])
def test_gaussian_map_peaks_at_the_centre_voxel_max_one_no_zeros(patch: tuple[int, int, int]) -> None:
    g = gaussian_importance_map(patch)
    assert g.shape == patch and g.dtype == np.float32
    assert g.max() == pytest.approx(1.0) and g.min() > 0
    centre = tuple(p // 2 for p in patch)
    assert g[centre] == g.max()  # nnU-Net's centre: voxel p // 2 (half a voxel off for even patches)
    assert g[0, 0, 0] < 0.01 * g.max()  # sigma = patch / 8: corners weigh very little
    for axis, p in enumerate(patch):
        if p % 2:  # odd: symmetric about the centre voxel
            np.testing.assert_allclose(g, np.flip(g, axis=axis), rtol=1e-6)


def test_gaussian_map_is_nnunets_filtered_impulse() -> None:
    # A 1D profile: SciPy's Gaussian filter of an impulse at p // 2 (sigma p / 8, truncated at 4 sigma).
    g = gaussian_importance_map((1, 1, 32), sigma_scale=1 / 8)[0, 0]
    sigma = 32 / 8
    kernel = np.exp(-0.5 * (np.arange(-16, 17) / sigma) ** 2)  # 4 sigma = 16 voxels each side
    expected = kernel[16 - 16 : 16 + 16] / kernel.max()  # impulse at 16: offsets -16..15
    np.testing.assert_allclose(g, expected, rtol=1e-5)


def test_gaussian_map_zeros_replaced_by_smallest_nonzero() -> None:
    g = gaussian_importance_map((1, 1, 41), sigma_scale=0.01)[0, 0]  # sigma 0.41: beyond 4 sigma the filter is 0
    assert g.min() > 0
    inside = np.abs(np.arange(41) - 20) <= 1  # truncate(4 sigma) rounds to 2 voxels; +-2 are ~1e-5, nonzero
    assert g[20] == 1.0 and (g[~inside] <= g[inside].min()).all()
    assert (g == g.min()).sum() >= 41 - 5  # every zero of the tails got the same smallest weight


# --------------------------------------------------------------------------- prediction


@pytest.mark.parametrize("shape", [(20, 17, 23), (5, 7, 6), (8, 12, 10), (9, 3, 25)])
@pytest.mark.parametrize("overlap", [0.0, 0.5])
@pytest.mark.parametrize("gaussian", [False, True])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_prediction_equals_network_on_whole_volume(
    backend: SimpleNamespace, shape, overlap: float, gaussian: bool, batch_size: int
) -> None:
    """A per-voxel network must give the same logits however the volume is tiled.

    Shapes cover: not divisible by the patch, smaller than the patch on every axis
    (padding path), equal to it, and mixed.
    """
    xp = backend.xp
    patch = (8, 6, 10)
    image = np.random.default_rng(sum(shape)).normal(size=shape).astype(np.float32)
    net = RecordingNet(xp)
    out = sliding_window_predict(
        xp.asarray(image), patch, net, net.num_classes,
        overlap=overlap, gaussian=gaussian, batch_size=batch_size, am=backend.am,
    )
    assert out.shape == (3,) + shape and out.dtype == np.float32
    np.testing.assert_allclose(backend.to_np(out), net.expected(image), rtol=1e-5, atol=1e-5)
    n_tiles = count_tiles(shape, patch, overlap)
    assert sum(b[0] for b in net.batches) == n_tiles
    assert len(net.batches) == -(-n_tiles // batch_size)
    assert all(b[2:] == patch and b[0] <= batch_size for b in net.batches)


def test_every_tile_position_is_visited_once() -> None:
    shape, patch = (20, 17, 23), (8, 6, 10)
    image = np.zeros(shape, np.float32)
    visits = np.zeros(shape, np.int32)
    corners = []

    def probe(batch):
        # The tile content tells where the tile was cut: the image holds voxel ids.
        for tile in batch[:, 0]:
            first = int(tile[0, 0, 0])
            corners.append(np.unravel_index(first, shape))
            visits[np.unravel_index(tile.astype(np.int64).ravel(), shape)] += 1
        return np.zeros((batch.shape[0], 1) + patch, np.float32)

    image[...] = np.arange(image.size).reshape(shape)
    sliding_window_predict(image, patch, probe, 1, overlap=0.0, batch_size=2)
    expected = list(itertools.product(*[compute_steps(s, p, 0.0) for s, p in zip(shape, patch)]))
    assert sorted(tuple(int(v) for v in c) for c in corners) == sorted(expected)
    assert visits.min() >= 1  # every voxel is covered


def test_gaussian_blending_weights_overlap() -> None:
    """Where two tiles overlap, the logits are their Gaussian-weighted mean."""
    shape, patch = (4, 4, 12), (4, 4, 8)  # x steps [0, 4] at step 0.5
    calls = []

    def constant_per_tile(batch):
        calls.append(len(calls))
        return np.full((batch.shape[0], 1) + patch, float(len(calls) - 1), np.float32)

    out = sliding_window_predict(np.zeros(shape, np.float32), patch, constant_per_tile, 1, overlap=0.5, gaussian=True)
    w = gaussian_importance_map(patch)[0, 0]
    got = out[0, 0, 0]
    np.testing.assert_allclose(got[:4], 0.0, atol=1e-6)
    np.testing.assert_allclose(got[8:], 1.0, atol=1e-6)
    np.testing.assert_allclose(got[4:8], w[:4] / (w[4:] + w[:4]), rtol=1e-5)
    assert got[4] < 0.5 < got[7]  # the nearer centre dominates


def test_uniform_blending_is_plain_mean() -> None:
    shape, patch = (4, 4, 12), (4, 4, 8)
    counter = iter(range(100))

    def constant_per_tile(batch):
        return np.full((batch.shape[0], 1) + patch, float(next(counter)), np.float32)

    out = sliding_window_predict(np.zeros(shape, np.float32), patch, constant_per_tile, 1, overlap=0.5)
    np.testing.assert_allclose(out[0, 0, 0], [0] * 4 + [0.5] * 4 + [1] * 4)


def test_float16_output_and_progress_bar(backend: SimpleNamespace) -> None:
    xp = backend.xp
    image = np.random.default_rng(0).normal(size=(9, 9, 9)).astype(np.float32)
    net = RecordingNet(xp)
    # Uniform blending: float16 accumulation is what the runtime uses without Gaussian weights (the products of
    # logits and the Gaussian's corner weights, ~1e-11 for a 4-voxel patch, underflow in float16).
    out = sliding_window_predict(
        xp.asarray(image), (4, 4, 4), net, 3, overlap=0.5, gaussian=False,
        am=backend.am, progress=True, out_dtype=np.float16,
    )
    assert out.dtype == np.float16
    np.testing.assert_allclose(backend.to_np(out).astype(np.float32), net.expected(image), rtol=2e-2, atol=2e-2)


def test_logs_tile_count_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    net = RecordingNet(np)
    with caplog.at_level(logging.DEBUG, logger="pocketseg.runtime.sliding_window"):
        sliding_window_predict(np.zeros((20, 17, 23), np.float32), (8, 6, 10), net, 3)
    assert f"-> {count_tiles((20, 17, 23), (8, 6, 10), 0.0)} tiles" in caplog.text


def test_infer_may_return_plain_lists_of_numbers() -> None:
    def as_list(batch):
        return np.concatenate([batch, batch + 1], axis=1).tolist()

    image = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
    out = sliding_window_predict(image, (2, 2, 2), as_list, 2)
    np.testing.assert_allclose(out, np.stack([image, image + 1]))


# --------------------------------------------------------------------------- argument checks


def _net(batch):
    return np.zeros((batch.shape[0], 2) + batch.shape[2:], np.float32)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(image=np.zeros((4, 4))), "3D"),
        (dict(patch_zyx=(4, 4)), "patch_zyx"),
        (dict(patch_zyx=(4, 0, 4)), "patch_zyx"),
        (dict(patch_zyx=(4, 4.0, 4)), "patch_zyx"),
        (dict(overlap=1.0), "overlap"),
        (dict(overlap=-0.5), "overlap"),
        (dict(num_classes=0), "num_classes"),
        (dict(batch_size=0), "batch_size"),
        (dict(out_dtype=np.int32), "out_dtype"),
        (dict(infer="not callable"), "infer"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs: dict, match: str) -> None:
    args = dict(image=np.zeros((6, 6, 6), np.float32), patch_zyx=(4, 4, 4), infer=_net, num_classes=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        sliding_window_predict(**args)


@pytest.mark.parametrize(
    "bad_output",
    [
        lambda b: np.zeros((b.shape[0], 3) + b.shape[2:], np.float32),  # wrong class count
        lambda b: np.zeros((b.shape[0], 2, 4, 4, 3), np.float32),  # wrong patch size
        lambda b: np.zeros((2,) + b.shape[2:], np.float32),  # no batch axis
    ],
)
def test_wrong_infer_output_shape_is_a_clear_error(bad_output) -> None:
    with pytest.raises(ValueError, match=r"infer returned shape .* expected \(1, 2, 4, 4, 4\)"):
        sliding_window_predict(np.zeros((6, 6, 6), np.float32), (4, 4, 4), bad_output, 2)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: compute_steps(0, 4, 1.0), "size"),
        (lambda: compute_steps(10, 0, 1.0), "tile"),
        (lambda: compute_steps(10, 4, 1.0), "overlap"),
        (lambda: count_tiles((10, 10), (4, 4, 4), 1.0), "shape_zyx"),
        (lambda: gaussian_importance_map((4, 4, 4), sigma_scale=0.0), "sigma_scale"),
    ],
)
def test_bad_helper_arguments_raise_value_error(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


# --------------------------------------------------------------------------- streamed labels

@pytest.mark.parametrize("shape,patch,step,gaussian,batch", [
    ((37, 20, 23), (8, 8, 8), 1.0, False, 1),
    ((37, 20, 23), (8, 8, 8), 0.5, True, 3),
    ((5, 9, 30), (8, 8, 8), 0.5, False, 2),     # padded axes
    ((64, 16, 16), (16, 16, 16), 0.25, True, 4),
    ((8, 8, 8), (8, 8, 8), 1.0, False, 1),      # one tile
])
def test_streamed_labels_equal_the_argmax_of_the_logits(backend, shape, patch, step, gaussian, batch):
    xp = backend.xp
    rng = np.random.default_rng(1)
    image = xp.asarray(rng.normal(size=shape).astype(np.float32))
    weights = xp.asarray(rng.normal(size=(5, 1, 1, 1)).astype(np.float32))

    def infer(b):
        # position-dependent logits so that overlaps and blending matter
        return b * weights[None] + xp.sin(b * 3.0) * weights[None, ::-1]

    overlap = 1.0 - step
    logits = sliding_window_predict(image, patch, infer, 5, overlap=overlap, gaussian=gaussian, batch_size=batch,
                                    am=backend.am)
    labels = sliding_window_labels(image, patch, infer, 5, overlap=overlap, gaussian=gaussian, batch_size=batch,
                                   am=backend.am)
    assert labels.dtype == np.uint8 and tuple(labels.shape) == shape
    np.testing.assert_array_equal(backend.to_np(labels), backend.to_np(xp.argmax(logits, axis=0)))


def test_streamed_labels_memory_does_not_grow_with_slices():
    import tracemalloc

    def infer(b):
        return np.concatenate([b, -b, b * 0.5, b * 2.0, -b * 3.0, b + 1.0], axis=1)

    peaks = {}
    for z in (64, 512):
        image = np.random.default_rng(0).normal(size=(z, 48, 48)).astype(np.float32)
        tracemalloc.start()
        sliding_window_labels(image, (16, 24, 24), infer, 6, overlap=0.5)
        peaks[z] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        # beyond the input copy (4 B/voxel) and the labels (1 B/voxel), only patch-sized buffers
        per_volume = image.size * 5
        full_logits = image.size * 6 * 4
        assert peaks[z] < per_volume + 6 * 16 * 48 * 48 * 4 * 3 + 2_000_000
        if z == 512:
            assert peaks[z] < full_logits / 3


def test_streamed_labels_check_arguments():
    image = np.zeros((8, 8, 8), np.float32)
    with pytest.raises(ValueError, match="num_classes"):
        sliding_window_labels(image, (8, 8, 8), lambda b: b, 300)
    with pytest.raises(ValueError, match="infer returned shape"):
        sliding_window_labels(image, (8, 8, 8), lambda b: b, 2)


@pytest.mark.parametrize("classes", [1, 2, 3, 15])
def test_class_argmax_equals_numpy_argmax_with_ties_and_nans(classes):
    """The running maximum over class planes gives argmax's labels: lowest class on ties, first NaN wins."""
    from pocketseg.runtime.sliding_window import _argmax_classes

    rng = np.random.default_rng(classes)
    logits = rng.integers(-2, 3, size=(classes, 6, 7, 8)).astype(np.float32)  # many exact ties
    logits[:, 0, 0, 0] = 0.0
    if classes > 1:
        logits[1, 0, 0, 0] = -0.0  # equal to 0.0: the lower class keeps it
    labels = _argmax_classes(logits, np)
    assert labels.dtype == np.uint8
    assert np.array_equal(labels, np.argmax(logits, axis=0))
    assert len(np.unique(labels)) == classes  # every class wins somewhere: the comparison is not vacuous
    logits[classes - 1, 1, 2, 3] = np.nan
    logits[0, 2, 2, 2] = np.nan
    assert np.array_equal(_argmax_classes(logits, np), np.argmax(logits, axis=0))
