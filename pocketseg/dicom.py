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

import logging
import os
from dataclasses import dataclass
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

    headers = []
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except invalid_dicom_error:
            log.debug("skipping %s: not a DICOM file", path)
            continue
        except Exception as exc:  # truncated or malformed: any parser error
            log.warning("skipping %s: unreadable DICOM header (%s)", path, exc)
            continue
        meta = getattr(ds, "file_meta", None)
        sop_class = str(getattr(meta, "MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", "") or "")
        if sop_class == _DICOMDIR_SOP_CLASS:
            log.debug("skipping %s: DICOMDIR index file", path)
            continue
        rows, columns = _int_or_none(ds, "Rows"), _int_or_none(ds, "Columns")
        if not rows or not columns:
            # No Image Pixel module: structured report, RT structure set, presentation state, ...
            log.debug("skipping %s: DICOM file without an image (no Rows/Columns)", path)
            continue
        headers.append(
            _Header(
                path=path,
                series_uid=str(ds.get("SeriesInstanceUID", "") or "").strip(),
                description=str(ds.get("SeriesDescription", "") or "").strip(),
                modality=str(ds.get("Modality", "") or "").strip(),
                rows=rows,
                columns=columns,
                position=_floats(ds, "ImagePositionPatient"),
                orientation=_floats(ds, "ImageOrientationPatient"),
                pixel_spacing=_floats(ds, "PixelSpacing"),
                slice_thickness=_float_or_none(ds, "SliceThickness"),
                n_frames=_int_or_none(ds, "NumberOfFrames") or 1,
                samples_per_pixel=_int_or_none(ds, "SamplesPerPixel") or 1,
            )
        )
    return headers


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
                f"{', ...' if len(subfolders) > 1 else ''}): give one series folder (sub-folders are not searched)")
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


def read_dicom_series(folder: str | os.PathLike, *, series_uid: str | None = None) -> Volume:
    """Read one DICOM series from ``folder`` (not recursive) as a volume in HU.

    Every non-hidden file is tried, whatever its suffix; non-DICOM files and
    DICOMDIR are skipped. With several series present ``series_uid`` must name
    one (see :func:`list_series`). Raises :class:`InputError` naming the folder
    when there is no image, the choice is ambiguous or the slices do not form a
    regular 3D grid, and :class:`MissingDependencyError` without pydicom.
    """
    root = Path(folder)
    headers = _scan_headers(root)
    uid, members = _choose_series(root, headers, series_uid)
    _check_consistent(root, members)
    ordered, spacing, normal = _order_slices(root, members)
    first = ordered[0]
    row_dir, col_dir = _unit_orientation(root, first)
    affine = _affine(first, spacing, normal, row_dir, col_dir)

    modality = first.modality
    if modality.upper() != "CT":
        log.warning("%s: series %s has modality %r, not CT; reading it anyway (intensities may not be HU)",
                    root, uid or "(no SeriesInstanceUID)", modality or "unknown")
    data = _stack(root, ordered)
    log.debug("read DICOM series %s from %s: shape %s dtype %s spacing %.4g mm",
              uid or "(no uid)", root, data.shape, data.dtype, spacing)
    meta = {
        "series_uid": uid,
        "series_description": first.description,
        "modality": modality,
        "slice_thickness": first.slice_thickness,
        "n_files": len(ordered),
        "source": root,
    }
    return Volume(data=data, affine=affine, source=root, meta=meta)
