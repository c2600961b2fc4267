"""The input entry points of pocketseg.volume: ``load_volume`` and ``volume_info``.

* ``volume_info`` reports shape, spacing (i, j, k), orientation codes, the
  oblique flag, dtype, min and max for files built here (LPS int16, RAS
  float32, oblique uint8 ``.nii``) and for every real CT example.
* ``load_volume`` dispatches NIfTI by suffix (case-insensitive) and gives one
  ``InputError`` naming the path for a missing path or an unsupported suffix.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pocketseg.errors import InputError
from pocketseg.imageio import load_volume, volume_info
from pocketseg.layout import is_nifti_path
from pocketseg.volume import Volume


def lps_affine(zooms=(0.75, 0.8, 3.0)) -> np.ndarray:
    aff = np.diag([-zooms[0], -zooms[1], zooms[2], 1.0])
    aff[:3, 3] = [180.0, 200.0, -310.0]
    return aff


def test_volume_info_of_constructed_lps_int16(tmp_path):
    data = np.full((9, 8, 5), -1000, np.int16)
    data[3:6, 2:5, 1:4] = 40
    data[4, 3, 2] = 1500
    data[0, 7, 4] = -1024
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(data, lps_affine()), path)
    info = volume_info(path)
    assert info == {
        "path": str(path),
        "shape": [9, 8, 5],
        "spacing_mm": [0.75, 0.8, 3.0],
        "orientation": "LPS",
        "oblique": False,
        "dtype": "int16",
        "min": -1024.0,
        "max": 1500.0,
    }
    json.dumps(info)  # plain JSON types (the CLI prints it)


def test_volume_info_of_constructed_ras_float32(tmp_path):
    data = np.linspace(-2.5, 7.25, 4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    path = tmp_path / "f.nii"
    nib.save(nib.Nifti1Image(data, np.diag([1.5, 1.25, 2.0, 1.0])), path)
    info = volume_info(path)
    assert info["shape"] == [4, 5, 6]
    assert info["spacing_mm"] == [1.5, 1.25, 2.0]
    assert info["orientation"] == "RAS" and info["oblique"] is False
    assert info["dtype"] == "float32"
    assert info["min"] == -2.5 and info["max"] == 7.25


def test_volume_info_flags_oblique_las(tmp_path):
    t = np.radians(12.0)
    rot = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([-0.9, 0.9, 2.0])
    path = tmp_path / "oblique.nii"
    nib.save(nib.Nifti1Image(np.arange(60, dtype=np.uint8).reshape(3, 4, 5), aff), path)
    info = volume_info(path)
    assert info["orientation"] == "LAS"
    assert info["oblique"] is True
    assert info["spacing_mm"] == pytest.approx([0.9, 0.9, 2.0], abs=1e-6)
    assert info["dtype"] == "uint8" and info["min"] == 0.0 and info["max"] == 59.0


def test_load_volume_reads_nifti_any_case(tmp_path):
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    for name in ("a.nii", "b.nii.gz", "C.NII.GZ"):
        path = tmp_path / name
        if name.endswith("GZ"):
            nib.save(nib.Nifti1Image(data, lps_affine()), tmp_path / "tmp.nii.gz")
            (tmp_path / "tmp.nii.gz").rename(path)
        else:
            nib.save(nib.Nifti1Image(data, lps_affine()), path)
        vol = load_volume(path)
        assert isinstance(vol, Volume)
        np.testing.assert_array_equal(vol.data, data)
        np.testing.assert_array_equal(vol.affine, nib.load(path).affine)
        assert vol.source == path


@pytest.mark.parametrize("name", ["scan.mha", "scan.nrrd", "scan.nii.bz2", "scan", "scan.gz"])
def test_load_volume_unsupported_suffix(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\0" * 400)
    with pytest.raises(InputError) as excinfo:
        load_volume(path)
    err = excinfo.value
    assert err.path == str(path) and str(path) in str(err)
    assert "unsupported" in err.problem and ".nii" in err.problem
    with pytest.raises(InputError):
        volume_info(path)


@pytest.mark.parametrize("name", ["missing.nii.gz", "missing_dicom_folder"])
def test_load_volume_missing_path(tmp_path, name):
    path = tmp_path / name
    with pytest.raises(InputError) as excinfo:
        load_volume(path)
    err = excinfo.value
    assert err.path == str(path) and str(path) in str(err)
    assert "does not exist" in err.problem
    assert err.__cause__ is None


def test_is_nifti_path():
    assert is_nifti_path("a.nii") and is_nifti_path("a.nii.gz") and is_nifti_path(Path("A.NII.GZ"))
    assert not is_nifti_path("a.nii.zip") and not is_nifti_path("a.gz") and not is_nifti_path("nii")


REAL_INFO = {
    # file: (shape, spacing mm, orientation, dtype), from the folder's NOTICE.md
    "example_ct.nii.gz": ([122, 101, 112], [3.0, 3.0, 3.0], "RAS", "int32"),
    "example_ct_sm.nii.gz": ([122, 101, 30], [3.0, 3.0, 3.0], "RAS", "int16"),
    "example_seg.nii.gz": ([122, 101, 30], [3.0, 3.0, 3.0], "RAS", "uint8"),
    "ct_lps_1p5mm.nii.gz": ([120, 126, 164], [1.5, 1.5, 1.5], "LPS", "int16"),
    "example_seg_dicom.nii.gz": ([512, 512, 20], [0.976562, 0.976562, 2.0], "LAS", "uint8"),
}


@pytest.mark.parametrize("name", sorted(REAL_INFO))
def test_volume_info_real_examples(ct_examples, name):
    path = ct_examples / name
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    shape, spacing, orientation, dtype = REAL_INFO[name]
    info = volume_info(path)
    assert info["shape"] == shape
    assert info["spacing_mm"] == pytest.approx(spacing, abs=1e-6)
    assert info["orientation"] == orientation
    assert info["oblique"] is False
    assert info["dtype"] == dtype
    reference = np.asanyarray(nib.load(path).dataobj)
    assert info["min"] == float(reference.min()) and info["max"] == float(reference.max())
    if name.startswith("example_ct") or name.startswith("ct_"):
        assert info["min"] <= -900 and info["max"] >= 300  # air and bone: these are CT numbers
