"""Memory samplers of the efficiency harness: GPU memory through NVML, process RSS on the CPU.

FLARE 2023 measures the GPU memory of a submission with its resource script
(``Efficiency.py`` of the FLARE repository): the device's used memory, read through
NVML every 0.1 s while the container runs; it reports the maximum and the area
under the memory-time curve, computed as *sum of samples x 0.1 s* (MB·s).
:class:`MemorySampler` does the same in a background thread for any
:class:`MemoryReader`::

    reader = open_reader("cuda")                   # NVML, else cudaMemGetInfo (Jetson)
    sampler = MemorySampler(reader).start()        # baseline = the reading now
    ...                                            # the work being measured
    trace = sampler.stop()                         # trace.max_mb, trace.auc_mb_s, trace.source
    trace.max_above_baseline_mb                    # the same minus the idle baseline

Sources, tried in this order (:func:`open_gpu_reader`, :func:`open_rss_reader`):

* ``nvml``: NVML's device used memory (nvidia-ml-py, module ``pynvml``), FLARE's source.
  Two structs report it. ``nvmlMemory_v2`` (``nvmlDeviceGetMemoryInfo(handle,
  version=nvmlMemory_v2)``) counts the driver-reserved memory apart, so its ``used`` is
  what nvidia-smi shows as used; the v1 struct (``nvmlDeviceGetMemoryInfo(handle)``)
  folds the reserved memory into ``used`` (hundreds of MB more). The reader takes v2
  where the binding and the driver have it, else v1, and says which (``struct``). FLARE's
  script reads the v1 struct: ``total - free`` of pynvml's ``nvidia_smi.DeviceQuery``,
  which calls ``nvmlDeviceGetMemoryInfo(handle)``; with v2, v1's ``used`` is
  ``used + reserved`` (``reserved_mb``, recorded too);
* ``cudaMemGetInfo``: total - free of the device through CuPy, where NVML reports
  nothing (Jetson's integrated GPU has no NVML memory query; there the number is the
  shared system memory in use). It needs a CUDA context in the sampling process,
  which the idle baseline then includes;
* ``proc`` / ``psutil``: on the CPU, the resident set size (RSS) of a process and
  its child processes, from ``/proc/PID/status`` (Linux) or psutil.

Units: MB = 2^20 bytes, as nvidia-smi and FLARE's script use. Nothing here imports
pynvml or CuPy until a GPU reader is asked for.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
import resource
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pocketseg.errors import PocketsegError

__all__ = [
    "INTERVAL_S",
    "MB",
    "MemoryReader",
    "MemorySampler",
    "MemorySourceError",
    "MemoryTrace",
    "area_under_curve",
    "memory_reader_details",
    "open_gpu_reader",
    "open_reader",
    "open_rss_reader",
]

log = logging.getLogger(__name__)

#: Bytes per MB (MiB), the unit of nvidia-smi and of FLARE's resource script.
MB = 2**20
#: FLARE's sampling interval.
INTERVAL_S = 0.1


class MemorySourceError(PocketsegError, RuntimeError):
    """No memory source works here; the message lists why each one was skipped."""


def area_under_curve(samples_mb: Sequence[float], interval_s: float = INTERVAL_S) -> float:
    """FLARE's total memory (MB·s): the sum of the samples times the sampling interval."""
    return float(sum(samples_mb)) * float(interval_s)


@dataclass
class MemoryTrace:
    """Samples of one measured interval: ``used_mb[n]`` was read ``times_s[n]`` seconds after the start."""

    source: str
    interval_s: float
    baseline_mb: float
    times_s: list[float] = field(default_factory=list)
    used_mb: list[float] = field(default_factory=list)

    @property
    def max_mb(self) -> float:
        return max(self.used_mb, default=0.0)

    @property
    def auc_mb_s(self) -> float:
        return area_under_curve(self.used_mb, self.interval_s)

    @property
    def above_baseline_mb(self) -> list[float]:
        # Clipped at 0: a reading below the baseline (memory another process freed) is not negative use.
        return [max(v - self.baseline_mb, 0.0) for v in self.used_mb]

    @property
    def max_above_baseline_mb(self) -> float:
        return max(self.above_baseline_mb, default=0.0)

    @property
    def auc_above_baseline_mb_s(self) -> float:
        return area_under_curve(self.above_baseline_mb, self.interval_s)

    def summary(self) -> dict[str, Any]:
        """The numbers of the report (no samples)."""
        return {"source": self.source, "interval_s": self.interval_s, "samples": len(self.used_mb),
                "baseline_mb": self.baseline_mb, "max_mb": self.max_mb, "auc_mb_s": self.auc_mb_s,
                "max_above_baseline_mb": self.max_above_baseline_mb,
                "auc_above_baseline_mb_s": self.auc_above_baseline_mb_s}

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary(), "times_s": [round(t, 4) for t in self.times_s],
                "used_mb": [round(v, 2) for v in self.used_mb]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MemoryTrace:
        return cls(str(data["source"]), float(data["interval_s"]), float(data["baseline_mb"]),
                   [float(t) for t in data.get("times_s", [])], [float(v) for v in data.get("used_mb", [])])


