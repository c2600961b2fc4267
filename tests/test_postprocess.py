"""Connected-component post-processing and bounding boxes, on NumPy (and CuPy where a GPU is lent)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage

from pocketseg.runtime import arrays
from pocketseg.runtime.arrays import bounding_box
from pocketseg.runtime.postprocess import keep_largest_components, remove_small_components


@pytest.fixture(params=["cpu-cc3d", "cpu-scipy", pytest.param("cuda", marks=pytest.mark.gpu)])
def am(request):
    if request.param == "cuda":
        usable, why = arrays.cuda_available()
        if not usable:
            pytest.skip(why)
        return arrays.array_module("cuda")
    module = arrays.cpu_module()
    if request.param == "cpu-scipy":
        return arrays.ArrayModule("numpy", "cpu", np, scipy.ndimage, arrays._scipy_label, "scipy.ndimage")
    if module.label_library != "connected-components-3d":
        pytest.skip("connected-components-3d (extra 'runtime') is not installed")
    return module


def test_keep_largest_components_per_label(am):
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[1:6, 1:6, 1:6] = 1        # liver: 125 voxels, kept
    labels[10:12, 10:12, 10:12] = 1  # liver island: 8 voxels, removed
    labels[15, 15, 15] = 1           # touches the next one only diagonally...
    labels[16, 16, 16] = 1           # ...which is connected under 26-connectivity (2 voxels, still removed)
    labels[1:3, 15:19, 1:3] = 3      # spleen: one piece, kept
    labels[15:19, 1:3, 15:19] = 14   # tumor: not in the list, untouched
    labels[8, 1, 1] = 14
    out = am.to_host(keep_largest_components(am.to_device(labels.copy()), (1, 2, 3), am))
    expected = labels.copy()
    expected[10:12, 10:12, 10:12] = 0
    expected[15, 15, 15] = expected[16, 16, 16] = 0
    np.testing.assert_array_equal(out, expected)


def test_diagonal_neighbours_are_one_component(am):
    labels = np.zeros((6, 6, 6), np.uint8)
    for i in range(4):
        labels[i, i, i] = 5  # a diagonal line: one 26-connected component
    labels[5, 0, 5] = 5
    out = am.to_host(keep_largest_components(am.to_device(labels.copy()), (5,), am))
    assert out.sum() == 4 * 5 and out[5, 0, 5] == 0


def test_remove_small_components(am):
    labels = np.zeros((16, 16, 16), np.uint8)
    labels[1:5, 1:5, 1:5] = 14   # 64 voxels
    labels[10:12, 10:12, 10] = 14  # 4 voxels
    labels[8, 8, 8] = 1           # another label is never touched
    out = am.to_host(remove_small_components(am.to_device(labels.copy()), 14, 5, am))
    assert (out == 14).sum() == 64 and out[8, 8, 8] == 1
    out = am.to_host(remove_small_components(am.to_device(labels.copy()), 14, 65, am))
    assert (out == 14).sum() == 0
    same = am.to_host(remove_small_components(am.to_device(labels.copy()), 14, 1, am))
    np.testing.assert_array_equal(same, labels)


def test_bounding_box(am):
    mask = np.zeros((7, 8, 9), bool)
    assert bounding_box(am.to_device(mask), am) is None
    mask[2, 3:5, 8] = True
    assert bounding_box(am.to_device(mask), am) == (slice(2, 3), slice(3, 5), slice(8, 9))


def test_labelling_libraries_agree_on_random_maps():
    if arrays.cpu_module().label_library != "connected-components-3d":
        pytest.skip("connected-components-3d (extra 'runtime') is not installed")
    rng = np.random.default_rng(0)
    for _ in range(5):
        mask = scipy.ndimage.gaussian_filter(rng.normal(size=(24, 24, 24)), 1.5) > 0.05
        a, na = arrays._cc3d_label(mask)
        b, nb = arrays._scipy_label(mask)
        assert na == nb
        # the same partition of voxels (ids may be numbered differently)
        pairs = np.unique(np.stack([a[mask], b[mask]]), axis=1)
        assert pairs.shape[1] == na


def _organ_like_maps(seed: int, count: int):
    """Smooth random label maps with values 0-4 and 14 in blobs of many sizes."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        smooth = scipy.ndimage.gaussian_filter(rng.normal(size=(30, 30, 30)), 1.2)
        labels = np.digitize(smooth, np.quantile(smooth, np.linspace(0.3, 0.98, 6))).astype(np.uint8)
        labels[labels == 5] = 14
        yield labels


def test_clean_components_one_pass_equals_the_per_value_loop():
    cc = arrays.cpu_module()
    if cc.label_multi is None:
        pytest.skip("connected-components-3d (extra 'runtime') is not installed")
    loop = arrays.ArrayModule("numpy", "cpu", np, scipy.ndimage, arrays._scipy_label, "scipy.ndimage")
    from pocketseg.runtime.postprocess import clean_components

    for labels in _organ_like_maps(seed=3, count=4):
        a = clean_components(labels.copy(), (1, 2, 3), {14: 6}, cc)
        b = clean_components(labels.copy(), (1, 2, 3), {14: 6}, loop)
        np.testing.assert_array_equal(a, b)
        assert (a != labels).any()  # the rules removed something
        for value in (1, 2, 3):
            assert scipy.ndimage.label(a == value, structure=np.ones((3, 3, 3)))[1] <= 1
        lab14, n14 = scipy.ndimage.label(a == 14, structure=np.ones((3, 3, 3)))
        assert n14 == 0 or np.bincount(lab14.ravel())[1:].min() >= 6
        np.testing.assert_array_equal(a[labels == 4], 4)  # not named in any rule: untouched


def test_cucim_style_labelling_labels_every_value_in_one_pass():
    """cuCIM's measure.label has scikit-image's API (connected regions of equal value, 0 is background), so
    scikit-image stands in for it here: the GPU module's labellers give the per-value loop's result with one
    call for all values."""
    measure = pytest.importorskip("skimage.measure", reason="scikit-image stands in for cuCIM's measure")
    from pocketseg.runtime.postprocess import clean_components

    calls = []

    class CountingMeasure:
        @staticmethod
        def label(image, **kwargs):
            calls.append(kwargs)
            return measure.label(image, **kwargs)

    label, label_multi = arrays.skimage_labellers(CountingMeasure, np)
    one_pass = arrays.ArrayModule("numpy", "cpu", np, scipy.ndimage, label, "cucim (scikit-image)", label_multi)
    loop = arrays.ArrayModule("numpy", "cpu", np, scipy.ndimage, arrays._scipy_label, "scipy.ndimage")
    for labels in _organ_like_maps(seed=5, count=3):
        calls.clear()
        a = clean_components(labels.copy(), (1, 2, 3), {14: 6}, one_pass)
        assert calls == [{"connectivity": 3, "return_num": True}]  # one labelling for four values, 26-connected
        b = clean_components(labels.copy(), (1, 2, 3), {14: 6}, loop)
        np.testing.assert_array_equal(a, b)
        assert (a != labels).any()
    components, n = label(np.array([[[1, 1, 0, 2, 2]]], np.uint8))
    assert components.dtype == np.int32 and n == 2
