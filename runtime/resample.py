"""Resampling of CT images and label maps to a new voxel spacing, as nnU-Net v2 does it.

The trainer (when it preprocesses cases) and the runtime (when it brings a scan to
the network's spacing and the prediction back) must resample identically, or the
network sees at inference a different texture than in training. Both therefore call
this one module.

What "as nnU-Net does it" means here:

* **Grid alignment** is skimage.transform.resize's pixel-area alignment: the
  outer edges of the first and last voxels stay where they were, so output index
  ``o`` samples input coordinate ``(o + 0.5) * n_in / n_out - 0.5``. This is
  ``scipy.ndimage.zoom(..., grid_mode=True)``; we use ``affine_transform`` with a
  diagonal matrix, which computes exactly that and has a CuPy twin.
* **Boundaries** extend the edge voxel (``mode='nearest'``, skimage's ``'edge'``).
* **Images** use cubic splines (order 3), no anti-aliasing, and the result is
  clipped to the value range of its input (skimage's ``clip=True``, which nnU-Net
  keeps): a spline overshoots at sharp edges (air/bone next to the clip limits of
  the CT normalisation) by several standard deviations otherwise. With a separate
  thick axis each slice is clipped to its own range, as nnU-Net resizes slice by slice.
* **Anisotropic volumes** (thick slices) are resampled in-plane with ``order``
  and along the thick axis with ``order_z`` (0, nearest, by default), so the
  spline does not invent structure between slices 5 mm apart.
* **Labels** use nnU-Net's "order 1 per label": each label's binary mask is
  linearly interpolated and thresholded at 0.5, which keeps organ volumes and
  shapes far better than nearest-neighbour interpolation of the label map.

On the CPU both are computed one axis after the other: the cubic spline of an axis as one product with
that axis's banded resampling matrix (BLAS, float32), the linear one as two gathers and a multiply-add
(float64, rounded to float32 before the threshold, as the 3D transform's result is); each equals the 3D
interpolation to float32 rounding, at a fraction of its cost on a CT scan.

On a GPU, cupyx compiles one interpolation kernel per output shape (the shape is
part of the kernel's source), so the per-label windows are computed at sizes
rounded up to multiples of :data:`LABEL_WINDOW_BUCKET` and cropped: a handful of
kernels serve every label of every scan. Each output voxel depends only on its own
coordinate, so the crop equals the unrounded result exactly. Coordinates are
computed in float64 as SciPy does (cupyx's ``float64_coords``, where it exists).

The public functions take one :class:`~pocketseg.runtime.arrays.ArrayModule`
(``am``: NumPy + ``scipy.ndimage``, or CuPy + ``cupyx.scipy.ndimage``) so the
same code runs on the GPU; nothing here imports CuPy. Arrays are ``(z, y, x)`` and spacings are in
millimetres in the same order.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
import math
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np
import scipy.ndimage

from pocketseg.runtime.arrays import ArrayModule, cpu_module

__all__ = [
    "ANISOTROPY_THRESHOLD",
    "resample_image",
    "resample_labels",
    "resample_logits_to_labels",
    "resample_to_spacing",
    "separate_z_axis",
    "target_shape",
]

logger = logging.getLogger(__name__)

#: nnU-Net's ANISO_THRESHOLD: a spacing ratio (max / min) above this counts as anisotropic.
ANISOTROPY_THRESHOLD = 3.0

# Edge padding before the spline prefilter, per axis; SciPy's own value for mode='nearest'
# (its filter has no exact 'nearest' boundary, so it pads and filters the padding instead).
_SPLINE_PAD = 12
#: Slices interpolated per chunk in the slice-wise (separate z) path.
CHUNK_SLICES = 16
#: On the CPU the cubic passes take chunks of at most this many float32 bytes (4 slices of 512 x 512).
CPU_CHUNK_BYTES = 4 << 20
#: Per-label windows are resampled at sizes rounded up to a multiple of this on a GPU (see the module doc).
LABEL_WINDOW_BUCKET = 32
#: Slabs of each organ's output window in the CPU's label passes (:func:`_linear_separable`).
LABEL_SLABS = 8
#: Output samples per block of the CPU's banded cubic resampling operator (:func:`_axis_operator`).
OPERATOR_BLOCK = 32
# Operator entries below this fraction of the largest are dropped (:func:`_axis_operator`).
_OPERATOR_TOL = 1e-7
# Inputs farther than this from an output's four knots are not computed (0.268**16 ~ 7e-10; :func:`_axis_operator`).
_OPERATOR_REACH = 16


# --------------------------------------------------------------------------- arguments


def _check_shape3(shape: Any, name: str) -> tuple[int, int, int]:
    """Three positive ints, or a ValueError naming the argument."""
    try:
        values = tuple(shape)
    except TypeError:
        raise ValueError(f"{name} must be 3 positive integers (z, y, x), got {shape!r}") from None
    if len(values) != 3:
        raise ValueError(f"{name} must be 3 positive integers (z, y, x), got {shape!r}")
    out = []
    for v in values:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or int(v) < 1:
            raise ValueError(f"{name} must be 3 positive integers (z, y, x), got {shape!r}")
        out.append(int(v))
    return (out[0], out[1], out[2])


def _check_spacing3(spacing: Any, name: str) -> tuple[float, float, float]:
    """Three finite positive spacings in mm, or a ValueError naming the argument."""
    try:
        values = tuple(float(v) for v in spacing)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be 3 positive spacings in mm (z, y, x), got {spacing!r}") from None
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"{name} must be 3 finite positive spacings in mm (z, y, x), got {spacing!r}")
    return (values[0], values[1], values[2])


def _check_order(order: Any, name: str) -> int:
    if isinstance(order, (bool, np.bool_)) or not isinstance(order, (int, np.integer)) or not 0 <= order <= 5:
        raise ValueError(f"{name} must be a spline order from 0 to 5, got {order!r}")
    return int(order)


def _check_axis(separate_z: Any) -> int | None:
    if separate_z is None:
        return None
    if isinstance(separate_z, (bool, np.bool_)) or not isinstance(separate_z, (int, np.integer)):
        raise ValueError(f"separate_z must be None or an axis 0, 1 or 2, got {separate_z!r}")
    if not 0 <= separate_z <= 2:
        raise ValueError(f"separate_z must be None or an axis 0, 1 or 2, got {separate_z!r}")
    return int(separate_z)


def _check_volume(array: Any, name: str) -> None:
    if getattr(array, "ndim", None) != 3:
        raise ValueError(f"{name} must be a 3D (z, y, x) array, got shape {getattr(array, 'shape', None)}")


# --------------------------------------------------------------------------- geometry


def target_shape(
    shape_zyx: Sequence[int],
    spacing_mm_zyx: Sequence[float],
    new_spacing_mm_zyx: Sequence[float],
) -> tuple[int, int, int]:
    """The shape that covers the same physical extent at the new spacing.

    ``round(shape * spacing / new_spacing)`` per axis, computed in nnU-Net's order
    (``spacing / new_spacing * shape``, Python's round-half-to-even) so that trainer,
    runtime and an nnU-Net baseline agree to the voxel; at least 1 per axis.
    """
    shape = _check_shape3(shape_zyx, "shape_zyx")
    old = _check_spacing3(spacing_mm_zyx, "spacing_mm_zyx")
    new = _check_spacing3(new_spacing_mm_zyx, "new_spacing_mm_zyx")
    out = [max(1, int(round(o / n * s))) for s, o, n in zip(shape, old, new)]
    return (out[0], out[1], out[2])


def _lowres_axis(spacing: tuple[float, float, float]) -> int | None:
    """The axis of the largest spacing, or None when two or three axes share it."""
    largest = max(spacing)
    axes = [i for i, s in enumerate(spacing) if s == largest]
    return axes[0] if len(axes) == 1 else None


def separate_z_axis(
    spacing_mm_zyx: Sequence[float],
    new_spacing_mm_zyx: Sequence[float],
    threshold: float = ANISOTROPY_THRESHOLD,
) -> int | None:
    """The axis to resample separately (nearest), or None: nnU-Net's rule.

    Thick-slice scans are interpolated in-plane only, and slice-wise along the thick
    axis, because a spline across 5 mm gaps invents structure. The thick axis is
    decided by the original spacing when it is anisotropic (max/min > threshold),
    otherwise by the target spacing when that is. When the largest spacing is shared
    by two axes there is no single thick axis and nnU-Net does not separate: None.
    """
    old = _check_spacing3(spacing_mm_zyx, "spacing_mm_zyx")
    new = _check_spacing3(new_spacing_mm_zyx, "new_spacing_mm_zyx")
    try:
        threshold = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be a number > 1, got {threshold!r}") from None
    if not (math.isfinite(threshold) and threshold >= 1.0):
        raise ValueError(f"threshold must be a finite number >= 1, got {threshold!r}")
    if max(old) / min(old) > threshold:
        return _lowres_axis(old)
    if max(new) / min(new) > threshold:
        return _lowres_axis(new)
    return None


# --------------------------------------------------------------------------- core transform


def _grid_map(n_in: int, n_out: int) -> tuple[float, float]:
    """(scale, offset) so that output index o samples input coordinate scale * o + offset."""
    scale = n_in / n_out
    return scale, 0.5 * scale - 0.5


def _spline_coefficients(x: Any, order: int, axes: Sequence[int], xp: ModuleType, ndi: ModuleType,
                         prep: Callable[[Any], Any] | None = None, value_range: list[Any] | None = None) -> Any:
    """B-spline coefficients along ``axes``, float32, edge-padded by _SPLINE_PAD on those axes.

    SciPy's own prefilter would allocate a float64 copy of the padded volume (about a
    gigabyte for a 512x512x400 CT); filtering into float32 halves that at ~1e-7
    relative error. The padding reproduces SciPy's treatment of mode='nearest'.
    ``prep`` (element-wise, raw -> float32) is applied chunk by chunk of slices while the
    padded buffer is filled: the one volume-sized allocation is that buffer (a fresh
    allocation is a pass of page faults, which costs as much as the filter itself).
    ``value_range``, a list, receives the (prepared) input's minimum and maximum.
    """
    pads = [_SPLINE_PAD if ax in axes else 0 for ax in range(x.ndim)]
    coef = xp.empty(tuple(n + 2 * p for n, p in zip(x.shape, pads)), dtype=xp.float32)
    interior = coef[tuple(slice(p, p + n) for p, n in zip(pads, x.shape))]
    for first in range(0, x.shape[0], CHUNK_SLICES):
        chunk = x[first : first + CHUNK_SLICES]
        interior[first : first + CHUNK_SLICES] = chunk if prep is None else prep(chunk)
    # Edge extension one axis after the other over the whole extent of the others: np.pad(mode="edge").
    for ax, p in enumerate(pads):
        if p:
            def at(sl: slice, ax: int = ax) -> tuple[slice, ...]:
                return (slice(None),) * ax + (sl,)
            coef[at(slice(0, p))] = coef[at(slice(p, p + 1))]
            coef[at(slice(-p, None))] = coef[at(slice(-p - 1, -p))]
    if value_range is not None:
        value_range[:] = [interior.min(), interior.max()]
    for ax in axes:
        if coef.shape[ax] > 1:
            ndi.spline_filter1d(coef, order=order, axis=ax, output=coef, mode="mirror")
    return coef


@functools.lru_cache(maxsize=8)
def _affine_keywords(affine_transform: Callable[..., Any]) -> tuple[tuple[str, Any], ...]:
    """Extra keywords for this ``affine_transform``: ``float64_coords=True`` where it has the keyword.

    cupyx computes coordinates in the input's precision (float32 here) unless asked for float64, which
    SciPy always uses; a coordinate rounded differently can move a label's 0.5 threshold by a voxel.
    """
    try:
        parameters = inspect.signature(affine_transform).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return ()
    return (("float64_coords", True),) if "float64_coords" in parameters else ()


def _affine(ndi: ModuleType, x: Any, scales: Any, **kwargs: Any) -> Any:
    return ndi.affine_transform(x, scales, **kwargs, **dict(_affine_keywords(ndi.affine_transform)))


def _transform(
    x: Any,
    scales: Sequence[float],
    offsets: Sequence[float],
    out_shape: Sequence[int],
    order: int,
    xp: ModuleType,
    ndi: ModuleType,
    prep: Callable[[Any], Any] | None = None,
    clip: bool = False,
) -> Any:
    """float32 ``out[o] = x(scales * o + offsets)`` with spline ``order`` on every axis, edges extended.

    ``prep`` (element-wise) is applied to ``x`` first; ``clip`` limits the result to the range of
    the (prepared) input, as splines overshoot.
    """
    offsets = [float(v) for v in offsets]
    value_range: list[Any] = []
    if order > 1:
        x = _spline_coefficients(x, order, range(x.ndim), xp, ndi, prep=prep, value_range=value_range)
        offsets = [v + _SPLINE_PAD for v in offsets]
    else:
        x = x if prep is None else prep(x)
        value_range = [x.min(), x.max()] if clip else []
    out = _affine(
        ndi,
        x,
        xp.asarray(scales, dtype=xp.float64),
        offset=offsets,
        output_shape=tuple(int(s) for s in out_shape),
        output=xp.float32,
        order=order,
        mode="nearest",
        prefilter=False,
    )
    if clip:
        xp.clip(out, *value_range, out=out)
    return out


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """(4, n) cubic B-spline weights of the knots floor(c) - 1 .. floor(c) + 2 at fractions ``t`` = c - floor(c)."""
    t2, t3 = t * t, t * t * t
    return np.stack([(1 - t) ** 3, 3 * t3 - 6 * t2 + 4, -3 * t3 + 3 * t2 + 3 * t + 1, t3]) / 6.0


class _Block(NamedTuple):
    """Output samples ``rows`` of a resampling operator, which depend on the input samples ``cols`` only."""

    rows: slice
    cols: slice
    matrix: np.ndarray  # (rows, cols), float32


@functools.lru_cache(maxsize=32)
def _axis_operator(n_in: int, n_out: int) -> tuple[_Block, ...]:
    """The cubic-spline resampling of one axis, ``n_in`` -> ``n_out`` samples, as a banded matrix in row blocks.

    Edge padding, prefilter and evaluation are all linear, so resampling an axis multiplies it by one
    ``(n_out, n_in)`` matrix, whose column ``i`` is the resampled unit impulse at ``i`` (computed here in
    float64, with the padding, mirror-mode prefilter and weights of the filter-then-gather path). The
    prefilter's response decays by a factor 0.268 per sample, so a block of :data:`OPERATOR_BLOCK` output
    samples depends only on the inputs within :data:`_OPERATOR_REACH` samples of its knots (beyond, the
    entries are below 1e-9); only those columns are computed, block by block, so building the operator of
    a long axis needs no dense matrix. Entries below :data:`_OPERATOR_TOL` of the block's largest are then
    set to zero, and columns left with none dropped (their sum is ~1e-6 of a row's, below float32 rounding
    of the result's range). Zeroing them matters for speed as well: far from its knots a row's entries
    decay to float32 subnormals (down to 1e-45), and on Intel CPUs every product with a subnormal takes
    a microcode assist: the matrix products of a 512x512x215 scan's ROI resampling took 10x longer.
    """
    pad = _SPLINE_PAD
    scale, offset = _grid_map(n_in, n_out)
    where = scale * np.arange(n_out, dtype=np.float64) + offset
    first = np.floor(where)
    weights = _cubic_weights(where - first)
    knots = first.astype(np.int64) + (pad - 1)  # the first of the four knots, in the padded coefficients
    blocks = []
    for a in range(0, n_out, OPERATOR_BLOCK):
        b = min(a + OPERATOR_BLOCK, n_out)
        lo = max(0, int(knots[a]) - pad - _OPERATOR_REACH)
        hi = min(n_in, int(knots[b - 1]) + 3 - pad + _OPERATOR_REACH + 1)
        columns = np.arange(lo, hi)
        impulses = np.zeros((n_in + 2 * pad, hi - lo))
        impulses[pad + columns, columns - lo] = 1.0
        impulses[:pad] = impulses[pad]
        impulses[pad + n_in :] = impulses[pad + n_in - 1]
        coef = scipy.ndimage.spline_filter1d(impulses, order=3, axis=0, mode="mirror")
        rows = sum(weights[k][a:b, None] * coef[knots[a:b] + k] for k in range(4))
        rows[np.abs(rows) <= _OPERATOR_TOL * np.abs(rows).max()] = 0.0  # also no float32 subnormals: see above
        kept = np.flatnonzero(rows.any(axis=0))
        k_lo, k_hi = int(kept[0]), int(kept[-1]) + 1
        block = np.ascontiguousarray(rows[:, k_lo:k_hi], dtype=np.float32)
        block.setflags(write=False)
        blocks.append(_Block(slice(a, b), slice(lo + k_lo, lo + k_hi), block))
    return tuple(blocks)


def _apply_operator(chunk: np.ndarray, blocks: Sequence[_Block], axis: int, out: np.ndarray) -> None:
    """``out`` = the blocks' operator applied along ``axis`` of a 3D float32 ``chunk``; matrix products (BLAS)."""
    if axis == 0:
        flat = chunk.reshape(chunk.shape[0], -1)
        for blk in blocks:
            out[blk.rows] = (blk.matrix @ flat[blk.cols]).reshape((-1,) + chunk.shape[1:])
    elif axis == 1:
        for blk in blocks:
            out[:, blk.rows] = np.matmul(blk.matrix, chunk[:, blk.cols])
    else:
        flat = chunk.reshape(-1, chunk.shape[2])
        res = np.empty((flat.shape[0], out.shape[2]), dtype=np.float32)
        for blk in blocks:
            res[:, blk.rows] = flat[:, blk.cols] @ blk.matrix.T
        out[...] = res.reshape(out.shape)


def _cubic_along(x: Any, n_out: int, axis: int, xp: ModuleType, ndi: ModuleType,
                 prep: Callable[[Any], Any] | None = None, value_range: list[Any] | None = None,
                 banded: bool | None = None, then: Sequence[tuple[int, int]] = ()) -> Any:
    """Cubic-spline resampling of one axis (the grid map of :func:`_grid_map`, edges extended); float32.

    Chunk by chunk along another axis (:data:`CHUNK_SLICES` slices; on the CPU at most
    :data:`CPU_CHUNK_BYTES`): ``prep`` (element-wise), then the resampling along ``axis``. On the CPU that is a product with the axis's banded operator
    (:func:`_axis_operator`; BLAS, about 8x faster on a CT scan than SciPy's recursive filter); on a
    GPU, the 1D prefilter along ``axis`` (:func:`_spline_coefficients`), then each output sample as the
    weighted sum of its four coefficients. Only the output is volume-sized; the chunks' buffers are small.
    ``then``: further ``(axis, n_out)`` passes applied to each chunk before it is stored (axes 1 and 2,
    chunks along axis 0), so the volume between two in-plane passes is never made: on a CT scan that
    intermediate is the largest array of the resampling, and every byte a process touches for the
    first time costs a page fault.
    ``value_range``, a list, receives the (prepared) input's minimum and maximum per index of the
    chunking axis (axis 0, or 1 when ``axis`` is 0): ``[lows, highs]``. ``banded``: use the operator
    (True) or the filter (False); None: the operator with NumPy, the filter otherwise.
    """
    passes = ((axis, int(n_out)),) + tuple((int(a), int(n)) for a, n in then)
    along = 1 if axis == 0 else 0
    if any(a == along for a, _ in passes) or len({a for a, _ in passes}) != len(passes):
        raise ValueError(f"passes {passes} cannot share chunks along axis {along}")
    use_operator = xp is np if banded is None else bool(banded)
    tables = [_axis_operator(int(x.shape[a]), n) if use_operator else _spline_table(int(x.shape[a]), n, a, xp)
              for a, n in passes]
    out_shape = list(x.shape)
    for a, n in passes:
        out_shape[a] = n
    out = xp.empty(tuple(out_shape), dtype=xp.float32)
    lows, highs = [], []
    step = CHUNK_SLICES
    if xp is np:  # on the CPU, chunks of about CPU_CHUNK_BYTES: fewer fresh pages, and they stay in cache
        slice_bytes = 4 * math.prod(n for ax, n in enumerate(x.shape) if ax != along)
        step = max(1, min(step, CPU_CHUNK_BYTES // max(slice_bytes, 1)))
    for start in range(0, x.shape[along], step):
        sel = (slice(None),) * along + (slice(start, start + step),)
        chunk = xp.asarray(x[sel], dtype=xp.float32) if prep is None else prep(x[sel])
        if value_range is not None:
            others = tuple(ax for ax in range(3) if ax != along)
            lows.append(chunk.min(axis=others))
            highs.append(chunk.max(axis=others))
        for i, ((a, n), table) in enumerate(zip(passes, tables)):
            last = i == len(passes) - 1
            if use_operator:
                shape = list(chunk.shape)
                shape[a] = n
                target = out[sel] if last else np.empty(tuple(shape), dtype=np.float32)
                _apply_operator(chunk, table, a, target)
            else:
                target = _spline_pass(chunk, table, a, xp, ndi)
                if last:
                    out[sel] = target
            chunk = target
    if value_range is not None:
        value_range[:] = [xp.concatenate(lows), xp.concatenate(highs)]
    return out


def _spline_table(n_in: int, n_out: int, axis: int, xp: ModuleType) -> tuple[list[Any], list[Any]]:
    """(weights, knot indices) of the four-tap evaluation of :func:`_spline_pass`, shaped for ``axis``."""
    scale, offset = _grid_map(n_in, n_out)
    where = scale * np.arange(n_out, dtype=np.float64) + offset
    first = np.floor(where)
    shape = [1, 1, 1]
    shape[axis] = n_out
    weights = [xp.asarray(w.reshape(shape)) for w in _cubic_weights(where - first).astype(np.float32)]
    index = [xp.asarray(first.astype(np.int64) + (_SPLINE_PAD - 1 + k)) for k in range(4)]
    return weights, index


def _spline_pass(chunk: Any, table: tuple[list[Any], list[Any]], axis: int, xp: ModuleType, ndi: ModuleType) -> Any:
    """One axis of a chunk by the recursive prefilter and four-tap evaluation (the GPU's path)."""
    weights, index = table
    coef = _spline_coefficients(chunk, 3, (axis,), xp, ndi)
    acc = xp.take(coef, index[0], axis=axis)
    acc *= weights[0]
    for k in range(1, 4):
        term = xp.take(coef, index[k], axis=axis)
        term *= weights[k]
        acc += term
    return acc


def _pass_order(x_shape: Sequence[int], new_shape: Sequence[int]) -> list[int]:
    """The axes to resample, in the order of the passes: the in-plane axes (1, 2) together, most shrinking first.

    The axis that shrinks the volume most goes first (less work for the passes after it), except that
    axis 0 goes before or after both in-plane axes, never between them, so those two share their chunks
    (:func:`_cubic_along`'s ``then``).
    """
    ratio = {ax: new_shape[ax] / x_shape[ax] for ax in range(3) if new_shape[ax] != x_shape[ax]}
    plane = sorted((ax for ax in (1, 2) if ax in ratio), key=lambda ax: ratio[ax])
    if 0 not in ratio:
        return plane
    return [0] + plane if not plane or ratio[0] <= ratio[plane[0]] else plane + [0]


def _cubic_separable(x: Any, new_shape: Sequence[int], xp: ModuleType, ndi: ModuleType,
                     prep: Callable[[Any], Any] | None, clip: bool) -> Any:
    """3D cubic-spline resampling one axis after the other (:func:`_pass_order`); float32.

    The tensor-product spline that :func:`_transform` evaluates in one 3D pass, factored by axis: each
    1D pass filters and samples a volume the passes before have already made smaller (a 512x512x215
    scan to the ROI grid: a third of the work of the 3D prefilter and evaluation, same values to float
    rounding, ~1e-6). Axes that keep their size are not touched (a spline interpolates at its knots).
    """
    groups: list[list[int]] = []  # passes that share their chunks: the in-plane ones
    for ax in _pass_order(x.shape, new_shape):
        if groups and ax != 0 and groups[-1][0] != 0:
            groups[-1].append(ax)
        else:
            groups.append([ax])
    value_range: list[Any] = []
    for i, (ax, *then) in enumerate(groups):
        x = _cubic_along(x, new_shape[ax], ax, xp, ndi, prep=prep if i == 0 else None,
                         value_range=value_range if i == 0 else None, then=[(a, new_shape[a]) for a in then])
    if clip:
        xp.clip(x, value_range[0].min(), value_range[1].max(), out=x)
    return x


def _resample_axes(x: Any, new_shape: Sequence[int], axes: Sequence[int], order: int, xp: ModuleType, ndi: ModuleType,
                   prep: Callable[[Any], Any] | None = None, clip: bool = False) -> Any:
    """Resample ``axes`` to ``new_shape`` with one spline order; the other axes keep their size.

    ``prep`` and ``clip`` as in :func:`_transform` (``prep`` applied when nothing is resampled too).
    """
    scales, offsets, out_shape = [], [], []
    for ax, n_in in enumerate(x.shape):
        if ax in axes and new_shape[ax] != n_in:
            scale, offset = _grid_map(n_in, new_shape[ax])
            scales.append(scale)
            offsets.append(offset)
            out_shape.append(new_shape[ax])
        else:
            # Identity: exact for order 0 and 1, an interpolating spline at its knots otherwise.
            scales.append(1.0)
            offsets.append(0.0)
            out_shape.append(n_in)
    if tuple(out_shape) == tuple(x.shape):
        return x if prep is None else prep(x)
    if order == 3 and x.ndim == 3:
        return _cubic_separable(x, out_shape, xp, ndi, prep, clip)
    return _transform(x, scales, offsets, out_shape, order, xp, ndi, prep=prep, clip=clip)


def _resample_in_plane(
    x: Any, new_shape: Sequence[int], axis: int, order: int, prep: Callable[[Any], Any], xp: ModuleType, ndi: ModuleType
) -> Any:
    """Resample the two axes other than ``axis`` with ``order``, each slice on its own; float32.

    ``prep`` turns raw slices into float32 (and normalises them) just before they are
    interpolated. For order <= 1 one 3D call with an identity along ``axis`` is exact
    (the weights at integer coordinates are exactly 1 and 0). A spline of higher order
    would also touch the neighbouring slices through the 3D prefilter, so then the
    coefficients are computed in-plane only and each slice is evaluated in 2D, as
    nnU-Net does (cubic: one in-plane axis after the other); this runs over chunks of :data:`CHUNK_SLICES` slices so the float32
    copies never cover the whole volume (bounded GPU memory for long scans).
    """
    plane = [ax for ax in range(3) if ax != axis]
    if all(new_shape[ax] == x.shape[ax] for ax in plane):
        return prep(x)
    if order <= 1:
        return _resample_axes(prep(x), new_shape, plane, order, xp, ndi)
    moved = xp.moveaxis(x, axis, 0)
    if order == 3:  # one in-plane axis after the other (:func:`_cubic_along`), each slice clipped to its range
        # One chunked pass normalises, measures each slice's range (chunks along axis 0, the slices) and
        # resamples both in-plane axes.
        passes = [(ax, new_shape[plane[ax - 1]]) for ax in (1, 2) if new_shape[plane[ax - 1]] != moved.shape[ax]]
        value_range: list[Any] = []
        out = _cubic_along(moved, passes[0][1], passes[0][0], xp, ndi, prep=prep, value_range=value_range,
                           then=passes[1:])
        xp.clip(out, value_range[0][:, None, None], value_range[1][:, None, None], out=out)
        return xp.moveaxis(out, 0, axis)
    maps = [_grid_map(moved.shape[ax], new_shape[plane[ax - 1]]) for ax in (1, 2)]
    scales = xp.asarray([m[0] for m in maps], dtype=xp.float64)
    offsets = [m[1] + _SPLINE_PAD for m in maps]
    out_plane = (new_shape[plane[0]], new_shape[plane[1]])
    out = xp.empty((moved.shape[0],) + out_plane, dtype=xp.float32)
    for first in range(0, moved.shape[0], CHUNK_SLICES):
        chunk = prep(moved[first : first + CHUNK_SLICES])
        lows, highs = chunk.min(axis=(1, 2)), chunk.max(axis=(1, 2))
        coef = _spline_coefficients(chunk, order, (1, 2), xp, ndi)
        del chunk
        for i in range(coef.shape[0]):
            _affine(
                ndi, coef[i], scales, offset=offsets, output_shape=out_plane, output=out[first + i],
                order=order, mode="nearest", prefilter=False,
            )
            xp.clip(out[first + i], lows[i], highs[i], out=out[first + i])
    return xp.moveaxis(out, 0, axis)


def _nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Input index picked by nearest-neighbour resampling for each output index.

    Computed from nnU-Net's coordinate map (``scale * (o + 0.5) - 0.5``, rounded half
    up, clamped to the volume) on the host, so that an image and its label map, cropped
    or not, always pick the same slice even where a coordinate falls on a .5 tie.
    """
    scale = n_in / n_out
    coords = scale * (np.arange(n_out, dtype=np.float64) + 0.5) - 0.5
    return np.clip(np.floor(coords + 0.5), 0, n_in - 1).astype(np.int64)


def _resample_along(x: Any, n_out: int, axis: int, order: int, xp: ModuleType, ndi: ModuleType) -> Any:
    """Resample one axis to ``n_out``; order 0 is a plain gather of slices."""
    if x.shape[axis] == n_out:
        return x
    if order == 0:
        return xp.take(x, xp.asarray(_nearest_indices(x.shape[axis], n_out)), axis=axis)
    new_shape = list(x.shape)
    new_shape[axis] = n_out
    return _resample_axes(x, new_shape, (axis,), order, xp, ndi)


def _resample_float(
    x: Any,
    new_shape: tuple[int, int, int],
    order: int,
    separate_z: int | None,
    order_z: int,
    prep: Callable[[Any], Any],
    xp: ModuleType,
    ndi: ModuleType,
) -> Any:
    """3D (raw dtype; ``prep`` makes it float32) -> float32 3D of new_shape (not necessarily contiguous)."""
    if separate_z is None:
        # Splines overshoot: clipped to the input's range (linear and nearest stay in it).
        return _resample_axes(x, new_shape, (0, 1, 2), order, xp, ndi, prep=prep, clip=order > 1)
    a = separate_z
    # The two passes act on different axes and are linear, so they commute; running the
    # one that shrinks the volume first does less work (exactly equal for order_z 0, a
    # pure selection of slices; equal up to float rounding otherwise). A selection of
    # slices also commutes with the element-wise ``prep``, so it runs on the raw data.
    if new_shape[a] < x.shape[a]:
        if order_z == 0:
            x = _resample_along(x, new_shape[a], a, order_z, xp, ndi)
            return _resample_in_plane(x, new_shape, a, order, prep, xp, ndi)
        x = _resample_along(prep(x), new_shape[a], a, order_z, xp, ndi)
        return _resample_in_plane(x, new_shape, a, order, lambda b: xp.asarray(b, dtype=xp.float32), xp, ndi)
    x = _resample_in_plane(x, new_shape, a, order, prep, xp, ndi)
    return _resample_along(x, new_shape[a], a, order_z, xp, ndi)


# --------------------------------------------------------------------------- public API


def resample_image(
    image: Any,
    new_shape: Sequence[int],
    *,
    order: int = 3,
    separate_z: int | None = None,
    order_z: int = 0,
    prepare: Callable[[Any], Any] | None = None,
    am: ArrayModule | None = None,
) -> Any:
    """Resample a (z, y, x) image to ``new_shape``; float32 on ``xp``.

    Cubic (``order``) splines with skimage/nnU-Net voxel alignment and edge extension.
    With ``separate_z=a`` axis ``a`` is resampled with ``order_z`` (nnU-Net: 0, nearest)
    and the two other axes with ``order``; pick ``a`` with :func:`separate_z_axis`.
    The result is a new array even when the shape is unchanged.

    ``prepare`` is an element-wise function (e.g. CT normalisation) applied before
    interpolation; giving it here rather than calling it first gives the same result
    while the image stays in its own dtype (int16 for CT) until slices are selected,
    and the float32 copies are made chunk by chunk where the passes allow.
    """
    _check_volume(image, "image")
    xp, ndi = (am or cpu_module()).xp, (am or cpu_module()).ndi
    new_shape = _check_shape3(new_shape, "new_shape")
    order = _check_order(order, "order")
    order_z = _check_order(order_z, "order_z")
    separate_z = _check_axis(separate_z)
    kind = getattr(getattr(image, "dtype", None), "kind", None)
    if kind not in ("b", "i", "u", "f"):
        raise ValueError(f"image must have a real numeric dtype, got {getattr(image, 'dtype', None)}")
    if prepare is None:
        def prep(a: Any) -> Any:
            return xp.asarray(a, dtype=xp.float32)
    else:
        def prep(a: Any) -> Any:
            return xp.asarray(prepare(a), dtype=xp.float32)
    x = xp.asarray(image)
    if tuple(x.shape) == new_shape:
        out = prep(x)
        return out.copy() if out is x or out is image else out
    logger.debug("resample_image %s -> %s order=%d separate_z=%s order_z=%d", tuple(x.shape), new_shape, order, separate_z, order_z)
    out = _resample_float(x, new_shape, order, separate_z, order_z, prep, xp, ndi)
    if out is x or out is image:
        return out.copy()
    return xp.ascontiguousarray(out)


def _true_extent(mask_any: Any, xp: ModuleType) -> tuple[int, int]:
    """[first, last + 1) of the True entries of a 1-D mask (known to hold one)."""
    idx = xp.flatnonzero(mask_any)
    return int(idx[0]), int(idx[-1]) + 1


class _Window(NamedTuple):
    """Where one label is resampled: input crop, output crop, and the cropped grid map."""

    in_lo: int
    in_hi: int
    out_lo: int
    out_hi: int
    scale: float
    offset: float


def _label_window(lo: int, hi: int, n_in: int, n_out: int) -> _Window:
    """The crop of one axis that resamples only near a label's box [lo, hi).

    With linear or nearest interpolation, output o can be non-zero only if its input
    coordinate t(o) lies in (lo - 1, hi). The input is cropped with two zero voxels of
    margin (or at the true border), so edge extension at the crop sees the same zeros
    (or the same border voxel) as the full volume would: the result is unchanged.
    """
    scale, offset = _grid_map(n_in, n_out)
    o_lo = max(0, math.floor((lo - 1 - offset) / scale) - 1)
    o_hi = min(n_out, math.floor((hi - offset) / scale) + 2)
    i_lo = max(0, lo - 2)
    i_hi = min(n_in, hi + 2)
    return _Window(i_lo, i_hi, o_lo, o_hi, scale, scale * o_lo + offset - i_lo)


def _bucketed(n: int, bucket: int) -> int:
    """``n`` rounded up to a multiple of ``bucket``."""
    return -(-n // bucket) * bucket


def _linear_along(x: np.ndarray, m: _AxisMap, axis: int, into: tuple[np.ndarray, int] | None = None) -> Any:
    """Linear interpolation of one axis by ``m`` (:func:`_linear_axis_map`, :func:`_lerp`); float64.

    Chunk by chunk of :data:`CHUNK_SLICES` along another axis, so the temporaries stay small; ``x`` may
    be a bool mask (converted chunk by chunk). ``into=(region, value)``: nothing is returned; ``value``
    is set in ``region`` (the output window of a uint8 label map) where the result, rounded to float32,
    is >= 0.5. That is the 3D transform's float64 result and rounding: exact ties (a voxel halfway
    between an organ and its outside) go the same way, which float32 passes would not.
    """
    out_shape = list(x.shape)
    out_shape[axis] = len(m.i0)
    out = np.empty(tuple(out_shape), dtype=np.float64) if into is None else None
    along = 1 if axis == 0 else 0
    for start in range(0, x.shape[along], CHUNK_SLICES):
        sel = (slice(None),) * along + (slice(start, start + CHUNK_SLICES),)
        part = _lerp(np.asarray(x[sel], dtype=np.float64), m, axis, np)
        if out is not None:
            out[sel] = part
        else:
            region, value = into
            region[sel][part.astype(np.float32) >= 0.5] = value
    return out


def _linear_separable(sub: np.ndarray, windows: Sequence[_Window], axes: Sequence[int],
                      into: tuple[np.ndarray, int]) -> None:
    """:func:`_label_pass` on the CPU: the trilinear interpolation one axis after the other, the most shrinking first.

    The tensor product of 1D linear interpolations is the 3D one; factored, each pass is two gathers and
    a multiply-add over an array the passes before have made smaller, about 5x faster than SciPy's 3D
    ``affine_transform`` on a CT scan's organs, in float64 as it computes. The output window is made in
    :data:`LABEL_SLABS` slabs along the first pass's axis (at least :data:`CHUNK_SLICES` samples each, each
    from the input samples it needs) and thresholded into ``into`` as it goes, so no float copy of the
    window or of the passes between is ever whole.
    """
    order = sorted(axes, key=lambda ax: (windows[ax].out_hi - windows[ax].out_lo) / sub.shape[ax])
    maps = {ax: _linear_axis_map(windows[ax].scale, windows[ax].offset, sub.shape[ax],
                                 windows[ax].out_hi - windows[ax].out_lo) for ax in order}
    region, value = into
    first, rest = order[0], order[1:]
    m = maps[first]
    at = (slice(None),) * first
    slab = max(CHUNK_SLICES, -(-len(m.i0) // LABEL_SLABS))
    for start in range(0, len(m.i0), slab):
        stop = min(start + slab, len(m.i0))
        lo, hi = int(m.i0[start:stop].min()), int(m.i1[start:stop].max()) + 1
        slab_into = (region[at + (slice(start, stop),)], value)
        local = _AxisMap(m.i0[start:stop] - lo, m.i1[start:stop] - lo, m.w[start:stop])
        part = _linear_along(sub[at + (slice(lo, hi),)], local, first, into=None if rest else slab_into)
        for i, ax in enumerate(rest):
            part = _linear_along(part, maps[ax], ax, into=slab_into if i == len(rest) - 1 else None)


def _label_pass(
    sub: Any, windows: Sequence[_Window], axes: Sequence[int], xp: ModuleType, ndi: ModuleType, bucket: int = 1,
    into: tuple[Any, int] | None = None,
) -> Any:
    """Linearly resample ``axes`` of a cropped mask to their output crop; the other axes stay (the 3D transform; on
    the CPU without rounding of the sizes, :func:`_linear_separable`).

    The transform runs at the output shape rounded up to multiples of ``bucket`` and is cropped back:
    output voxel o depends on its coordinate alone, so the crop is exactly the unrounded result.
    ``into=(region, value)``: returns nothing and sets ``value`` in ``region`` where the result is >= 0.5.
    """
    if xp is np and bucket == 1 and axes and into is not None:
        return _linear_separable(sub, windows, axes, into)
    sub = sub.astype(xp.float32, copy=False)
    scales = [w.scale if ax in axes else 1.0 for ax, w in enumerate(windows)]
    offsets = [w.offset if ax in axes else 0.0 for ax, w in enumerate(windows)]
    shape = [w.out_hi - w.out_lo if ax in axes else sub.shape[ax] for ax, w in enumerate(windows)]
    padded = [_bucketed(n, bucket) for n in shape]
    out = _transform(sub, scales, offsets, padded, 1, xp, ndi)
    out = out if padded == shape else out[tuple(slice(0, n) for n in shape)]
    if into is None:
        return out
    region, value = into
    region[out >= 0.5] = value
    return None


def _label_select(sub: Any, window: _Window, n_in: int, n_out: int, axis: int, xp: ModuleType) -> Any:
    """Nearest-neighbour pass along ``axis`` of a cropped mask, picking the slices the full volume would."""
    idx = _nearest_indices(n_in, n_out)[window.out_lo : window.out_hi] - window.in_lo
    # Indices outside the crop fall on zeros (the crop keeps two empty voxels of margin)
    # or on the true border voxel, which the clamp reproduces.
    idx = np.clip(idx, 0, window.in_hi - window.in_lo - 1)
    return xp.take(sub, xp.asarray(idx), axis=axis)


def resample_labels(
    labels: Any,
    new_shape: Sequence[int],
    *,
    separate_z: int | None = None,
    am: ArrayModule | None = None,
    window_bucket: int | None = None,
) -> Any:
    """Resample a (z, y, x) label map to ``new_shape``; uint8 on ``xp``.

    nnU-Net's "order 1 per label": each label ``c > 0`` present is interpolated as a
    float mask (linear; nearest along ``separate_z`` when given) and set where the
    result is >= 0.5, labels in increasing order so a later label wins a tie. Only
    values present in the input appear in the output, 255 ("ignore") included.
    Each mask is resampled only around its bounding box, which gives the same result
    as the whole volume at a fraction of the cost for small organs.
    ``window_bucket``: the window sizes are rounded up to multiples of it for the
    interpolation (the result is the same); None: :data:`LABEL_WINDOW_BUCKET` on a GPU,
    where each new size would compile a new kernel, 1 (no rounding) on the CPU.
    """
    _check_volume(labels, "labels")
    am = am or cpu_module()
    xp, ndi = am.xp, am.ndi
    new_shape = _check_shape3(new_shape, "new_shape")
    separate_z = _check_axis(separate_z)
    if window_bucket is None:
        window_bucket = LABEL_WINDOW_BUCKET if am.device == "cuda" else 1
    if isinstance(window_bucket, (bool, np.bool_)) or not isinstance(window_bucket, (int, np.integer)) \
            or window_bucket < 1:
        raise ValueError(f"window_bucket must be a positive integer, got {window_bucket!r}")
    kind = getattr(getattr(labels, "dtype", None), "kind", None)
    if kind not in ("b", "i", "u"):
        raise ValueError(f"labels must have an integer or bool dtype, got {getattr(labels, 'dtype', None)}")
    lab = xp.asarray(labels)
    if kind != "b" and lab.size:
        lo, hi = int(lab.min()), int(lab.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"labels must lie in 0..255 to fit uint8, got values from {lo} to {hi}")
    lab = lab.astype(xp.uint8)
    if tuple(lab.shape) == new_shape:
        return lab.copy()
    out = xp.zeros(new_shape, dtype=xp.uint8)
    values = [int(v) for v in xp.unique(lab).tolist() if int(v) != 0]
    logger.debug("resample_labels %s -> %s separate_z=%s labels=%s", tuple(lab.shape), new_shape, separate_z, values)
    for c in values:
        mask = lab == c
        windows = [
            _label_window(*_true_extent(mask.any(axis=tuple(o for o in range(3) if o != ax)), xp), lab.shape[ax], new_shape[ax])
            for ax in range(3)
        ]
        sub = mask[tuple(slice(w.in_lo, w.in_hi) for w in windows)]  # bool: made float in the passes, chunk by chunk
        region = out[tuple(slice(w.out_lo, w.out_hi) for w in windows)]
        if separate_z is None:
            _label_pass(sub, windows, (0, 1, 2), xp, ndi, window_bucket, into=(region, c))
            continue
        # Nearest along the thick axis (a selection of slices) commutes exactly with
        # linear in-plane interpolation; do the pass that shrinks the mask first.
        a = separate_z
        plane = tuple(ax for ax in range(3) if ax != a)
        # On the CPU the selection always comes first: on the bool mask it is cheap, and the passes after it
        # threshold slab by slab, so no float copy of the output window is made.
        if new_shape[a] < lab.shape[a] or (xp is np and window_bucket == 1):
            res = _label_select(sub, windows[a], lab.shape[a], new_shape[a], a, xp)
            _label_pass(res, windows, plane, xp, ndi, window_bucket, into=(region, c))
        else:
            res = _label_pass(sub, windows, plane, xp, ndi, window_bucket)
            res = _label_select(res, windows[a], lab.shape[a], new_shape[a], a, xp)
            region[res.astype(xp.float32, copy=False) >= 0.5] = c
    return out


#: Output elements (channels x slices x rows x columns) per block of :func:`resample_logits_to_labels`.
LOGIT_BLOCK_ELEMENTS = 1 << 23


class _AxisMap(NamedTuple):
    """Where the output samples one axis: the two input indices and the weight of the second (0: nearest)."""

    i0: np.ndarray
    i1: np.ndarray
    w: np.ndarray


def _axis_map(n_in: int, n_out: int, nearest: bool) -> _AxisMap:
    """Linear interpolation on nnU-Net's grid with edges extended (order 1, mode 'nearest'), or nearest."""
    if nearest:
        i = _nearest_indices(n_in, n_out)
        return _AxisMap(i, i, np.zeros(n_out))
    return _linear_axis_map(*_grid_map(n_in, n_out), n_in, n_out)


