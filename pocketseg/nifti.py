"""NIfTI-1/2 reading and label-map writing.

Reading decompresses a ``.nii.gz`` with ISA-L (``isal``), 2-3x faster than the
zlib-based ``gzip`` module nibabel streams through, straight into one writable
buffer that then becomes the voxel array without further copies (falling back
to ``gzip`` where isal or its C reader is missing). Writing is atomic (see :mod:`pocketseg.atomic`).
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.spatialimages import HeaderDataError

from pocketseg.atomic import atomic_write_bytes, check_writable_target
from pocketseg.errors import InputError, OutputError
from pocketseg.layout import is_nifti_path
from pocketseg.volume import Volume

log = logging.getLogger(__name__)

try:  # ISA-L: same gzip format as zlib, SIMD-accelerated decoder.
    from isal import igzip as _igzip
    from isal import isal_zlib as _isal_zlib
except ImportError:  # pragma: no cover - exercised only where isal has no wheel
    _igzip = None
    _isal_zlib = None

#: What a truncated or corrupt gzip stream raises (EOFError: ended early; BadGzipFile: bad header/CRC).
_DECOMPRESS_ERRORS: tuple[type[BaseException], ...] = (EOFError, zlib.error, ValueError, gzip.BadGzipFile) + (
    (_isal_zlib.error,) if _isal_zlib is not None else ()
)

GZIP_MAGIC = b"\x1f\x8b"
# Level 1 of both encoders: label maps compress well at any level, so speed wins.
GZIP_LEVEL = 1


def have_isal() -> bool:
    return _igzip is not None


def gzip_writer(fileobj: io.BufferedIOBase) -> io.BufferedIOBase:
    """A gzip stream writing into ``fileobj`` (ISA-L where present), at :data:`GZIP_LEVEL`, with mtime 0.

    Writing an image through it compresses the voxels slab by slab as nibabel lays them out, so the
    uncompressed file is never whole in memory; mtime 0 makes equal images equal files.
    """
    if _igzip is not None:
        return _igzip.GzipFile(fileobj=fileobj, mode="wb", compresslevel=GZIP_LEVEL, mtime=0)
    return gzip.GzipFile(fileobj=fileobj, mode="wb", compresslevel=GZIP_LEVEL, mtime=0)


#: Size of the compressed-input buffer of the streaming decompressor.
_READ_CHUNK = 1 << 20
#: Deflate cannot expand data more than ~1032:1; caps the ISIZE size hint of a corrupt file.
_MAX_DEFLATE_RATIO = 1032


def _gzip_reader(handle):
    """An object with ``readinto`` that decompresses ``handle`` (all gzip members, CRC-checked)."""
    reader_class = getattr(_isal_zlib, "_GzipReader", None) if _isal_zlib is not None else None
    if reader_class is not None:  # ISA-L's C reader: decompresses straight into the caller's buffer
        return reader_class(handle, _READ_CHUNK)
    return gzip.GzipFile(fileobj=handle, mode="rb")  # isal missing or without _GzipReader


def _readinto_all(reader, buf: np.ndarray) -> int:
    """Fill ``buf`` from ``reader.readinto`` until it is full or the input ends; returns the bytes read."""
    view = memoryview(buf)
    pos = 0
    while pos < len(buf):
        n = reader.readinto(view[pos:])
        if not n:
            break
        pos += n
    return pos


def _gunzip_file(handle, compressed_size: int) -> np.ndarray:
    """Decompress an open gzip file into one writable uint8 array, without intermediate copies.

    The buffer is sized from the gzip trailer's ISIZE field (the last member's
    length modulo 2**32) and grown only when that hint is short (multi-member
    files, payloads over 4 GiB).
    """
    handle.seek(max(compressed_size - 4, 0))
    hint = struct.unpack("<I", handle.read(4).rjust(4, b"\0"))[0]
    handle.seek(0)
    hint = max(1, min(hint, compressed_size * _MAX_DEFLATE_RATIO + 1024))
    reader = _gzip_reader(handle)
    buf = np.empty(hint, dtype=np.uint8)
    pos = _readinto_all(reader, buf)
    scratch = np.empty(1 << 16, dtype=np.uint8)
    while pos == len(buf):  # the hint was short or exact: probe for more
        extra = _readinto_all(reader, scratch)
        if not extra:
            break
        grown = np.empty(max(2 * len(buf), pos + extra), dtype=np.uint8)
        grown[:pos] = buf[:pos]
        grown[pos:pos + extra] = scratch[:extra]
        buf, pos = grown, pos + extra
        pos += _readinto_all(reader, buf[pos:])
    return buf[:pos]


def _read_payload(path: Path) -> np.ndarray:
    """The file's (decompressed) bytes as one writable uint8 array."""
    try:
        with open(path, "rb", buffering=0) as handle:
            size = os.fstat(handle.fileno()).st_size
            if size == 0:
                raise InputError(path, "is empty")
            if not str(path).lower().endswith(".gz"):
                buf = np.empty(size, dtype=np.uint8)
                return buf[:_readinto_all(handle, buf)]
            if handle.read(2) != GZIP_MAGIC:
                raise InputError(path, "is not gzip-compressed although it is named .gz (not a NIfTI file?)")
            try:
                return _gunzip_file(handle, size)
            except _DECOMPRESS_ERRORS as exc:
                raise InputError(path, f"is truncated or corrupt gzip data ({exc})") from None
    except IsADirectoryError:
        raise InputError(path, "is a folder, expected a NIfTI file") from None
    except OSError as exc:
        raise InputError(path, f"cannot be read ({exc.strerror or exc})") from None


