"""The array module of a device: NumPy/SciPy on the CPU, CuPy/cupyx on a CUDA GPU.

Every array operation of the runtime is written once against the NumPy/SciPy API
and receives one :class:`ArrayModule`; only connected-component labelling picks a
faster library per device (connected-components-3d on the CPU, cuCIM on x86_64
GPUs), because neither NumPy nor CuPy offers a multi-label labelling.

On a GPU, work is ordered by CUDA streams: :meth:`ArrayModule.new_stream` makes a
non-blocking stream and :meth:`ArrayModule.stream_scope` makes it CuPy's current one,
which every CuPy operation, host/device copy and engine call inside the scope then uses
(NumPy has no streams: both are no-ops there).

Nothing here imports CuPy until a GPU module is asked for.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import scipy.ndimage

from pocketseg.errors import PocketsegError

__all__ = ["ArrayModule", "DeviceUnavailableError", "array_module", "bounding_box", "cuda_available", "cpu_module",
           "skimage_labellers"]

log = logging.getLogger(__name__)

#: Connectivity of "connected": full 26-neighbourhood in 3D, as nnU-Net's
#: remove_all_but_largest_component (skimage.measure.label's default, connectivity=ndim).
CONNECTIVITY = 26


class DeviceUnavailableError(PocketsegError, RuntimeError):
    """The requested device cannot be used on this machine (no GPU, no CuPy, ...)."""


@dataclass(frozen=True)
class ArrayModule:
    """``xp`` and ``ndi`` of one device, plus the labelling function and host/device transfers."""

    name: str  # "numpy" or "cupy"
    device: str  # "cpu" or "cuda"
    xp: ModuleType
    ndi: ModuleType
    #: Binary mask -> (int32 component ids 1..n, n), 26-connected.
    label: Callable[[Any], tuple[Any, int]]
    label_library: str
    #: Label map -> (int32 ids 1..n of the 26-connected components of every non-zero value, n), or None
    #: when the library has no multi-label mode (then :func:`label_each_value` loops over the values).
    label_multi: Callable[[Any], tuple[Any, int]] | None = None

    def to_device(self, array: Any) -> Any:
        return self.xp.asarray(array)

    def to_host(self, array: Any) -> np.ndarray:
        if self.name == "cupy":
            return self.xp.asnumpy(array)
        return np.asarray(array)

    def synchronize(self) -> None:
        """Wait for the work queued on the current stream (the stream of the enclosing :meth:`stream_scope`)."""
        if self.name == "cupy":
            self.xp.cuda.get_current_stream().synchronize()

    def new_stream(self) -> Any:
        """A new non-blocking CUDA stream (None on the CPU).

        Non-blocking: it never waits for the legacy default stream (CuPy's null stream), so work on
        it does not serialise with other libraries or predictors of the process that use that stream.
        """
        if self.name == "cupy":
            return self.xp.cuda.Stream(non_blocking=True)
        return None

    def stream_scope(self, stream: Any) -> contextlib.AbstractContextManager:
        """``with am.stream_scope(stream):`` makes ``stream`` CuPy's current stream in this thread (no-op for None)."""
        return contextlib.nullcontext() if stream is None else stream

    def free_cached_memory(self) -> None:
        """Return cached blocks of CuPy's memory pool to the driver (GPU memory as others see it)."""
        if self.name == "cupy":
            self.synchronize()
            self.xp.get_default_memory_pool().free_all_blocks()


def bounding_box(mask: Any, am: ArrayModule | None = None) -> tuple[slice, slice, slice] | None:
    """The smallest box holding every True voxel of a mask, or None when it is empty: the one bounding-box rule.

    One reduction per axis (``any`` over the others), so no index array of the mask's size is made.
    """
    am = am or cpu_module()
    xp = am.xp
    box = []
    for axis in range(mask.ndim):
        profile = mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis))
        idx = xp.flatnonzero(profile)
        if idx.size == 0:
            return None
        box.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(box)  # type: ignore[return-value]


def _scipy_label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    structure = np.ones((3,) * mask.ndim, dtype=bool)
    labels, n = scipy.ndimage.label(mask, structure=structure, output=np.int32)
    return labels, int(n)


