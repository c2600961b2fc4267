"""``pocketseg doctor``: what this machine offers the runtime, and whether a model package runs here.

:func:`diagnose` gathers, without ever raising on a missing or broken optional library:

- Python (version, executable), platform and machine, Jetson's L4T release, system memory;
- GPUs (name, compute capability, memory) from NVML (``pynvml`` of nvidia-ml-py), else from
  ``nvidia-smi``, else none; the driver's version and the CUDA version it supports;
- TensorRT, ONNX Runtime (and its execution providers), OpenVINO (and whether the CPU computes
  bf16 natively: OpenVINO's CPU ``OPTIMIZATION_CAPABILITIES`` listing BF16; AMX where /proc/cpuinfo
  shows it), CuPy (and the CUDA runtime it loads), cuCIM, torch, nvidia-ml-py and
  connected-components-3d: present or not, version;
- what ``backend="auto"``, ``device="auto"`` picks (:func:`pocketseg.runtime.engines.resolve`),
  or why nothing can run;
- with a model package: whether its checksums verify and, per TensorRT engine record, whether
  it matches this GPU and TensorRT version, and why not.

:func:`format_report` renders the dictionary for people; ``pocketseg doctor --json`` prints it
as JSON. torch is imported only when it is installed (and then only to ask for its version and
CUDA); CuPy is imported under a guard, because on a machine without a CUDA driver importing it
or asking it for a device may fail in several ways.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from pocketseg.errors import InputError, PocketsegError
from pocketseg.manifest import load_package, read_manifest
from pocketseg.runtime.arrays import cuda_available
from pocketseg.runtime.engines import BACKENDS, cpu_amx, cpu_bf16_support, probe_backends, resolve
from pocketseg.runtime.tensorrt_probe import (engine_matches, gpu_identity, import_tensorrt,
                                              normalize_compute_capability, parse_version, select_engine)
from pocketseg.signing import describe_signature
from pocketseg.version import __version__

__all__ = ["diagnose", "format_report"]

log = logging.getLogger(__name__)

#: Seconds a single nvidia-smi call may take (a hung driver must not hang the doctor).
NVIDIA_SMI_TIMEOUT_S = 30
NV_TEGRA_RELEASE = Path("/etc/nv_tegra_release")
DEVICE_TREE_MODEL = Path("/proc/device-tree/model")
_MISSING_VALUES = {"", "n/a", "[n/a]", "not supported", "[not supported]", "unknown", "[unknown error]"}


def _error(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _text(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).split(b"\0", 1)[0].decode("utf-8", errors="replace")
    return str(value).strip()


def _cuda_version_from_int(value: int) -> str:
    """``"12.4"`` from CUDA's integer form ``12040`` (1000 * major + 10 * minor)."""
    value = int(value)
    return f"{value // 1000}.{value % 1000 // 10}"


def _distribution_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that fails to import, or a module set to None
        return False


# -------------------------------------------------------------------------------------------------- python, platform

def _python() -> dict[str, Any]:
    return {"version": platform.python_version(), "implementation": platform.python_implementation(),
            "executable": sys.executable}


def _jetson() -> dict[str, Any] | None:
    """L4T release and board of a Jetson (None elsewhere)."""
    try:
        first = NV_TEGRA_RELEASE.read_text(encoding="utf-8", errors="replace").splitlines()[0]
    except (OSError, IndexError):
        return None
    # "# R36 (release), REVISION: 4.0, GCID: ..., BOARD: generic, EABI: aarch64, DATE: ..."
    match = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", first)
    release = f"R{match.group(1)}.{match.group(2)}" if match else first.lstrip("# ").strip()
    try:
        board = _text(DEVICE_TREE_MODEL.read_bytes()) or None
    except OSError:
        board = None
    return {"l4t_release": release, "board": board}


def _system_memory_mib() -> int | None:
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2**20)
    except (ValueError, OSError, AttributeError):  # not every platform names these
        return None


def _platform() -> dict[str, Any]:
    return {"system": platform.system(), "release": platform.release(), "machine": platform.machine(),
            "platform": platform.platform(), "memory_total_mib": _system_memory_mib(), "jetson": _jetson()}