class MemoryReader(Protocol):
    """One memory source: ``read_mb()`` is the current reading in MB, or None when there is none (process gone)."""

    source: str
    description: str

    def read_mb(self) -> float | None: ...

    def close(self) -> None: ...


# ------------------------------------------------------------------------------------------------------ GPU sources

#: NVML memory structs by the name the reports use.
NVML_V2, NVML_V1 = "nvmlMemory_v2", "nvmlMemory_v1"


class NvmlReader:
    """Device used memory through NVML (nvidia-ml-py): the v2 struct where available (as nvidia-smi shows it),
    else v1 (as FLARE's resource script reads it, driver-reserved memory included); ``struct`` says which."""

    source = "nvml"

    def __init__(self, index: int = 0, pci_bus_id: str | None = None):
        self._nvml = importlib.import_module("pynvml")
        self._nvml.nvmlInit()
        self._version = None  # the version argument of nvmlDeviceGetMemoryInfo; None: the v1 struct
        try:
            if pci_bus_id:
                # CUDA and NVML may number GPUs differently (CUDA_VISIBLE_DEVICES, CUDA_DEVICE_ORDER);
                # the PCI bus id names the same device for both.
                self._handle = self._nvml.nvmlDeviceGetHandleByPciBusId(pci_bus_id)
            else:
                self._handle = self._nvml.nvmlDeviceGetHandleByIndex(index)
            name = self._nvml.nvmlDeviceGetName(self._handle)
            info = self._memory_v2()
            if info is None:
                info = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
        except BaseException:
            self.close()
            raise
        if not getattr(info, "total", 0):
            self.close()
            raise RuntimeError("NVML reports no device memory (integrated GPU?)")
        self.struct = NVML_V1 if self._version is None else NVML_V2
        #: Driver-reserved memory (v2 only): v1's ``used`` is v2's ``used`` plus this.
        self.reserved_mb = float(info.reserved) / MB if self._version is not None else None
        self.device_name = name.decode() if isinstance(name, bytes) else str(name)
        if self._version is None:
            what = "NVML nvmlMemory_v1: used includes driver-reserved memory, as FLARE's script reads it"
        else:
            what = (f"NVML nvmlMemory_v2: used without the {self.reserved_mb:.0f} MB driver-reserved, "
                    "as nvidia-smi shows it")
        self.description = f"GPU memory used on the device ({what}; {self.device_name})"

    def _memory_v2(self) -> Any:
        """The v2 struct, remembering its version for later reads; None where the binding or driver lacks it."""
        version = getattr(self._nvml, "nvmlMemory_v2", None)
        if version is None:  # nvidia-ml-py before the v2 struct
            return None
        try:
            info = self._nvml.nvmlDeviceGetMemoryInfo(self._handle, version=version)
        except TypeError:  # a binding whose nvmlDeviceGetMemoryInfo takes no version
            return None
        except Exception as exc:  # noqa: BLE001 - NVMLError_FunctionNotFound (older driver), NotSupported, ...
            log.debug("NVML nvmlMemory_v2 unavailable (%s: %s); reading the v1 struct", type(exc).__name__, exc)
            return None
        self._version = version
        return info

    def read_mb(self) -> float | None:
        if self._version is None:
            return self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used / MB
        return self._nvml.nvmlDeviceGetMemoryInfo(self._handle, version=self._version).used / MB

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._nvml.nvmlShutdown()


class CudaMemGetInfoReader:
    """total - free of a CUDA device through CuPy's ``cudaMemGetInfo`` (Jetson: shared memory in use)."""

    source = "cudaMemGetInfo"

    def __init__(self, index: int = 0):
        self._cupy = importlib.import_module("cupy")
        self._index = index
        self.read_mb()  # fails here, not in the sampling thread, where CUDA cannot be used
        try:
            name = self._cupy.cuda.runtime.getDeviceProperties(index)["name"]
            self.device_name = name.decode() if isinstance(name, bytes) else str(name)
        except Exception:  # noqa: BLE001 - the name is for the report only
            self.device_name = f"CUDA device {index}"
        self.description = f"GPU memory used on {self.device_name} (cudaMemGetInfo: total - free)"

    def read_mb(self) -> float | None:
        # Each host thread has its own current device; the sampler reads from its own thread.
        with self._cupy.cuda.Device(self._index):
            free, total = self._cupy.cuda.runtime.memGetInfo()
        return (total - free) / MB

    def close(self) -> None:
        pass