def _header_class(path: Path, raw: np.ndarray) -> type[nib.Nifti1Image]:
    if len(raw) < 348:
        raise InputError(path, f"is too short to hold a NIfTI header ({len(raw)} bytes)")
    first4 = raw[:4].tobytes()
    for order in "<>":
        size = struct.unpack(order + "i", first4)[0]
        if size in (348, 540):
            # dim[0], the number of dimensions: nibabel guesses the byte order from it being 1..7, and with
            # another value reads a valid header with the wrong byte order (a 7D shape of 512s, a data type
            # code of 8192); the header size field tells the byte order without guessing.
            dim0 = struct.unpack_from(order + ("h" if size == 348 else "q"), raw, 40 if size == 348 else 16)[0]
            if not 1 <= dim0 <= 7:
                raise InputError(path, f"has an invalid NIfTI header: dim[0] (the number of dimensions) is {dim0}, "
                                       "not 1..7")
            return nib.Nifti1Image if size == 348 else nib.Nifti2Image
    raise InputError(path, "is not a NIfTI file (bad header size field)")


def read_nifti(path: str | os.PathLike) -> Volume:
    """Read a 3D NIfTI image in any orientation and dtype, validating geometry and values.

    Trailing singleton dimensions (a 4D image with one volume) are dropped; a
    true 2D or 4D image is an error, as are non-positive spacings and NaN/inf voxels.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(p, "does not exist")
    raw = _read_payload(p)
    image_class = _header_class(p, raw)
    header_class = image_class.header_class
    try:
        # check=False first: nibabel's check_fix silently turns zero or negative
        # pixdim into 1 / abs(pixdim), which would hide a broken header from us.
        header = header_class.from_fileobj(_BytesReader(raw), check=False)
    except Exception as exc:  # nibabel raises several HeaderDataError subclasses
        raise InputError(p, f"has an invalid NIfTI header ({exc})") from None

    try:
        shape = tuple(int(n) for n in header.get_data_shape())
        dtype = header.get_data_dtype()
        offset = int(header.get_data_offset())
    except Exception as exc:
        raise InputError(p, f"has an invalid NIfTI header ({exc})") from None
    if dtype.kind not in "iuf" or dtype.fields is not None:
        raise InputError(p, f"has an unsupported voxel data type {dtype} (integer or float expected)")
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise InputError(p, f"is {len(shape)}D with shape {shape}; a 3D CT volume is expected")
    if min(shape) < 1:
        raise InputError(p, f"has an empty dimension, shape {shape}")

    pixdim = np.asarray(header["pixdim"][1:4], dtype=np.float64)
    if not np.all(np.isfinite(pixdim)) or np.any(pixdim <= 0):
        raise InputError(p, f"has zero, negative or non-finite voxel spacing in its header (pixdim {pixdim.tolist()})")
    try:
        header.check_fix()  # what check=True would have done, now that pixdim is known to be sane
    except Exception as exc:
        raise InputError(p, f"has an invalid NIfTI header ({exc})") from None
    try:
        affine = np.asarray(header.get_best_affine(), dtype=np.float64)
    except ValueError as exc:  # nibabel: quaternion parameters b, c, d whose squares add up to more than 1
        raise InputError(p, f"has an invalid qform ({exc})") from None
    if not np.all(np.isfinite(affine)):
        raise InputError(p, "has a non-finite affine (qform/sform)")
    column_norms = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(column_norms <= 1e-6) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(p, f"has a degenerate affine (zero spacing along an axis: {column_norms.round(6).tolist()})")

    count = int(np.prod(shape))
    needed = offset + count * dtype.itemsize
    if len(raw) < needed:
        raise InputError(p, f"is truncated: voxel data needs {needed} bytes, the file holds {len(raw)}")
    try:
        data = np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(shape, order="F")
    except (TypeError, ValueError) as exc:
        raise InputError(p, f"has voxel data that cannot be interpreted as {dtype} ({exc})") from None
    if not dtype.isnative:  # the buffer is ours and writable: swap in place, no second copy
        data = data.byteswap(inplace=True).view(dtype.newbyteorder("="))
    try:
        slope, inter = header.get_slope_inter()
    except HeaderDataError as exc:  # nibabel: a usable scl_slope with a NaN or infinite scl_inter
        raise InputError(p, f"has an invalid intensity scaling ({exc})") from None
    if slope is not None and (slope != 1 or (inter or 0) != 0):
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow to infinity is refused just below
            data = data * np.float32(slope) + np.float32(inter or 0)
    elif not data.flags.writeable:
        data = data.copy(order="F")
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        bad = int(np.count_nonzero(~np.isfinite(data)))
        raise InputError(p, f"contains {bad} NaN or infinite voxel values")
    log.debug("read %s: shape %s dtype %s", p, shape, data.dtype)
    return Volume(data=data, affine=affine, source=p, header=header)


class _BytesReader:
    """Minimal file-like view over bytes for header parsing (no copy of the voxel data)."""

    def __init__(self, payload: bytes | np.ndarray):
        self._view = memoryview(payload).cast("B")
        self._pos = 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._view) if size < 0 else self._pos + size
        chunk = self._view[self._pos:end].tobytes()
        self._pos += len(chunk)
        return chunk

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = pos if whence == 0 else (self._pos + pos if whence == 1 else len(self._view) + pos)
        return self._pos

    def tell(self) -> int:
        return self._pos


#: Header fields that carry the voxel grid's geometry; copied verbatim from a reference.
GEOMETRY_FIELDS = (
    "pixdim", "qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d",
    "qoffset_x", "qoffset_y", "qoffset_z", "srow_x", "srow_y", "srow_z", "xyzt_units",
)


def _reference_header(reference: Volume | None) -> nib.Nifti1Header | None:
    """The reference's NIfTI header when it still describes ``reference.affine``, else None."""
    if reference is None or reference.header is None or not isinstance(reference.header, nib.Nifti1Header):
        return None
    ref = reference.header
    if not np.allclose(ref.get_best_affine(), reference.affine, rtol=0, atol=1e-5):
        log.debug("reference header does not match the volume's affine; writing the affine instead")
        return None
    return ref


