"""NIfTI reading and label-map writing (pocketseg.nifti).

* Reading: every orientation (RAS, LAS, LPS, permuted, oblique with shear) and
  dtype (int16, int32, float32, float64, uint8, little and big endian), with
  scl_slope/scl_inter, NIfTI-1 and NIfTI-2, ``.nii`` and ``.nii.gz``,
  multi-member gzip; ``read_nifti`` must give the same voxels and affine as
  nibabel's own ``nib.load``.
* Writing: ``write_labels`` keeps the reference's affine, shape, qform and sform
  (matrices and codes, raw header fields) for sform-only, qform-only, both
  (different codes) and neither; uint8 on disk; atomic on failure; overwrite rules.
* Bad input: each problem is one ``InputError`` naming the file and the problem.
* Real CT examples (``ct_examples`` fixture, skipped when absent): geometry,
  voxels identical to nibabel's, and a label map written for each reloads with
  an identical affine and shape.

Small volumes are built in each test; files are written with nibabel or, where
a header field must be set exactly (codes, scl_*, pixdim, byte order), byte by
byte with :func:`write_raw`.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import pocketseg.atomic
import pocketseg.nifti
from pocketseg.errors import InputError, OutputError
from pocketseg.nifti import read_nifti, write_labels, write_nifti
from pocketseg.imageio import load_volume
from pocketseg.volume import Volume

SHAPE = (5, 6, 7)  # all different, so any axis mix-up (C vs F order, transposes) shows
GEOMETRY_FIELDS = (
    "pixdim", "qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d",
    "qoffset_x", "qoffset_y", "qoffset_z", "srow_x", "srow_y", "srow_z",
)


# --------------------------------------------------------------------------- helpers


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def make_affine(orientation: str, zooms=(0.8, 0.9, 2.5), origin=(-120.0, 35.5, 210.25)) -> np.ndarray:
    aff = np.eye(4)
    if orientation == "RAS":
        aff[:3, :3] = np.diag(zooms)
    elif orientation == "LAS":
        aff[:3, :3] = np.diag([-zooms[0], zooms[1], zooms[2]])
    elif orientation == "LPS":
        aff[:3, :3] = np.diag([-zooms[0], -zooms[1], zooms[2]])
    elif orientation == "PIL":  # permuted axes: i -> posterior, j -> inferior, k -> left
        aff[:3, :3] = np.array([[0, 0, -zooms[2]], [-zooms[0], 0, 0], [0, -zooms[1], 0]])
    elif orientation == "oblique":
        aff[:3, :3] = rotation(0.25, -0.15, 0.4) @ np.diag(zooms)
    elif orientation == "oblique-shear":  # only an sform can hold a shear
        aff[:3, :3] = rotation(0.1, 0.05, -0.2) @ np.array([[zooms[0], 0.07, 0], [0, zooms[1], 0.02], [0, 0, zooms[2]]])
    else:
        raise ValueError(orientation)
    aff[:3, 3] = origin
    return aff


def ramp(shape=SHAPE, dtype=np.int16) -> np.ndarray:
    """Distinct, deterministic voxel values that fit ``dtype`` (uint8 wraps at 251)."""
    n = int(np.prod(shape))
    values = np.arange(n).reshape(shape)
    dtype = np.dtype(dtype)
    if dtype == np.uint8:
        return (values % 251).astype(dtype)
    if dtype.kind == "f":
        return (values * 1.25 - 1000.5).astype(dtype)
    return (values * 3 - 1000).astype(dtype)


def write_raw(path: Path, header: nib.Nifti1Header, data: np.ndarray) -> Path:
    """Write ``data`` with ``header``'s fields verbatim (nibabel's save resets scl_* and may set codes).

    The voxels are stored in the header's byte order; ``.gz`` names are gzip-compressed.
    """
    header = header.copy()
    header.set_data_shape(data.shape)
    header.set_data_dtype(data.dtype.newbyteorder("="))
    offset = 352 if header.sizeof_hdr == 348 else 544
    header["vox_offset"] = offset
    blob = header.binaryblock + b"\0" * (offset - header.sizeof_hdr)
    blob += np.asarray(data, dtype=header.get_data_dtype()).tobytes(order="F")
    if str(path).endswith(".gz"):
        blob = gzip.compress(blob, compresslevel=1)
    Path(path).write_bytes(blob)
    return Path(path)


def header_with(*, qform=None, qcode=0, sform=None, scode=0, zooms=None, nifti2=False, endian="<"):
    header = (nib.Nifti2Header if nifti2 else nib.Nifti1Header)(endianness=endian)
    header.set_data_shape(SHAPE)
    if qform is not None:
        header.set_qform(qform, qcode)
    header["qform_code"] = qcode
    if sform is not None:
        header.set_sform(sform, scode)
    header["sform_code"] = scode
    if zooms is not None:
        header["pixdim"][1:4] = zooms
    header.set_xyzt_units("mm", "sec")
    return header


def nib_read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(path)
    return np.asanyarray(img.dataobj), img.affine


def assert_same_as_nibabel(path: Path) -> Volume:
    vol = read_nifti(path)
    expected, affine = nib_read(path)
    assert vol.data.shape == expected.shape
    assert vol.data.dtype == expected.dtype.newbyteorder("=")  # same type; ours always in native byte order
    np.testing.assert_array_equal(vol.data, expected)
    np.testing.assert_array_equal(vol.affine, affine)
    assert vol.data.dtype.isnative
    assert vol.data.flags.writeable
    return vol


def assert_single_input_error(excinfo: pytest.ExceptionInfo, path: Path, *words: str) -> None:
    """One InputError, not chained to another traceback, naming the file and the problem."""
    err = excinfo.value
    assert type(err) is InputError
    assert err.path == str(path)
    assert str(path) in str(err)
    assert "\n" not in str(err)
    assert err.__cause__ is None
    assert err.__context__ is None or err.__suppress_context__
    problem = err.problem.lower()
    for word in words:
        assert word.lower() in problem, f"{word!r} not in {err.problem!r}"


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".part", ".old")))


# --------------------------------------------------------------------------- reading


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("orientation", ["RAS", "LAS", "LPS", "PIL", "oblique", "oblique-shear"])
def test_read_any_orientation_matches_nibabel(tmp_path, orientation, suffix):
    affine = make_affine(orientation)
    path = tmp_path / f"img{suffix}"
    nib.save(nib.Nifti1Image(ramp(), affine), path)
    vol = assert_same_as_nibabel(path)
    np.testing.assert_allclose(vol.affine, affine, atol=1e-4)  # float32 header round-off only
    assert vol.shape == SHAPE
    assert vol.source == path


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("endian", ["<", ">"])
@pytest.mark.parametrize("dtype", ["int16", "int32", "float32", "float64", "uint8"])
def test_read_any_dtype_and_byte_order_matches_nibabel(tmp_path, dtype, endian, suffix):
    path = tmp_path / f"img{suffix}"
    header = header_with(sform=make_affine("LPS"), scode=1, endian=endian)
    write_raw(path, header, ramp(dtype=dtype))
    raw = gzip.decompress(path.read_bytes()) if suffix == ".nii.gz" else path.read_bytes()
    assert raw[:4] == struct.pack(endian + "i", 348)  # the file really has that byte order
    vol = assert_same_as_nibabel(path)
    assert vol.data.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(vol.data, ramp(dtype=dtype))


@pytest.mark.parametrize("endian", ["<", ">"])
@pytest.mark.parametrize(
    ("dtype", "slope", "inter"),
    [("int16", 1.0, -1024.0), ("int16", 0.5, 10.0), ("uint8", 2.0, -3.0), ("int32", 0.25, 0.0), ("float32", 3.0, 1.5)],
)
def test_read_applies_scl_slope_and_inter(tmp_path, dtype, slope, inter, endian):
    path = tmp_path / "scaled.nii.gz"
    header = header_with(sform=make_affine("RAS"), scode=2, endian=endian)
    header["scl_slope"], header["scl_inter"] = slope, inter
    stored = ramp(dtype=dtype)
    write_raw(path, header, stored)
    vol = read_nifti(path)
    expected, affine = nib_read(path)
    assert vol.data.dtype.kind == "f"
    # Exactly representable slopes: the same numbers as nibabel (which computes in float64).
    np.testing.assert_array_equal(vol.data, expected)
    np.testing.assert_array_equal(vol.data, stored.astype(np.float64) * slope + inter)
    np.testing.assert_array_equal(vol.affine, affine)
    assert vol.data.flags.writeable


def test_read_inexact_slope_agrees_with_nibabel_to_float32_precision(tmp_path):
    path = tmp_path / "scaled.nii"
    header = header_with(sform=make_affine("RAS"), scode=2)
    header["scl_slope"], header["scl_inter"] = 0.1, -1024.0
    write_raw(path, header, ramp(dtype=np.int16))
    expected, _ = nib_read(path)
    got = read_nifti(path).data
    assert not np.array_equal(ramp(dtype=np.int16), got)  # scaling was applied
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("dtype", ["int16", "float64"])
def test_read_nifti2_matches_nibabel(tmp_path, suffix, dtype):
    path = tmp_path / f"img2{suffix}"
    nib.save(nib.Nifti2Image(ramp(dtype=dtype), make_affine("oblique")), path)
    assert isinstance(nib.load(path), nib.Nifti2Image)
    vol = assert_same_as_nibabel(path)
    assert isinstance(vol.header, nib.Nifti2Header)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_read_4d_with_one_volume_as_3d(tmp_path, suffix):
    path = tmp_path / f"single{suffix}"
    data = ramp()[..., None]
    nib.save(nib.Nifti1Image(data, make_affine("LAS")), path)
    assert nib.load(path).shape == (*SHAPE, 1)
    vol = read_nifti(path)
    assert vol.shape == SHAPE
    np.testing.assert_array_equal(vol.data, np.asanyarray(nib.load(path).dataobj)[..., 0])
    np.testing.assert_array_equal(vol.affine, nib.load(path).affine)


def test_read_3d_with_single_slice_stays_3d(tmp_path):
    path = tmp_path / "slab.nii.gz"
    nib.save(nib.Nifti1Image(ramp(shape=(5, 6, 1)), make_affine("RAS")), path)
    assert read_nifti(path).shape == (5, 6, 1)


def test_read_multi_member_gzip(tmp_path):
    """Several concatenated gzip members (as pigz/bgzip write): all are read, not only the first."""
    plain = tmp_path / "img.nii"
    nib.save(nib.Nifti1Image(ramp(dtype=np.float32), make_affine("LPS")), plain)
    blob = plain.read_bytes()
    cuts = [0, 100, 352, 700, len(blob)]
    multi = tmp_path / "multi.nii.gz"
    multi.write_bytes(b"".join(gzip.compress(blob[a:b]) for a, b in zip(cuts, cuts[1:])))
    vol = read_nifti(multi)
    np.testing.assert_array_equal(vol.data, ramp(dtype=np.float32))
    np.testing.assert_array_equal(vol.affine, nib.load(plain).affine)


def test_read_gzip_whose_trailer_size_hint_is_wrong(tmp_path):
    """The decompressed size hint (ISIZE of the last member) may be too big or small; data must not suffer."""
    plain = tmp_path / "img.nii"
    nib.save(nib.Nifti1Image(ramp(dtype=np.int32), make_affine("RAS")), plain)
    blob = plain.read_bytes()
    short_hint = tmp_path / "short.nii.gz"  # last member tiny: hint far below the real size
    short_hint.write_bytes(gzip.compress(blob) + gzip.compress(b""))
    np.testing.assert_array_equal(read_nifti(short_hint).data, ramp(dtype=np.int32))


def test_read_without_isal_reader_uses_gzip_module(tmp_path, monkeypatch):
    """Where isal (or its C reader) is missing, the stdlib decompressor gives the same result and errors."""
    monkeypatch.setattr(pocketseg.nifti, "_isal_zlib", None)
    path = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(ramp(dtype=np.float32), make_affine("LAS")), path)
    assert_same_as_nibabel(path)
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(InputError) as excinfo:
        read_nifti(cut)
    assert_single_input_error(excinfo, cut, "truncated")


def test_read_returns_independent_writeable_arrays(tmp_path):
    path = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(ramp(), make_affine("RAS")), path)
    first = read_nifti(path)
    first.data[0, 0, 0] = 1234
    assert read_nifti(path).data[0, 0, 0] == ramp()[0, 0, 0]


def test_read_uppercase_suffix(tmp_path):
    path = tmp_path / "IMG.NII.GZ"
    nib.save(nib.Nifti1Image(ramp(), make_affine("RAS")), tmp_path / "img.nii.gz")
    shutil.copy(tmp_path / "img.nii.gz", path)
    np.testing.assert_array_equal(load_volume(path).data, ramp())


# --------------------------------------------------------------------------- bad input


def test_error_missing_file(tmp_path):
    path = tmp_path / "nope.nii.gz"
    with pytest.raises(InputError) as excinfo:
        read_nifti(path)
    assert_single_input_error(excinfo, path, "does not exist")


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_error_empty_file(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")
    with pytest.raises(InputError) as excinfo:
        read_nifti(path)
    assert_single_input_error(excinfo, path, "empty")


def test_error_truncated_gzip(tmp_path):
    good = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(size=(20, 20, 20)).astype(np.float32), np.eye(4)), good)
    blob = good.read_bytes()
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(InputError) as excinfo:
        read_nifti(path)
    assert_single_input_error(excinfo, path, "truncated")


def test_error_corrupt_gzip_checksum(tmp_path):
    plain = tmp_path / "img.nii"
    nib.save(nib.Nifti1Image(ramp(), np.eye(4)), plain)
    blob = bytearray(gzip.compress(plain.read_bytes()))
    blob[-8:-4] = bytes(4 - i for i in range(4))  # wrong CRC32 in the trailer
    path = tmp_path / "crc.nii.gz"
    path.write_bytes(bytes(blob))
    with pytest.raises(InputError) as excinfo:
        read_nifti(path)
    assert_single_input_error(excinfo, path, "corrupt")


def test_error_text_file_named_nii_gz(tmp_path):
    path = tmp_path / "notes.nii.gz"
    path.write_text("these are not voxels\n" * 40)
    with pytest.raises(InputError) as excinfo:
        read_nifti(path)
    assert_single_input_error(excinfo, path, "not gzip")


@pytest.mark.parametrize(("text", "word"), [("short text\n", "too short"), ("a longer text file\n" * 60, "not a nifti")])
def test_error_text_file_named_nii(tmp_path, text, word):
    path = tmp_path / "notes.nii"
    path.write_text(text)
    with pytest.raises(InputError) as excinfo:
        read_nifti(path)
    assert_single_input_error(excinfo, path, word)


def test_error_truncated_uncompressed_voxels(tmp_path):
    good = tmp_path / "good.nii"
    nib.save(nib.Nifti1Image(ramp(), np.eye(4)), good)
    path = tmp_path / "cut.nii"
    path.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(InputError) as excinfo:
        read_nifti(path)
    assert_single_input_error(excinfo, path, "truncated")


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_error_2d_image(tmp_path, suffix):
    path = tmp_path / f"flat{suffix}"
    nib.save(nib.Nifti1Image(np.zeros((8, 9), np.int16), np.eye(4)), path)
    with pytest.raises(InputError) as excinfo:
        read_nifti(path)
    assert_single_input_error(excinfo, path, "2D", "3D")


def test_error_true_4d_image(tmp_path):
    path = tmp_path / "series.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((*SHAPE, 2), np.int16), np.eye(4)), path)
    with pytest.raises(InputError) as excinfo:
        read_nifti(path)
    assert_single_input_error(excinfo, path, "4D", "3D")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_error_non_finite_voxels(tmp_path, bad, dtype):
    path = tmp_path / "nan.nii.gz"
    data = ramp(dtype=dtype)
    data[1, 2, 3] = bad
    data[4, 0, 6] = bad
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    with pytest.raises(InputError) as excinfo:
        read_nifti(path)
    assert_single_input_error(excinfo, path, "2 nan or infinite")


def test_error_zero_spacing_in_pixdim(tmp_path):
    path = tmp_path / "zero.nii"
    header = header_with(qform=make_affine("RAS"), qcode=1)
    header["pixdim"][2] = 0.0  # written directly: nibabel would "fix" it to 1 on load
    write_raw(path, header, ramp())
    with pytest.raises(InputError) as excinfo:
        read_nifti(path)
    assert_single_input_error(excinfo, path, "spacing")


def test_error_zero_spacing_in_sform(tmp_path):
    path = tmp_path / "zero.nii.gz"
    sform = make_affine("RAS")
    sform[:3, 1] = 0.0  # j axis has no length
    write_raw(path, header_with(sform=sform, scode=2, zooms=(0.8, 0.9, 2.5)), ramp())
    with pytest.raises(InputError) as excinfo:
        read_nifti(path)
    assert_single_input_error(excinfo, path, "zero spacing")


@pytest.mark.parametrize("which", [1, 3])
@pytest.mark.parametrize("form", ["sform", "qform", "neither"])
def test_error_negative_spacing_in_pixdim(tmp_path, which, form):
    path = tmp_path / "negative.nii.gz"
    affine = make_affine("LPS")
    header = {
        "sform": lambda: header_with(sform=affine, scode=2, zooms=(0.8, 0.9, 2.5)),
        "qform": lambda: header_with(qform=affine, qcode=1),
        "neither": lambda: header_with(zooms=(0.8, 0.9, 2.5)),
    }[form]()
    header["pixdim"][which] = -abs(float(header["pixdim"][which]))  # the header field itself
    write_raw(path, header, ramp())
    with pytest.raises(InputError) as excinfo:
        read_nifti(path)
    assert_single_input_error(excinfo, path, "negative", "spacing")


def test_error_unsupported_voxel_type(tmp_path):
    path = tmp_path / "complex.nii"
    nib.save(nib.Nifti1Image(ramp().astype(np.complex64), np.eye(4)), path)
    with pytest.raises(InputError) as excinfo:
        read_nifti(path)
    assert_single_input_error(excinfo, path, "data type")


def test_error_is_a_folder(tmp_path):
    path = tmp_path / "folder.nii.gz"
    path.mkdir()
    with pytest.raises(InputError) as excinfo:
        read_nifti(path)
    assert_single_input_error(excinfo, path, "folder")


# --------------------------------------------------------------------------- writing


def reference_volume(tmp_path: Path, config: str, *, nifti2: bool = False, name: str = "ref.nii.gz") -> Volume:
    """A reference file with the given qform/sform set-up, read back with read_nifti."""
    q_aff = make_affine("oblique", origin=(-100.0, 50.0, 20.0))
    s_aff = make_affine("oblique-shear", origin=(10.0, -50.0, 25.5))
    kwargs = {
        "sform-only": dict(qform=q_aff, qcode=0, sform=s_aff, scode=1),  # qform matrix present, code 0
        "qform-only": dict(qform=q_aff, qcode=1, sform=s_aff, scode=0),
        "both-q1-s2": dict(qform=q_aff, qcode=1, sform=s_aff, scode=2),
        "both-q2-s4": dict(qform=q_aff, qcode=2, sform=s_aff, scode=4),
        "both-q1-s1-lps": dict(qform=make_affine("LPS"), qcode=1, sform=make_affine("LPS"), scode=1),
        "neither": dict(zooms=(0.8, 0.9, 2.5)),
    }[config]
    path = write_raw(tmp_path / name, header_with(nifti2=nifti2, **kwargs), ramp())
    stored = nib.load(path).header
    assert (int(stored["qform_code"]), int(stored["sform_code"])) == (kwargs.get("qcode", 0), kwargs.get("scode", 0))
    return read_nifti(path)


def labels_for(vol: Volume) -> np.ndarray:
    return (np.arange(vol.data.size).reshape(vol.shape) % 16).astype(np.uint8)


def assert_geometry_identical(written: Path, reference: Path | Volume) -> nib.Nifti1Image:
    out = nib.load(written)
    ref = nib.load(reference if isinstance(reference, Path) else reference.source)
    assert out.shape[:3] == ref.shape[:3] and len(out.shape) == 3
    np.testing.assert_array_equal(out.affine, ref.affine)
    for coded in (True, False):
        q_out, q_ref = out.header.get_qform(coded=coded), ref.header.get_qform(coded=coded)
        s_out, s_ref = out.header.get_sform(coded=coded), ref.header.get_sform(coded=coded)
        if coded:
            assert q_out[1] == q_ref[1] and s_out[1] == s_ref[1]  # the codes
            q_out, q_ref, s_out, s_ref = q_out[0], q_ref[0], s_out[0], s_ref[0]
        for a, b in ((q_out, q_ref), (s_out, s_ref)):
            assert (a is None) == (b is None)
            if a is not None:
                np.testing.assert_array_equal(a, b)
    for field in GEOMETRY_FIELDS:  # the raw fields, so nothing was recomputed or rounded
        np.testing.assert_array_equal(out.header[field], ref.header[field], err_msg=field)
    assert out.header.get_xyzt_units() == ref.header.get_xyzt_units()
    return out


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
@pytest.mark.parametrize("config", ["sform-only", "qform-only", "both-q1-s2", "both-q2-s4", "both-q1-s1-lps", "neither"])
def test_write_labels_keeps_exact_geometry(tmp_path, config, suffix):
    vol = reference_volume(tmp_path, config)
    labels = labels_for(vol)
    out_path = write_labels(labels, tmp_path / f"labels{suffix}", reference=vol)
    assert out_path == tmp_path / f"labels{suffix}"
    out = assert_geometry_identical(out_path, vol)
    assert out.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(out.dataobj), labels)
    assert np.asanyarray(out.dataobj).dtype == np.uint8  # no scaling to float on reload
    # and pocketseg reads its own output back with the same geometry
    back = read_nifti(out_path)
    np.testing.assert_array_equal(back.affine, vol.affine)
    np.testing.assert_array_equal(back.data, labels)


def test_write_labels_nifti2_reference_keeps_float64_geometry(tmp_path):
    vol = reference_volume(tmp_path, "both-q1-s2", nifti2=True)
    out_path = write_labels(labels_for(vol), tmp_path / "labels.nii.gz", reference=vol)
    assert isinstance(nib.load(out_path), nib.Nifti2Image)
    assert_geometry_identical(out_path, vol)


def test_write_labels_from_4d_single_volume_reference(tmp_path):
    path = tmp_path / "single.nii.gz"
    nib.save(nib.Nifti1Image(ramp()[..., None], make_affine("LAS")), path)
    vol = read_nifti(path)
    out = nib.load(write_labels(labels_for(vol), tmp_path / "labels.nii.gz", reference=vol))
    assert out.shape == SHAPE
    np.testing.assert_array_equal(out.affine, nib.load(path).affine)


@pytest.mark.parametrize("dtype", [np.int64, np.int16, bool, np.float32])
def test_write_labels_converts_to_uint8(tmp_path, dtype):
    vol = reference_volume(tmp_path, "both-q1-s1-lps")
    labels = labels_for(vol).astype(dtype)
    out = nib.load(write_labels(labels, tmp_path / "labels.nii.gz", reference=vol))
    assert out.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(out.dataobj), labels.astype(np.uint8))


def test_write_labels_rejects_out_of_range_and_wrong_shape(tmp_path):
    vol = reference_volume(tmp_path, "sform-only")
    bad = labels_for(vol).astype(np.int16)
    bad[0, 0, 0] = 300
    with pytest.raises(ValueError, match="0..255"):
        write_labels(bad, tmp_path / "a.nii.gz", reference=vol)
    with pytest.raises(ValueError, match="shape"):
        write_labels(np.zeros((5, 6, 8), np.uint8), tmp_path / "b.nii.gz", reference=vol)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.nii.gz"]


def test_write_labels_without_header_uses_volume_affine(tmp_path):
    affine = make_affine("oblique")
    vol = Volume(data=ramp(), affine=affine)  # e.g. from DICOM: no NIfTI header
    out = nib.load(write_labels(labels_for(vol), tmp_path / "labels.nii.gz", reference=vol))
    np.testing.assert_allclose(out.affine, affine, atol=1e-5)
    assert int(out.header["qform_code"]) == 1 and int(out.header["sform_code"]) == 1


def test_write_labels_ignores_a_header_that_no_longer_matches_the_affine(tmp_path):
    vol = reference_volume(tmp_path, "both-q1-s2")
    moved = vol.affine.copy()
    moved[:3, 3] += 7.0  # the volume was shifted after reading; its header is stale
    shifted = Volume(data=vol.data, affine=moved, header=vol.header)
    out = nib.load(write_labels(labels_for(vol), tmp_path / "labels.nii.gz", reference=shifted))
    np.testing.assert_allclose(out.affine, moved, atol=1e-4)


def test_write_nifti_with_affine_only(tmp_path):
    affine = make_affine("LPS")
    data = ramp(dtype=np.float32)
    out = nib.load(write_nifti(data, tmp_path / "img.nii", affine=affine))
    np.testing.assert_allclose(out.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(np.asanyarray(out.dataobj), data)
    with pytest.raises(ValueError, match="exactly one"):
        write_nifti(data, tmp_path / "x.nii", affine=affine, reference=Volume(data=data, affine=affine))
    with pytest.raises(OutputError, match=".nii"):
        write_nifti(data, tmp_path / "x.mha", affine=affine)


def test_write_refuses_existing_file_without_overwrite(tmp_path):
    vol = reference_volume(tmp_path, "sform-only")
    target = tmp_path / "labels.nii.gz"
    target.write_bytes(b"precious")
    with pytest.raises(OutputError, match="already exists"):
        write_labels(labels_for(vol), target, reference=vol)
    assert target.read_bytes() == b"precious"
    write_labels(labels_for(vol), target, reference=vol, overwrite=True)
    np.testing.assert_array_equal(np.asanyarray(nib.load(target).dataobj), labels_for(vol))
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("existing", [False, True])
def test_write_failure_in_compressor_leaves_nothing(tmp_path, monkeypatch, existing):
    vol = reference_volume(tmp_path, "both-q1-s2")
    target = tmp_path / "labels.nii.gz"
    if existing:
        target.write_bytes(b"previous result")

    class Broken(io.BytesIO):
        def write(self, payload):
            if self.tell() + len(payload) > 352:  # the header went through; the voxels kill it
                raise MemoryError("compressor died")
            return super().write(payload)

    monkeypatch.setattr(pocketseg.nifti, "gzip_writer", lambda fileobj: Broken())
    with pytest.raises(MemoryError):
        write_labels(labels_for(vol), target, reference=vol, overwrite=True)
    assert target.exists() == existing
    if existing:
        assert target.read_bytes() == b"previous result"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("existing", [False, True])
def test_write_failure_mid_write_or_rename_leaves_no_partial_file(tmp_path, monkeypatch, existing):
    vol = reference_volume(tmp_path, "qform-only")
    target = tmp_path / "labels.nii"
    if existing:
        target.write_bytes(b"previous result")
    calls = []

    def failing_fsync(fd):  # the payload is already in the temp file when this fires
        calls.append(os.fstat(fd).st_size)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pocketseg.atomic.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space"):
        write_labels(labels_for(vol), target, reference=vol, overwrite=True)
    assert calls and calls[0] > 352  # it failed mid-way, after writing voxels
    assert target.exists() == existing and (not existing or target.read_bytes() == b"previous result")
    assert leftovers(tmp_path) == []
    monkeypatch.undo()

    def failing_replace(src, dst):
        raise OSError(5, "I/O error")

    monkeypatch.setattr(pocketseg.atomic.os, "replace", failing_replace)
    with pytest.raises(OSError, match="I/O error"):
        write_labels(labels_for(vol), target, reference=vol, overwrite=True)
    assert target.exists() == existing and (not existing or target.read_bytes() == b"previous result")
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- real CT examples

REAL_EXAMPLES = {
    # file: (shape, spacing mm, orientation, dtype) as listed in the folder's NOTICE.md
    "example_ct.nii.gz": ((122, 101, 112), (3.0, 3.0, 3.0), "RAS", "int32"),
    "example_ct_sm.nii.gz": ((122, 101, 30), (3.0, 3.0, 3.0), "RAS", "int16"),
    "example_seg.nii.gz": ((122, 101, 30), (3.0, 3.0, 3.0), "RAS", "uint8"),
    "ct_lps_1p5mm.nii.gz": ((120, 126, 164), (1.5, 1.5, 1.5), "LPS", "int16"),
    "example_seg_dicom.nii.gz": ((512, 512, 20), (0.9765625, 0.9765625, 2.0), "LAS", "uint8"),
}


def real_file(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


@pytest.mark.parametrize("name", sorted(REAL_EXAMPLES))
def test_real_example_reads_like_nibabel(ct_examples, name):
    shape, spacing, orientation, dtype = REAL_EXAMPLES[name]
    vol = assert_same_as_nibabel(real_file(ct_examples, name))
    assert vol.shape == shape
    assert vol.spacing_mm == pytest.approx(spacing, abs=1e-6)
    assert vol.orientation == orientation
    assert str(vol.data.dtype) == dtype


@pytest.mark.parametrize("name", sorted(REAL_EXAMPLES))
def test_real_example_label_map_keeps_affine_and_shape(ct_examples, tmp_path, name):
    src = real_file(ct_examples, name)
    vol = read_nifti(src)
    if vol.data.dtype == np.uint8:  # a segmentation: write it back as the label map
        labels = vol.data
    else:
        labels = np.digitize(vol.data, [-500, 0, 100, 300]).astype(np.uint8)
    out_path = write_labels(labels, tmp_path / f"labels_{name}", reference=vol)
    out = assert_geometry_identical(out_path, src)
    assert out.shape == REAL_EXAMPLES[name][0]
    np.testing.assert_array_equal(np.asanyarray(out.dataobj), labels)


def test_real_truncated_gzip(ct_examples, tmp_path):
    blob = real_file(ct_examples, "example_ct_sm.nii.gz").read_bytes()
    path = tmp_path / "half.nii.gz"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(InputError) as excinfo:
        read_nifti(path)
    assert_single_input_error(excinfo, path, "truncated")


# --------------------------------------------------------------------------- benchmark script


def test_benchmark_script_runs_and_verifies(tmp_path, capsys):
    from pocketseg.benchmarks import nifti_read

    assert nifti_read.main(["--shape", "24x20x6", "--repeat", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "nifti_read.json").read_text())
    assert result["identical"] is True
    assert result["shape"] == [24, 20, 6] and result["dtype"] == "int16"
    assert result["ratio"] == pytest.approx(result["nibabel_s"] / result["read_nifti_s"])
    assert "speed ratio" in capsys.readouterr().out
    image, _, _ = nifti_read.make_volume((24, 20, 6))
    assert len(np.unique(image)) > 20  # CT-like range of values, not a constant block


# Found by the property-based fuzzing (tests/test_fuzz_cases.py): each escaped as another exception or
# read with a misleading message before.

def _header_file(path: Path, edit, *, endian: str = "<") -> Path:
    """A 2x2x2 int16 NIfTI-1 whose header ``edit`` changes after nibabel set it up (fields written as is)."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_data_shape((2, 2, 2))
    header.set_qform(np.diag([1.0, 1.0, 1.0, 1.0]), code=1)
    header["vox_offset"] = 352
    edit(header)
    data = np.arange(8, dtype=np.int16)
    if endian == ">":
        header, data = header.as_byteswapped(">"), data.astype(">i2")
    path.write_bytes(header.binaryblock + b"\0" * 4 + data.tobytes())
    return path