def _cuda_pci_bus_id(index: int) -> str | None:
    """The PCI bus id of CUDA device ``index`` through CuPy, or None (no CuPy, no GPU)."""
    try:
        cupy = importlib.import_module("cupy")
        return str(cupy.cuda.runtime.deviceGetPCIBusId(index))
    except Exception:  # noqa: BLE001 - ImportError, or CUDA errors without a GPU
        return None


#: GPU sources in the order they are tried.
GPU_SOURCES = ("nvml", "cudaMemGetInfo")


def open_gpu_reader(index: int = 0, *, sources: Sequence[str] = GPU_SOURCES) -> MemoryReader:
    """The first GPU memory source of ``sources`` that works for CUDA device ``index``.

    The reader's ``tried`` attribute lists why earlier sources were skipped; with none
    working, :class:`MemorySourceError` says why for each.
    """
    tried: list[str] = []
    for name in sources:
        try:
            if name == "nvml":
                reader: Any = NvmlReader(index, _cuda_pci_bus_id(index))
            elif name == "cudaMemGetInfo":
                reader = CudaMemGetInfoReader(index)
            else:
                raise ValueError(f"unknown GPU memory source {name!r}; known: {', '.join(GPU_SOURCES)}")
        except ValueError:
            raise
        except Exception as exc:  # noqa: BLE001 - ImportError, NVMLError_*, CUDA errors: all mean "not this source"
            why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if isinstance(exc, ImportError):
                why = f"not installed ({why}); pip install 'pocketseg[gpu]'"
            tried.append(f"{name}: {why}")
            log.debug("GPU memory source %s unusable: %s", name, why)
            continue
        reader.tried = tried
        if tried:
            log.info("GPU memory from %s (%s)", reader.source, "; ".join(tried))
        return reader
    raise MemorySourceError("no GPU memory source works here: " + "; ".join(tried))


# ------------------------------------------------------------------------------------------------------ CPU sources

def own_peak_rss_mb() -> float:
    """This process's peak resident memory in MiB since it started its program: ``VmHWM`` (Linux).

    Not ``ru_maxrss``: at ``exec`` the kernel folds the high-water mark of the address space being
    replaced into it, and a freshly spawned child's is its parent's (forked or shared by vfork), so a
    child of a big parent would report the parent's peak. ``ru_maxrss`` only where ``/proc`` is missing
    (macOS, where it is in bytes). Both come from the kernel's high-water mark, which is refreshed lazily: a
    short peak handed back with ``madvise`` may be missed by a few per cent (a sampled curve shows it).
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def _proc_rss_kb(pid: int) -> int | None:
    """VmRSS of one process in kB, or None when it is gone or a zombie (no VmRSS line)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _proc_children(pid: int) -> list[int]:
    children: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return children
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as handle:
                children.extend(int(c) for c in handle.read().split())
        except (OSError, ValueError):
            continue
    return children


class ProcRssReader:
    """RSS of a process and its descendants from ``/proc/PID/status`` (Linux)."""

    source = "proc"

    def __init__(self, pid: int):
        if _proc_rss_kb(os.getpid()) is None:
            raise RuntimeError("/proc/PID/status has no VmRSS here (not Linux?)")
        self.pid = int(pid)
        self.description = "process RSS (/proc/PID/status VmRSS, child processes included)"

    def read_mb(self) -> float | None:
        root = _proc_rss_kb(self.pid)
        if root is None:
            return None
        total, seen, stack = root, {self.pid}, _proc_children(self.pid)
        while stack:
            pid = stack.pop()
            if pid in seen:
                continue
            seen.add(pid)
            rss = _proc_rss_kb(pid)
            if rss is not None:
                total += rss
                stack.extend(_proc_children(pid))
        return total * 1024 / MB

    def close(self) -> None:
        pass