# ------------------------------------------------------------------------------------------------------------ GPUs

def _gpus_from_nvml() -> dict[str, Any]:
    pynvml = importlib.import_module("pynvml")  # from nvidia-ml-py
    pynvml.nvmlInit()
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        cuda = None
        for getter in ("nvmlSystemGetCudaDriverVersion_v2", "nvmlSystemGetCudaDriverVersion"):
            try:
                cuda = _cuda_version_from_int(getattr(pynvml, getter)())
                break
            except Exception:  # noqa: BLE001 - older NVML lacks _v2; any NVMLError means "unknown"
                continue
        devices, notes = [], []
        for index in range(int(pynvml.nvmlDeviceGetCount())):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            device: dict[str, Any] = {"index": index, "name": _text(pynvml.nvmlDeviceGetName(handle)),
                                      "compute_capability": None, "memory_total_mib": None, "memory_used_mib": None}
            try:
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
                device["compute_capability"] = f"{int(major)}.{int(minor)}"
            except Exception as exc:  # noqa: BLE001 - NVMLError_NotSupported and friends
                notes.append(f"GPU {index}: NVML gives no compute capability ({_error(exc)})")
            try:
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
                device["memory_total_mib"] = int(memory.total) // 2**20
                device["memory_used_mib"] = int(memory.used) // 2**20
            except Exception as exc:  # noqa: BLE001 - Jetson: NVML_ERROR_NOT_SUPPORTED (memory is shared)
                notes.append(f"GPU {index}: NVML reports no memory ({_error(exc)})")
            devices.append(device)
    finally:
        with contextlib.suppress(Exception):  # nothing useful to do if shutting NVML down fails
            pynvml.nvmlShutdown()
    return {"source": "nvml", "driver_version": driver, "cuda_driver_version": cuda, "devices": devices,
            "notes": notes}


def _smi_value(text: str) -> str | None:
    text = text.strip()
    return None if text.lower() in _MISSING_VALUES else text


def _smi_int(text: str) -> int | None:
    value = _smi_value(text)
    try:
        return None if value is None else int(float(value))
    except ValueError:
        return None


def parse_nvidia_smi_query(text: str, with_compute_cap: bool = True) -> list[dict[str, Any]]:
    """GPUs from ``nvidia-smi --query-gpu=index,name[,compute_cap],memory.total,memory.used,driver_version
    --format=csv,noheader,nounits``; fields nvidia-smi cannot give ("[N/A]", "[Not Supported]") become None."""
    devices = []
    n_fields = 6 if with_compute_cap else 5
    for line in text.splitlines():
        if not line.strip():
            continue
        # A GPU name may hold a comma, so the fixed fields are taken from both ends.
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < n_fields:
            raise ValueError(f"unexpected nvidia-smi line {line.strip()!r}")
        index, tail = parts[0], parts[-(n_fields - 2):]
        name = ", ".join(parts[1:len(parts) - (n_fields - 2)])
        cap = _smi_value(tail[0]) if with_compute_cap else None
        total, used, driver = tail[-3:]
        devices.append({"index": _smi_int(index), "name": name, "compute_capability": cap,
                        "memory_total_mib": _smi_int(total), "memory_used_mib": _smi_int(used),
                        "driver_version": _smi_value(driver)})
    return devices


def _run_nvidia_smi(exe: str, *args: str) -> str:
    done = subprocess.run([exe, *args], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=False)
    if done.returncode != 0:
        raise RuntimeError((done.stderr or done.stdout).strip() or f"nvidia-smi exit status {done.returncode}")
    return done.stdout


