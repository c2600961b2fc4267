"""What the DICOM writers share (pocketseg.runtime.dicom_output): output types, labels present, grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pocketseg.dicom import SeriesGrid
from pocketseg.errors import InputError
from pocketseg.manifest import Manifest
from pocketseg.runtime.dicom_output import algorithm_of, output_types, present_labels, to_series_grid


def test_output_types_in_table_order_and_unknown_refused():
    assert output_types(None) == ("nifti",)
    assert output_types(["dicom-rtstruct", "nifti", "dicom-rtstruct"]) == ("nifti", "dicom-rtstruct")
    assert output_types("dicom-seg") == ("dicom-seg",)
    with pytest.raises(InputError, match="--output-type 'png' is not one of nifti, dicom-seg, dicom-rtstruct"):
        output_types(["nifti", "png"])


def test_present_labels_by_id_and_values_outside_the_set_refused():
    labels = np.zeros((4, 4, 2), dtype=np.uint8)
    labels[0, 0, 0], labels[1, 1, 1] = 14, 3
    assert [lab.name for lab in present_labels(labels, None)] == ["spleen", "tumor"]
    assert [lab.id for lab in present_labels(labels.astype(np.int16), None)] == [3, 14]
    with pytest.raises(InputError, match=r"label value\(s\) \[3\] are not in the model's label set"):
        present_labels(np.where(labels == 14, 0, labels), {"background": 0, "a": 1})


def _grid(affine, shape=(5, 4, 3)) -> SeriesGrid:
    return SeriesGrid(Path("series"), "1.2.3", tuple(Path(f"f{k}") for k in range(shape[2])), shape, affine)


def test_a_flipped_nifti_is_moved_onto_the_series_grid_and_another_grid_refused():
    affine = np.diag([-0.8, -0.7, 2.0, 1.0])
    affine[:3, 3] = (10, 20, 30)
    data = np.arange(60, dtype=np.uint8).reshape(5, 4, 3)
    # The same voxels stored with rows reversed (as dcm2niix writes them).
    flipped_affine = affine.copy()
    flipped_affine[:3, 3] += affine[:3, 1] * 3
    flipped_affine[:3, 1] *= -1
    moved = to_series_grid(data[:, ::-1, :], flipped_affine, _grid(affine), Path("ct.nii.gz"))
    assert np.array_equal(moved, data)
    shifted = affine.copy()
    shifted[0, 3] += 0.5
    with pytest.raises(InputError, match="ct.nii.gz: its grid does not match the DICOM reference series"):
        to_series_grid(data, shifted, _grid(affine), Path("ct.nii.gz"))
    with pytest.raises(InputError, match=r"shape \(5, 4, 2\)"):
        to_series_grid(data[:, :, :2], affine, _grid(affine), Path("ct.nii.gz"))


def test_algorithm_names_the_package_and_its_manifest_digest(tmp_path):
    import json

    from pocketseg.manifest import CONTENT_DIGEST

    manifest = Manifest(stages={})
    algorithm = algorithm_of(tmp_path / "my_model", manifest)
    assert algorithm.model_name == "my_model"
    assert algorithm.model_digest == json.loads(manifest.to_json())[CONTENT_DIGEST]
    assert len(algorithm.model_digest) == 64 and "my_model" in algorithm.description
