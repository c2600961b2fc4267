"""`pocketseg doctor`: machine report on this CPU machine, GPU probes (fake NVML, fake nvidia-smi), missing or
broken optional libraries, a model package's checksums and engine records, and the CLI (text and JSON)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from pocketseg.cli import build_parser, main
from pocketseg.runtime.tensorrt_probe import GpuIdentity
from pocketseg.manifest import MANIFEST_NAME, EngineRecord, Intensity, Manifest, Network, Stage, read_manifest
from pocketseg.deploy import doctor
from pocketseg.runtime.arrays import cuda_available
from pocketseg.runtime.engines import probe_backends
from pocketseg.deploy.doctor import diagnose, engine_records, format_report, parse_nvidia_smi_query

ORIN = GpuIdentity("Orin (nvgpu)", "8.7")
H100 = GpuIdentity("NVIDIA H100 80GB HBM3", "9.0")


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _no_gpu_tools() -> bool:
    return shutil.which("nvidia-smi") is None and not _has("pynvml")


# --------------------------------------------------------------------------------------------------- this machine

def _cpu_auto() -> str:
    """The backend ``auto`` takes on the CPU here: OpenVINO where it runs, else ONNX Runtime."""
    return "openvino" if "cpu" in probe_backends(import_torch=False)["openvino"].devices else "onnxruntime"


def test_report_of_this_machine_is_json_and_picks_the_cpu():
    report = diagnose()
    assert json.loads(json.dumps(report)) == report  # JSON-serialisable as it is
    assert report["python"]["executable"] == sys.executable
    assert report["python"]["version"].startswith(f"{sys.version_info.major}.{sys.version_info.minor}")
    assert report["platform"]["machine"] and report["package"] is None
    assert set(report["libraries"]) >= {"tensorrt", "onnxruntime", "cupy", "cucim", "torch"}
    for lib in report["libraries"].values():
        assert isinstance(lib["installed"], bool)
    if _no_gpu_tools():
        assert report["gpus"]["source"] is None and report["gpus"]["devices"] == []
        assert any("nvidia-smi" in t for t in report["gpus"]["tried"])
    if cuda_available()[0]:
        pytest.skip("a CUDA GPU is usable here; the CPU choice is checked on CPU-only machines")
    selection = report["selection"]
    openvino = report["libraries"]["openvino"]
    cpu_auto = "openvino" if "cpu" in openvino["devices"] else "onnxruntime"
    if _has("onnxruntime"):
        assert selection["ok"] and (selection["backend"], selection["device"], selection["precision"]) == (
            cpu_auto, "cpu", "fp32")
        assert "CPUExecutionProvider" in report["libraries"]["onnxruntime"]["providers"]
    assert report["libraries"]["cupy"]["usable"] is False
    text = format_report(report)
    assert f"Auto picks  {cpu_auto} on cpu" in text or not _has("onnxruntime")
    # OpenVINO: its version, and whether the CPU computes bf16 natively (and why), said either way.
    assert isinstance(openvino["bf16_native"], bool) and openvino["bf16_evidence"]
    assert ("CPU bf16    native (" if openvino["bf16_native"] else "CPU bf16    not native (") in text
    if openvino["installed"]:
        assert openvino["version"] and f"openvino                 {openvino['version']}" in text
    assert "GPUs        none found" in text or not _no_gpu_tools()


def test_torch_is_reported_with_its_version_when_installed():
    pytest.importorskip("torch")
    import torch

    lib = diagnose()["libraries"]["torch"]
    assert lib["installed"] and lib["version"] == torch.__version__ and "cpu" in lib["devices"]


def test_doctor_does_not_import_torch_when_it_is_missing(tmp_path):
    # sys.modules["torch"] = None is how Python marks a module as absent: find_spec gives None, import raises.
    code = textwrap.dedent("""
        import json, sys
        sys.modules["torch"] = None
        from pocketseg.deploy.doctor import diagnose, format_report
        report = diagnose()
        format_report(report)
        assert sys.modules["torch"] is None, "torch was imported"
        print(json.dumps(report["libraries"]["torch"]))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    torch = json.loads(res.stdout.strip().splitlines()[-1])
    assert torch["installed"] is False and torch["version"] is None


