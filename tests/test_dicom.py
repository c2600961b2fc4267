"""DICOM series reading: ordering, geometry, rescaling and the errors for unusable folders.

Real-data tests use the TotalSegmentator DICOM example in ``../shared/data/ct_examples``
(override with ``POCKETSEG_CT_EXAMPLES``) and skip when it is absent; they copy
files only into pytest's ``tmp_path``. Synthetic series written with pydicom
cover the geometry conventions exhaustively and always run when pydicom is
installed.
"""

from __future__ import annotations

import builtins
import logging
import os
import re
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

from pocketseg.errors import InputError, MissingDependencyError
from pocketseg.synth.dicom_series import ct_slice, save_slice

CT_EXAMPLES = Path(
    os.environ.get("POCKETSEG_CT_EXAMPLES")
    or Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ct_examples"
)
SERIES_DIR = CT_EXAMPLES / "dicom_series"
REFERENCE_SEG = CT_EXAMPLES / "example_seg_dicom.nii.gz"


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def pydicom():
    return pytest.importorskip("pydicom", reason="pydicom (extra 'dicom') is not installed")


def _save(ds, path: Path) -> None:
    """Write a new dataset as a proper DICOM file on pydicom 2.4 and 3.x."""
    save_slice(ds, path)


def _write_slice(
    path: Path,
    stored: np.ndarray,
    *,
    position,
    orientation=(1, 0, 0, 0, 1, 0),
    pixel_spacing=(0.7, 0.9),
    slope=1.0,
    intercept=0.0,
    series_uid: str,
    instance: int,
    modality: str = "CT",
    description: str = "synthetic",
) -> None:
    """One uncompressed Explicit VR Little Endian slice; ``stored`` is (rows, cols), int16 or uint16."""
    ds = ct_slice(stored, series_uid=series_uid, instance=instance, position=[round(float(v), 6) for v in position],
                  orientation=[round(float(v), 10) for v in orientation], pixel_spacing=[float(v) for v in pixel_spacing],
                  slope=slope, intercept=intercept, thickness=5.0, modality=modality, description=description)
    _save(ds, path)


def _normal(orientation) -> np.ndarray:
    o = np.asarray(orientation, dtype=np.float64)
    n = np.cross(o[:3], o[3:])
    return n / np.linalg.norm(n)


def _write_series(
    folder: Path,
    *,
    n_slices=6,
    rows=8,
    cols=10,
    orientation=(1, 0, 0, 0, 1, 0),
    origin=(-100.5, -50.25, 20.0),
    step=-2.5,
    pixel_spacing=(0.7, 0.9),
    slope=2.0,
    intercept=-100.0,
    series_uid: str | None = None,
    dtype=np.int16,
    seed=0,
    **kwargs,
):
    """Slice n at ``origin + n*step*normal``, file ``slice_{n:03d}.dcm``; returns (stored, positions, uid)."""
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    uid = series_uid or generate_uid()
    rng = np.random.default_rng(seed)
    low, high = (-400, 400) if dtype == np.int16 else (0, 4000)
    stored = rng.integers(low, high, size=(n_slices, rows, cols)).astype(dtype)
    normal = _normal(orientation)
    positions = np.array([np.asarray(origin, dtype=np.float64) + n * step * normal for n in range(n_slices)])
    for n in range(n_slices):
        _write_slice(
            folder / f"slice_{n:03d}.dcm",
            stored[n],
            position=positions[n],
            orientation=orientation,
            pixel_spacing=pixel_spacing,
            slope=slope,
            intercept=intercept,
            series_uid=uid,
            instance=n + 1,
            **kwargs,
        )
    return stored, positions, uid


def _real_files() -> list[Path]:
    return sorted(p for p in SERIES_DIR.iterdir() if p.is_file())


