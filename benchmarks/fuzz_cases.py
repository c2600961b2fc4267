"""Property-based fuzzing of pocketseg's input edges with hypothesis: NIfTI files, DICOM series, manifests.

Each property draws one input (a NIfTI header and array, a DICOM tag set written as a small series, a
mutated manifest, a scan for the tiny package), writes it into a fresh temporary folder and hands it to
pocketseg's public entry point. The input must end in one of two ways:

- a result with the input's geometry: the volume's shape and affine are the ones the header or the tags
  describe (values finite, the grid non-degenerate), a manifest that is sound and survives a round trip, a
  label map with the input's shape and affine;
- a :class:`pocketseg.errors.PocketsegError` (one clear line), leaving no output file behind.

Any other exception is a bug; hypothesis then shrinks the input to a minimal example. Inputs that a reader
must refuse (a truncated file, a zero spacing, a missing slice) are also checked to be refused.

The module needs hypothesis (extra ``test``). ``tests/test_fuzz_cases.py`` runs every property with a small,
derandomised profile; ``python -m pocketseg.benchmarks.fuzz`` runs them longer.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pocketseg.errors import PocketsegError
from pocketseg.imageio import load_volume
from pocketseg.manifest import (CONTENT_DIGEST, MANIFEST_NAME, Intensity, Manifest, Network, Stage, content_digest,
                                load_package, read_manifest)
from pocketseg.nifti import read_nifti
from pocketseg.runtime.predict import predict
from pocketseg.synth.dicom_series import ct_slice, save_slice
from pocketseg.volume import canonical_zyx

__all__ = ["PROPERTIES", "fuzz_settings", "run_property"]

#: Absolute tolerance of affine comparisons, mm: the header stores float32 (quaternions, srows, pixdim).
AFFINE_ATOL = 1e-3

# ------------------------------------------------------------------------------------------------ shared values

#: Spacings (mm) a header may carry: ordinary ones, and the zero, negative and non-finite ones readers must refuse.
GOOD_SPACINGS = (0.5, 0.8, 1.0, 2.5, 5.0)
BAD_SPACINGS = (0.0, -1.0, float("nan"), float("inf"))


def _rotation(kind: str) -> np.ndarray:
    """Direction cosines (columns) of a voxel grid: axis-aligned, flipped, permuted or oblique."""
    if kind == "identity":
        return np.eye(3)
    if kind == "lps":
        return np.diag([-1.0, -1.0, 1.0])
    if kind == "permuted":  # coronal-like: j along z, k along y, flipped
        return np.array([[1.0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]])
    a, b = math.radians(30.0), math.radians(10.0)  # oblique: about z, then about x
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1.0]])
    rx = np.array([[1.0, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return rx @ rz


ROTATIONS = ("identity", "lps", "permuted", "oblique")


def _affine(rotation: str, spacing: tuple[float, float, float], offset: tuple[float, float, float]) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = _rotation(rotation) @ np.diag(spacing)
    out[:3, 3] = offset
    return out


def _geometry_ok(affine: np.ndarray) -> bool:
    return (affine.shape == (4, 4) and bool(np.all(np.isfinite(affine)))
            and np.allclose(affine[3], [0, 0, 0, 1]) and abs(float(np.linalg.det(affine[:3, :3]))) > 1e-9)


def _files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------------------------------------- NIfTI

DTYPES = ("uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "float32", "float64", "complex64")


@dataclass
class NiftiCase:
    """One NIfTI file to write: its header fields, its voxel array and how the file is damaged."""

    dims: tuple[int, ...]
    dtype: str
    data: np.ndarray
    spacing: tuple[float, float, float]
    qform_rotation: str
    qform_code: int
    sform_rotation: str
    sform_code: int
    sform_kind: str  # "regular", "degenerate" (a zero column) or "nan"
    offset: tuple[float, float, float]
    bad_spacing: tuple[int, float] | None  # (axis, value) written over pixdim after the qform
    bad_quatern: tuple[float, float, float] | None
    slope: float
    inter: float
    big_endian: bool
    gz: bool
    truncate: int  # bytes cut from the end
    dim0: int | None  # a wrong dim[0]

    def shape3(self) -> tuple[int, ...]:
        shape = tuple(self.dims)
        while len(shape) > 3 and shape[-1] == 1:
            shape = shape[:-1]
        return shape


@st.composite
def nifti_cases(draw, *, max_side: int = 5) -> NiftiCase:
    n_dims = draw(st.sampled_from((3,) * 6 + (4, 4, 2, 5)))
    dims = tuple(draw(st.integers(1, max_side)) for _ in range(n_dims))
    if n_dims >= 4 and draw(st.booleans()):
        dims = dims[:3] + (1,) * (n_dims - 3)  # trailing singleton dimensions: a 3D volume
    dtype = draw(st.sampled_from(DTYPES))
    count = int(np.prod(dims))
    if dtype == "complex64":
        data = np.zeros(count, np.complex64)
    else:
        data = draw(hnp.arrays(np.dtype(dtype), count))
    spacing = tuple(draw(st.sampled_from(GOOD_SPACINGS)) for _ in range(3))
    bad_spacing = None
    if draw(st.integers(0, 7)) == 0:
        bad_spacing = (draw(st.integers(0, 2)), draw(st.sampled_from(BAD_SPACINGS)))
    bad_quatern = None
    if draw(st.integers(0, 7)) == 0:
        bad_quatern = draw(st.sampled_from(((1.0, 1.0, 0.0), (float("nan"), 0.0, 0.0), (0.0, 2.0, 0.0))))
    slope, inter = draw(st.sampled_from((
        (1.0, 0.0), (1.0, 0.0), (0.0, 0.0), (2.0, -1024.0), (0.5, 0.25), (-1.0, 0.0), (float("nan"), 0.0),
        (1.0, float("inf")), (2.0, float("nan")), (float("inf"), 0.0), (1e38, 0.0))))
    return NiftiCase(
        dims=dims, dtype=dtype, data=data, spacing=spacing,  # type: ignore[arg-type]
        qform_rotation=draw(st.sampled_from(ROTATIONS)), qform_code=draw(st.sampled_from((0, 1, 1, 2, 7))),
        sform_rotation=draw(st.sampled_from(ROTATIONS)), sform_code=draw(st.sampled_from((0, 0, 1, 2, 7))),
        sform_kind=draw(st.sampled_from(("regular", "regular", "regular", "degenerate", "nan"))),
        offset=tuple(draw(st.sampled_from((0.0, -100.5, 250.0))) for _ in range(3)),  # type: ignore[arg-type]
        bad_spacing=bad_spacing, bad_quatern=bad_quatern, slope=slope, inter=inter,
        big_endian=draw(st.integers(0, 4)) == 0, gz=draw(st.booleans()),
        truncate=draw(st.sampled_from((0,) * 9 + (1, 100, 400))),
        dim0=draw(st.sampled_from((None,) * 15 + (0, 8, -1))))


def _sform(case: NiftiCase) -> np.ndarray:
    sform = _affine(case.sform_rotation, case.spacing, case.offset)
    if case.sform_kind == "degenerate":
        sform[:3, 1] = 0.0
    elif case.sform_kind == "nan":
        sform[0, 0] = float("nan")
    return sform


def write_nifti_case(case: NiftiCase, folder: Path) -> Path:
    """Write ``case`` as a single-file NIfTI-1 (``.nii`` or ``.nii.gz``); its header fields set one by one."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.dtype(case.dtype))
    header.set_data_shape(case.dims)
    header.set_qform(_affine(case.qform_rotation, case.spacing, case.offset), code=1)
    header["qform_code"] = case.qform_code  # written as is: nibabel's setter refuses unknown codes
    header["sform_code"] = case.sform_code
    sform = _sform(case)
    header["srow_x"], header["srow_y"], header["srow_z"] = sform[0], sform[1], sform[2]
    if case.bad_spacing is not None:
        header["pixdim"][1 + case.bad_spacing[0]] = case.bad_spacing[1]
    if case.bad_quatern is not None:
        header["quatern_b"], header["quatern_c"], header["quatern_d"] = case.bad_quatern
    header["scl_slope"], header["scl_inter"] = case.slope, case.inter
    if case.dim0 is not None:
        header["dim"][0] = case.dim0
    header["vox_offset"] = 352
    data = np.asarray(case.data)
    if case.big_endian:
        header = header.as_byteswapped(">")
        data = data.astype(data.dtype.newbyteorder(">"))
    payload = header.binaryblock + b"\0" * 4 + data.tobytes(order="F")
    if case.truncate:
        payload = payload[:max(len(payload) - case.truncate, 0)]
    path = folder / ("case.nii.gz" if case.gz else "case.nii")
    path.write_bytes(gzip.compress(payload, mtime=0) if case.gz else payload)
    return path