def _linear_axis_map(scale: float, offset: float, n_in: int, n_out: int) -> _AxisMap:
    """Linear interpolation at input coordinates ``scale * o + offset``, edges extended (mode 'nearest')."""
    t = np.clip(scale * np.arange(n_out, dtype=np.float64) + offset, 0.0, n_in - 1)
    i0 = np.floor(t).astype(np.int64)
    return _AxisMap(i0, np.minimum(i0 + 1, n_in - 1), t - i0)


def _lerp(x: Any, m: _AxisMap, axis: int, xp: ModuleType) -> Any:
    """``x`` resampled along ``axis`` by ``m`` (in its dtype): a gather, and a blend where the map is linear."""
    lo = xp.take(x, xp.asarray(m.i0), axis=axis)
    if not m.w.any():
        return lo
    hi = xp.take(x, xp.asarray(m.i1), axis=axis)
    shape = [1] * x.ndim
    shape[axis] = -1
    hi -= lo
    hi *= xp.asarray(m.w, dtype=x.dtype).reshape(shape)
    lo += hi
    return lo


def _argmax_first(values: Any, xp: ModuleType) -> Any:
    """uint8 argmax over axis 0, ties to the lowest index (as numpy's), one channel at a time."""
    best = values[0].copy()
    index = xp.zeros(best.shape, dtype=xp.uint8)
    for c in range(1, values.shape[0]):
        better = values[c] > best
        index[better] = c
        xp.maximum(best, values[c], out=best)
    return index