# ------------------------------------------------------------------------------------------- broken optional libs

@pytest.fixture
def fake_modules(tmp_path, monkeypatch):
    """A folder on sys.path for fake packages; the fakes are dropped from sys.modules afterwards."""
    folder = tmp_path / "fake_site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    for name in [m for m in sys.modules if m.split(".")[0] in ("cupy", "cucim")]:
        del sys.modules[name]


def test_cupy_that_fails_to_import_is_reported_not_raised(fake_modules):
    (fake_modules / "cupy").mkdir()
    (fake_modules / "cupy" / "__init__.py").write_text(
        'raise OSError("libcuda.so.1: cannot open shared object file: No such file or directory")\n')
    (fake_modules / "cucim").mkdir()
    (fake_modules / "cucim" / "__init__.py").write_text('raise ImportError("libcudart.so.12: not found")\n')
    report = diagnose()
    cupy, cucim = report["libraries"]["cupy"], report["libraries"]["cucim"]
    assert cupy["installed"] and not cupy["usable"] and "libcuda.so.1" in cupy["detail"]
    assert cucim["installed"] and "libcudart" in cucim["detail"]
    if _has("onnxruntime"):
        assert report["selection"]["device"] == "cpu" and report["selection"]["backend"] == _cpu_auto()
    assert "libcuda.so.1" in format_report(report)


def test_cupy_without_a_gpu_is_reported_as_unusable(fake_modules):
    (fake_modules / "cupy").mkdir()
    (fake_modules / "cupy" / "__init__.py").write_text(textwrap.dedent("""
        import types
        __version__ = "13.6.0"

        def _no_device():
            raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")

        cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=_no_device,
                                                                   runtimeGetVersion=lambda: 12060))
    """))
    cupy = diagnose()["libraries"]["cupy"]
    assert cupy["installed"] and cupy["version"] == "13.6.0" and cupy["usable"] is False
    assert cupy["cuda_runtime_version"] == "12.6" and "cudaErrorNoDevice" in cupy["detail"]


# -------------------------------------------------------------------------------------------------------- GPUs

class FakeNVMLError(Exception):
    pass


