"""DICOM series reading: one folder of single-frame slices -> one :class:`Volume`.

Geometry comes only from each slice's ImagePositionPatient (IPP) and
ImageOrientationPatient (IOP): slices are ordered and spaced by their IPP
projected on the slice normal, never by SliceThickness, InstanceNumber,
SliceLocation or file names, because those are often wrong or merely
informative (thickness 3 mm reconstructed every 2 mm, renumbered exports,
anonymised file names). A series whose positions do not describe one regular
grid (missing or duplicated slice, mixed orientations or matrix sizes) is
rejected instead of being silently resampled onto a wrong one.

Conventions (see :mod:`pocketseg.types`): DICOM patient coordinates are LPS;
``IOP[:3]`` is the direction in which the column index increases along a row,
``IOP[3:]`` the direction in which the row index increases, and
``PixelSpacing = [between rows, between columns]``. ``pixel_array`` is
``(rows, cols)``, so each slice is transposed to get ``(i, j) = (column, row)``;
k counts slices in ascending order along the normal ``IOP[:3] x IOP[3:]``.
The LPS affine is turned into RAS+ by negating its x and y rows.

pydicom (extra ``dicom``) is imported lazily so the rest of the package works
without it; compressed transfer syntaxes (JPEG 2000, JPEG-LS, ...) further need
the pylibjpeg plugins of the same extra.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

import numpy as np

from pocketseg.errors import InputError, MissingDependencyError
from pocketseg.layout import is_nifti_path
from pocketseg.volume import Volume

log = logging.getLogger(__name__)

#: Slices closer than this along the normal are the same position (mm).
DUPLICATE_TOL_MM = 1e-3
#: A step larger than this multiple of the median spacing means a missing slice.
GAP_FACTOR = 1.5
#: Largest allowed relative deviation of any step from the median spacing.
SPACING_REL_TOL = 0.10
#: Largest allowed difference between the direction cosines of two slices.
ORIENTATION_TOL = 1e-4
#: Largest allowed difference between the pixel spacings of two slices (mm).
PIXEL_SPACING_TOL_MM = 1e-4
#: Largest allowed in-plane offset of a slice from the line through the first
#: one along the normal, as a fraction of the smallest pixel spacing (gantry tilt).
IN_PLANE_SHIFT_FRACTION = 0.1

_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
_INT16 = np.iinfo(np.int16)


@dataclass(frozen=True)
class SeriesInfo:
    """One image series found in a folder, as a CLI would list it.

    ``uid`` is the SeriesInstanceUID; it is ``""`` for files that lack one
    (some anonymisers blank it), and ``series_uid=""`` selects that group.
    """

    uid: str
    description: str
    n_files: int
    modality: str


@dataclass(frozen=True)
class _Header:
    """What the first pass keeps of one file: enough to group, order and validate."""

    path: Path
    series_uid: str
    description: str
    modality: str
    rows: int | None
    columns: int | None
    position: tuple[float, ...] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, ...] | None
    slice_thickness: float | None
    n_frames: int
    samples_per_pixel: int
    image_type: tuple[str, ...] = ()
    patient_id: str = ""
    study_date: str = ""
    series_number: int | None = None


def _import_pydicom() -> tuple[ModuleType, type[Exception]]:
    """pydicom and its InvalidDicomError, or the package's missing-dependency error."""
    try:  # optional (dicom extra): a missing pydicom is named with its extra
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError:
        raise MissingDependencyError("pydicom", "Reading DICOM series", "dicom") from None
    return pydicom, InvalidDicomError


def _floats(ds: Any, keyword: str) -> tuple[float, ...] | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    # Multi-valued elements (MultiValue) iterate; single DS/IS values are floats or ints.
    items = [value] if isinstance(value, (str, bytes, int, float)) else value
    try:
        return tuple(float(v) for v in items)
    except (TypeError, ValueError):
        return None


