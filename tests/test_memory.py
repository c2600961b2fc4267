"""Memory samplers of the bench (pocketseg.benchmarks.memory): FLARE's area rule, baselines, RSS, GPU source fallback."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import types

import pytest

from pocketseg.benchmarks import memory as M
from pocketseg.benchmarks.memory import MemorySampler, MemorySourceError, MemoryTrace, area_under_curve


class _Reader:
    """A memory source that returns the given readings in turn (then repeats the last)."""

    source = "fake"
    description = "fake readings"

    def __init__(self, *values):
        self.values = list(values)
        self.calls = 0

    def read_mb(self):
        value = self.values[min(self.calls, len(self.values) - 1)]
        self.calls += 1
        return value

    def close(self):
        pass


def test_area_is_sum_of_samples_times_interval():
    # FLARE's "total GPU memory": sum of the 0.1 s samples x 0.1 s.
    assert area_under_curve([100.0, 200.0, 300.0], 0.1) == pytest.approx(60.0)
    assert area_under_curve([], 0.1) == 0.0
    trace = MemoryTrace("fake", 0.1, baseline_mb=150.0, times_s=[0.0, 0.1, 0.2], used_mb=[100.0, 200.0, 300.0])
    assert trace.max_mb == 300.0
    assert trace.auc_mb_s == pytest.approx(60.0)
    # Minus the idle baseline, clipped at zero (a reading below the baseline is not negative use).
    assert trace.above_baseline_mb == [0.0, 50.0, 150.0]
    assert trace.max_above_baseline_mb == 150.0
    assert trace.auc_above_baseline_mb_s == pytest.approx(20.0)
    summary = trace.summary()
    assert summary["samples"] == 3 and summary["auc_mb_s"] == pytest.approx(60.0)
    assert MemoryTrace.from_dict(trace.to_dict()).used_mb == trace.used_mb


def test_sampler_reads_on_the_interval_grid_with_a_baseline_read_at_start():
    reader = _Reader(40.0, 100.0)
    sampler = MemorySampler(reader, interval_s=0.05).start()  # first reading (40) is the baseline
    time.sleep(0.33)
    trace = sampler.stop()
    assert trace.baseline_mb == 40.0 and trace.source == "fake"
    assert 4 <= len(trace.used_mb) <= 9
    assert set(trace.used_mb) == {100.0}
    assert trace.auc_mb_s == pytest.approx(100.0 * 0.05 * len(trace.used_mb))
    gaps = [b - a for a, b in zip(trace.times_s, trace.times_s[1:])]
    assert min(gaps) > 0.02  # on the grid: late reads never bunch up
    assert trace.max_above_baseline_mb == pytest.approx(60.0)


def test_sampler_given_baseline_and_readings_of_a_finished_process_are_skipped():
    sampler = MemorySampler(_Reader(None), interval_s=0.02).start(baseline_mb=0.0)
    time.sleep(0.1)
    trace = sampler.stop()
    assert trace.used_mb == [] and trace.max_mb == 0.0 and trace.baseline_mb == 0.0
    with pytest.raises(ValueError):
        MemorySampler(_Reader(1.0), interval_s=0)


@pytest.mark.parametrize("source", ["proc", "psutil"])
def test_rss_sampler_sees_what_a_child_process_allocates(source):
    if source == "psutil":
        pytest.importorskip("psutil")
    size_mb = 150
    # bytes * n writes every page, so all of it is resident.
    child = subprocess.Popen([sys.executable, "-c", (f"import sys, time; a = b'x' * ({size_mb} * 2**20); "
                                                    "print('ready', flush=True); time.sleep(1.0)")],
                             stdout=subprocess.PIPE, text=True)
    try:
        reader = M.open_rss_reader(child.pid, sources=(source,))
        assert reader.source == source
        sampler = MemorySampler(reader, interval_s=0.05).start(baseline_mb=0.0)
        assert child.stdout.readline().strip() == "ready"
        child.wait(timeout=30)
        trace = sampler.stop()
    finally:
        with contextlib.suppress(ProcessLookupError):
            child.kill()
        child.wait()
    assert trace.source == source
    # The interpreter itself adds some 10-40 MB.
    assert size_mb <= trace.max_mb <= size_mb + 80, trace.used_mb
    # Resident through the one-second sleep: many readings at the allocated size.
    assert sum(v >= size_mb for v in trace.used_mb) >= 5, trace.used_mb


def test_rss_of_this_process():
    reader = M.open_reader("cpu")
    value = reader.read_mb()
    assert value is not None and value > 5


def _fake_cupy(free_mb: float, total_mb: float) -> types.ModuleType:
    cupy = types.ModuleType("cupy")
    runtime = types.SimpleNamespace(memGetInfo=lambda: (int(free_mb * M.MB), int(total_mb * M.MB)),
                                    deviceGetPCIBusId=lambda index: "0000:01:00.0")
    cupy.cuda = types.SimpleNamespace(Device=lambda index: contextlib.nullcontext(), runtime=runtime)
    return cupy


class _NvmlNotSupported(Exception):
    pass


def _jetson_pynvml() -> types.ModuleType:
    """NVML that loads but reports no memory, as on Jetson's integrated GPU."""
    nvml = types.ModuleType("pynvml")
    nvml.nvmlInit = lambda: None
    nvml.nvmlShutdown = lambda: None
    nvml.nvmlDeviceGetHandleByIndex = lambda index: object()
    nvml.nvmlDeviceGetHandleByPciBusId = lambda bus_id: object()
    nvml.nvmlDeviceGetName = lambda handle: b"Orin"

    def memory_info(handle):
        raise _NvmlNotSupported("Not Supported")

    nvml.nvmlDeviceGetMemoryInfo = memory_info
    return nvml