def _expected_nifti_affine(case: NiftiCase) -> np.ndarray | None:
    """The affine the header describes (NIfTI's rule: sform when its code is set, else qform), or None when the
    header is not one of the plain cases this function can predict."""
    if case.bad_quatern is not None or case.bad_spacing is not None:
        return None
    if case.sform_code in (1, 2):
        return _sform(case)
    if case.sform_code == 0 and case.qform_code in (1, 2):
        return _affine(case.qform_rotation, case.spacing, case.offset)
    return None


def _must_refuse_nifti(case: NiftiCase) -> str | None:
    """Why the reader has to refuse ``case`` (None: it may read it)."""
    shape = case.shape3()
    if case.truncate and case.dim0 is None:
        return "truncated"
    if case.dim0 is None and len(shape) != 3:
        return f"{len(shape)}D"
    if case.dtype == "complex64":
        return "complex voxels"
    if case.bad_spacing is not None:
        return "bad pixdim"
    if case.sform_code in (1, 2) and case.sform_kind != "regular":
        return "degenerate or non-finite sform"
    return None


def check_nifti_case(case: NiftiCase, folder: Path, package: Path | None = None) -> None:
    """Read ``case`` with :func:`pocketseg.imageio.load_volume`: a volume with the header's geometry or a
    :class:`PocketsegError`."""
    path = write_nifti_case(case, folder)
    try:
        volume = load_volume(path)
    except PocketsegError:
        return
    must = _must_refuse_nifti(case)
    assert must is None, f"read although it must be refused ({must})"
    assert volume.shape == case.shape3(), (volume.shape, case.dims)
    assert _geometry_ok(volume.affine), volume.affine
    expected = _expected_nifti_affine(case)
    if expected is not None:
        np.testing.assert_allclose(volume.affine, expected, atol=AFFINE_ATOL * max(1.0, np.abs(expected).max()))
    values = np.asarray(volume.data)
    assert values.dtype.kind in "iuf" and values.shape == volume.shape
    if values.dtype.kind == "f":
        assert np.isfinite(values).all()
    raw = np.asarray(case.data).reshape(volume.shape, order="F")
    scaled = math.isfinite(case.slope) and case.slope != 0 and (case.slope, case.inter) != (1.0, 0.0)
    # NIfTI's value = stored * scl_slope + scl_inter, the factors float32 as stored in the header
    expected_values = raw * np.float32(case.slope) + np.float32(case.inter) if scaled else raw
    np.testing.assert_allclose(values.astype(np.float64), np.asarray(expected_values, dtype=np.float64), rtol=1e-6)
    grid, spacing = canonical_zyx(volume)  # the geometry the pipeline derives from it
    assert sorted(grid.shape) == sorted(volume.shape) and all(s > 0 for s in spacing)


