"""TensorRT on this machine: importing it, the GPU's identity, and which of a package's engines fit.

Shared by the runtime (choosing and loading engines) and ``engine_build``
(building them): an engine runs only on the GPU kind (compute capability) and
the TensorRT major.minor it was built with, so both sides identify the GPU and
match engine records the same way.

TensorRT and the CUDA libraries are optional: each is imported where it is
first needed (see the reason at each import), never at import time.
"""

from __future__ import annotations

import importlib
import logging
import re
import shutil
import subprocess
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pocketseg.errors import InputError, MissingDependencyError, PocketsegError
from pocketseg.manifest import EngineRecord, Stage

__all__ = ["GPU_PROBES", "GpuIdentity", "TensorRTError", "TensorRTNotInstalledError", "engine_matches",
           "gpu_identity", "import_tensorrt", "init_plugins", "normalize_compute_capability", "parse_nvidia_smi",
           "parse_version", "select_engine", "tensorrt_available", "tensorrt_logger"]

log = logging.getLogger(__name__)

#: The oldest TensorRT pocketseg builds and runs engines with (JetPack 6.0).
MIN_VERSION = (8, 6)

INSTALL_HINT = (
    "TensorRT comes from NVIDIA, not from pocketseg's dependencies: on Jetson it is JetPack's "
    "python3-libnvinfer (apt install python3-libnvinfer; a virtualenv needs --system-site-packages to see it), "
    "on x86_64 NVIDIA's 'tensorrt' wheel (pip install tensorrt; older releases need "
    "--extra-index-url https://pypi.nvidia.com), matching the installed CUDA"
)


class TensorRTNotInstalledError(MissingDependencyError):
    """``import tensorrt`` failed; the message says where TensorRT comes from."""

    def __init__(self, cause: str | None = None):
        super().__init__("tensorrt", "Building TensorRT engines", "tensorrt")
        message = f"{self.args[0]}. {INSTALL_HINT}."
        if cause:
            message += f" (import error: {cause})"
        self.args = (message,)
        self.msg = message  # ImportError's str() shows .msg


class TensorRTError(PocketsegError, RuntimeError):
    """TensorRT cannot be set up or run here (no GPU identity, an engine that does not load or run)."""


def import_tensorrt():
    """The ``tensorrt`` module; :class:`TensorRTNotInstalledError` when it cannot be imported."""
    try:
        return importlib.import_module("tensorrt")  # optional, from NVIDIA: imported when first asked for
    except (ImportError, OSError) as exc:  # OSError: the wheel is there but libnvinfer is not loadable
        raise TensorRTNotInstalledError(str(exc)) from None


_LOGGERS: dict[Any, Any] = {}  # keyed by the module object itself (kept alive), never by a reusable id()
_PLUGINS: dict[Any, bool] = {}  # module -> whether its plugin library registered


def tensorrt_logger(trt):
    """The one ``trt.Logger`` of this process, shared by the builder and the runtime.

    TensorRT keeps the first logger it was given process-wide and warns when later objects bring
    another one, so every Builder, Runtime and OnnxParser of a TensorRT module gets this one.
    """
    if trt not in _LOGGERS:
        _LOGGERS[trt] = trt.Logger(trt.Logger.WARNING)
    return _LOGGERS[trt]


def init_plugins(trt) -> bool:
    """Register TensorRT's own plugins (``libnvinfer_plugin``) once per process; whether that worked.

    An engine that holds a plugin layer can only be deserialized once its plugin creator is in the
    registry. The builder side registers plugins implicitly (the ONNX parser does it while parsing),
    a fresh process that only loads engines does not, so the runtime calls this before loading.
    """
    if trt not in _PLUGINS:
        try:
            _PLUGINS[trt] = bool(trt.init_libnvinfer_plugins(tensorrt_logger(trt), ""))
        except Exception as exc:  # noqa: BLE001 - a missing plugin library only matters for engines that need it
            log.debug("TensorRT plugins not registered: %s: %s", type(exc).__name__, exc)
            _PLUGINS[trt] = False
    return _PLUGINS[trt]


def tensorrt_available() -> bool:
    """Whether ``import tensorrt`` works here (it does not on CPU-only or non-NVIDIA machines)."""
    try:
        import_tensorrt()
    except MissingDependencyError:
        return False
    return True


def parse_version(version: str | Sequence[int]) -> tuple[int, int]:
    """``(major, minor)`` of a TensorRT version such as ``"10.3.0.30"`` or ``"8.6.2"``."""
    if not isinstance(version, str):
        parts = tuple(int(v) for v in version)
        if len(parts) < 2:
            raise InputError(None, f"TensorRT version {version!r} needs a major and a minor number")
        return parts[0], parts[1]
    match = re.match(r"\s*(\d+)\.(\d+)", version)
    if not match:
        raise InputError(None, f"cannot read the TensorRT version {version!r} (expected e.g. '10.3.0')")
    return int(match.group(1)), int(match.group(2))


@dataclass(frozen=True)
class GpuIdentity:
    name: str
    compute_capability: str  # "8.7"

    @property
    def sm(self) -> str:
        """``"sm87"`` for compute capability 8.7, ``"sm100"`` for 10.0."""
        return "sm" + self.compute_capability.replace(".", "")


def normalize_compute_capability(value: str | Sequence[int]) -> str:
    """``"8.7"`` from ``"8.7"``, ``(8, 7)``, ``"87"`` (CuPy's form) or ``"sm87"``."""
    if not isinstance(value, str):
        major, minor = (int(v) for v in value)
        return f"{major}.{minor}"
    text = value.strip().lower().removeprefix("sm_").removeprefix("sm")
    if re.fullmatch(r"\d+\.\d+", text):
        major, minor = text.split(".")
        return f"{int(major)}.{int(minor)}"
    if re.fullmatch(r"\d{2,3}", text):  # CuPy: "87", "90", "100", "120"; the last digit is the minor
        return f"{int(text[:-1])}.{int(text[-1])}"
    raise ValueError(f"not a compute capability: {value!r}")