def _cc3d_label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    import cc3d  # optional (runtime extra); cpu_module() checked that it imports

    # cc3d picks the smallest output dtype that fits; int32 keeps bincount and comparisons uniform.
    labels, n = cc3d.connected_components(np.ascontiguousarray(mask, dtype=bool), connectivity=CONNECTIVITY,
                                          return_N=True)
    return labels.astype(np.int32, copy=False), int(n)


def _cc3d_label_multi(labels: np.ndarray) -> tuple[np.ndarray, int]:
    import cc3d  # optional (runtime extra); cpu_module() checked that it imports

    # One pass for every value: voxels are connected only to neighbours of the same value.
    out, n = cc3d.connected_components(np.ascontiguousarray(labels), connectivity=CONNECTIVITY, return_N=True)
    return out.astype(np.int32, copy=False), int(n)


@functools.lru_cache(maxsize=1)
def cpu_module() -> ArrayModule:
    """NumPy + scipy.ndimage; labelling with connected-components-3d when installed (several times faster)."""
    try:
        importlib.import_module("cc3d")
    except ImportError:
        return ArrayModule("numpy", "cpu", np, scipy.ndimage, _scipy_label, "scipy.ndimage")
    return ArrayModule("numpy", "cpu", np, scipy.ndimage, _cc3d_label, "connected-components-3d", _cc3d_label_multi)


def cuda_available() -> tuple[bool, str]:
    """(usable, why not): a CUDA GPU that CuPy can use."""
    try:
        cupy = importlib.import_module("cupy")  # optional (gpu extra): only when a GPU is asked about
    except Exception as exc:  # ImportError, or a CUDA library that fails to load
        return False, f"CuPy is not usable ({type(exc).__name__}: {exc}); install pocketseg[gpu]"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return False, f"no CUDA GPU ({type(exc).__name__}: {exc})"
    if count < 1:
        return False, "no CUDA GPU"
    return True, ""


@functools.lru_cache(maxsize=1)
def _gpu_module() -> ArrayModule:
    usable, why = cuda_available()
    if not usable:
        raise DeviceUnavailableError(f"device 'cuda' is not available: {why}")
    cupy = importlib.import_module("cupy")
    cundi = importlib.import_module("cupyx.scipy.ndimage")
    try:  # cuCIM (x86_64 only; not on Jetson) labels faster than cupyx, and every value in one pass
        measure = importlib.import_module("cucim.skimage.measure")
        label, label_multi = skimage_labellers(measure, cupy)
        return ArrayModule("cupy", "cuda", cupy, cundi, label, "cucim", label_multi)
    except Exception:  # ImportError or a cuCIM built for another CUDA
        structure = cupy.ones((3, 3, 3), dtype=bool)

        def label(mask):
            out = cupy.empty(mask.shape, dtype=cupy.int32)
            n = cundi.label(mask, structure=structure, output=out)
            return out, int(n)

        return ArrayModule("cupy", "cuda", cupy, cundi, label, "cupyx.scipy.ndimage")


def skimage_labellers(measure: ModuleType, xp: ModuleType) -> tuple[Callable[[Any], tuple[Any, int]],
                                                                      Callable[[Any], tuple[Any, int]]]:
    """(binary, multi-label) labelling through a ``measure.label`` with scikit-image's API (cuCIM's on a GPU).

    ``measure.label`` labels connected regions of equal value, 0 being background, so one call labels
    every organ of a label map: a voxel is connected only to neighbours of its own value. Connectivity
    3 (= ndim) is the full 26-neighbourhood.
    """

    def label(image: Any) -> tuple[Any, int]:
        out, n = measure.label(image, connectivity=3, return_num=True)
        return out.astype(xp.int32, copy=False), int(n)

    return label, label


def array_module(device: str) -> ArrayModule:
    """The array module for ``"cpu"`` or ``"cuda"``; :class:`DeviceUnavailableError` if it cannot run here."""
    if device == "cpu":
        return cpu_module()
    if device == "cuda":
        return _gpu_module()
    raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