def fake_pynvml(devices, driver="540.4.0", cuda=12060):
    """A pynvml module; a device whose memory is None raises NVMLError_NotSupported there, as on Jetson."""
    import types

    def memory(handle):
        total = devices[handle]["memory"]
        if total is None:
            raise FakeNVMLError("Not Supported")
        return types.SimpleNamespace(total=total, used=total // 4, free=total - total // 4)

    calls = []
    module = types.SimpleNamespace(
        nvmlInit=lambda: calls.append("init"), nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlSystemGetDriverVersion=lambda: driver, nvmlSystemGetCudaDriverVersion=lambda: cuda,
        nvmlDeviceGetCount=lambda: len(devices), nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: devices[h]["name"].encode(),
        nvmlDeviceGetCudaComputeCapability=lambda h: devices[h]["cc"], nvmlDeviceGetMemoryInfo=memory,
        calls=calls)
    return module


def test_gpus_from_nvml_with_jetson_shared_memory(monkeypatch):
    nvml = fake_pynvml([{"name": "Orin (nvgpu)", "cc": (8, 7), "memory": None}], driver="540.4.0", cuda=12060)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    gpus = doctor._gpus()
    assert gpus["source"] == "nvml" and gpus["driver_version"] == "540.4.0" and gpus["cuda_driver_version"] == "12.6"
    assert gpus["devices"] == [{"index": 0, "name": "Orin (nvgpu)", "compute_capability": "8.7",
                                "memory_total_mib": None, "memory_used_mib": None}]
    assert any("no memory" in n for n in gpus["notes"]) and nvml.calls == ["init", "shutdown"]
    report = diagnose()
    assert report["gpus"]["devices"][0]["name"] == "Orin (nvgpu)"
    text = format_report(report)
    assert "Orin (nvgpu), compute capability 8.7, memory not reported" in text
    if not report["libraries"]["cupy"]["usable"]:
        assert any("CuPy cannot use it" in p for p in report["problems"])


def test_gpus_from_nvml_on_a_workstation(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(
        [{"name": "NVIDIA H100 80GB HBM3", "cc": (9, 0), "memory": 80 * 2**30},
         {"name": "NVIDIA RTX A4000", "cc": (8, 6), "memory": 16 * 2**30}], driver="550.54.15", cuda=12040))
    gpus = doctor._gpus()
    assert [d["compute_capability"] for d in gpus["devices"]] == ["9.0", "8.6"]
    assert gpus["devices"][0]["memory_total_mib"] == 80 * 1024 and gpus["devices"][0]["memory_used_mib"] == 20 * 1024
    assert gpus["cuda_driver_version"] == "12.4" and gpus["notes"] == []


NVIDIA_SMI = """#!/bin/sh
case "$*" in
  *compute_cap*) {cap_branch} ;;
  *--query-gpu*) echo "0, NVIDIA GeForce RTX 4090, 24564, 1024, 550.54.15" ;;
  *) printf '| NVIDIA-SMI 550.54.15    Driver Version: 550.54.15    CUDA Version: 12.4     |\\n' ;;
esac
"""


@pytest.mark.parametrize("old_driver", [False, True])
def test_gpus_from_nvidia_smi_when_nvml_is_missing(tmp_path, monkeypatch, old_driver):
    cap_branch = ('echo "Field compute_cap is not a valid field to query." >&2; exit 2' if old_driver else
                  'echo "0, NVIDIA GeForce RTX 4090, 8.9, 24564, 1024, 550.54.15"')
    script = tmp_path / "bin" / "nvidia-smi"
    script.parent.mkdir()
    script.write_text(NVIDIA_SMI.replace("{cap_branch}", cap_branch))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setitem(sys.modules, "pynvml", None)  # nvidia-ml-py absent
    gpus = doctor._gpus()
    assert gpus["source"] == "nvidia-smi" and gpus["driver_version"] == "550.54.15"
    assert gpus["cuda_driver_version"] == "12.4" and "nvml" in gpus["tried"][0]
    device = gpus["devices"][0]
    assert device["name"] == "NVIDIA GeForce RTX 4090" and device["memory_total_mib"] == 24564
    assert device["compute_capability"] == (None if old_driver else "8.9")
    assert any("compute capability" in n for n in gpus["notes"]) == old_driver


def test_parse_nvidia_smi_query_handles_missing_fields_and_commas():
    text = "0, Orin (nvgpu), 8.7, [N/A], [N/A], 540.4.0\n1, Weird, GPU, 9.0, 81559, 3, 550.54.15\n"
    first, second = parse_nvidia_smi_query(text)
    assert first == {"index": 0, "name": "Orin (nvgpu)", "compute_capability": "8.7", "memory_total_mib": None,
                     "memory_used_mib": None, "driver_version": "540.4.0"}
    assert second["name"] == "Weird, GPU" and second["compute_capability"] == "9.0"
    with pytest.raises(ValueError):
        parse_nvidia_smi_query("0, only three\n")


def test_jetson_release_is_read(tmp_path, monkeypatch):
    release = tmp_path / "nv_tegra_release"
    release.write_text("# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64, DATE: x\n")
    model = tmp_path / "model"
    model.write_bytes(b"NVIDIA Jetson AGX Orin Developer Kit\0")
    monkeypatch.setattr(doctor, "NV_TEGRA_RELEASE", release)
    monkeypatch.setattr(doctor, "DEVICE_TREE_MODEL", model)
    assert doctor._jetson() == {"l4t_release": "R36.4.0", "board": "NVIDIA Jetson AGX Orin Developer Kit"}
    monkeypatch.setattr(doctor, "NV_TEGRA_RELEASE", tmp_path / "absent")
    assert doctor._jetson() is None


# ----------------------------------------------------------------------------------------------------- packages

@pytest.fixture(scope="module")
def package(tiny_package):
    """A real model package from the tiny export (fp32 ONNX + weights, checksummed; see conftest)."""
    return tiny_package


def _copy(package: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(package, tmp_path / "pkg"))


def _add_engines(folder: Path, records: dict[str, list[EngineRecord]]) -> None:
    manifest = read_manifest(folder)
    stages = dict(manifest.stages)
    for name, recs in records.items():
        for record in recs:
            (folder / record.file).write_bytes(b"engine " + record.file.encode())
        stages[name] = replace(stages[name], engines=stages[name].engines + tuple(recs))
    new = replace(manifest, stages=stages).with_checksums(folder)
    (folder / MANIFEST_NAME).write_text(new.to_json())


def test_exported_package_verifies_and_has_no_engines(package, capsys):
    report = diagnose(model=package)
    pkg = report["package"]
    assert pkg["manifest_ok"] and pkg["checksums_ok"] and pkg["checksum_problem"] is None
    assert pkg["engines"] == [] and set(pkg["stages"]) == {"roi", "detail"}
    assert pkg["stages"]["detail"]["patch_zyx"] == [16, 32, 32]
    if not cuda_available()[0]:
        assert (report["selection"]["backend"], report["selection"]["device"]) == (_cpu_auto(), "cpu")
        assert report["problems"] == []
    text = format_report(report)
    assert "checksums   OK" in text and "engines     none" in text

    assert main(["doctor", "-m", str(package), "--json"]) == 0
    parsed = json.loads(capsys.readouterr().out)
    assert parsed["package"]["checksums_ok"] is True and parsed["package"]["path"] == str(package)
    assert main(["doctor", "--model", str(package)]) == 0
    assert "checksums   OK" in capsys.readouterr().out


def test_tampered_package_is_reported_not_raised(package, tmp_path, capsys):
    folder = _copy(package, tmp_path)
    onnx = folder / "roi.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-1] + b"\0")
    report = diagnose(model=folder)
    assert report["package"]["manifest_ok"] and not report["package"]["checksums_ok"]
    assert "roi.onnx" in report["package"]["checksum_problem"]
    assert any(p.startswith("model package refused") and "roi.onnx" in p for p in report["problems"])
    assert main(["doctor", "-m", str(folder)]) == 0
    assert "checksums   FAILED" in capsys.readouterr().out
    assert main(["doctor", "-m", str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["package"]["checksums_ok"] is False


def test_unreadable_manifest_and_missing_folder(package, tmp_path, capsys):
    folder = _copy(package, tmp_path)
    (folder / MANIFEST_NAME).write_text("{ not json")
    report = diagnose(model=folder)
    assert not report["package"]["manifest_ok"] and "not valid JSON" in report["package"]["manifest_problem"]
    assert "UNREADABLE" in format_report(report)

    missing = tmp_path / "no-such-package"
    res = subprocess.run([sys.executable, "-m", "pocketseg", "doctor", "-m", str(missing)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip().splitlines() == [f"pocketseg: error: {missing}: is not a folder (expected a pocketseg "
                                               "model package)"]


def test_engine_records_are_listed_with_match_and_why(package, tmp_path, monkeypatch):
    folder = _copy(package, tmp_path)
    orin_old = EngineRecord("roi_fp16_sm87_trt10.3_old.engine", "fp16", "10.3.0.26", "8.7", ORIN.name, 1)
    orin = EngineRecord("roi_fp16_sm87_trt10.3.engine", "fp16", "10.3.0.30", "8.7", ORIN.name, 1)
    h100 = EngineRecord("roi_fp16_sm90_trt10.3.engine", "fp16", "10.3.0.30", "9.0", H100.name, 1)
    orin_trt8 = EngineRecord("detail_fp16_sm87_trt8.6.engine", "fp16", "8.6.2", "8.7", ORIN.name, 1)
    _add_engines(folder, {"roi": [orin_old, orin, h100], "detail": [orin_trt8]})

    # This machine: no TensorRT (or no GPU), so nothing can match, and each record says why.
    report = diagnose(model=folder)
    assert report["package"]["checksums_ok"]
    rows = report["package"]["engines"]
    assert [r["file"] for r in rows] == [orin_old.file, orin.file, h100.file, orin_trt8.file]
    if not _has("tensorrt"):
        assert all(not r["match"] and r["why"] == "TensorRT is not installed here" for r in rows)
        assert "match no - TensorRT is not installed here" in format_report(report)

    # An Orin with TensorRT 10.3: both Orin 10.3 records match, the last one is used.
    monkeypatch.setattr(doctor, "_engine_target", lambda: ("10.3.0.30", ORIN, ""))
    rows = {r["file"]: r for r in diagnose(model=folder)["package"]["engines"]}
    assert rows[orin.file]["match"] and rows[orin.file]["selected"]
    assert rows[orin_old.file]["match"] and not rows[orin_old.file]["selected"]
    assert "later record" in rows[orin_old.file]["why"]
    assert not rows[h100.file]["match"] and "compute capability 9.0" in rows[h100.file]["why"]
    assert not rows[orin_trt8.file]["match"] and "TensorRT 8.6.2" in rows[orin_trt8.file]["why"]
    assert all(r["present"] for r in rows.values())
    report = diagnose(model=folder)
    assert report["package"]["engines_usable_here"] is False  # the detail stage has no TensorRT 10.3 engine
    assert "cannot run this package here" in format_report(report)
    _add_engines(folder, {"detail": [replace(orin, file="detail_fp16_sm87_trt10.3.engine")]})
    assert diagnose(model=folder)["package"]["engines_usable_here"] is True


def _stage(name: str, engines=()) -> Stage:
    return Stage(name=name, preset=f"{name}-tiny", network=Network(8, ((3, 3, 3),), ((1, 1, 1),)),
                 num_classes=2 if name == "roi" else 15, spacing_mm_zyx=(5.0, 4.0, 4.0), patch_zyx=(16, 32, 32),
                 intensity=Intensity(50.0, 60.0, -100.0, 300.0), files={"onnx-fp32": f"{name}.onnx"},
                 engines=tuple(engines))


def test_engine_records_without_a_gpu_or_with_a_malformed_record():
    bad = EngineRecord("roi.engine", "fp16", "ten", "8.7", "Orin", 1)
    manifest = Manifest(stages={"roi": _stage("roi", [bad]), "detail": _stage("detail")})
    (row,) = engine_records(manifest, "10.3.0", None, "no CUDA GPU identified")
    assert row["match"] is False and row["why"] == "no CUDA GPU identified" and row["present"] is None
    (row,) = engine_records(manifest, "10.3.0", ORIN)
    assert row["match"] is False and "unreadable" in row["why"]


def test_selection_failure_is_reported(monkeypatch):
    from pocketseg.runtime import engines

    def refuse(**kwargs):
        raise engines.EngineUnavailableError("no inference backend can run on cpu: onnxruntime: not installed")

    monkeypatch.setattr(doctor, "resolve", refuse)
    report = diagnose()
    assert report["selection"]["ok"] is False and "not installed" in report["selection"]["reason"]
    assert any(p.startswith("no inference backend can run") for p in report["problems"])
    assert "Auto picks  nothing" in format_report(report)


# ------------------------------------------------------------------------------------------------------------ CLI

def test_doctor_flags_map_to_diagnose_keywords():
    import inspect

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    dests = {a.dest for a in sub.choices["doctor"]._actions} - {"help", "json", "verbose", "quiet"}  # global flags
    assert dests == set(inspect.signature(diagnose).parameters) == {"model", "trusted_keys"}


def test_cli_json_parses(capsys):
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"python", "platform", "gpus", "libraries", "selection", "package", "problems"} <= set(report)