def _gpus_from_nvidia_smi() -> dict[str, Any]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        raise FileNotFoundError("nvidia-smi is not on PATH")
    fields = "index,name,compute_cap,memory.total,memory.used,driver_version"
    notes = []
    try:
        devices = parse_nvidia_smi_query(_run_nvidia_smi(exe, f"--query-gpu={fields}",
                                                         "--format=csv,noheader,nounits"))
    except (RuntimeError, ValueError) as exc:  # drivers before R510 do not know the compute_cap field
        notes.append(f"nvidia-smi gives no compute capability ({_error(exc)})")
        devices = parse_nvidia_smi_query(_run_nvidia_smi(exe, f"--query-gpu={fields.replace('compute_cap,', '')}",
                                                         "--format=csv,noheader,nounits"), with_compute_cap=False)
    driver = next((d.pop("driver_version") for d in devices), None)
    for device in devices:
        device.pop("driver_version", None)
        if device["memory_total_mib"] is None:
            notes.append(f"GPU {device['index']}: nvidia-smi reports no memory")
    cuda = None
    try:  # the CUDA version the driver supports is only in the table header
        match = re.search(r"CUDA Version:\s*([\d.]+)", _run_nvidia_smi(exe))
        cuda = match.group(1) if match else None
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        notes.append(f"nvidia-smi gives no CUDA version ({_error(exc)})")
    return {"source": "nvidia-smi", "driver_version": driver, "cuda_driver_version": cuda, "devices": devices,
            "notes": notes}


def _gpus() -> dict[str, Any]:
    """GPUs from NVML, else nvidia-smi, else none; ``tried`` says why each source gave nothing."""
    tried = []
    for label, probe in (("nvml", _gpus_from_nvml), ("nvidia-smi", _gpus_from_nvidia_smi)):
        try:
            found = probe()
        except Exception as exc:  # noqa: BLE001 - a missing library, no driver, a hung tool: try the next source
            tried.append(f"{label}: {_error(exc)}")
            continue
        found["tried"] = tried
        return found
    return {"source": None, "driver_version": None, "cuda_driver_version": None, "devices": [], "notes": [],
            "tried": tried}


# ------------------------------------------------------------------------------------------------------- libraries

def _library(installed: bool, version: str | None = None, detail: str = "", **extra: Any) -> dict[str, Any]:
    return {"installed": installed, "version": version, "detail": detail, **extra}


def _backends() -> dict[str, dict[str, Any]]:
    """TensorRT, ONNX Runtime and torch as the runtime's engine layer sees them."""
    out: dict[str, dict[str, Any]] = {}
    torch_error = None
    try:
        # probe_backends(import_torch=True) imports torch, so only when it is there at all.
        statuses = probe_backends(import_torch=_installed("torch"))
    except Exception as exc:  # noqa: BLE001 - a broken torch (or TensorRT) install must not stop the doctor
        torch_error = _error(exc)
        try:
            statuses = probe_backends(import_torch=False)
        except Exception as exc2:  # noqa: BLE001
            return {name: _library(False, detail=f"probe failed ({_error(exc2)})")
                    for name in BACKENDS}
    for name, status in statuses.items():
        out[name] = _library(status.installed, status.version, status.detail, devices=list(status.devices))
    trt = out.get("tensorrt")
    if trt is not None and not trt["installed"]:
        # The engine layer's message is the full install hint; the report keeps its gist and the import error.
        cause = re.search(r"\(import error: (.*)\)\s*$", trt["detail"])
        trt["detail"] = ("not installed (Jetson: JetPack's python3-libnvinfer; x86_64: pip install "
                         "'pocketseg[tensorrt]')" + (f"; import error: {cause.group(1)}" if cause else ""))
    if torch_error is not None:
        out["torch"] = _library(True, _distribution_version("torch"), f"installed but not importable ({torch_error})",
                                devices=[])
    ort = out.get("onnxruntime")
    if ort is not None:
        ort["providers"] = []
        if ort["installed"]:
            try:
                ort["providers"] = list(importlib.import_module("onnxruntime").get_available_providers())
            except Exception as exc:  # noqa: BLE001
                ort["detail"] = f"providers unknown ({_error(exc)})"
    openvino = out.get("openvino")
    if openvino is not None:
        try:
            openvino["bf16_native"], openvino["bf16_evidence"] = cpu_bf16_support()
        except Exception as exc:  # noqa: BLE001 - a broken OpenVINO install must not stop the doctor
            openvino["bf16_native"], openvino["bf16_evidence"] = False, f"probe failed ({_error(exc)})"
        openvino["amx"] = cpu_amx()
    torch = out.get("torch")
    if torch is not None and torch["installed"] and "torch" in sys.modules:
        try:
            torch["cuda"] = sys.modules["torch"].version.cuda  # None for CPU builds
        except AttributeError:
            torch["cuda"] = None
    return out


