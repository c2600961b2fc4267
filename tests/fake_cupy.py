"""A stand-in for CuPy where no GPU is: NumPy arrays plus CuPy's stream API, recording what is queued where.

Follows CuPy's documented behaviour (cupy/cuda/stream.pyx): ``cupy.cuda.Stream(non_blocking=...)``
is a context manager that makes the stream current in this thread and restores the previous one on
exit; ``get_current_stream()`` is the null stream (``ptr == 0``, the legacy default stream) outside
any; ``Stream.record()`` returns an event, ``Stream.wait_event(event)`` orders the stream after it;
``ndarray.data.ptr`` is the device address. Arrays are NumPy arrays, so array code runs unchanged.
"""

from __future__ import annotations

import types
from typing import Any

import numpy as np
import scipy.ndimage

from pocketseg.runtime import arrays


class DeviceArray(np.ndarray):
    """A NumPy array with CuPy's ``.data.ptr``."""

    @property
    def data(self):  # shadows ndarray.data (a memoryview), as cupy.ndarray.data is a MemoryPointer
        return types.SimpleNamespace(ptr=self.__array_interface__["data"][0])


class FakeEvent:
    def __init__(self, stream: FakeStream):
        self.stream = stream


class FakeStream:
    def __init__(self, cuda: FakeCuda, ptr: int, non_blocking: bool):
        self.cuda, self.ptr, self.non_blocking = cuda, ptr, non_blocking
        self.synchronized = 0
        self.waited: list[FakeEvent] = []
        self.recorded: list[FakeEvent] = []

    def __enter__(self) -> FakeStream:  # noqa: PYI034 - Python 3.10 has no typing.Self
        self.cuda.stack.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.cuda.stack.pop() is self

    def synchronize(self) -> None:
        self.synchronized += 1

    def record(self, event: FakeEvent | None = None) -> FakeEvent:
        event = FakeEvent(self)
        self.recorded.append(event)
        return event

    def wait_event(self, event: FakeEvent) -> None:
        self.waited.append(event)


class FakeCuda:
    def __init__(self):
        self.null = FakeStream(self, 0, non_blocking=False)
        self.stack = [self.null]
        self.made: list[FakeStream] = []

    def Stream(self, null: bool = False, non_blocking: bool = False) -> FakeStream:
        stream = FakeStream(self, 0x1000 * (len(self.made) + 1), non_blocking)
        self.made.append(stream)
        return stream

    def get_current_stream(self) -> FakeStream:
        return self.stack[-1]

    def Device(self, index: int = 0):
        return types.SimpleNamespace(id=index)


class FakePool:
    def __init__(self):
        self.freed = 0

    def free_all_blocks(self) -> None:
        self.freed += 1


class FakeCupy:
    """``numpy`` with ``cuda`` (streams), ``asnumpy`` and a memory pool; new arrays carry ``.data.ptr``."""

    def __init__(self):
        self.cuda = FakeCuda()
        self.pool = FakePool()

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)

    def asnumpy(self, a: Any) -> np.ndarray:
        return np.asarray(a)

    def get_default_memory_pool(self) -> FakePool:
        return self.pool

    def ascontiguousarray(self, a: Any, dtype: Any = None) -> DeviceArray:
        return np.ascontiguousarray(a, dtype=dtype).view(DeviceArray)

    def empty(self, shape: Any, dtype: Any = float) -> DeviceArray:
        return np.empty(shape, dtype=dtype).view(DeviceArray)

    def zeros(self, shape: Any, dtype: Any = float, order: str = "C") -> DeviceArray:  # cupy.zeros takes order too
        return np.zeros(shape, dtype=dtype, order=order).view(DeviceArray)


def fake_gpu_module() -> arrays.ArrayModule:
    """An ArrayModule named like the GPU one (``cupy``, ``cuda``) over :class:`FakeCupy` and scipy.ndimage."""
    return arrays.ArrayModule("cupy", "cuda", FakeCupy(), scipy.ndimage, arrays._scipy_label, "scipy.ndimage")