def _copy(files, folder: Path, names=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, src in enumerate(files):
        shutil.copyfile(src, folder / (names[i] if names else src.name))
    return folder


@pytest.fixture(scope="module")
def real_volume():
    """The real series read once per module (JPEG 2000 decoding is the slow part)."""
    if not SERIES_DIR.is_dir():
        pytest.skip(f"real CT examples not found at {SERIES_DIR} (set POCKETSEG_CT_EXAMPLES)")
    pytest.importorskip("pydicom", reason="pydicom (extra 'dicom') is not installed")
    from pocketseg.dicom import read_dicom_series

    try:
        return read_dicom_series(SERIES_DIR)
    except MissingDependencyError as exc:
        pytest.skip(f"cannot decode the JPEG 2000 example: {exc}")


# --------------------------------------------------------------------------- real series


def test_real_series_shape_spacing_and_hu(real_volume):
    vol = real_volume
    assert vol.shape == (512, 512, 20)
    # 2.0 mm comes from the positions; SliceThickness says 3 mm.
    np.testing.assert_allclose(vol.spacing_mm, (0.9765625, 0.9765625, 2.0), atol=1e-4)
    assert vol.meta["slice_thickness"] == pytest.approx(3.0)
    assert vol.data.dtype == np.int16
    assert vol.data.min() <= -900  # air outside the patient (stored 0 - 1024)
    assert np.mean(vol.data < -900) > 0.05
    assert vol.data.max() > 300  # bone
    assert vol.orientation == "LPS"
    assert vol.meta["n_files"] == 20
    assert vol.meta["modality"] == "CT"
    assert vol.meta["series_description"] == "CT Body 3.0"
    assert vol.meta["source"] == SERIES_DIR
    assert vol.source == SERIES_DIR


def test_real_series_matches_reference_segmentation_grid(real_volume):
    if not REFERENCE_SEG.is_file():
        pytest.skip(f"reference segmentation not found at {REFERENCE_SEG}")
    ref = nib.load(str(REFERENCE_SEG))
    vol = real_volume
    transform = ornt_transform(io_orientation(vol.affine), io_orientation(ref.affine))
    data = apply_orientation(vol.data, transform)
    affine = vol.affine @ inv_ornt_aff(transform, vol.shape)
    assert data.shape == ref.shape
    np.testing.assert_allclose(affine, ref.affine, atol=1e-3)

    # Our voxel (0, 0, 0) is the reference's (0, 511, 0): the reference is LAS, we are LPS.
    ref_ijk = np.linalg.inv(ref.affine) @ vol.affine[:, 3]
    np.testing.assert_allclose(ref_ijk[:3], (0, 511, 0), atol=1e-4)
    np.testing.assert_allclose(ref.affine @ [0, 511, 0, 1], vol.affine[:, 3], atol=1e-3)

    # The intensities sit under the labels: organs are tissue, not air (a flipped
    # row axis would put ~27 % of labelled voxels on air and the liver at ~-75 HU) ...
    seg = np.asarray(ref.dataobj)
    assert np.mean(data[seg > 0] > -500) > 0.95
    liver = data[seg == 5]
    assert liver.size > 1000 and 0 < np.median(liver) < 150
    # ... and each organ is most homogeneous exactly where the reference put it: any
    # flip of an axis, or a shift by a few voxels / one slice, mixes organs and raises
    # the within-label variance (measured: 3455 aligned, >= 4737 flipped, >= 3800 shifted).
    aligned = _within_label_variance(data, seg)
    for axis in range(3):
        assert aligned < 0.8 * _within_label_variance(np.flip(data, axis), seg)
    for shift, axis in ((3, 0), (3, 1), (1, 2), (-1, 2)):
        assert aligned < _within_label_variance(np.roll(data, shift, axis), seg)


def _within_label_variance(image: np.ndarray, seg: np.ndarray) -> float:
    """Mean over labelled voxels of the HU variance within each label (HU clipped to -200..400)."""
    labels = seg[seg > 0].astype(np.int64)
    values = np.clip(image[seg > 0].astype(np.float64), -200, 400)
    counts = np.bincount(labels)
    sums = np.bincount(labels, values)
    squares = np.bincount(labels, values**2)
    used = counts > 0
    within = squares[used] - sums[used] ** 2 / counts[used]
    return float(within.sum() / counts.sum())


@pytest.mark.parametrize("naming", ["reversed", "shuffled"])
def test_real_series_order_comes_from_positions_not_names(real_volume, tmp_path, naming):
    files = _real_files()
    n = len(files)
    if naming == "reversed":
        # Original names sort by InstanceNumber (descending z); these sort the other way.
        names = [f"img{n - i:04d}" for i in range(n)]
    else:
        perm = np.random.default_rng(7).permutation(n)
        names = [f"x{int(p):02d}" for p in perm]
    folder = _copy(files, tmp_path / "renamed", names)
    from pocketseg.dicom import read_dicom_series

    vol = read_dicom_series(folder)
    assert np.array_equal(vol.data, real_volume.data)
    assert np.array_equal(vol.affine, real_volume.affine)


def test_real_series_ignores_instance_number_and_slice_location(real_volume, tmp_path, pydicom):
    files = _real_files()
    rng = np.random.default_rng(3)
    instances = rng.permutation(len(files)) + 1
    locations = rng.permutation(len(files)) * 7.0
    folder = tmp_path / "scrambled"
    folder.mkdir()
    for src, instance, location in zip(files, instances, locations):
        ds = pydicom.dcmread(src)
        ds.InstanceNumber = int(instance)
        ds.SliceLocation = float(location)
        ds.save_as(str(folder / src.name))
    from pocketseg.dicom import read_dicom_series

    vol = read_dicom_series(folder)
    assert np.array_equal(vol.data, real_volume.data)
    assert np.array_equal(vol.affine, real_volume.affine)


def _two_series_folder(tmp_path: Path, pydicom, uid_a: str | None, uid_b: str) -> Path:
    """All 20 real slices (series A, or its blank UID when uid_a is None) plus 4 of them as series B."""
    files = _real_files()
    folder = tmp_path / "two_series"
    folder.mkdir()
    for src in files:
        if uid_a is None:
            shutil.copyfile(src, folder / src.name)
        else:
            ds = pydicom.dcmread(src)
            ds.SeriesInstanceUID = uid_a
            ds.save_as(str(folder / src.name))
    for i, src in enumerate(files[:4]):
        ds = pydicom.dcmread(src)
        ds.SeriesInstanceUID = uid_b
        ds.SeriesDescription = "copy B"
        ds.save_as(str(folder / f"b_{i}"))
    return folder


def test_real_two_series_needs_a_choice(real_volume, tmp_path, pydicom):
    from pydicom.uid import generate_uid

    from pocketseg.dicom import list_series, read_dicom_series

    uid_a, uid_b = generate_uid(), generate_uid()
    folder = _two_series_folder(tmp_path, pydicom, uid_a, uid_b)
    with pytest.raises(InputError) as excinfo:
        read_dicom_series(folder)
    message = str(excinfo.value)
    assert str(folder) in message
    assert uid_a in message and uid_b in message
    assert "CT Body 3.0" in message and "copy B" in message
    assert "20 file" in message and "4 file" in message
    assert "series_uid" in message

    infos = list_series(folder)
    assert [(i.uid, i.n_files, i.description, i.modality) for i in infos] == [
        (uid_a, 20, "CT Body 3.0", "CT"),
        (uid_b, 4, "copy B", "CT"),
    ]

    vol_a = read_dicom_series(folder, series_uid=uid_a)
    assert np.array_equal(vol_a.data, real_volume.data)
    assert np.array_equal(vol_a.affine, real_volume.affine)
    assert vol_a.meta["series_uid"] == uid_a
    vol_b = read_dicom_series(folder, series_uid=uid_b)
    assert vol_b.shape == (512, 512, 4)
    assert vol_b.meta["series_description"] == "copy B"

    missing = "1.2.3.4.5"
    with pytest.raises(InputError) as excinfo:
        read_dicom_series(folder, series_uid=missing)
    message = str(excinfo.value)
    assert str(folder) in message and missing in message and uid_a in message and uid_b in message


def test_real_blank_series_uid_is_listed_and_selectable(real_volume, tmp_path, pydicom):
    """The example's SeriesInstanceUID is blank (anonymised); "" must still name it."""
    from pydicom.uid import generate_uid

    from pocketseg.dicom import read_dicom_series

    uid_b = generate_uid()
    folder = _two_series_folder(tmp_path, pydicom, None, uid_b)
    with pytest.raises(InputError) as excinfo:
        read_dicom_series(folder)
    assert "no SeriesInstanceUID" in str(excinfo.value) and uid_b in str(excinfo.value)
    vol = read_dicom_series(folder, series_uid="")
    assert vol.shape == (512, 512, 20)
    assert np.array_equal(vol.affine, real_volume.affine)


def test_real_missing_slice_is_rejected(real_volume, tmp_path):
    files = _real_files()
    folder = _copy(files[:9] + files[10:], tmp_path / "gap")
    from pocketseg.dicom import read_dicom_series

    with pytest.raises(InputError) as excinfo:
        read_dicom_series(folder)
    message = str(excinfo.value)
    assert str(folder) in message
    assert "not uniform" in message and "missing" in message
    # files[9] sits at z = -784.5; its neighbours are named.
    assert "-786.500" in message and "-782.500" in message


def test_real_duplicated_slice_is_rejected(real_volume, tmp_path):
    files = _real_files()
    folder = _copy(files, tmp_path / "dup")
    shutil.copyfile(files[5], folder / "duplicate_of_5")
    from pocketseg.dicom import read_dicom_series

    with pytest.raises(InputError) as excinfo:
        read_dicom_series(folder)
    message = str(excinfo.value)
    assert str(folder) in message
    assert "same position" in message and "duplicate_of_5" in message and files[5].name in message


# --------------------------------------------------------------------------- synthetic series


def test_synthetic_axial_series_values_shape_and_affine(tmp_path, pydicom):
    from pocketseg.dicom import read_dicom_series

    stored, positions, uid = _write_series(tmp_path / "s")  # z decreases with file order
    vol = read_dicom_series(tmp_path / "s")
    assert vol.shape == (10, 8, 6)  # (cols, rows, slices)
    assert vol.data.dtype == np.int16
    for k in range(6):  # k = 0 is the lowest slice = the last file
        expected = stored[5 - k].astype(np.int32) * 2 - 100
        assert np.array_equal(vol.data[:, :, k], expected.T)
    assert stored.min() < 0  # signed pixels exercised
    np.testing.assert_allclose(vol.spacing_mm, (0.9, 0.7, 2.5), atol=1e-9)
    lowest = positions[np.argmin(positions[:, 2])]
    np.testing.assert_allclose(vol.affine[:3, 3], (-lowest[0], -lowest[1], lowest[2]), atol=1e-9)
    np.testing.assert_allclose(vol.affine, np.array([
        [-0.9, 0, 0, 100.5],
        [0, -0.7, 0, 50.25],
        [0, 0, 2.5, 7.5],
        [0, 0, 0, 1],
    ]), atol=1e-9)
    assert vol.meta["series_uid"] == uid
    assert vol.meta["n_files"] == 6


ORIENTATIONS = {
    "axial": ((1, 0, 0, 0, 1, 0), "LPS"),
    "sagittal": ((0, 1, 0, 0, 0, -1), "PIR"),
    "coronal": ((1, 0, 0, 0, 0, -1), "LIP"),
    "oblique": ((np.cos(0.5), np.sin(0.5), 0, -np.sin(0.5), np.cos(0.5), 0), None),
}


@pytest.mark.parametrize("name", sorted(ORIENTATIONS))
def test_synthetic_every_pixel_lands_at_its_dicom_world_position(tmp_path, pydicom, name):
    """For each stored pixel, LPS = IPP + col*dc*F_row + row*dr*F_col.

    The affine must map the voxel that holds the pixel's value to exactly that point (in RAS).
    """
    from pocketseg.dicom import read_dicom_series

    orientation, codes = ORIENTATIONS[name]
    stored, positions, _ = _write_series(
        tmp_path / name, orientation=orientation, origin=(12.5, -30.0, 40.0), step=-3.0, n_slices=5, rows=7, cols=9
    )
    vol = read_dicom_series(tmp_path / name)
    assert vol.shape == (9, 7, 5)
    if codes:
        assert vol.orientation == codes
    o = np.asarray([round(float(v), 10) for v in orientation])
    f_row, f_col = o[:3] / np.linalg.norm(o[:3]), o[3:] / np.linalg.norm(o[3:])
    rows_mm, cols_mm = 0.7, 0.9
    inv = np.linalg.inv(vol.affine)
    r, c = np.meshgrid(np.arange(7), np.arange(9), indexing="ij")
    for n in range(5):
        lps = positions[n] + c[..., None] * cols_mm * f_row + r[..., None] * rows_mm * f_col
        ras = lps * (-1, -1, 1)
        ijk = ras @ inv[:3, :3].T + inv[:3, 3]
        np.testing.assert_allclose(ijk, np.rint(ijk), atol=1e-4)
        i, j, k = np.rint(ijk).astype(int).transpose(2, 0, 1)
        np.testing.assert_array_equal(i, c)
        np.testing.assert_array_equal(j, r)
        assert np.array_equal(vol.data[i, j, k], stored[n].astype(np.int32) * 2 - 100)
    # k increases along +normal: the slice with the smallest projection comes first.
    along = positions @ _normal(orientation)
    np.testing.assert_allclose(vol.affine[:3, 3], positions[np.argmin(along)] * (-1, -1, 1), atol=1e-6)


def test_synthetic_per_slice_rescale_and_float_output(tmp_path, pydicom):
    from pydicom.uid import generate_uid

    from pocketseg.dicom import read_dicom_series

    folder = tmp_path / "mixed"
    folder.mkdir()
    uid = generate_uid()
    rng = np.random.default_rng(1)
    stored = rng.integers(-50, 50, size=(3, 4, 5)).astype(np.int16)
    slopes, intercepts = (1.0, 0.5, 1.0), (-1024.0, -10.0, 3.0)
    for n in range(3):
        _write_slice(folder / f"f{n}", stored[n], position=(0, 0, 2.0 * n), slope=slopes[n],
                     intercept=intercepts[n], series_uid=uid, instance=n + 1)
    vol = read_dicom_series(folder)
    assert vol.data.dtype == np.float32
    for n in range(3):
        np.testing.assert_array_equal(vol.data[:, :, n], (stored[n] * slopes[n] + intercepts[n]).T.astype(np.float32))


def test_synthetic_unsigned_out_of_int16_range_gives_float(tmp_path, pydicom):
    """Unsigned pixels above 32767 (PixelRepresentation 0) must not wrap around."""
    from pydicom.uid import generate_uid

    from pocketseg.dicom import read_dicom_series

    folder = tmp_path / "unsigned"
    folder.mkdir()
    uid = generate_uid()
    stored = np.full((2, 3, 4), 60000, dtype=np.uint16)
    stored[:, 0, 0] = 0
    for n in range(2):
        _write_slice(folder / f"u{n}", stored[n], position=(0, 0, n), intercept=-1024, series_uid=uid, instance=n + 1)
    vol = read_dicom_series(folder)
    assert vol.data.dtype == np.float32
    assert vol.data.max() == 60000 - 1024 and vol.data.min() == -1024


def test_synthetic_skips_non_dicom_hidden_and_dicomdir(tmp_path, pydicom, caplog):
    from pocketseg.dicom import list_series, read_dicom_series
    from pocketseg.imageio import load_volume

    folder = tmp_path / "mixed_files"
    stored, _, uid = _write_series(folder, n_slices=3)
    (folder / "README.txt").write_text("not a DICOM file\n")
    (folder / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 10)
    shutil.copyfile(folder / "slice_000.dcm", folder / ".hidden_copy")  # would duplicate a position
    (folder / "sub").mkdir()
    shutil.copyfile(folder / "slice_000.dcm", folder / "sub" / "nested.dcm")  # not recursive
    with caplog.at_level(logging.DEBUG, logger="pocketseg.dicom"):
        vol = read_dicom_series(folder)
    assert vol.shape == (10, 8, 3)
    assert "README.txt" in caplog.text and "not a DICOM file" in caplog.text
    assert list_series(folder)[0].n_files == 3
    via_load = load_volume(folder)
    assert np.array_equal(via_load.data, vol.data) and np.array_equal(via_load.affine, vol.affine)


def test_synthetic_non_ct_modality_warns_but_reads(tmp_path, pydicom, caplog):
    from pocketseg.dicom import read_dicom_series

    _write_series(tmp_path / "mr", n_slices=3, modality="MR")
    with caplog.at_level(logging.WARNING, logger="pocketseg.dicom"):
        vol = read_dicom_series(tmp_path / "mr")
    assert vol.meta["modality"] == "MR"
    assert any(rec.levelname == "WARNING" and "MR" in rec.getMessage() for rec in caplog.records)


# --------------------------------------------------------------------------- errors


def test_empty_folder_is_rejected(tmp_path, pydicom):
    from pocketseg.dicom import list_series, read_dicom_series

    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(InputError) as excinfo:
        read_dicom_series(folder)
    assert str(folder) in str(excinfo.value) and "is empty" in str(excinfo.value)
    assert list_series(folder) == []


def test_a_folder_of_nifti_files_or_of_series_folders_says_what_it_holds(tmp_path, pydicom):
    from pocketseg.dicom import read_dicom_series

    nifti = tmp_path / "nifti"
    nifti.mkdir()
    (nifti / "a_0000.nii.gz").write_bytes(b"x")
    with pytest.raises(InputError, match="holds NIfTI files \\(a_0000.nii.gz\\), not a DICOM series"):
        read_dicom_series(nifti)
    patients = tmp_path / "patients"
    for name in ("p1", "p2"):
        (patients / name).mkdir(parents=True)
    with pytest.raises(InputError, match="2 sub-folder\\(s\\) \\(p1, ...\\): give one series folder"):
        read_dicom_series(patients)


def test_folder_with_only_text_is_rejected(tmp_path, pydicom):
    from pocketseg.dicom import read_dicom_series

    folder = tmp_path / "text_only"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello\n")
    with pytest.raises(InputError) as excinfo:
        read_dicom_series(folder)
    assert str(folder) in str(excinfo.value) and "no DICOM image files (1 file(s)" in str(excinfo.value)


def test_missing_folder_and_file_instead_of_folder(tmp_path, pydicom):
    from pocketseg.dicom import read_dicom_series

    with pytest.raises(InputError, match="does not exist"):
        read_dicom_series(tmp_path / "nope")
    (tmp_path / "file.dcm").write_bytes(b"x")
    with pytest.raises(InputError, match="not a folder"):
        read_dicom_series(tmp_path / "file.dcm")


def test_single_slice_is_read_with_its_thickness_as_a_one_slice_nifti_is(tmp_path, pydicom):
    from pocketseg.dicom import read_dicom_series

    stored, positions, _ = _write_series(tmp_path / "one", n_slices=1)  # SliceThickness 5 mm, slope 2, intercept -100
    volume = read_dicom_series(tmp_path / "one")
    assert 1 in volume.data.shape and volume.data.size == stored.size
    np.testing.assert_array_equal(np.sort(np.asarray(volume.data, dtype=np.float64).ravel()),
                                  np.sort(stored.astype(np.float64).ravel() * 2.0 - 100.0))
    assert sorted(round(float(v), 6) for v in np.linalg.norm(volume.affine[:3, :3], axis=0)) == [0.7, 0.9, 5.0]

    path = tmp_path / "one" / "slice_000.dcm"
    ds = pydicom.dcmread(str(path))
    del ds.SliceThickness
    _save(ds, path)
    with pytest.raises(InputError) as excinfo:
        read_dicom_series(tmp_path / "one")
    assert str(tmp_path / "one") in str(excinfo.value) and "single slice" in str(excinfo.value)
    assert "SliceThickness" in str(excinfo.value)


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"orientation": (0, 1, 0, 0, 0, -1)}, "ImageOrientationPatient"),
        ({"pixel_spacing": (0.8, 0.9)}, "PixelSpacing"),
        ({"shape": (8, 11)}, "differ in size"),
    ],
)
def test_inconsistent_slices_are_rejected(tmp_path, pydicom, change, expected):
    from pocketseg.dicom import read_dicom_series

    folder = tmp_path / "inconsistent"
    stored, positions, uid = _write_series(folder, n_slices=4)
    shape = change.get("shape", stored[0].shape)
    _write_slice(
        folder / "slice_002.dcm",
        np.zeros(shape, dtype=np.int16),
        position=positions[2],
        orientation=change.get("orientation", (1, 0, 0, 0, 1, 0)),
        pixel_spacing=change.get("pixel_spacing", (0.7, 0.9)),
        series_uid=uid,
        instance=3,
    )
    with pytest.raises(InputError) as excinfo:
        read_dicom_series(folder)
    assert str(folder) in str(excinfo.value) and expected in str(excinfo.value)