class PsutilRssReader:
    """RSS of a process and its descendants through psutil (where /proc is not available)."""

    source = "psutil"

    def __init__(self, pid: int):
        self._psutil = importlib.import_module("psutil")
        self._process = self._psutil.Process(int(pid))
        self.pid = int(pid)
        self.description = "process RSS (psutil, child processes included)"

    def read_mb(self) -> float | None:
        try:
            total = self._process.memory_info().rss
            for child in self._process.children(recursive=True):
                with contextlib.suppress(self._psutil.Error):
                    total += child.memory_info().rss
        except self._psutil.Error:  # gone, zombie, no access
            return None
        return total / MB

    def close(self) -> None:
        pass


#: CPU sources in the order they are tried.
RSS_SOURCES = ("proc", "psutil")


def open_rss_reader(pid: int | None = None, *, sources: Sequence[str] = RSS_SOURCES) -> MemoryReader:
    """The first RSS source that works for process ``pid`` (default: this process)."""
    pid = os.getpid() if pid is None else int(pid)
    tried: list[str] = []
    for name in sources:
        try:
            if name == "proc":
                reader: Any = ProcRssReader(pid)
            elif name == "psutil":
                reader = PsutilRssReader(pid)
            else:
                raise ValueError(f"unknown RSS source {name!r}; known: {', '.join(RSS_SOURCES)}")
        except ValueError:
            raise
        except Exception as exc:  # noqa: BLE001 - ImportError, psutil.Error, OSError: all mean "not this source"
            tried.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        reader.tried = tried
        return reader
    raise MemorySourceError(f"no source of process memory works here for PID {pid}: " + "; ".join(tried))


def memory_reader_details(reader: MemoryReader) -> dict[str, Any]:
    """What a report records about a reader beyond its source: the NVML struct read and the reserved memory."""
    if getattr(reader, "source", None) != "nvml":
        return {}
    return {"nvml_struct": getattr(reader, "struct", None), "nvml_reserved_mb": getattr(reader, "reserved_mb", None)}


def open_reader(device: str, *, pid: int | None = None, gpu_index: int = 0) -> MemoryReader:
    """GPU memory for ``device="cuda"``; the RSS of process ``pid`` (default: this one) for ``"cpu"``."""
    if device == "cuda":
        return open_gpu_reader(gpu_index)
    if device == "cpu":
        return open_rss_reader(pid)
    raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")


# ------------------------------------------------------------------------------------------------------ sampling

class MemorySampler:
    """Reads a :class:`MemoryReader` every ``interval_s`` in a background thread between start() and stop().

    The first sample is taken at start; samples stay on the grid start + n x interval
    (a late read skips the grid points it missed rather than bunching samples, so that
    sum x interval stays the area). A reading of None (the process ended) is skipped.
    """

    def __init__(self, reader: MemoryReader, interval_s: float = INTERVAL_S):
        if not (isinstance(interval_s, (int, float)) and math.isfinite(interval_s) and interval_s > 0):
            raise ValueError(f"interval_s must be a positive number, got {interval_s!r}")
        self.reader = reader
        self.interval_s = float(interval_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._trace: MemoryTrace | None = None
        self._t0 = 0.0

    def _read(self) -> float | None:
        try:
            return self.reader.read_mb()
        except Exception as exc:  # noqa: BLE001 - a transient NVML error must not end the measured run
            log.debug("memory reading failed: %s", exc)
            return None

    def start(self, baseline_mb: float | None = None) -> MemorySampler:
        """Start sampling; ``baseline_mb`` defaults to a reading taken now (the idle baseline)."""
        if self._thread is not None:
            raise RuntimeError("the sampler is already running")
        if baseline_mb is None:
            baseline_mb = self._read() or 0.0
        self._trace = MemoryTrace(self.reader.source, self.interval_s, float(baseline_mb))
        self._stop.clear()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        trace, t0, k = self._trace, self._t0, 0
        while trace is not None:  # always set by start()
            now = time.perf_counter()
            value = self._read()
            if value is not None:
                trace.times_s.append(now - t0)
                trace.used_mb.append(float(value))
            k = max(k + 1, math.ceil((time.perf_counter() - t0) / self.interval_s))
            if self._stop.wait(max(t0 + k * self.interval_s - time.perf_counter(), 0.0)):
                return

    def stop(self) -> MemoryTrace:
        """Stop sampling and return the trace."""
        if self._thread is None or self._trace is None:
            raise RuntimeError("the sampler was not started")
        self._stop.set()
        self._thread.join()
        self._thread = None
        return self._trace

    def __enter__(self) -> MemorySampler:  # noqa: PYI034 - Python 3.10 has no typing.Self
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self.stop()

    @property
    def trace(self) -> MemoryTrace | None:
        return self._trace