def _cupy() -> dict[str, Any]:
    if not _installed("cupy"):
        return _library(False, detail="not installed; pip install 'pocketseg[gpu]'", usable=False)
    try:
        cupy = importlib.import_module("cupy")
    except Exception as exc:  # noqa: BLE001 - ImportError, or a CUDA library that fails to load
        return _library(True, _distribution_version("cupy-cuda12x", "cupy-cuda11x", "cupy"),
                        f"installed but not importable ({_error(exc)})", usable=False)
    usable, why = cuda_available()
    info = _library(True, getattr(cupy, "__version__", None), "" if usable else why, usable=usable,
                    cuda_runtime_version=None)
    try:
        info["cuda_runtime_version"] = _cuda_version_from_int(cupy.cuda.runtime.runtimeGetVersion())
    except Exception as exc:  # noqa: BLE001 - no libcudart: CuPy imports but cannot run
        log.debug("CuPy's CUDA runtime version is unknown: %s", _error(exc))
    return info


def _cucim() -> dict[str, Any]:
    version = _distribution_version("cucim-cu12", "cucim-cu11", "cucim")
    if not _installed("cucim"):
        note = ("not installed; cuCIM has no Jetson (aarch64) build, the runtime labels with cupyx.scipy.ndimage"
                if platform.machine() == "aarch64" else "not installed; pip install 'pocketseg[gpu]' (x86_64 Linux)")
        return _library(False, detail=note)
    try:
        module = importlib.import_module("cucim")
    except Exception as exc:  # noqa: BLE001 - cuCIM's native part needs CUDA
        return _library(True, version, f"installed but not importable ({_error(exc)})")
    return _library(True, getattr(module, "__version__", None) or version)


def _plain(module: str, distribution: str, hint: str) -> dict[str, Any]:
    if not _installed(module):
        return _library(False, detail=hint)
    return _library(True, _distribution_version(distribution))


def _libraries() -> dict[str, dict[str, Any]]:
    libraries = _backends()
    libraries["cupy"] = _cupy()
    libraries["cucim"] = _cucim()
    libraries["nvidia-ml-py"] = _plain("pynvml", "nvidia-ml-py", "not installed; pip install 'pocketseg[gpu]'")
    libraries["connected-components-3d"] = _plain("cc3d", "connected-components-3d",
                                                  "not installed (labelling falls back to scipy.ndimage); "
                                                  "pip install 'pocketseg[runtime]'")
    order = ("tensorrt", "onnxruntime", "openvino", "cupy", "cucim", "torch", "nvidia-ml-py", "connected-components-3d")
    return {name: libraries[name] for name in order if name in libraries}


# ------------------------------------------------------------------------------------------------ selection, package

def _selection(manifest: Any) -> dict[str, Any]:
    try:
        chosen = resolve(manifest=manifest)
    except Exception as exc:  # noqa: BLE001 - EngineUnavailableError/DeviceUnavailableError expected; report any
        return {"ok": False, "backend": None, "device": None, "precision": None, "reason": _error(exc),
                "engine_files": {}}
    return {"ok": True, "backend": chosen.backend, "device": chosen.device, "precision": chosen.precision,
            "reason": chosen.reason, "engine_files": dict(chosen.engine_files)}


def _engine_target() -> tuple[str | None, Any, str]:
    """(TensorRT version, GPU identity, why either is missing) that engines must match here."""
    try:
        version = str(import_tensorrt().__version__)
    except Exception:  # noqa: BLE001 - TensorRTNotInstalledError, or a broken TensorRT install
        return None, None, "TensorRT is not installed here"
    try:
        gpu = gpu_identity(0)
    except Exception as exc:  # noqa: BLE001 - EngineBuildError lists what every probe said
        log.debug("no GPU identity: %s", _error(exc))
        return version, None, "no CUDA GPU identified (cuda-python, nvidia-smi, torch and CuPy all failed)"
    return version, gpu, ""