def test_irregular_spacing_and_tilt_are_rejected(tmp_path, pydicom):
    from pydicom.uid import generate_uid

    from pocketseg.dicom import read_dicom_series

    img = np.zeros((4, 4), dtype=np.int16)
    irregular = tmp_path / "irregular"
    irregular.mkdir()
    uid = generate_uid()
    for n, z in enumerate((0.0, 2.0, 4.0, 6.5, 8.5)):  # one step 25 % longer: not a missing slice
        _write_slice(irregular / f"f{n}", img, position=(0, 0, z), series_uid=uid, instance=n)
    with pytest.raises(InputError) as excinfo:
        read_dicom_series(irregular)
    message = str(excinfo.value)
    assert str(irregular) in message and "not uniform" in message and "missing" not in message
    assert "4.000" in message and "6.500" in message

    tilted = tmp_path / "tilted"
    tilted.mkdir()
    uid = generate_uid()
    for n in range(4):  # y moves 1 mm per slice: gantry tilt, not a straight stack
        _write_slice(tilted / f"f{n}", img, position=(0, float(n), 2.0 * n), series_uid=uid, instance=n)
    with pytest.raises(InputError) as excinfo:
        read_dicom_series(tilted)
    assert str(tilted) in str(excinfo.value) and "gantry tilt" in str(excinfo.value)


