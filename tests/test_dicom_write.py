"""The DICOM output write-time benchmark (pocketseg.benchmarks.dicom_write) on a small series."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("highdicom", reason="highdicom (extra 'dicom') is not installed")
pytest.importorskip("skimage", reason="scikit-image (extra 'dicom') is not installed")

from pocketseg.benchmarks.dicom_write import ellipsoid_labels, main  # noqa: E402


def test_ellipsoid_labels_are_disjoint_and_all_present():
    labels = ellipsoid_labels((128, 128, 40), 14)
    assert sorted(np.unique(labels)) == list(range(15))
    assert (labels == 14).sum() > (labels == 1).sum() > 0  # radii grow with the id


def test_benchmark_times_both_writers(tmp_path):
    assert main(["--shape", "64x56x12", "--labels", "3", "--repeat", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "dicom_write.json").read_text())
    assert result["shape"] == [64, 56, 12] and result["labels"] == 3
    for name in ("dicom_seg", "rtstruct"):
        assert result[name]["wall_s_best"] > 0 and result[name]["bytes"] > 1000
        assert len(result[name]["cpu_s"]) == 1