def engine_records(manifest: Any, tensorrt_version: str | None, gpu: Any, why_not: str = "",
                   folder: Path | None = None) -> list[dict[str, Any]]:
    """Every engine record of ``manifest`` with ``match`` (runs here), ``selected`` (the one the runtime takes)
    and ``why``; ``gpu`` is a :class:`~pocketseg.engine_build.tensorrt_build.GpuIdentity` or None."""
    rows = []
    for stage in manifest.stages.values():
        chosen = None
        if tensorrt_version is not None and gpu is not None:
            chosen = select_engine(stage, tensorrt_version, gpu.compute_capability)
        for record in stage.engines:
            row = {"stage": stage.name, "file": record.file, "precision": record.precision,
                   "tensorrt_version": record.tensorrt_version, "compute_capability": record.compute_capability,
                   "gpu_name": record.gpu_name, "max_batch": record.max_batch,
                   "present": None if folder is None else (folder / record.file).is_file(),
                   "match": False, "selected": False}
            if tensorrt_version is None or gpu is None:
                row["why"] = why_not or "TensorRT or the GPU is unknown"
            elif engine_matches(record, tensorrt_version, gpu.compute_capability):
                row["match"] = True
                row["selected"] = chosen is not None and chosen.file == record.file
                row["why"] = (f"built for TensorRT {'.'.join(map(str, parse_version(tensorrt_version)))} and "
                              f"compute capability {gpu.compute_capability}, as here")
                if not row["selected"]:
                    row["why"] += f"; a later record of the {stage.name} stage is used instead"
            else:
                reasons = []
                try:
                    if parse_version(record.tensorrt_version) != parse_version(tensorrt_version):
                        reasons.append(f"built with TensorRT {record.tensorrt_version}, "
                                       f"this machine has {tensorrt_version}")
                    if (normalize_compute_capability(record.compute_capability)
                            != normalize_compute_capability(gpu.compute_capability)):
                        reasons.append(f"built for compute capability {record.compute_capability} "
                                       f"({record.gpu_name}), this GPU is {gpu.compute_capability} ({gpu.name})")
                except ValueError:  # InputError is a ValueError too
                    reasons.append("the record's TensorRT version or compute capability is unreadable")
                row["why"] = "; ".join(reasons) or "does not match"
            rows.append(row)
    return rows


def _package(folder: Path) -> tuple[dict[str, Any], Any]:
    """The package section of the report, and the manifest (None when unreadable)."""
    info: dict[str, Any] = {"path": str(folder), "manifest_ok": False, "manifest_problem": None,
                            "checksums_ok": False, "checksum_problem": None, "stages": {}, "engines": [],
                            "engine_target": None, "engines_usable_here": False}
    try:
        manifest = read_manifest(folder)
    except PocketsegError as exc:
        info["manifest_problem"] = str(exc)
        return info, None
    info["manifest_ok"] = True
    info["format_version"] = manifest.format_version
    info["pocketseg_version"] = manifest.pocketseg_version
    info["stages"] = {name: {"preset": s.preset, "num_classes": s.num_classes, "patch_zyx": list(s.patch_zyx),
                             "spacing_mm_zyx": list(s.spacing_mm_zyx), "files": dict(s.files),
                             "bf16_agreement": s.bf16_agreement}
                      for name, s in manifest.stages.items()}
    try:
        load_package(folder)
        info["checksums_ok"] = True
    except PocketsegError as exc:
        info["checksum_problem"] = str(exc)
    if any(stage.engines for stage in manifest.stages.values()):
        version, gpu, why = _engine_target()
        info["engine_target"] = {"tensorrt_version": version,
                                 "gpu_name": None if gpu is None else gpu.name,
                                 "compute_capability": None if gpu is None else gpu.compute_capability,
                                 "why_unknown": why or None}
        info["engines"] = engine_records(manifest, version, gpu, why, folder)
    # TensorRT runs a package only with an engine for every stage.
    info["engines_usable_here"] = all(any(r["selected"] for r in info["engines"] if r["stage"] == name)
                                      for name in manifest.stages)
    return info, manifest