def test_error_qform_quaternion_outside_the_unit_sphere(tmp_path):
    # nibabel raised ValueError("w2 should be positive") from get_best_affine
    def edit(header):
        header["quatern_b"], header["quatern_c"] = 1.0, 1.0  # b² + c² + d² = 2 > 1: no rotation
    path = _header_file(tmp_path / "q.nii", edit)
    with pytest.raises(InputError) as excinfo:
        read_nifti(path)
    assert_single_input_error(excinfo, path, "has an invalid qform")


@pytest.mark.parametrize("inter", [np.inf, np.nan])
def test_error_usable_slope_with_a_non_finite_intercept(tmp_path, inter):
    # nibabel raised HeaderDataError("Valid slope but invalid intercept") from get_slope_inter
    def edit(header):
        header["scl_slope"], header["scl_inter"] = 2.0, inter
    path = _header_file(tmp_path / "s.nii", edit)
    with pytest.raises(InputError) as excinfo:
        read_nifti(path)
    assert_single_input_error(excinfo, path, "has an invalid intensity scaling")


@pytest.mark.parametrize("endian", ["<", ">"])
@pytest.mark.parametrize("dim0", [0, 8, -1])
def test_error_dim0_outside_1_to_7_is_named_not_misread(tmp_path, dim0, endian):
    # nibabel guesses the byte order from dim[0]; a little-endian file with dim[0] = 8 was read big-endian and
    # refused as "7D with shape (512, 512, 512, 256, ...)", a dim[0] of 0 as "1D with shape (0,)"
    path = _header_file(tmp_path / "d.nii", lambda h: h["dim"].__setitem__(0, dim0), endian=endian)
    with pytest.raises(InputError) as excinfo:
        read_nifti(path)
    assert_single_input_error(excinfo, path, f"dim[0] (the number of dimensions) is {dim0}, not 1..7")


@pytest.mark.parametrize("order", ["C", "F"])
def test_gzip_label_files_round_trip_in_either_layout_and_repeat_byte_for_byte(tmp_path, monkeypatch, order):
    """The .nii.gz is compressed as nibabel lays the voxels out; C- and F-ordered labels give the same
    file, and writing again later gives the same bytes (gzip mtime 0), so reruns change nothing."""
    import time as _time

    vol = reference_volume(tmp_path, "both-q1-s2")
    labels = np.asarray(labels_for(vol), order=order)
    first = write_labels(labels, tmp_path / "a.nii.gz", reference=vol)
    monkeypatch.setattr(_time, "time", lambda: 2_000_000_000.0)  # a later clock: nothing in the file follows it
    second = write_labels(np.asarray(labels, order="F" if order == "C" else "C"), tmp_path / "b.nii.gz", reference=vol)
    assert first.read_bytes() == second.read_bytes()
    assert gzip.decompress(first.read_bytes())[:4] in (struct.pack("<i", 348), struct.pack(">i", 348))
    np.testing.assert_array_equal(np.asanyarray(nib.load(first).dataobj), labels_for(vol))