def _float_or_none(ds: Any, keyword: str) -> float | None:
    values = _floats(ds, keyword)
    return values[0] if values else None


def _int_or_none(ds: Any, keyword: str) -> int | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _candidate_files(folder: Path) -> list[Path]:
    """Plain, non-hidden files directly in ``folder`` (any suffix), DICOMDIR excluded."""
    files = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.name.upper() == "DICOMDIR":
            log.debug("skipping %s: DICOMDIR index file", entry)
            continue
        if entry.is_file():
            files.append(entry)
    return files


def _scan_headers(folder: Path) -> list[_Header]:
    """First pass: read every file's header (no pixel data) and keep the image files."""
    pydicom, invalid_dicom_error = _import_pydicom()
    if not folder.exists():
        raise InputError(folder, "does not exist")
    if not folder.is_dir():
        raise InputError(folder, "is not a folder; a DICOM series folder is expected")
    try:
        files = _candidate_files(folder)
    except OSError as exc:
        raise InputError(folder, f"cannot be listed ({exc.strerror or exc})") from None

    return [h for h in (_read_header(path, pydicom, invalid_dicom_error) for path in files) if h is not None]


def _text(ds: Any, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip()


def _read_header(path: Path, pydicom: ModuleType, invalid_dicom_error: type[Exception]) -> _Header | None:
    """One file's header (no pixel data), or None for a file that is not a DICOM image (logged)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except invalid_dicom_error:
        log.debug("skipping %s: not a DICOM file", path)
        return None
    except Exception as exc:  # truncated or malformed: any parser error
        log.warning("skipping %s: unreadable DICOM header (%s)", path, exc)
        return None
    meta = getattr(ds, "file_meta", None)
    sop_class = str(getattr(meta, "MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", "") or "")
    if sop_class == _DICOMDIR_SOP_CLASS:
        log.debug("skipping %s: DICOMDIR index file", path)
        return None
    rows, columns = _int_or_none(ds, "Rows"), _int_or_none(ds, "Columns")
    if not rows or not columns:
        # No Image Pixel module: structured report, RT structure set, presentation state, ...
        log.debug("skipping %s: DICOM file without an image (no Rows/Columns)", path)
        return None
    image_type = ds.get("ImageType") or ()
    image_type = (image_type,) if isinstance(image_type, str) else tuple(str(v) for v in image_type)
    return _Header(
        path=path,
        series_uid=_text(ds, "SeriesInstanceUID"),
        description=_text(ds, "SeriesDescription"),
        modality=_text(ds, "Modality"),
        rows=rows,
        columns=columns,
        position=_floats(ds, "ImagePositionPatient"),
        orientation=_floats(ds, "ImageOrientationPatient"),
        pixel_spacing=_floats(ds, "PixelSpacing"),
        slice_thickness=_float_or_none(ds, "SliceThickness"),
        n_frames=_int_or_none(ds, "NumberOfFrames") or 1,
        samples_per_pixel=_int_or_none(ds, "SamplesPerPixel") or 1,
        image_type=tuple(v.strip().upper() for v in image_type),
        patient_id=_text(ds, "PatientID"),
        study_date=_text(ds, "StudyDate"),
        series_number=_int_or_none(ds, "SeriesNumber"),
    )


def _group(headers: Sequence[_Header]) -> dict[str, list[_Header]]:
    groups: dict[str, list[_Header]] = {}
    for header in headers:
        groups.setdefault(header.series_uid, []).append(header)
    return groups


def _info(uid: str, members: Sequence[_Header]) -> SeriesInfo:
    first = members[0]
    return SeriesInfo(uid=uid, description=first.description, n_files=len(members), modality=first.modality)


def _describe(infos: Sequence[SeriesInfo]) -> str:
    lines = []
    for info in infos:
        uid = info.uid if info.uid else '"" (no SeriesInstanceUID)'
        description = info.description or "(no description)"
        lines.append(f"  {uid}  {description!r}  {info.modality or '?'}  {info.n_files} file(s)")
    return "\n".join(lines)


def list_series(folder: str | os.PathLike) -> list[SeriesInfo]:
    """The image series in ``folder`` (not recursive), largest first.

    Non-DICOM files, hidden files, DICOMDIR and DICOM files without an image
    are ignored; a folder without any image series gives an empty list.
    """
    groups = _group(_scan_headers(Path(folder)))
    infos = [_info(uid, members) for uid, members in groups.items()]
    infos.sort(key=lambda info: (-info.n_files, info.uid))
    return infos


def _no_series(folder: Path) -> str:
    """Why ``folder`` holds no DICOM image series, as the user would describe its content."""
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")] if folder.is_dir() else []
    if not entries:
        return "is empty: expected the files of one DICOM series"
    nifti = [p for p in entries if p.is_file() and is_nifti_path(p)]
    if nifti:
        return (f"holds NIfTI files ({nifti[0].name}{', ...' if len(nifti) > 1 else ''}), not a DICOM series: give one "
                "NIfTI file, or the folder to `pocketseg predict`, which segments every NIfTI file in it")
    subfolders = sorted(p for p in entries if p.is_dir())
    if subfolders:
        return (f"holds no DICOM image files itself but {len(subfolders)} sub-folder(s) ({subfolders[0].name}"
                f"{', ...' if len(subfolders) > 1 else ''}): give one series folder; `pocketseg predict` and "
                "`pocketseg info` take such a study tree and search its sub-folders")
    return f"contains no DICOM image files ({len(entries)} file(s), none of them a DICOM image)"


def _choose_series(folder: Path, headers: Sequence[_Header], series_uid: str | None) -> tuple[str, list[_Header]]:
    if not headers:
        raise InputError(folder, _no_series(folder))
    groups = _group(headers)
    infos = sorted((_info(uid, members) for uid, members in groups.items()), key=lambda i: (-i.n_files, i.uid))
    if series_uid is not None:
        wanted = series_uid.strip()
        if wanted not in groups:
            raise InputError(
                folder,
                f"has no series with SeriesInstanceUID {series_uid!r}; the series present are:\n{_describe(infos)}",
            )
        return wanted, groups[wanted]
    if len(groups) > 1:
        raise InputError(
            folder,
            f"holds {len(groups)} DICOM series; choose one with --series-uid UID (series_uid= from Python):\n"
            f"{_describe(infos)}",
        )
    uid = next(iter(groups))
    return uid, groups[uid]


def _unit_orientation(folder: Path, header: _Header) -> tuple[np.ndarray, np.ndarray]:
    if header.orientation is None or len(header.orientation) != 6 or not np.all(np.isfinite(header.orientation)):
        raise InputError(folder, f"{header.path.name} has no valid ImageOrientationPatient (6 finite direction "
                                 f"cosines): {None if header.orientation is None else list(header.orientation)}")
    row_dir = np.asarray(header.orientation[:3], dtype=np.float64)
    col_dir = np.asarray(header.orientation[3:], dtype=np.float64)
    norms = (np.linalg.norm(row_dir), np.linalg.norm(col_dir))
    if min(norms) < 1e-6 or abs(norms[0] - 1) > 1e-2 or abs(norms[1] - 1) > 1e-2:
        raise InputError(
            folder,
            f"{header.path.name} has ImageOrientationPatient vectors that are not unit length: "
            f"{list(header.orientation)}",
        )
    row_dir, col_dir = row_dir / norms[0], col_dir / norms[1]
    if abs(float(row_dir @ col_dir)) > 1e-2:
        raise InputError(
            folder, f"{header.path.name} has non-orthogonal ImageOrientationPatient vectors: {list(header.orientation)}"
        )
    return row_dir, col_dir


def _check_consistent(folder: Path, members: Sequence[_Header]) -> None:
    """Every slice has the tags geometry needs, and all share matrix, spacing and orientation."""
    first = members[0]
    for header in members:
        name = header.path.name
        if header.n_frames > 1:
            raise InputError(
                folder,
                f"{name} is a multi-frame (enhanced) DICOM image with {header.n_frames} frames; "
                "only single-frame series are supported",
            )
        if header.samples_per_pixel != 1:
            raise InputError(
                folder,
                f"{name} has {header.samples_per_pixel} samples per pixel (colour image); "
                "a greyscale CT series is expected",
            )
        # NaN passes every comparison, so finiteness is checked first: a NaN or infinite tag would give a
        # non-finite affine.
        if header.position is None or len(header.position) != 3 or not np.all(np.isfinite(header.position)):
            raise InputError(folder, f"{name} has no valid ImagePositionPatient (3 finite coordinates): "
                                     f"{None if header.position is None else list(header.position)}")
        if (header.pixel_spacing is None or len(header.pixel_spacing) != 2
                or not np.all(np.isfinite(header.pixel_spacing)) or min(header.pixel_spacing) <= 0):
            raise InputError(folder, f"{name} has no valid PixelSpacing (2 positive finite spacings): "
                                     f"{None if header.pixel_spacing is None else list(header.pixel_spacing)}")
        _unit_orientation(folder, header)
        if (header.rows, header.columns) != (first.rows, first.columns):
            raise InputError(
                folder,
                f"slices differ in size: {first.path.name} is {first.rows}x{first.columns} (rows x columns), "
                f"{name} is {header.rows}x{header.columns}",
            )
        if not np.allclose(header.pixel_spacing, first.pixel_spacing, rtol=0, atol=PIXEL_SPACING_TOL_MM):
            raise InputError(
                folder,
                f"slices differ in PixelSpacing: {first.path.name} has {list(first.pixel_spacing)} mm, "
                f"{name} has {list(header.pixel_spacing)} mm",
            )
        if not np.allclose(header.orientation, first.orientation, rtol=0, atol=ORIENTATION_TOL):
            raise InputError(
                folder,
                f"slices differ in ImageOrientationPatient: {first.path.name} has {list(first.orientation)}, "
                f"{name} has {list(header.orientation)}",
            )


def _order_slices(folder: Path, members: Sequence[_Header]) -> tuple[list[_Header], float, np.ndarray]:
    """Slices sorted ascending along the normal, the slice spacing (mm) and the unit normal.

    Rejects duplicated positions, missing slices, irregular spacing and slices
    shifted in-plane (gantry tilt), none of which fits one affine grid.
    """
    row_dir, col_dir = _unit_orientation(folder, members[0])
    normal = np.cross(row_dir, col_dir)
    normal /= np.linalg.norm(normal)
    if len(members) == 1:
        # One slice (as a one-slice NIfTI is read): its extent along the normal can only come from SliceThickness.
        thickness = members[0].slice_thickness
        if thickness is None or not np.isfinite(thickness) or thickness <= 0:
            raise InputError(folder, f"the series has a single slice ({members[0].path.name}) without a positive "
                                     "SliceThickness, so its extent along the slice normal is unknown")
        return list(members), float(thickness), normal
    positions = np.array([h.position for h in members], dtype=np.float64)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    ordered = [members[i] for i in order]
    along = along[order]
    positions = positions[order]

    steps = np.diff(along)
    duplicates = np.flatnonzero(steps < DUPLICATE_TOL_MM)
    if duplicates.size:
        i = int(duplicates[0])
        raise InputError(
            folder,
            f"{ordered[i].path.name} and {ordered[i + 1].path.name} are at the same position "
            f"({along[i]:.3f} mm along the slice normal): duplicated slices "
            f"({duplicates.size} duplicate(s) in all; is the same series exported twice?)",
        )
    spacing = float(np.median(steps))
    relative = np.abs(steps - spacing) / spacing
    bad = np.flatnonzero((steps > GAP_FACTOR * spacing) | (relative > SPACING_REL_TOL))
    if bad.size:
        details = ", ".join(f"{steps[i]:.3f} mm between {along[i]:.3f} and {along[i + 1]:.3f}" for i in bad[:5])
        more = f" and {bad.size - 5} more" if bad.size > 5 else ""
        missing = " (a slice may be missing)" if np.any(steps[bad] > GAP_FACTOR * spacing) else ""
        raise InputError(
            folder,
            f"slice spacing is not uniform{missing}: median step {spacing:.3f} mm along the slice normal, "
            f"but {details}{more} (positions in mm along the normal)",
        )

    expected = positions[0] + np.outer(along - along[0], normal)
    shift = np.linalg.norm(positions - expected, axis=1)
    limit = IN_PLANE_SHIFT_FRACTION * min(members[0].pixel_spacing or (1.0,))
    if float(shift.max()) > limit:
        worst = int(np.argmax(shift))
        raise InputError(
            folder,
            f"slice positions do not lie along the slice normal ({ordered[worst].path.name} is shifted "
            f"{shift[worst]:.3f} mm in-plane, gantry tilt?); such sheared series are not supported",
        )
    return ordered, spacing, normal


def _affine(first: _Header, spacing: float, normal: np.ndarray, row_dir: np.ndarray, col_dir: np.ndarray) -> np.ndarray:
    """Voxel (column, row, slice) -> RAS+ mm, from the lowest slice's position."""
    between_rows, between_columns = first.pixel_spacing  # type: ignore[misc]
    lps = np.eye(4)
    lps[:3, 0] = row_dir * between_columns
    lps[:3, 1] = col_dir * between_rows
    lps[:3, 2] = normal * spacing
    lps[:3, 3] = first.position  # type: ignore[assignment]
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _read_pixels(folder: Path, header: _Header) -> tuple[np.ndarray, float, float]:
    """Stored pixel values (rows, cols) of one slice and its rescale slope/intercept."""
    pydicom, _ = _import_pydicom()
    try:
        ds = pydicom.dcmread(header.path)
    except Exception as exc:
        raise InputError(header.path, f"cannot be read as DICOM ({exc})") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise InputError(header.path, "has no pixel data")
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        meta = getattr(ds, "file_meta", None)
        syntax = getattr(meta, "TransferSyntaxUID", None)
        syntax_name = getattr(syntax, "name", str(syntax))
        text = str(exc).lower()
        # pydicom 3: "... all plugins are missing dependencies"; 2.x: "... missing required dependencies".
        if "missing" in text and "dependenc" in text:
            log.warning("%s: pydicom cannot decode %s: %s", header.path, syntax_name, exc)
            package = "pylibjpeg-openjpeg" if "2000" in str(syntax_name) else "pylibjpeg"
            feature = f"Decoding DICOM pixel data compressed as {syntax_name}"
            raise MissingDependencyError(package, feature, "dicom") from None
        raise InputError(header.path, f"pixel data cannot be decoded ({syntax_name}: {exc})") from None
    pixels = np.asarray(pixels)
    if pixels.shape != (header.rows, header.columns):
        raise InputError(
            header.path,
            f"pixel data has shape {pixels.shape}, expected {header.rows}x{header.columns} (rows x columns)",
        )
    slope = _float_or_none(ds, "RescaleSlope")
    intercept = _float_or_none(ds, "RescaleIntercept")
    return pixels, 1.0 if slope is None else slope, 0.0 if intercept is None else intercept


def _is_integral(value: float) -> bool:
    return float(value).is_integer()


def _stack(folder: Path, ordered: Sequence[_Header]) -> np.ndarray:
    """Rescaled slices as one (column, row, slice) array: int16 when exact, else float32."""
    slices = [_read_pixels(folder, header) for header in ordered]
    # A whole slope of 1e30 would overflow NumPy's int64 arithmetic (OverflowError) even where every rescaled
    # value fits (all pixels 0): such factors take the float path, which gives the same finite values.
    integral = all(
        pixels.dtype.kind in "iu" and _is_integral(slope) and _is_integral(intercept)
        and abs(slope) <= _INT16.max and abs(intercept) <= 2 ** 31
        for pixels, slope, intercept in slices
    )
    if integral:  # exact in int16 only if every slice's rescaled range fits
        ends = [int(end) * int(slope) + int(intercept) for pixels, slope, intercept in slices
                for end in (pixels.min(), pixels.max())]
        integral = _INT16.min <= min(ends) and max(ends) <= _INT16.max
    dtype = np.int16 if integral else np.float32
    rows, columns = slices[0][0].shape
    data = np.empty((columns, rows, len(slices)), dtype=dtype)
    for k, (pixels, slope, intercept) in enumerate(slices):
        if integral:
            values = pixels.astype(np.int64) * int(slope) + int(intercept)
        else:
            values = pixels.astype(np.float64) * slope + intercept
        data[:, :, k] = values.T
    if dtype == np.float32 and not np.isfinite(data).all():
        raise InputError(folder, "rescaled pixel values contain NaN or infinity")
    return data


def _grid(root: Path, members: Sequence[_Header]) -> tuple[list[_Header], np.ndarray]:
    """The slices in k order (ascending along the normal) and the voxel-to-RAS affine, after every check."""
    _check_consistent(root, members)
    ordered, spacing, normal = _order_slices(root, members)
    row_dir, col_dir = _unit_orientation(root, ordered[0])
    return ordered, _affine(ordered[0], spacing, normal, row_dir, col_dir)


def _volume_from(root: Path, uid: str, members: Sequence[_Header]) -> Volume:
    ordered, affine = _grid(root, members)
    first = ordered[0]
    modality = first.modality
    if modality.upper() != "CT":
        log.warning("%s: series %s has modality %r, not CT; reading it anyway (intensities may not be HU)",
                    root, uid or "(no SeriesInstanceUID)", modality or "unknown")
    data = _stack(root, ordered)
    log.debug("read DICOM series %s from %s: shape %s dtype %s", uid or "(no uid)", root, data.shape, data.dtype)
    meta = {
        "series_uid": uid,
        "series_description": first.description,
        "modality": modality,
        "slice_thickness": first.slice_thickness,
        "n_files": len(ordered),
        "source": root,
        # The slice files in k order: the DICOM output writers reference them (runtime.dicom_seg, runtime.rtstruct).
        "files": tuple(h.path for h in ordered),
    }
    return Volume(data=data, affine=affine, source=root, meta=meta)


def read_dicom_series(folder: str | os.PathLike, *, series_uid: str | None = None) -> Volume:
    """Read one DICOM series from ``folder`` (not recursive) as a volume in HU.

    Every non-hidden file is tried, whatever its suffix; non-DICOM files and
    DICOMDIR are skipped. With several series present ``series_uid`` must name
    one (see :func:`list_series`). Raises :class:`InputError` naming the folder
    when there is no image, the choice is ambiguous or the slices do not form a
    regular 3D grid, and :class:`MissingDependencyError` without pydicom.
    ``meta["files"]`` holds the slice files in k order.
    """
    root = Path(folder)
    uid, members = _choose_series(root, _scan_headers(root), series_uid)
    return _volume_from(root, uid, members)


@dataclass(frozen=True)
class SeriesGrid:
    """Where a DICOM series' voxels are, read from its headers only: what a NIfTI grid is checked against."""

    folder: Path
    uid: str
    files: tuple[Path, ...]  # in k order
    shape: tuple[int, int, int]  # (columns, rows, slices), the (i, j, k) of read_dicom_series
    affine: np.ndarray  # voxel -> RAS+ mm


def read_series_grid(folder: str | os.PathLike, *, series_uid: str | None = None) -> SeriesGrid:
    """The grid of the series :func:`read_dicom_series` would read, without reading pixel data."""
    root = Path(folder)
    uid, members = _choose_series(root, _scan_headers(root), series_uid)
    ordered, affine = _grid(root, members)
    first = ordered[0]
    shape = (int(first.columns or 0), int(first.rows or 0), len(ordered))
    return SeriesGrid(root, uid, tuple(h.path for h in ordered), shape, affine)


# ----------------------------------------------------------------------------------------------- study trees

#: Header reads in flight while a study tree is scanned: the reads wait on the disk or network share more
#: than on Python, so a few threads overlap them.
SCAN_THREADS = 8


@dataclass(frozen=True)
class TreeSeries:
    """One image series found in a study tree, and why it is skipped (None: a CT series to segment)."""

    case: str  # patient, study date and series number, safe as a file name; unique within the tree
    uid: str
    folder: Path  # the folder holding its files (the deepest common one)
    description: str
    modality: str
    patient_id: str
    study_date: str
    series_number: int | None
    n_files: int
    skipped: str | None
    headers: tuple[_Header, ...] = field(repr=False, default=())


def _all_files(root: Path) -> list[Path]:
    """Every non-hidden file under ``root`` (links to folders not followed), DICOMDIR excluded."""
    found = []
    for folder, dirs, names in os.walk(root, onerror=lambda exc: log.warning("cannot list %s: %s", exc.filename,
                                                                              exc.strerror or exc)):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith(".") or name.upper() == "DICOMDIR":
                continue
            found.append(Path(folder) / name)
    return found


def is_study_tree(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds no DICOM image itself but sub-folders (a PACS export of patients/studies/series)."""
    root = Path(folder)
    if not root.is_dir():
        return False
    subfolders = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return bool(subfolders) and not _scan_headers(root)


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _safe(text: str, fallback: str) -> str:
    """``text`` as a file-name part: letters, digits, ``.``, ``_`` and ``-`` only; never empty or hidden."""
    cleaned = _UNSAFE.sub("_", text).strip("._-")
    return cleaned[:64] or fallback


def _skip_reason(members: Sequence[_Header]) -> str | None:
    modalities = sorted({h.modality.upper() or "?" for h in members})
    if modalities != ["CT"]:
        return f"modality {'/'.join(modalities)}, not CT"
    if any("LOCALIZER" in h.image_type for h in members):
        return "localizer (ImageType LOCALIZER)"
    return None


def scan_study_tree(folder: str | os.PathLike, *, threads: int = SCAN_THREADS) -> list[TreeSeries]:
    """Every image series under ``folder`` (any depth), headers only, read by a pool of threads.

    Files are grouped by SeriesInstanceUID (by folder where the UID is blank, as after some anonymisers).
    Non-CT series and localizers are returned with the reason they are skipped. Case names are built from
    patient ID, study date and series number (``P001_20240131_s3``), made safe for file names; where two
    collide, each gets 8 hex digits of its own series UID (``P001_20240131_s3_1a2b3c4d``).
    """
    root = Path(folder)
    pydicom, invalid_dicom_error = _import_pydicom()
    if not root.is_dir():
        raise InputError(root, "is not a folder")
    files = _all_files(root)
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="dicom-scan") as pool:
        headers = [h for h in pool.map(lambda f: _read_header(f, pydicom, invalid_dicom_error), files)
                   if h is not None]
    groups: dict[tuple[str, str], list[_Header]] = {}
    for header in headers:
        key = (header.series_uid, "" if header.series_uid else str(header.path.parent))
        groups.setdefault(key, []).append(header)
    found = []
    for (uid, _), members in groups.items():
        first = members[0]
        number = first.series_number
        base = "_".join((_safe(first.patient_id, "anonymous"), _safe(first.study_date, "nodate"),
                         f"s{number}" if number is not None else _safe(uid[-12:], "series")))
        common = Path(os.path.commonpath([str(h.path.parent) for h in members]))
        found.append(TreeSeries(base, uid, common, first.description, first.modality, first.patient_id,
                                first.study_date, number, len(members), _skip_reason(members), tuple(members)))
    # Names that collide (re-exports, blank tags, IDs that differ only in unsafe characters) each get a suffix
    # from their own series UID (from their folder where it is blank), never from their order: adding a series
    # to the tree never moves another patient's name onto a finished output (--continue).
    counts: dict[str, int] = {}
    for series in found:
        counts[series.case] = counts.get(series.case, 0) + 1
    unique = [series if counts[series.case] == 1 else
              replace(series, case=f"{series.case}_{_identity_suffix(series, root)}") for series in found]
    # Cases in patient, date, series order (then by folder): the same tree plans the same way every time.
    unique.sort(key=lambda t: (t.case, str(t.folder), t.uid))
    return unique


def _identity_suffix(series: TreeSeries, root: Path) -> str:
    """8 hex digits that name one series whatever else the tree holds: of its UID, else of its folder."""
    key = series.uid or str(series.folder.relative_to(root) if series.folder.is_relative_to(root) else series.folder)
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:8]


def read_tree_series(series: TreeSeries) -> Volume:
    """The volume of one series of :func:`scan_study_tree` (same checks and meta as :func:`read_dicom_series`)."""
    return _volume_from(series.folder, series.uid, series.headers)


# ------------------------------------------------------------------------------------- sources of DICOM outputs


def source_datasets(files: Sequence[Path]) -> list[Any]:
    """The headers of a series' slices (no pixel data), in the given order, ready to be referenced.

    Anonymised exports often blank SOP Class/Instance UID, Study/Series Instance UID and Frame of
    Reference UID in the data set. The SOP UIDs are then taken from the file meta (Media Storage SOP
    Class/Instance UID, which name the same instance); missing study, series and frame-of-reference UIDs
    are generated, the same for every file of the series and derived from its instance UIDs, so the SEG
    and the RT Structure Set written for it agree, with a warning: a viewer then files the outputs under
    a new study. A slice without any SOP Instance UID is refused, since nothing could reference it.
    """
    pydicom, _ = _import_pydicom()
    from pydicom.uid import generate_uid  # optional (dicom extra), as pydicom above

    datasets = []
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:
            raise InputError(path, f"cannot be read as DICOM ({exc})") from None
        meta = getattr(ds, "file_meta", None)
        for keyword, meta_keyword in (("SOPClassUID", "MediaStorageSOPClassUID"),
                                      ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
            if not _text(ds, keyword):
                value = str(getattr(meta, meta_keyword, "") or "").strip()
                if not value:
                    raise InputError(path, f"has no {keyword} (neither in the data set nor as {meta_keyword} in "
                                           "the file meta), so a DICOM output cannot reference it")
                setattr(ds, keyword, value)
        datasets.append(ds)
    instances = sorted(str(ds.SOPInstanceUID) for ds in datasets)
    generated = []
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        values = {_text(ds, keyword) for ds in datasets}
        if values == {""}:
            value = generate_uid(entropy_srcs=[keyword, *instances])
            for ds in datasets:
                setattr(ds, keyword, value)
            generated.append(keyword)
        elif "" in values or len(values) > 1:
            raise InputError(Path(files[0]).parent, f"the slices disagree on {keyword} ({len(values)} values, "
                                                    "some blank): not one series")
    if generated:
        log.warning("%s: the series has no %s; generated from its SOP Instance UIDs, so the DICOM outputs belong "
                    "to a new study in a viewer", Path(files[0]).parent, ", ".join(generated))
    return datasets