def _problems(report: dict[str, Any]) -> list[str]:
    problems = []
    package = report.get("package")
    if package is not None:
        if not package["manifest_ok"]:
            problems.append(f"model package unreadable: {package['manifest_problem']}")
        elif not package["checksums_ok"]:
            problems.append(f"model package refused: {package['checksum_problem']}")
        signature = package.get("signature") or {"required": False, "state": None}
        if signature["required"] and signature["state"] != "trusted":
            problems.append(f"model package refused by predict: {signature['detail']} "
                            f"(trusted keys: {signature['trusted_keys']})")
        elif signature["state"] in ("invalid", "unknown"):
            problems.append(f"model package signature: {signature['detail']}")
    selection = report["selection"]
    if not selection["ok"]:
        problems.append(f"no inference backend can run: {selection['reason']}")
    cupy = report["libraries"]["cupy"]
    if report["gpus"]["devices"] and not cupy.get("usable"):
        problems.append("a GPU is present but CuPy cannot use it, so the runtime runs on the CPU: "
                        + (cupy["detail"] or "CuPy is not usable"))
    tensorrt = report["libraries"]["tensorrt"]
    if (package is not None and package["manifest_ok"] and tensorrt["installed"] and selection["device"] == "cuda"
            and selection["backend"] != "tensorrt"):
        problems.append("TensorRT is installed but the package has no engine for this GPU and TensorRT version; "
                        f"build them with: pocketseg build-engine {package['path']}")
    return problems


def diagnose(model: str | os.PathLike | None = None, trusted_keys: str | os.PathLike | None = None
             ) -> dict[str, Any]:
    """A report (JSON-serialisable dict) of this machine and, with ``model``, of a model package folder.

    Raises :class:`~pocketseg.errors.InputError` only when ``model`` is not a folder; a package that
    is unreadable, fails its checksums or its signature is reported in ``report["package"]`` and
    ``report["problems"]``. ``trusted_keys``: a folder of trusted public keys (None: ``$POCKETSEG_TRUSTED_KEYS``
    when set); the package's signature is then judged as ``predict`` would judge it.
    """
    folder = None
    if model is not None:
        folder = Path(model)
        if not folder.is_dir():
            raise InputError(folder, "is not a folder (expected a pocketseg model package)")
    report: dict[str, Any] = {"pocketseg_version": __version__, "python": _python(), "platform": _platform(),
                              "gpus": _gpus(), "libraries": _libraries()}
    manifest = None
    if folder is not None:
        report["package"], manifest = _package(folder)
        report["package"]["signature"] = describe_signature(folder, trusted_keys)
    else:
        report["package"] = None
    report["selection"] = _selection(manifest)
    report["problems"] = _problems(report)
    return report


# ---------------------------------------------------------------------------------------------------------- report

def _mib(value: int | None) -> str:
    return "?" if value is None else f"{value / 1024:.1f} GiB"


