"""Fingerprint and preprocessing: canonical orientation, body crop, CT normalisation, cache."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pocketseg.nifti import write_nifti
from pocketseg.synth.phantom import make_phantom
from pocketseg.manifest import Intensity
from pocketseg.runtime.intensity import ct_normalize
from pocketseg.trainer.dataset import open_dataset
from pocketseg.trainer.preprocess import body_bbox, compute_fingerprint, load_preprocessed, preprocess_cases
from pocketseg.volume import Volume, canonical_zyx


def _write_case(root, name, ph):
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(exist_ok=True)
    write_nifti(ph.image, root / "imagesTr" / f"{name}_0000.nii.gz", affine=ph.affine)
    write_nifti(ph.labels, root / "labelsTr" / f"{name}.nii.gz", affine=ph.affine)


@pytest.fixture(scope="module")
def two_orientations(tmp_path_factory):
    root = tmp_path_factory.mktemp("orient")
    _write_case(root, "ras", make_phantom(4, small=True, slices=40, orientation="RAS"))
    _write_case(root, "lpi", make_phantom(4, small=True, slices=40, orientation="LPI"))
    (root / "dataset.json").write_text(json.dumps({"file_ending": ".nii.gz"}))
    return root


def test_canonical_zyx_reorders_axes_and_spacing():
    data = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    affine = np.diag([-0.7, -0.8, 2.5, 1.0])  # LPS
    zyx, spacing = canonical_zyx(Volume(data, affine))
    assert zyx.shape == (4, 3, 2) and spacing == pytest.approx((2.5, 0.8, 0.7))
    assert zyx[0, 0, 0] == data[1, 2, 0]  # RAS x=0 is the last i of an L-going axis


def test_same_anatomy_in_any_orientation_preprocesses_identically(two_orientations, tmp_path):
    ds = open_dataset(two_orientations)
    cases = ds.labelled(full_only=True)
    fp = compute_fingerprint(cases, progress=False)
    stats = Intensity(**fp["intensity"])
    folder = preprocess_cases(cases, stats, (5.0, 4.0, 4.0), tmp_path, progress=False)
    a, b = load_preprocessed(folder, "ras"), load_preprocessed(folder, "lpi")
    np.testing.assert_array_equal(a.seg, b.seg)
    np.testing.assert_allclose(a.image, b.image, atol=1e-5)
    assert a.props["fg_bbox_zyx"] == b.props["fg_bbox_zyx"]


def test_fingerprint_and_normalisation(two_orientations, tmp_path):
    cases = open_dataset(two_orientations).labelled(full_only=True)
    fp = compute_fingerprint(cases, progress=False)
    s = fp["intensity"]
    # Foreground of abdominal CT: organs of tens to ~250 HU; percentiles bracket the mean.
    assert -100 < s["mean"] < 250 and 5 < s["std"] < 300
    assert s["percentile_00_5"] < s["mean"] < s["percentile_99_5"]
    stats = Intensity(**s)
    folder = preprocess_cases(cases, stats, (5.0, 4.0, 4.0), tmp_path, progress=False)
    case = load_preprocessed(folder, "ras")
    assert isinstance(case.image, np.memmap) and case.image.dtype == np.float32
    fg = np.asarray(case.image)[np.asarray(case.seg) > 0]
    assert abs(fg.mean()) < 0.5 and 0.5 < fg.std() < 1.5  # z-scored foreground
    lo = (stats.percentile_00_5 - stats.mean) / stats.std
    hi = (stats.percentile_99_5 - stats.mean) / stats.std
    img = np.asarray(case.image)
    inside = (img >= lo - 0.05) & (img <= hi + 0.05)
    assert inside.mean() > 0.9  # clipped before resampling; cubic-spline overshoot at sharp edges leaves the range
    raw = np.array([-2000.0, stats.percentile_00_5, stats.mean, 5000.0])
    np.testing.assert_allclose(ct_normalize(raw, stats), [lo, lo, 0.0, hi], rtol=1e-6, atol=1e-6)
    spacing = case.props["spacing_mm_zyx"]
    assert spacing == [5.0, 4.0, 4.0] and list(case.image.shape) == case.props["shape_zyx"]
    assert set(case.props["class_locations"]) == {str(c) for c in range(1, 14)} | ({"14"} if (np.asarray(case.seg) == 14).any() else set())


def test_cache_is_reused_and_keyed(two_orientations, tmp_path):
    cases = open_dataset(two_orientations).labelled(full_only=True)
    stats = Intensity(mean=50.0, std=60.0, percentile_00_5=-100.0, percentile_99_5=300.0)
    folder = preprocess_cases(cases, stats, (5.0, 4.0, 4.0), tmp_path, progress=False)
    stamp = (folder / "ras.npy").stat().st_mtime_ns
    assert preprocess_cases(cases, stats, (5.0, 4.0, 4.0), tmp_path, progress=False) == folder
    assert (folder / "ras.npy").stat().st_mtime_ns == stamp  # not redone
    other = preprocess_cases(cases, stats, (6.0, 4.0, 4.0), tmp_path, progress=False)
    assert other != folder  # a different spacing is a different cache
    other_stats = Intensity(mean=40.0, std=60.0, percentile_00_5=-100.0, percentile_99_5=300.0)
    assert preprocess_cases(cases, other_stats, (5.0, 4.0, 4.0), tmp_path, progress=False) != folder
    assert not list(folder.glob(".*.part"))


def test_body_bbox_ignores_air_and_the_table():
    img = np.full((20, 60, 60), -1000.0, dtype=np.float32)
    img[4:16, 10:40, 15:45] = 40.0  # body
    img[:, 50:52, :] = 200.0  # table: separate, thin
    box = body_bbox(img)
    assert box[1].stop <= 48 and box[1].start <= 10 and box[2].start <= 15 and box[2].stop >= 45