def _decided_cells(logits: Any, maps: Sequence[_AxisMap], xp: ModuleType) -> tuple[Any, Any]:
    """The argmax of the input grid, and where it decides the output: cells whose corners all agree by a margin.

    Linear interpolation is a convex combination of a cell's corners: where one class leads every corner
    by more than two float16 steps of the largest logit, it leads the interpolated logits too, after
    rounding to float16 (each value moves by at most half a step). Those output voxels need no
    interpolation; only the others are computed.
    """
    top = logits.max(axis=0)
    label = _argmax_first(logits, xp)
    runner_up = xp.where(xp.arange(logits.shape[0]).reshape(-1, 1, 1, 1) == label[None], -xp.inf,
                         logits.astype(xp.float32)).max(axis=0)
    largest = float(xp.abs(logits).max()) if logits.size else 0.0
    step = 2.0 ** (math.floor(math.log2(largest)) - 10) if largest > 0 else 2.0**-24
    decided = (top.astype(xp.float32) - runner_up) > 2.0 * max(step, 2.0**-24)
    for ax, m in enumerate(maps):
        if m.w.any():  # a linear axis: the cell's other corner is the next index (the last one is its own)
            n = label.shape[ax]
            nxt = [slice(None)] * 3
            nxt[ax] = xp.asarray(np.minimum(np.arange(n) + 1, n - 1))
            decided = decided & decided[tuple(nxt)] & (label == label[tuple(nxt)])
    return label, decided