def format_report(report: dict[str, Any]) -> str:
    """The human-readable form of a :func:`diagnose` report."""
    lines = [f"pocketseg {report['pocketseg_version']} doctor", ""]
    py, plat = report["python"], report["platform"]
    lines.append(f"Python      {py['version']} ({py['implementation']}) {py['executable']}")
    lines.append(f"Platform    {plat['platform']} ({plat['machine']}), {_mib(plat['memory_total_mib'])} system memory")
    if plat.get("jetson"):
        jetson = plat["jetson"]
        lines.append(f"Jetson      L4T {jetson['l4t_release']}" + (f", {jetson['board']}" if jetson["board"] else "")
                     + " (CPU and GPU share the system memory)")

    gpus = report["gpus"]
    if gpus["devices"]:
        lines.append(f"GPUs        from {gpus['source']}")
        for d in gpus["devices"]:
            memory = ("memory not reported" if d["memory_total_mib"] is None
                      else f"{_mib(d['memory_total_mib'])}" + (f" ({d['memory_used_mib']} MiB used)"
                                                                if d["memory_used_mib"] is not None else ""))
            lines.append(f"  {d['index']}: {d['name']}, compute capability {d['compute_capability'] or '?'}, {memory}")
    else:
        lines.append("GPUs        none found" + (f" ({'; '.join(gpus['tried'])})" if gpus.get("tried") else ""))
    for note in gpus.get("notes", []):
        lines.append(f"  note: {note}")
    cupy = report["libraries"]["cupy"]
    lines.append(f"Driver      {gpus['driver_version'] or '-'}, supports CUDA {gpus['cuda_driver_version'] or '-'}; "
                 f"CUDA runtime (CuPy) {cupy.get('cuda_runtime_version') or '-'}; "
                 f"CuPy can use a GPU: {'yes' if cupy.get('usable') else 'no'}")

    lines.append("Libraries")
    for name, lib in report["libraries"].items():
        state = (lib["version"] or "yes") if lib["installed"] else "no"
        extra = []
        if lib.get("providers"):
            extra.append("providers: " + ", ".join(lib["providers"]))
        elif lib["detail"]:
            extra.append(lib["detail"])
        lines.append(f"  {name:<24} {state:<12} {'; '.join(extra)}".rstrip())
    openvino = report["libraries"].get("openvino")
    if openvino is not None and "bf16_native" in openvino:
        amx = {True: "AMX present", False: "no AMX", None: "AMX unknown"}[openvino.get("amx")]
        lines.append(f"CPU bf16    {'native' if openvino['bf16_native'] else 'not native'} ({openvino['bf16_evidence']}; "
                     f"{amx})")

    selection = report["selection"]
    if selection["ok"]:
        lines.append(f"Auto picks  {selection['backend']} on {selection['device']}, {selection['precision']} "
                     f"({selection['reason']})")
        for stage, file in selection["engine_files"].items():
            lines.append(f"  {stage}: {file}")
    else:
        lines.append(f"Auto picks  nothing: {selection['reason']}")

    package = report.get("package")
    if package is not None:
        lines.append(f"Package     {package['path']}")
        if not package["manifest_ok"]:
            lines.append(f"  manifest    UNREADABLE: {package['manifest_problem']}")
        else:
            lines.append(f"  manifest    format {package['format_version']}, written by pocketseg "
                         f"{package['pocketseg_version']}; stages "
                         + ", ".join(f"{n} ({s['preset']}, patch {'x'.join(map(str, s['patch_zyx']))})"
                                     for n, s in package["stages"].items()))
            lines.append("  checksums   OK" if package["checksums_ok"]
                         else f"  checksums   FAILED: {package['checksum_problem']}")
        signature = package.get("signature")
        if signature:
            trust = (f"; trusted keys {signature['trusted_keys']}" if signature["required"]
                     else "; no trusted keys given (--trusted-keys)")
            lines.append(f"  signature   {signature['state'].upper()}: {signature['detail']}{trust}")
            if not package["engines"]:
                lines.append("  engines     none (build them on the target GPU with pocketseg build-engine)")
            else:
                target = package["engine_target"]
                here = (f"TensorRT {target['tensorrt_version'] or '-'}, "
                        f"{target['gpu_name'] or 'no GPU'} (compute capability {target['compute_capability'] or '-'})")
                lines.append(f"  engines     for this machine: {here}")
                for e in package["engines"]:
                    mark = "yes" if e["match"] else "no"
                    used = ", selected" if e["selected"] else ""
                    lines.append(f"    {e['stage']:<7} {e['file']}  TensorRT {e['tensorrt_version']}, compute "
                                 f"capability {e['compute_capability']} ({e['gpu_name']}): match {mark}{used} "
                                 f"- {e['why']}")
                lines.append("  TensorRT    " + ("can run this package here" if package["engines_usable_here"]
                                                 else "cannot run this package here (not every stage has a "
                                                      "matching engine)"))
    problems = report.get("problems") or []
    lines.append("Problems    " + ("none" if not problems else ""))
    lines.extend(f"  - {p}" for p in problems)
    return "\n".join(lines)