# --------------------------------------------------------------------------------------------------------- DICOM

ORIENTATIONS = {
    "axial": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    "coronal": (1.0, 0.0, 0.0, 0.0, 0.0, -1.0),
    "sagittal": (0.0, 1.0, 0.0, 0.0, 0.0, -1.0),
    "oblique": tuple(np.round(np.concatenate([_rotation("oblique")[:, 0], _rotation("oblique")[:, 1]]), 10)),
}
BAD_ORIENTATIONS = {
    "zero": (0.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    "not-unit": (2.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    "not-orthogonal": (1.0, 0.0, 0.0, 1.0, 0.0, 0.0),
    "nan": (float("nan"), 0.0, 0.0, 0.0, 1.0, 0.0),
    "five-values": (1.0, 0.0, 0.0, 0.0, 1.0),
}


@dataclass
class DicomCase:
    """One synthetic single-frame series and the ways it is damaged."""

    n_slices: int
    rows: int
    cols: int
    orientation: str
    pixel_spacing: tuple[float, ...]
    step: float
    origin: tuple[float, float, float]
    slope: float | None
    intercept: float | None
    thickness: float | None
    unsigned: bool
    stored: np.ndarray  # (n_slices, rows, cols)
    defect: str  # "none", "missing", "duplicate", "irregular", "shifted", "no-position", "nan-position",
    #              "other-size", "other-spacing"
    defect_slice: int = 0

    def iop(self) -> tuple[float, ...]:
        return ORIENTATIONS.get(self.orientation) or BAD_ORIENTATIONS[self.orientation]


DEFECTS = ("none",) * 6 + ("missing", "duplicate", "irregular", "shifted", "no-position", "nan-position",
                           "other-size", "other-spacing")


@st.composite
def dicom_cases(draw) -> DicomCase:
    n = draw(st.integers(1, 5))
    rows, cols = draw(st.integers(2, 5)), draw(st.integers(2, 5))
    unsigned = draw(st.booleans())
    info = np.iinfo(np.uint16 if unsigned else np.int16)
    stored = draw(hnp.arrays(np.uint16 if unsigned else np.int16, (n, rows, cols),
                             elements=st.integers(int(info.min), int(info.max))))
    orientation = draw(st.sampled_from(tuple(ORIENTATIONS) * 3 + tuple(BAD_ORIENTATIONS)))
    spacing = draw(st.sampled_from(((0.7, 0.9), (1.0, 1.0), (0.5, 2.0), (0.0, 1.0), (-1.0, 1.0),
                                    (float("nan"), 1.0), (float("inf"), 1.0), (1.0,))))
    slope, intercept = draw(st.sampled_from(((1.0, -1024.0), (1.0, 0.0), (2.0, -100.0), (0.5, -1024.25),
                                             (None, None), (0.0, 0.0), (float("nan"), 0.0), (1.0, float("inf")),
                                             (1e30, 0.0))))
    return DicomCase(
        n_slices=n, rows=rows, cols=cols, orientation=orientation, pixel_spacing=spacing,
        step=draw(st.sampled_from((2.5, -2.5, 1.0, -0.8, 5.0))),
        origin=draw(st.sampled_from(((-100.5, -50.25, 20.0), (0.0, 0.0, 0.0), (300.0, -200.0, -1200.5)))),
        slope=slope, intercept=intercept, thickness=draw(st.sampled_from((2.5, 5.0, None, 0.0, float("nan")))),
        unsigned=unsigned, stored=stored, defect=draw(st.sampled_from(DEFECTS)),
        defect_slice=draw(st.integers(0, max(n - 1, 0))))


def _normal(iop: tuple[float, ...]) -> np.ndarray:
    """The slice normal of a tag value (any axis for one that has none: the series is refused anyway)."""
    if len(iop) != 6:
        return np.array([0.0, 0.0, 1.0])
    o = np.asarray(iop, dtype=np.float64)
    n = np.cross(o[:3], o[3:])
    norm = np.linalg.norm(n)
    return n / norm if norm > 0 and np.isfinite(norm) else np.array([0.0, 0.0, 1.0])


def _positions(case: DicomCase) -> list[np.ndarray]:
    normal = _normal(case.iop())
    return [np.asarray(case.origin) + k * case.step * normal for k in range(case.n_slices)]


def _write_dicom_slice(path: Path, stored: np.ndarray, *, position, case: DicomCase, uid: str, instance: int,
                       pixel_spacing, rows: int, cols: int) -> None:
    ds = ct_slice(np.asarray(stored).astype(np.uint16 if case.unsigned else np.int16),
                  series_uid=uid, instance=instance,
                  position=None if position is None else [float(v) for v in position],
                  orientation=[float(v) for v in case.iop()], pixel_spacing=[float(v) for v in pixel_spacing],
                  slope=case.slope, intercept=case.intercept, thickness=case.thickness)
    ds.Rows, ds.Columns = rows, cols  # as the case says, which may disagree with the pixels on purpose
    save_slice(ds, path)


def write_dicom_case(case: DicomCase, folder: Path) -> tuple[Path, list[int], list[Any]]:
    """Write the series into ``folder/series``; returns the folder, the indices of the slices written in the
    order of their files, and the position each was written with."""
    series = folder / "series"
    series.mkdir()
    uid = f"2.25.{uuid.uuid4().int}"  # a UUID-derived UID (DICOM PS3.5, B.2)
    positions = _positions(case)
    written = list(range(case.n_slices))
    if case.defect == "missing" and case.n_slices >= 3:
        written.remove(1)  # a middle slice
    names = [f"s{k:03d}.dcm" for k in written]
    if case.defect == "duplicate":
        written.append(case.defect_slice)
        names.append("dup.dcm")
    normal = _normal(case.iop())
    in_plane = np.asarray(case.iop()[:3], dtype=np.float64) if len(case.iop()) >= 3 else np.zeros(3)
    used = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid values written on purpose
        for number, (k, name) in enumerate(zip(written, names)):
            position: Any = positions[k]
            spacing, rows, cols, stored = case.pixel_spacing, case.rows, case.cols, case.stored[k]
            if k == case.defect_slice and name != "dup.dcm":
                if case.defect == "irregular":
                    position = position + 0.4 * case.step * normal
                elif case.defect == "shifted":
                    position = position + 3.0 * in_plane
                elif case.defect == "no-position":
                    position = None
                elif case.defect == "nan-position":
                    position = np.array([float("nan"), 0.0, 0.0])
                elif case.defect == "other-size" and len(written) > 1:
                    rows, stored = rows + 1, np.concatenate([stored, stored[:1]])
                elif case.defect == "other-spacing" and len(spacing) == 2 and len(written) > 1:
                    spacing = (spacing[0] * 2, spacing[1])
            _write_dicom_slice(series / name, stored, position=position, case=case, uid=uid, instance=number + 1,
                               pixel_spacing=spacing, rows=rows, cols=cols)
            used.append(position)
    return series, written, used


def _must_refuse_dicom(case: DicomCase, written: list[int]) -> str | None:
    if case.orientation in BAD_ORIENTATIONS:
        return f"{case.orientation} orientation"
    if len(case.pixel_spacing) != 2 or not all(math.isfinite(v) and v > 0 for v in case.pixel_spacing):
        return "bad PixelSpacing"
    if case.defect in ("no-position", "nan-position") or (case.defect == "other-size" and len(written) > 1):
        return case.defect
    if case.defect == "other-spacing" and len(written) > 1:
        return case.defect
    if case.defect == "missing" and 1 not in written and len(written) >= 3:
        return "missing slice"  # (from three slices, two remain: a regular grid of twice the step)
    if case.defect == "irregular" and len(written) >= 3:
        return "irregular spacing"
    if case.defect == "duplicate":
        return "duplicated slice"
    if case.defect == "shifted" and len(written) > 1:
        return "in-plane shift"
    if len(written) == 1 and not (case.thickness is not None and math.isfinite(case.thickness)
                                  and case.thickness > 0):
        return "one slice without a thickness"
    return None


def check_dicom_case(case: DicomCase, folder: Path, package: Path | None = None) -> None:
    """Read the series with :func:`pocketseg.imageio.load_volume`: a volume with the tags' geometry and
    values, or a :class:`PocketsegError`."""
    series, written, positions = write_dicom_case(case, folder)
    try:
        volume = load_volume(series)
    except PocketsegError:
        return
    must = _must_refuse_dicom(case, written)
    assert must is None, f"read although it must be refused ({must})"
    assert volume.shape == (case.cols, case.rows, len(written)), (volume.shape, case)
    assert _geometry_ok(volume.affine), volume.affine
    values = np.asarray(volume.data)
    if values.dtype.kind == "f":
        assert np.isfinite(values).all()
    # the affine of the positions as written (lowest slice, normal x step), and the values slice by slice
    iop = np.asarray(case.iop(), dtype=np.float64)
    normal = _normal(case.iop())
    along = np.array([float(np.asarray(p) @ normal) for p in positions])
    order = np.argsort(along)
    lowest = positions[int(order[0])]
    step = (float(np.median(np.diff(along[order]))) if len(written) > 1
            else float(case.thickness))  # type: ignore[arg-type]
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * case.pixel_spacing[1]
    lps[:3, 1] = iop[3:] * case.pixel_spacing[0]
    lps[:3, 2] = normal * step
    lps[:3, 3] = lowest
    expected = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    np.testing.assert_allclose(volume.affine, expected, atol=AFFINE_ATOL * max(1.0, np.abs(expected).max()))
    slope = 1.0 if case.slope is None else case.slope
    intercept = 0.0 if case.intercept is None else case.intercept
    for k, index in enumerate(order):
        stored = case.stored[written[int(index)]].astype(np.float64)
        np.testing.assert_allclose(values[:, :, k].astype(np.float64), stored.T * slope + intercept,
                                   rtol=1e-6, atol=1e-3)


# ------------------------------------------------------------------------------------------------------ manifests

#: The made-up files of :func:`base_manifest`'s package: name -> content.
PACKAGE_FILES = {"roi.onnx": b"roi network", "detail.onnx": b"detail network"}


def base_manifest() -> Manifest:
    """A sound two-stage manifest of :data:`PACKAGE_FILES`, with their checksums."""
    def stage(name: str, classes: int) -> Stage:
        return Stage(name=name, preset=f"{name}-tiny", network=Network(4, ((3, 3, 3),) * 2, ((1, 1, 1), (2, 2, 2))),
                     num_classes=classes, spacing_mm_zyx=(2.5, 1.0, 1.0), patch_zyx=(16, 32, 32),
                     intensity=Intensity(80.0, 70.0, -110.0, 320.0), files={"onnx": f"{name}.onnx"})
    checksums = {name: hashlib.sha256(content).hexdigest() for name, content in PACKAGE_FILES.items()}
    return Manifest(stages={"roi": stage("roi", 2), "detail": stage("detail", 15)}, checksums=checksums)


JSON_LEAVES = (st.none() | st.booleans() | st.sampled_from((0, 1, -1, 2, 14, 15, 255, 256, 2**63, 0.5, -0.0))
               | st.integers() | st.floats() | st.text(max_size=6))
JSON_VALUES = st.recursive(JSON_LEAVES, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)


def _slots(data: Any, path: tuple = ()) -> Iterator[tuple]:
    """Every place in a JSON tree: paths of keys and indices."""
    if isinstance(data, dict):
        for key, value in data.items():
            yield path + (key,)
            yield from _slots(value, path + (key,))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            yield path + (index,)
            yield from _slots(value, path + (index,))


@dataclass
class ManifestCase:
    data: Any
    edits: list[str] = field(default_factory=list)
    redigest: bool = True


@st.composite
def manifest_cases(draw) -> ManifestCase:
    data: Any = json.loads(base_manifest().to_json())
    case = ManifestCase(data=data, redigest=draw(st.integers(0, 4)) > 0)
    for _ in range(draw(st.integers(1, 3))):
        slots = [s for s in _slots(case.data) if s and s[0] != CONTENT_DIGEST]
        if not slots or draw(st.integers(0, 9)) == 0:
            case.data = draw(JSON_VALUES)  # the whole document replaced
            case.edits.append("document")
            continue
        slot = draw(st.sampled_from(slots))
        parent = case.data
        for key in slot[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(("replace", "replace", "delete", "add")))
        if action == "delete":
            del parent[slot[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=6))] = draw(JSON_VALUES)
        else:
            parent[slot[-1]] = draw(JSON_VALUES)
        case.edits.append(f"{action} {'/'.join(map(str, slot))}")
    if case.redigest and isinstance(case.data, dict):
        case.data[CONTENT_DIGEST] = content_digest(case.data)
    return case


def check_manifest_case(case: ManifestCase, folder: Path, package: Path | None = None) -> None:
    """Read and load a package with ``case``'s manifest: a sound, round-tripping manifest or a
    :class:`PocketsegError`."""
    for name, content in PACKAGE_FILES.items():
        (folder / name).write_bytes(content)
    (folder / MANIFEST_NAME).write_text(json.dumps(case.data))
    try:
        manifest = read_manifest(folder)
    except PocketsegError:
        return
    assert manifest.problems() == []
    again = Manifest.from_dict(json.loads(manifest.to_json()))
    assert again == manifest, "the manifest does not survive a round trip"
    for item in asdict(manifest).values():
        json.dumps(item)  # every value is plain JSON again
    try:
        load_package(folder)
    except PocketsegError:
        return


# ----------------------------------------------------------------------------------------------------- prediction

@st.composite
def prediction_cases(draw) -> NiftiCase:
    """Small scans in any orientation and spacing, one in four damaged (a NaN voxel, a truncated file, a zero
    spacing: refused, with no output left behind), for a prediction with a tiny package."""
    damage = draw(st.sampled_from((None, None, None, "nan-voxel", "truncated", "zero-spacing")))
    dims = tuple(draw(st.sampled_from((1, 2, 7, 12, 20))) for _ in range(3))
    if draw(st.booleans()):
        dims = dims + (1,)
    count = int(np.prod(dims))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    data = rng.integers(-1000, 1500, count).astype(np.float32 if damage == "nan-voxel" else np.int16)
    if damage == "nan-voxel":
        data[count // 2] = np.nan
    spacing = tuple(draw(st.sampled_from((0.7, 1.0, 2.5, 5.0))) for _ in range(3))
    rotation = draw(st.sampled_from(ROTATIONS))
    return NiftiCase(dims=dims, dtype=str(data.dtype), data=data, spacing=spacing,  # type: ignore[arg-type]
                     qform_rotation=rotation, qform_code=1, sform_rotation=rotation,
                     sform_code=draw(st.sampled_from((0, 1))), sform_kind="regular", offset=(-100.5, 20.0, 250.0),
                     bad_spacing=(1, 0.0) if damage == "zero-spacing" else None, bad_quatern=None,
                     slope=draw(st.sampled_from((1.0, 0.5))), inter=0.0, big_endian=False, gz=True,
                     truncate=100 if damage == "truncated" else 0, dim0=None)


def check_prediction_case(case: NiftiCase, folder: Path, package: Path | None) -> None:
    """Predict ``case`` with ``package``: a label map with the input's shape and affine, or a
    :class:`PocketsegError` and no output file."""
    if package is None:
        raise ValueError("the prediction property needs a model package")
    path = write_nifti_case(case, folder)
    out = folder / "out"
    try:
        predict(path, out / "labels.nii.gz", package, check_intensities=False, progress=False, statistics=True)
    except PocketsegError:
        assert not out.exists() or not _files_under(out), f"output left behind: {sorted(_files_under(out))}"
        return
    assert _must_refuse_nifti(case) is None and not np.isnan(case.data).any(), "predicted a damaged scan"
    source = read_nifti(path)
    labels = read_nifti(out / "labels.nii.gz")
    assert labels.shape == source.shape, (labels.shape, source.shape)
    np.testing.assert_array_equal(labels.affine, source.affine)


# ---------------------------------------------------------------------------------------------------- the runner

@dataclass(frozen=True)
class Property:
    strategy: Callable[[], st.SearchStrategy]
    check: Callable[[Any, Path, Path | None], None]
    needs_package: bool = False
    needs: str | None = None  # an optional module it needs


PROPERTIES: dict[str, Property] = {
    "nifti": Property(nifti_cases, check_nifti_case),
    "dicom": Property(dicom_cases, check_dicom_case, needs="pydicom"),
    "manifest": Property(manifest_cases, check_manifest_case),
    "predict": Property(prediction_cases, check_prediction_case, needs_package=True, needs="onnxruntime"),
}


def fuzz_settings(max_examples: int, *, derandomize: bool = True) -> settings:
    """Hypothesis settings of a run: no deadline (file I/O on busy machines), no example database (a run is
    reproducible from its settings alone), derandomised unless asked otherwise."""
    return settings(max_examples=max_examples, deadline=None, derandomize=derandomize, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much], print_blob=False)


def run_property(name: str, max_examples: int, *, package: Path | None = None, derandomize: bool = True) -> None:
    """Run one property with ``max_examples`` inputs; raises (with hypothesis's minimal example) on a failure."""
    prop = PROPERTIES[name]

    @fuzz_settings(max_examples, derandomize=derandomize)
    @given(prop.strategy())
    def holds(case: Any) -> None:
        with tempfile.TemporaryDirectory(prefix=f"pocketseg-fuzz-{name}-") as tmp:
            prop.check(case, Path(tmp), package)

    holds()