def _output_header(reference: Volume | None, affine: np.ndarray, dtype: np.dtype) -> nib.Nifti1Header:
    """A header carrying the reference's exact qform and sform (matrices and codes).

    The geometry fields (pixdim with qfac, quaternion, offsets, srow rows, both
    codes and the units) are copied field by field, never recomputed from a
    matrix, so that even the form whose code is 0 and float32 round-off survive.
    A NIfTI-2 reference gives a NIfTI-2 header (its fields are float64).
    """
    ref = _reference_header(reference)
    if ref is not None:
        header_class = nib.Nifti2Header if isinstance(ref, nib.Nifti2Header) else nib.Nifti1Header
        header = header_class()
        for name in GEOMETRY_FIELDS:
            header[name] = ref[name]
    else:
        header = nib.Nifti1Header()
        header.set_qform(affine, 1)  # scanner-anatomical
        header.set_sform(affine, 1)
        header.set_xyzt_units("mm", "sec")
    header.set_data_dtype(dtype)
    header.set_slope_inter(1.0, 0.0)
    return header


def nifti_image(
    data: np.ndarray,
    *,
    reference: Volume | None = None,
    affine: np.ndarray | None = None,
    dtype: np.dtype | type | str | None = None,
) -> nib.Nifti1Image:
    """A nibabel image of ``data`` (i, j, k order) with the reference's geometry (or ``affine``).

    Exactly one of ``reference`` or ``affine`` gives the geometry; with a
    reference the shape must match and its qform/sform are copied verbatim.
    """
    if (reference is None) == (affine is None):
        raise ValueError("give exactly one of reference= or affine=")
    data = np.asanyarray(data)
    if reference is not None:
        if tuple(data.shape) != reference.shape:
            raise ValueError(f"data shape {tuple(data.shape)} differs from the reference shape {reference.shape}")
        affine = reference.affine
    if data.ndim != 3:
        raise ValueError(f"expected a 3D array, got shape {data.shape}")
    out_dtype = np.dtype(dtype) if dtype is not None else data.dtype
    header = _output_header(reference, np.asarray(affine, dtype=np.float64), out_dtype)
    image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    # affine=None: the image takes its geometry from the header untouched (an
    # affine here would make nibabel rewrite the sform and its code).
    return image_class(np.asarray(data, dtype=out_dtype), None, header=header)