def _decode_name(raw: Any) -> str:
    if isinstance(raw, (bytes, bytearray)):
        raw = bytes(raw).split(b"\0", 1)[0].decode("utf-8", errors="replace")
    return str(raw).strip()


def _probe_cuda_python(device: int) -> GpuIdentity:
    # cuda-python is optional (it comes with TensorRT's wheels): imported only when a GPU is probed.
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        with warnings.catch_warnings():  # the old module path warns about its deprecation on newer releases
            warnings.simplefilter("ignore", DeprecationWarning)
            from cuda import cudart  # type: ignore[no-redef]
    ok = cudart.cudaError_t.cudaSuccess

    def call(result):
        err, value = result[0], result[1]
        if err != ok:
            raise RuntimeError(f"CUDA runtime error {err}")
        return value

    attr = cudart.cudaDeviceAttr
    major = call(cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, device))
    minor = call(cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, device))
    props = call(cudart.cudaGetDeviceProperties(device))
    return GpuIdentity(_decode_name(props.name), f"{int(major)}.{int(minor)}")


def parse_nvidia_smi(text: str, device: int = 0) -> GpuIdentity:
    """The GPU from ``nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader`` output.

    nvidia-smi numbers GPUs in PCI order, CUDA (and TensorRT) by default fastest first and after
    ``CUDA_VISIBLE_DEVICES``; so with several GPUs of different compute capability the answer is
    refused rather than guessed.
    """
    gpus = []
    for line in text.splitlines():
        if not line.strip():
            continue
        name, _, cap = line.rpartition(",")
        try:
            gpus.append(GpuIdentity(name.strip(), normalize_compute_capability(cap)))
        except ValueError:
            raise ValueError(f"nvidia-smi reported no compute capability ({line.strip()!r})") from None
    if not gpus:
        raise ValueError("nvidia-smi listed no GPU")
    if len({g.compute_capability for g in gpus}) > 1:
        raise ValueError(f"nvidia-smi lists GPUs of different compute capability ({gpus}); it cannot tell which "
                         f"one CUDA calls device {device}")
    return gpus[device] if device < len(gpus) else gpus[0]


def _probe_nvidia_smi(device: int) -> GpuIdentity:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        raise FileNotFoundError("nvidia-smi is not on PATH")
    done = subprocess.run([exe, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                          capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise RuntimeError((done.stderr or done.stdout).strip() or f"exit status {done.returncode}")
    return parse_nvidia_smi(done.stdout, device)


def _probe_torch(device: int) -> GpuIdentity:
    import torch  # optional (train extra) and heavy: only when the probes before it failed

    if not torch.cuda.is_available():
        raise RuntimeError("torch sees no CUDA device")
    major, minor = torch.cuda.get_device_capability(device)
    return GpuIdentity(torch.cuda.get_device_name(device), f"{major}.{minor}")


def _probe_cupy(device: int) -> GpuIdentity:
    import cupy  # optional (gpu extra): only when the probes before it failed

    cap = cupy.cuda.Device(device).compute_capability  # a string such as "87"
    name = cupy.cuda.runtime.getDeviceProperties(device)["name"]
    return GpuIdentity(_decode_name(name), normalize_compute_capability(cap))


GPU_PROBES: tuple[tuple[str, Callable[[int], GpuIdentity]], ...] = (
    ("cuda-python", _probe_cuda_python),
    ("nvidia-smi", _probe_nvidia_smi),
    ("torch", _probe_torch),
    ("cupy", _probe_cupy),
)


def gpu_identity(device: int = 0, *, probes: Iterable[tuple[str, Callable[[int], GpuIdentity]]] | None = None
                 ) -> GpuIdentity:
    """Name and compute capability of CUDA device ``device``: cuda-python, else nvidia-smi, else torch, else CuPy."""
    failures = []
    for label, probe in GPU_PROBES if probes is None else probes:
        try:
            gpu = probe(device)
        except Exception as exc:  # noqa: BLE001 - every probe may fail in its own way; the next one is tried
            failures.append(f"{label}: {type(exc).__name__}: {exc}")
            continue
        log.debug("GPU %d from %s: %s, compute capability %s", device, label, gpu.name, gpu.compute_capability)
        return gpu
    raise TensorRTError(f"cannot identify CUDA device {device}, which TensorRT engines are built for ("
                           + "; ".join(failures) + "); install cuda-python (pip install cuda-python) "
                           "or put nvidia-smi on PATH")


def engine_matches(record: EngineRecord, tensorrt_version: str, compute_capability: str) -> bool:
    """Whether the engine of ``record`` runs here: same TensorRT major.minor and same compute capability.

    (TensorRT engines are not portable across TensorRT versions unless built version-compatible,
    which pocketseg does not do, nor across compute capabilities.)
    """
    try:
        return (parse_version(record.tensorrt_version) == parse_version(tensorrt_version)
                and normalize_compute_capability(record.compute_capability)
                == normalize_compute_capability(compute_capability))
    except ValueError:  # InputError is a ValueError too: a malformed record never matches
        return False


def select_engine(stage: Stage, tensorrt_version: str, compute_capability: str, member: int = 0) -> EngineRecord | None:
    """The engine record of network ``member`` of ``stage`` usable with this TensorRT and GPU (the last one
    recorded), or None."""
    usable = [e for e in stage.engines if e.member == member and engine_matches(e, tensorrt_version, compute_capability)]
    return usable[-1] if usable else None