@pytest.mark.parametrize("nvml", ["absent", "jetson"])
def test_gpu_reader_falls_back_to_cudaMemGetInfo_and_says_so(monkeypatch, nvml):
    monkeypatch.setitem(sys.modules, "pynvml", None if nvml == "absent" else _jetson_pynvml())
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(free_mb=3000.0, total_mb=8000.0))
    reader = M.open_reader("cuda")
    assert reader.source == "cudaMemGetInfo"
    assert reader.read_mb() == pytest.approx(5000.0)
    assert len(reader.tried) == 1 and reader.tried[0].startswith("nvml: ")
    assert ("not installed" in reader.tried[0]) if nvml == "absent" else ("Not Supported" in reader.tried[0])
    trace = MemorySampler(reader, interval_s=0.05).start().stop()
    assert trace.source == "cudaMemGetInfo"


def test_gpu_reader_uses_nvml_when_it_reports_memory(monkeypatch):
    nvml = _jetson_pynvml()
    nvml.nvmlDeviceGetMemoryInfo = lambda handle: types.SimpleNamespace(used=1234 * M.MB, total=80000 * M.MB)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setitem(sys.modules, "cupy", None)
    reader = M.open_gpu_reader(0)
    assert reader.source == "nvml" and reader.tried == []
    assert reader.read_mb() == pytest.approx(1234.0)
    assert reader.device_name == "Orin" and "Orin" in reader.description


def test_no_gpu_source_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(MemorySourceError, match=r"nvml: .*; cudaMemGetInfo: "):
        M.open_gpu_reader(0)


def _nvml_with_structs(*, v2: bool, binding_has_v2: bool = True) -> types.ModuleType:
    """nvidia-ml-py's memory query: ``nvmlDeviceGetMemoryInfo(handle, version=None)`` reads the v1 struct
    (``used`` includes the driver-reserved memory), ``version=nvmlMemory_v2`` the v2 struct (``reserved`` apart);
    a driver without nvmlDeviceGetMemoryInfo_v2 raises NVMLError_FunctionNotFound for the latter."""
    nvml = _jetson_pynvml()
    total, used, reserved = 80000 * M.MB, 1000 * M.MB, 450 * M.MB

    class FunctionNotFound(Exception):
        pass

    if binding_has_v2:
        nvml.nvmlMemory_v2 = 0x02000028

        def memory_info(handle, version=None):
            if not version:
                return types.SimpleNamespace(total=total, free=total - used - reserved, used=used + reserved)
            if not v2:
                raise FunctionNotFound("Function Not Found")
            assert version == nvml.nvmlMemory_v2
            return types.SimpleNamespace(version=version, total=total, reserved=reserved,
                                         free=total - used - reserved, used=used)
    else:  # an old binding: no constant, no keyword
        def memory_info(handle):
            return types.SimpleNamespace(total=total, free=total - used - reserved, used=used + reserved)
    nvml.nvmlDeviceGetMemoryInfo = memory_info
    return nvml


def test_nvml_reads_the_v2_struct_without_reserved_memory(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _nvml_with_structs(v2=True))
    monkeypatch.setitem(sys.modules, "cupy", None)
    reader = M.open_gpu_reader(0)
    assert reader.struct == "nvmlMemory_v2" and reader.reserved_mb == pytest.approx(450.0)
    assert reader.read_mb() == pytest.approx(1000.0)  # as nvidia-smi shows it
    assert "nvmlMemory_v2" in reader.description
    assert M.memory_reader_details(reader) == {"nvml_struct": "nvmlMemory_v2", "nvml_reserved_mb": 450.0}


@pytest.mark.parametrize("binding_has_v2", [True, False])
def test_nvml_falls_back_to_the_v1_struct_and_says_so(monkeypatch, binding_has_v2):
    monkeypatch.setitem(sys.modules, "pynvml", _nvml_with_structs(v2=False, binding_has_v2=binding_has_v2))
    monkeypatch.setitem(sys.modules, "cupy", None)
    reader = M.open_gpu_reader(0)
    assert reader.source == "nvml" and reader.struct == "nvmlMemory_v1" and reader.reserved_mb is None
    assert reader.read_mb() == pytest.approx(1450.0)  # v1: reserved included, as FLARE's script reads it
    assert "nvmlMemory_v1" in reader.description
    assert M.memory_reader_details(reader) == {"nvml_struct": "nvmlMemory_v1", "nvml_reserved_mb": None}


def test_rss_readers_have_no_nvml_details():
    assert M.memory_reader_details(M.open_reader("cpu")) == {}