def nifti_bytes(
    data: np.ndarray,
    path: str | os.PathLike,
    *,
    reference: Volume | None = None,
    affine: np.ndarray | None = None,
    dtype: np.dtype | type | str | None = None,
) -> bytes:
    """The file :func:`write_nifti` would write at ``path`` (gzip-compressed for ``.nii.gz``), as bytes."""
    target = Path(path)
    if not is_nifti_path(target):
        raise OutputError(target, "output name must end in .nii or .nii.gz")
    image = nifti_image(data, reference=reference, affine=affine, dtype=dtype)
    if not target.name.lower().endswith(".gz"):
        return image.to_bytes()
    compressed = io.BytesIO()
    with gzip_writer(compressed) as stream:
        image.to_stream(stream)
    return compressed.getvalue()


def write_nifti(
    data: np.ndarray,
    path: str | os.PathLike,
    *,
    reference: Volume | None = None,
    affine: np.ndarray | None = None,
    dtype: np.dtype | type | str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``data`` (i, j, k order) as NIfTI with the reference's geometry, atomically (see :func:`nifti_image`)."""
    target = Path(path)
    if not is_nifti_path(target):
        raise OutputError(target, "output name must end in .nii or .nii.gz")
    check_writable_target(target, overwrite=overwrite)
    payload = nifti_bytes(data, target, reference=reference, affine=affine, dtype=dtype)
    return atomic_write_bytes(target, payload, overwrite=overwrite)


def _as_uint8_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.dtype != np.uint8:
        if labels.size and (labels.min() < 0 or labels.max() > 255):
            raise ValueError(f"label values outside 0..255 cannot be stored as uint8 ({labels.min()}..{labels.max()})")
        labels = labels.astype(np.uint8)
    return labels


def label_bytes(labels: np.ndarray, path: str | os.PathLike, *, reference: Volume) -> bytes:
    """The file :func:`write_labels` would write at ``path``, as bytes (for writers that stage several files)."""
    return nifti_bytes(_as_uint8_labels(labels), path, reference=reference, dtype=np.uint8)


def write_labels(
    labels: np.ndarray, path: str | os.PathLike, *, reference: Volume, overwrite: bool = False
) -> Path:
    """Write a label map as uint8 NIfTI with the input's exact affine, shape, qform and sform."""
    return write_nifti(_as_uint8_labels(labels), path, reference=reference, dtype=np.uint8, overwrite=overwrite)