def resample_logits_to_labels(
    logits: Any,
    new_shape: Sequence[int],
    *,
    separate_z: int | None = None,
    am: ArrayModule | None = None,
    block_elements: int = LOGIT_BLOCK_ELEMENTS,
    round_to: Any = None,
) -> Any:
    """The argmax (uint8) of (C, z, y, x) logits resampled to ``new_shape``, as nnU-Net brings logits back.

    nnU-Net resamples the network's logits (not its labels) to the original grid with linear
    interpolation (its ``resampling_fn_probabilities``: order 1, and nearest along a separate thick
    axis), in float64, stores them in the logits' dtype (``round_to``, e.g. float16) and takes the
    argmax (ties to the lower class). The result here is the same, computed where it is not already
    decided: an output voxel whose input cell has one class leading at every corner by a margin that
    rounding cannot close takes that class (:func:`_decided_cells`); the others are interpolated in
    float64 from their eight corners. Blocks along axis 0 where most voxels are undecided (an
    untrained net) are interpolated whole, separably in float64. No full-resolution (C, Z, Y, X)
    float array ever exists; the grid alignment is the one of :func:`resample_image`.
    """
    xp = (am or cpu_module()).xp
    if getattr(logits, "ndim", None) != 4:
        raise ValueError(f"logits must be a 4D (C, z, y, x) array, got shape {getattr(logits, 'shape', None)}")
    new_shape = _check_shape3(new_shape, "new_shape")
    separate_z = _check_axis(separate_z)
    if logits.shape[0] > 256:
        raise ValueError(f"at most 256 channels fit a uint8 label map, got {logits.shape[0]}")
    logits = xp.asarray(logits)
    channels = logits.shape[0]
    maps = [_axis_map(n_in, n_out, ax == separate_z) for ax, (n_in, n_out) in
            enumerate(zip(logits.shape[1:], new_shape))]
    label, decided = _decided_cells(logits, maps, xp)
    rows = xp.asarray(maps[1].i0)[:, None], xp.asarray(maps[2].i0)[None, :]
    out = xp.empty(new_shape, dtype=xp.uint8)
    block = max(1, min(new_shape[0], block_elements // max(channels * new_shape[1] * new_shape[2], 1)))
    for first in range(0, new_shape[0], block):
        last = min(first + block, new_shape[0])
        zs = xp.asarray(maps[0].i0[first:last])[:, None, None]
        labels = label[zs, rows[0][None], rows[1][None]]
        todo = ~decided[zs, rows[0][None], rows[1][None]]
        count = int(todo.sum())
        if count == 0:
            out[first:last] = labels
        elif count * 4 < todo.size:
            where = xp.nonzero(todo)
            values = _interpolate_points(logits, maps, (where[0] + first,) + where[1:], xp)
            if round_to is not None:
                values = values.astype(round_to)
            labels[where] = xp.argmax(values, axis=0).astype(xp.uint8)
            out[first:last] = labels
        else:
            out[first:last] = _dense_block(logits, maps, first, last, round_to, xp)
    return out


def _interpolate_points(logits: Any, maps: Sequence[_AxisMap], points: Sequence[Any], xp: ModuleType) -> Any:
    """(C, N) float64 interpolated logits at output voxels ``points`` (three index arrays): the 8-corner sum."""
    host = [xp.asarray(p) for p in points]
    corners = []
    for ax, m in enumerate(maps):
        i0, i1, w = (xp.asarray(a)[host[ax]] for a in (m.i0, m.i1, m.w))
        corners.append(((i0, 1.0 - w), (i1, w)))
    total = None
    for (z, wz), (y, wy), (x, wx) in itertools.product(*corners):
        term = logits[:, z, y, x].astype(xp.float64) * (wz * wy * wx)
        total = term if total is None else total + term
    return total


def _dense_block(logits: Any, maps: Sequence[_AxisMap], first: int, last: int, round_to: Any,
                 xp: ModuleType) -> Any:
    """uint8 labels of output slices first..last, every voxel interpolated (separably, float64 as nnU-Net)."""
    mz = _AxisMap(maps[0].i0[first:last], maps[0].i1[first:last], maps[0].w[first:last])
    lo, hi = int(min(mz.i0.min(), mz.i1.min())), int(max(mz.i0.max(), mz.i1.max())) + 1
    part = xp.asarray(logits[:, lo:hi], dtype=xp.float64)
    slab = _lerp(part, _AxisMap(mz.i0 - lo, mz.i1 - lo, mz.w), 1, xp)
    slab = _lerp(slab, maps[2], 3, xp)
    slab = _lerp(slab, maps[1], 2, xp)
    if round_to is not None:
        slab = slab.astype(round_to)
    return _argmax_first(slab, xp)


def resample_to_spacing(
    image: Any,
    spacing_mm_zyx: Sequence[float],
    new_spacing_mm_zyx: Sequence[float],
    *,
    is_labels: bool = False,
    order: int = 3,
    order_z: int = 0,
    threshold: float = ANISOTROPY_THRESHOLD,
    am: ArrayModule | None = None,
) -> Any:
    """Resample a (z, y, x) image or label map from one spacing to another, nnU-Net style.

    Computes the target shape with :func:`target_shape` and the thick axis with
    :func:`separate_z_axis`, then calls :func:`resample_labels` (uint8) when
    ``is_labels`` else :func:`resample_image` (float32). ``order``/``order_z`` apply
    to images only; labels always use nnU-Net's order 1 per label.
    """
    _check_volume(image, "image")
    new_shape = target_shape(tuple(image.shape), spacing_mm_zyx, new_spacing_mm_zyx)
    axis = separate_z_axis(spacing_mm_zyx, new_spacing_mm_zyx, threshold)
    if is_labels:
        return resample_labels(image, new_shape, separate_z=axis, am=am)
    return resample_image(image, new_shape, order=order, separate_z=axis, order_z=order_z, am=am)