def test_synthetic_two_series_listing(tmp_path, pydicom):
    from pocketseg.dicom import SeriesInfo, list_series, read_dicom_series

    folder = tmp_path / "two"
    _, _, uid_a = _write_series(folder, n_slices=3, description="A")
    _write_series(folder / "tmp", n_slices=2, description="B", modality="MR")
    for p in (folder / "tmp").iterdir():
        p.rename(folder / f"b_{p.name}")
    (folder / "tmp").rmdir()
    infos = list_series(folder)
    assert len(infos) == 2 and all(isinstance(i, SeriesInfo) for i in infos)
    assert infos[0] == SeriesInfo(uid=uid_a, description="A", n_files=3, modality="CT")
    assert (infos[1].description, infos[1].n_files, infos[1].modality) == ("B", 2, "MR")
    with pytest.raises(AttributeError):  # frozen
        infos[0].uid = "x"  # type: ignore[misc]
    with pytest.raises(InputError, match="series_uid"):
        read_dicom_series(folder)
    assert read_dicom_series(folder, series_uid=infos[1].uid).shape == (10, 8, 2)


# --------------------------------------------------------------------------- optional dependency


@pytest.mark.parametrize("how", ["sys_modules", "import_hook"])
def test_missing_pydicom_raises_missing_dependency(tmp_path, monkeypatch, how):
    from pocketseg.dicom import list_series, read_dicom_series
    from pocketseg.imageio import load_volume

    if how == "sys_modules":
        monkeypatch.setitem(sys.modules, "pydicom", None)  # "import pydicom" now raises ImportError
    else:
        real_import = builtins.__import__

        def fake_import(name, *args, **kwargs):
            if name == "pydicom" or name.startswith("pydicom."):
                raise ImportError(f"No module named {name!r}")
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", fake_import)
    for call in (read_dicom_series, list_series, load_volume):
        with pytest.raises(MissingDependencyError) as excinfo:
            call(tmp_path)
        assert "pydicom" in str(excinfo.value) and "pocketseg[dicom]" in str(excinfo.value)


def test_missing_decoder_plugin_raises_missing_dependency(tmp_path, pydicom, monkeypatch):
    """A compressed series without the pylibjpeg plugins names the package to install."""
    from pocketseg.dicom import read_dicom_series

    _write_series(tmp_path / "s", n_slices=2)

    def no_plugin(self):
        raise RuntimeError(
            "Unable to decompress 'JPEG 2000 Image Compression (Lossless Only)' pixel data because all "
            "plugins are missing dependencies:\n\tpylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-openjpeg>=2.0"
        )

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(no_plugin))
    with pytest.raises(MissingDependencyError) as excinfo:
        read_dicom_series(tmp_path / "s")
    assert "pocketseg[dicom]" in str(excinfo.value)


@pytest.mark.parametrize("n_slices", [1, 4])
@pytest.mark.parametrize("keyword, value, problem", [
    ("PixelSpacing", ["inf", "1.0"], "has no valid PixelSpacing"),
    ("PixelSpacing", ["nan", "1.0"], "has no valid PixelSpacing"),
    ("ImagePositionPatient", ["nan", "0", "0"], "has no valid ImagePositionPatient"),
    ("ImageOrientationPatient", ["nan", "0", "0", "0", "1", "0"], "has no valid ImageOrientationPatient"),
])
def test_non_finite_geometry_tags_are_refused(tmp_path, pydicom, n_slices, keyword, value, problem):
    # Found by the property-based fuzzing (tests/test_fuzz_cases.py): NaN passes every comparison, so such
    # series were read with a NaN or infinite affine.
    import warnings

    from pocketseg.dicom import read_dicom_series

    _write_series(tmp_path / "s", n_slices=n_slices)
    target = sorted((tmp_path / "s").iterdir())[0]
    ds = pydicom.dcmread(target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid DS value written on purpose
        setattr(ds, keyword, value)
        _save(ds, target)
    with pytest.raises(InputError, match=f"{target.name} {problem}") as excinfo:
        read_dicom_series(tmp_path / "s")
    assert "\n" not in str(excinfo.value)


def test_a_huge_whole_rescale_slope_is_rescaled_in_floats(tmp_path, pydicom):
    # Found by the property-based fuzzing: RescaleSlope 1e30 on an all-zero slice took the exact integer path
    # (every rescaled value fits int16) and overflowed NumPy's int64 arithmetic (OverflowError).
    from pocketseg.dicom import read_dicom_series

    _write_series(tmp_path / "s", n_slices=2, slope=1e30, intercept=0.0)
    for path in sorted((tmp_path / "s").iterdir()):
        ds = pydicom.dcmread(path)
        ds.PixelData = np.zeros((ds.Rows, ds.Columns), "<i2").tobytes()
        _save(ds, path)
    volume = read_dicom_series(tmp_path / "s")
    assert volume.data.dtype == np.float32 and not volume.data.any()


# ------------------------------------------------------------------------------------------------ study trees


def test_study_tree_scan_groups_names_and_skips(tmp_path, pydicom):
    from dicom_phantom import write_phantom_series
    from pocketseg.dicom import is_study_tree, read_tree_series, scan_study_tree

    tree = tmp_path / "tree"
    small = dict(columns=8, rows=6, slices=4)
    write_phantom_series(tree / "a" / "1", patient_id="P 1", series_number=2, **small)
    # The same patient, date and number twice (a re-export): both get a suffix of their own series UID.
    write_phantom_series(tree / "a" / "2", patient_id="P 1", series_number=2, **small)
    # Blank series UIDs (anonymised): grouped by folder, never merged across folders.
    write_phantom_series(tree / "b" / "x", patient_id="", study_date="", series_number=4, complete_uids=False,
                         **small)
    write_phantom_series(tree / "b" / "y", patient_id="", study_date="", series_number=5, complete_uids=False,
                         **small)
    write_phantom_series(tree / "c", patient_id="Q", series_number=1, modality="PT", **small)
    (tree / "DICOMDIR").write_bytes(b"not parsed")
    (tree / ".hidden").mkdir()
    assert is_study_tree(tree) and not is_study_tree(tree / "a" / "1")
    found = scan_study_tree(tree, threads=3)
    twins = sorted(s.case for s in found if s.case.startswith("P_1_20240131_s2"))
    assert len(twins) == 2 and all(re.fullmatch(r"P_1_20240131_s2_[0-9a-f]{8}", c) for c in twins)
    assert len(set(twins)) == 2
    assert sorted((s.case, s.n_files) for s in found if s.skipped is None and s.case not in twins) == [
        ("anonymous_nodate_s4", 4), ("anonymous_nodate_s5", 4)]
    skipped = [s for s in found if s.skipped]
    assert [(s.case, s.skipped) for s in skipped] == [("Q_20240131_s1", "modality PT, not CT")]
    blank = next(s for s in found if s.case == "anonymous_nodate_s5")
    assert blank.folder == tree / "b" / "y" and blank.uid == ""
    volume = read_tree_series(blank)
    assert volume.shape == (8, 6, 4) and len(volume.meta["files"]) == 4


def test_adding_a_series_to_a_tree_never_moves_another_series_name(tmp_path, pydicom):
    # A name taken from the order of the series would shift when a series is added, and --continue would then
    # take one patient's finished output for another's: each series' name depends on itself only.
    from dicom_phantom import write_phantom_series
    from pocketseg.dicom import scan_study_tree

    tree = tmp_path / "tree"
    small = dict(columns=8, rows=6, slices=4)
    write_phantom_series(tree / "b", patient_id="P 1", series_number=3, **small)
    write_phantom_series(tree / "c", patient_id="P/1", series_number=3, **small)  # the same safe name
    before = {s.folder.name: s.case for s in scan_study_tree(tree)}
    write_phantom_series(tree / "a", patient_id="P 1", series_number=3, **small)  # sorts first
    after = {s.folder.name: s.case for s in scan_study_tree(tree)}
    assert after["b"] == before["b"] and after["c"] == before["c"]
    assert len(set(after.values())) == 3


def test_info_lists_the_series_of_a_study_tree(tmp_path, pydicom, capsys):
    from dicom_phantom import write_phantom_series
    from pocketseg.cli import main

    tree = tmp_path / "tree"
    write_phantom_series(tree / "p" / "ct", columns=8, rows=6, slices=4, series_number=3)
    write_phantom_series(tree / "p" / "scout", columns=8, rows=6, slices=2, series_number=1,
                         image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    assert main(["info", str(tree)]) == 0
    out = capsys.readouterr().out
    assert "2 image series" in out and "case P001_20240131_s3" in out
    assert "skipped: localizer (ImageType LOCALIZER)" in out
