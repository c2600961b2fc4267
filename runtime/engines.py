"""Inference engines behind one small interface: TensorRT, ONNX Runtime, OpenVINO, PyTorch.

An engine runs one network of a model package on batches of patches::

    engine = open_engine(package_dir, manifest.detail, backend="onnxruntime", device="cpu")
    logits = engine(batch)          # (B, 1, z, y, x) float on the device -> (B, C, z, y, x)

Inputs and outputs stay on the engine's device: NumPy arrays on the CPU, CuPy
arrays on a GPU, so the cascade never copies a patch to the host. On a GPU all
three backends run in CUDA's primary context of the device, the one CuPy uses
(TensorRT and ONNX Runtime through the CUDA runtime API, torch likewise), and
they read and write CuPy's buffers directly (TensorRT tensor addresses, ONNX
Runtime I/O binding, DLPack for torch).

Which backend ``auto`` picks (:func:`resolve`): on a GPU TensorRT when the
package has an engine built for this GPU and TensorRT version, else ONNX
Runtime's CUDA provider, else torch; on the CPU OpenVINO, else ONNX Runtime,
else torch. torch is imported only when the torch backend is chosen or asked
about.

OpenVINO (CPU only) compiles the package's fp32 ONNX with the precision pinned
(``INFERENCE_PRECISION_HINT`` f32 for fp32, bf16 for bf16: on a CPU with native
bf16 OpenVINO would otherwise pick bf16 by itself) and keeps compiled models in
a cache folder outside the package (:func:`openvino_cache_dir`). bf16 runs only
through OpenVINO on a CPU that computes bf16 natively (:func:`cpu_bf16_support`).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pocketseg.errors import InputError, MissingDependencyError, PocketsegError
from pocketseg.manifest import AGREEMENT_MIN, INPUT_NAME, OUTPUT_NAME, Manifest, Stage
from pocketseg.runtime.arrays import DeviceUnavailableError, array_module, cuda_available
from pocketseg.runtime.tensorrt_probe import (TensorRTError, gpu_identity, import_tensorrt, init_plugins,
                                              select_engine, tensorrt_logger)

__all__ = [
    "BACKENDS",
    "BackendStatus",
    "Engine",
    "EngineUnavailableError",
    "Selection",
    "compile_openvino",
    "cpu_bf16_support",
    "open_engine",
    "openvino_cache_dir",
    "probe_backends",
    "resolve",
]

log = logging.getLogger(__name__)

BACKENDS = ("tensorrt", "onnxruntime", "openvino", "torch")
DEVICES = ("cpu", "cuda")
PRECISIONS = ("fp32", "fp16", "bf16")
#: Preference of ``backend="auto"`` per device, fastest first.
AUTO_ORDER = {"cuda": ("tensorrt", "onnxruntime", "torch"), "cpu": ("openvino", "onnxruntime", "torch")}
#: On the CPU, nnU-Net-exact inference prefers torch: the same convolution kernels as nnU-Net's predictor, so
#: that voxels whose two best classes are within a float16 step fall the same way (ONNX Runtime's kernels sum
#: in another order); ONNX Runtime is next where torch is not installed.
EXACT_CPU_ORDER = ("torch", "onnxruntime")
#: ONNX Runtime run option that shrinks the listed arenas ("gpu:0", "cpu:0;gpu:0") at the end of that run
#: (kOrtRunOptionsConfigEnableMemoryArenaShrinkage, onnxruntime_run_options_config_keys.h).
ARENA_SHRINKAGE = "memory.enable_memory_arena_shrinkage"
#: ONNX Runtime session option: weights in memory of their own, outside the arena, so that a shrink can
#: return every arena region (a region holding an initializer is never free).
INITIALIZERS_OUTSIDE_ARENA = "session.use_device_allocator_for_initializers"
#: Environment variable naming the folder of OpenVINO's compiled-model cache (default :func:`openvino_cache_dir`).
OPENVINO_CACHE_ENV = "POCKETSEG_OPENVINO_CACHE"
#: OpenVINO's inference precision for each precision of the runtime that OpenVINO runs.
OPENVINO_PRECISION = {"fp32": "f32", "bf16": "bf16"}


class EngineUnavailableError(PocketsegError, RuntimeError):
    """The requested backend cannot run here (not installed, no provider, no matching TensorRT engine)."""


# ------------------------------------------------------------------------------------------------ what is installed

@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend is installed, its version and the devices it can run on here."""

    name: str
    installed: bool
    version: str | None
    devices: tuple[str, ...]
    detail: str = ""


def _version(module: Any) -> str | None:
    return getattr(module, "__version__", None)


def _probe_onnxruntime() -> BackendStatus:
    try:
        ort = importlib.import_module("onnxruntime")  # optional (runtime extra): imported when asked about
    except ImportError as exc:
        return BackendStatus("onnxruntime", False, None, (), f"not installed ({exc}); pip install 'pocketseg[runtime]'")
    providers = tuple(ort.get_available_providers())
    devices = ("cpu",) + (("cuda",) if "CUDAExecutionProvider" in providers else ())
    return BackendStatus("onnxruntime", True, _version(ort), devices, "providers: " + ", ".join(providers))


def _probe_tensorrt() -> BackendStatus:
    try:
        trt = import_tensorrt()
    except MissingDependencyError as exc:
        return BackendStatus("tensorrt", False, None, (), str(exc))
    return BackendStatus("tensorrt", True, _version(trt), ("cuda",))


def _probe_torch(import_it: bool = True) -> BackendStatus:
    if importlib.util.find_spec("torch") is None:
        return BackendStatus("torch", False, None, (), "not installed; pip install 'pocketseg[train]'")
    if not import_it:
        return BackendStatus("torch", True, None, ("cpu",), "not imported")
    torch = importlib.import_module("torch")  # optional and heavy: only when asked (import_it)
    cuda = bool(torch.cuda.is_available())
    return BackendStatus("torch", True, _version(torch), ("cpu", "cuda") if cuda else ("cpu",),
                         f"CUDA {torch.version.cuda}" if cuda else "CPU build or no GPU")


def _import_openvino() -> Any:
    return importlib.import_module("openvino")  # optional (openvino extra): imported when asked about or run


@functools.lru_cache(maxsize=1)
def _openvino_cpu() -> tuple[str | None, tuple[str, ...], str]:
    """(OpenVINO's version, its CPU's OPTIMIZATION_CAPABILITIES, why not usable); the version is None when missing."""
    try:
        ov = _import_openvino()
    except ImportError as exc:
        return None, (), f"not installed ({exc}); pip install 'pocketseg[openvino]'"
    version = str(getattr(ov, "__version__", "")).split("-")[0] or "unknown"
    try:
        core = ov.Core()
        if "CPU" not in core.available_devices:
            return version, (), f"OpenVINO sees no CPU device (devices: {', '.join(core.available_devices) or 'none'})"
        return version, tuple(str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")), ""
    except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses of its own
        return version, (), f"OpenVINO's CPU plugin cannot start ({type(exc).__name__}: {exc})"


def _probe_openvino() -> BackendStatus:
    version, capabilities, why = _openvino_cpu()
    if version is None:
        return BackendStatus("openvino", False, None, (), why)
    if why:
        return BackendStatus("openvino", True, version, (), why)
    return BackendStatus("openvino", True, version, ("cpu",), "CPU capabilities: " + ", ".join(capabilities))


def cpu_amx() -> bool | None:
    """Whether the CPU has AMX tiles for bf16 (Linux ``/proc/cpuinfo`` flag ``amx_bf16``); None where unknown."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return "amx_bf16" in line.split()
    except OSError:
        return None
    return None


def cpu_bf16_support() -> tuple[bool, str]:
    """(whether this CPU computes bf16 natively, the evidence): OpenVINO's CPU ``OPTIMIZATION_CAPABILITIES`` lists
    BF16 (AVX-512 BF16 or AMX); without OpenVINO nothing here can run bf16."""
    version, capabilities, why = _openvino_cpu()
    if version is None or why:
        return False, f"OpenVINO is not usable: {why}"
    if "BF16" not in capabilities:
        return False, f"OpenVINO {version} reports no native bf16 on this CPU (capabilities: {', '.join(capabilities)})"
    amx = cpu_amx()
    return True, f"OpenVINO's CPU capabilities list BF16{'; AMX present' if amx else ''}"


def probe_backends(*, import_torch: bool = True) -> dict[str, BackendStatus]:
    """Status of every backend on this machine (``import_torch=False`` avoids importing torch)."""
    return {"tensorrt": _probe_tensorrt(), "onnxruntime": _probe_onnxruntime(), "openvino": _probe_openvino(),
            "torch": _probe_torch(import_torch)}


# ------------------------------------------------------------------------------------------------------- selection

@dataclass(frozen=True)
class Selection:
    """What ``resolve`` decided, and why."""

    backend: str
    device: str
    precision: str
    reason: str
    engine_files: dict[str, str] = field(default_factory=dict)  # stage -> TensorRT engine file


def _check_choice(value: str, allowed: tuple[str, ...], name: str) -> str:
    if value not in allowed:
        raise InputError(None, f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _tensorrt_engines(manifest: Manifest | None) -> tuple[dict[str, str], str]:
    """Engine files of both stages usable with this GPU and TensorRT, or ({}, why not)."""
    if manifest is None:
        return {}, "no model package given"
    try:
        version = import_tensorrt().__version__
        gpu = gpu_identity(0)
    except PocketsegError as exc:
        return {}, str(exc)
    files = {}
    for name, stage in manifest.stages.items():
        for member in range(len(stage.members)):
            record = select_engine(stage, version, gpu.compute_capability, member)
            if record is None:
                built = ", ".join(f"{e.file} (TensorRT {e.tensorrt_version}, sm {e.compute_capability})"
                                  for e in stage.engines) or "none"
                return {}, (f"no {engine_key(name, member)} engine for {gpu.name} (sm {gpu.compute_capability}) and "
                            f"TensorRT {version} in the package (built: {built}); run pocketseg build-engine on this "
                            "machine")
            files[engine_key(name, member)] = record.file
    return files, ""


def _available_on(backend: str, device: str, manifest: Manifest | None) -> tuple[bool, str, dict[str, str]]:
    """(usable, why not, engine files) for one backend on one device."""
    if backend == "tensorrt":
        if device != "cuda":
            return False, "TensorRT runs on CUDA GPUs only", {}
        status = _probe_tensorrt()
        if not status.installed:
            return False, status.detail, {}
        files, why = _tensorrt_engines(manifest)
        return bool(files), why, files
    if backend == "onnxruntime":
        status = _probe_onnxruntime()
        if not status.installed:
            return False, status.detail, {}
        if device not in status.devices:
            return False, f"onnxruntime has no CUDAExecutionProvider here ({status.detail}); pip install onnxruntime-gpu", {}
        return True, "", {}
    if backend == "openvino":
        if device != "cpu":
            return False, "this runtime runs OpenVINO on the CPU only", {}
        status = _probe_openvino()
        if not status.installed or "cpu" not in status.devices:
            return False, status.detail, {}
        return True, "", {}
    status = _probe_torch(import_it=device == "cuda")
    if not status.installed:
        return False, status.detail, {}
    if device not in status.devices:
        return False, f"torch cannot use CUDA here ({status.detail})", {}
    return True, "", {}


def _bf16_record(manifest: Manifest | None) -> tuple[bool, str]:
    """(whether every stage of the package records a verified bf16 agreement, what the package says)."""
    if manifest is None:
        return False, "no model package given"
    missing = [name for name, stage in manifest.stages.items() if stage.bf16_agreement is None]
    if missing:
        return False, (f"the package records no bf16 agreement for {', '.join(missing)} (exported without OpenVINO "
                       "or on a CPU without native bf16)")
    measured = ", ".join(f"{name} {100 * stage.bf16_agreement:.3f} %" for name, stage in manifest.stages.items())
    if not all(stage.bf16_verified for stage in manifest.stages.values()):
        return False, f"the package's bf16 agreement is below {100 * AGREEMENT_MIN:.1f} % ({measured})"
    return True, f"the package's bf16 agreement is {measured}"


def resolve(backend: str = "auto", device: str = "auto", manifest: Manifest | None = None,
            precision: str = "auto", *, exact: bool | None = None) -> Selection:
    """The backend, device and precision to run with.

    ``device="auto"`` is ``cuda`` when CuPy sees a GPU, else ``cpu`` (``cpu`` for ``precision="bf16"``).
    ``backend="auto"`` takes the first usable backend of :data:`AUTO_ORDER` (:data:`EXACT_CPU_ORDER` on the
    CPU for nnU-Net-exact inference: ``exact``, by default the package's setting). ``precision="auto"`` is
    fp16 on a GPU (the paper's FP16 engines); on the CPU bf16 when OpenVINO runs, the CPU computes bf16
    natively and every stage of the package records a bf16 agreement of at least :data:`AGREEMENT_MIN`
    (never for nnU-Net-exact inference), else fp32. ``precision="bf16"`` runs only with OpenVINO on a CPU
    with native bf16 (refused elsewhere); on a package without a verified agreement it runs with a warning.
    An explicit choice that cannot run raises :class:`EngineUnavailableError` (or
    :class:`DeviceUnavailableError`, :class:`InputError`) saying why.
    """
    _check_choice(backend, ("auto",) + BACKENDS, "backend")
    _check_choice(device, ("auto",) + DEVICES, "device")
    _check_choice(precision, ("auto",) + PRECISIONS, "precision")
    device_auto = device == "auto"
    if device_auto and precision == "bf16":
        device, device_reason = "cpu", "CPU (precision bf16 runs on the CPU)"
    elif device_auto:
        usable, why = cuda_available()
        device = "cuda" if usable else "cpu"
        device_reason = "a CUDA GPU is usable" if usable else f"CPU ({why})"
    else:
        if device == "cuda":
            usable, why = cuda_available()
            if not usable:
                raise DeviceUnavailableError(f"device 'cuda' is not available: {why}")
        device_reason = f"device {device} requested"
    precision_auto = precision == "auto"
    if precision_auto:
        precision = "fp16" if device == "cuda" else "fp32"
    if precision == "fp16" and device == "cpu":
        raise InputError(None, "precision fp16 needs a CUDA device; on the CPU the runtime runs fp32 (or bf16)")
    if precision == "bf16":
        if device != "cpu":
            raise InputError(None, "precision bf16 runs on the CPU (OpenVINO); on a CUDA device use fp16 or fp32")
        if backend not in ("auto", "openvino"):
            raise InputError(None, f"precision bf16 runs with the openvino backend only, not {backend}")
        native, why = cpu_bf16_support()
        if not native:
            raise EngineUnavailableError(f"precision bf16 refused: this CPU has no native bf16 ({why})")

    if exact is None:
        exact = bool(manifest is not None and manifest.inference.nnunet_numerics)
    order = EXACT_CPU_ORDER if exact and device == "cpu" else AUTO_ORDER[device]
    if precision == "bf16":
        order = ("openvino",)
    candidates = order if backend == "auto" else (backend,)
    skipped = []
    for name in candidates:
        if name == "tensorrt" and device != "cuda":
            skipped.append(f"tensorrt: runs only on a CUDA GPU, and the device is {device}")
            continue
        if name == "tensorrt" and precision != "fp16":
            skipped.append("tensorrt: the package's engines are fp16")
            continue
        ok, why, files = _available_on(name, device, manifest)
        if ok:
            how = "requested" if backend != "auto" else "auto, nnU-Net-exact" if order is EXACT_CPU_ORDER else "auto"
            reason = f"{device_reason}; backend {name} ({how})"
            if skipped:
                reason += "; skipped " + "; ".join(skipped)
            if name == "openvino":
                precision, note = _openvino_precision(precision, precision_auto, manifest, exact)
                reason += f"; {note}"
            return Selection(name, device, precision, reason, files)
        skipped.append(f"{name}: {why}")
    if backend == "auto" and device_auto and precision_auto and device == "cuda":
        # A GPU but no GPU-capable backend installed: the CPU still works.
        fallback = resolve(backend="auto", device="cpu", manifest=manifest, precision="auto", exact=exact)
        return Selection(fallback.backend, "cpu", fallback.precision,
                         f"CPU: no backend can run on the GPU ({'; '.join(skipped)}); {fallback.reason}")
    if backend == "auto":
        raise EngineUnavailableError(f"no inference backend can run on {device}: " + "; ".join(skipped))
    raise EngineUnavailableError(f"backend {backend} cannot run on {device}: " + "; ".join(skipped))


def _openvino_precision(precision: str, precision_auto: bool, manifest: Manifest | None,
                        exact: bool) -> tuple[str, str]:
    """OpenVINO's precision (fp32 or bf16) and why; warns on an explicit bf16 the package has not verified."""
    verified, record = _bf16_record(manifest)
    if precision == "bf16":  # asked for; native bf16 was checked by resolve
        if not verified:
            log.warning("precision bf16 without a verified agreement with fp32: %s; labels may differ from fp32",
                        record)
            return "bf16", f"precision bf16 (requested; not verified: {record})"
        return "bf16", f"precision bf16 (requested; {record})"
    if not precision_auto:
        return precision, f"precision {precision} (requested)"
    if exact:
        return "fp32", "precision fp32 (auto: nnU-Net-exact inference)"
    native, why = cpu_bf16_support()
    if not native:
        return "fp32", f"precision fp32 (auto: {why})"
    if not verified:
        return "fp32", f"precision fp32 (auto: the CPU computes bf16 natively, but {record})"
    return "bf16", f"precision bf16 (auto: the CPU computes bf16 natively and {record})"


# --------------------------------------------------------------------------------------------------------- engines

class Engine:
    """One network of a package on one device; ``engine(batch) -> logits``, both on the device."""

    backend = ""

    def __init__(self, stage: Stage, device: str, precision: str, member: int = 0):
        if not 0 <= member < len(stage.members):
            raise InputError(None, f"stage {stage.name} has {len(stage.members)} network(s), not a member {member}")
        self.stage = stage
        self.member = member
        self.files = stage.members[member]  # export target -> file, of this network of the stage
        self.device = device
        self.precision = precision
        self.am = array_module(device)
        self.max_batch: int | None = None  # None: any batch size

    @property
    def num_classes(self) -> int:
        return self.stage.num_classes

    @property
    def patch_zyx(self) -> tuple[int, int, int]:
        return self.stage.patch_zyx

    def __call__(self, batch: Any) -> Any:  # pragma: no cover - implemented by subclasses
        raise NotImplementedError

    def transient(self, batch: Any) -> Any:
        """Like calling the engine, but the logits may live in a buffer the engine reuses: valid until its next
        call or :meth:`close`. For callers that are done with each result before asking for the next (the
        sliding window); an engine whose output would be a fresh copy each time hands out its own buffer."""
        return self(batch)

    def close(self) -> None:
        """Release what the engine holds (sessions, GPU buffers)."""

    def free_cached_memory(self) -> None:
        """Return memory the backend caches for itself to the device, keeping the engine usable.

        Called after a GPU out-of-memory error (before the retry) and by the benchmark between
        cases, so that every case starts from the same idle baseline: torch's caching allocator,
        ONNX Runtime's arena (CuPy's pool is the predictor's, freed by it). TensorRT's execution
        context holds a fixed amount, allocated once with the context; nothing to return there.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.stage.name}[{self.member}], {self.device}, {self.precision})"


class OnnxRuntimeEngine(Engine):
    """ONNX Runtime: CPU provider with NumPy arrays, CUDA provider with CuPy buffers bound in place."""

    backend = "onnxruntime"

    def __init__(self, package_dir: Path, stage: Stage, device: str, precision: str, *, threads: int | None = None,
                 member: int = 0):
        super().__init__(stage, device, precision, member)
        ort = importlib.import_module("onnxruntime")  # optional (runtime extra): imported when an engine opens
        target = "onnx-fp16" if precision == "fp16" and "onnx-fp16" in self.files else "onnx-fp32"
        if precision == "fp16" and target == "onnx-fp32":
            log.warning("%s: the package has no fp16 ONNX; running fp32", stage.name)
            self.precision = "fp32"
        path = Path(package_dir) / self.files[target]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = int(threads)
        providers: list[Any] = ["CPUExecutionProvider"]
        self._ort = ort
        self._arena: str | None = None  # the arena free_cached_memory shrinks ("gpu:<id>"); None: none
        self._grown = False  # whether a run may have grown the arena since its last shrink
        if device == "cuda":
            device_id = self.am.xp.cuda.Device().id
            providers = [("CUDAExecutionProvider", cuda_provider_options(device_id)), "CPUExecutionProvider"]
            options.add_session_config_entry(INITIALIZERS_OUTSIDE_ARENA, "1")
            self._arena = f"gpu:{device_id}"
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as exc:  # ORT raises its own exception types for unreadable models
            raise InputError(path, f"ONNX Runtime cannot load the model ({type(exc).__name__}: {exc})") from None
        if device == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            # ONNX Runtime builds a CPU-only session, with only a logged error, when CUDA/cuDNN cannot load.
            raise EngineUnavailableError(f"{path}: ONNX Runtime could not start its CUDA provider (CUDA or cuDNN "
                                         "libraries missing or mismatched?); use --backend tensorrt/torch or --device cpu")
        inputs = {i.name: i for i in self.session.get_inputs()}
        if INPUT_NAME not in inputs:
            raise InputError(path, f"the ONNX model has no input named {INPUT_NAME!r}")
        self.io_dtype = np.float16 if "float16" in inputs[INPUT_NAME].type else np.float32

    def __call__(self, batch: Any) -> Any:
        self._grown = True
        return self._run(batch, None)

    def _run(self, batch: Any, run_options: Any) -> Any:
        xp = self.am.xp
        batch = xp.ascontiguousarray(batch, dtype=self.io_dtype)
        if self.device == "cpu":
            return self.session.run([OUTPUT_NAME], {INPUT_NAME: batch}, run_options)[0]
        shape = (batch.shape[0], self.num_classes) + tuple(batch.shape[2:])
        out = xp.empty(shape, dtype=self.io_dtype)
        device_id = xp.cuda.Device().id
        binding = self.session.io_binding()
        binding.bind_input(INPUT_NAME, "cuda", device_id, self.io_dtype, tuple(batch.shape), int(batch.data.ptr))
        binding.bind_output(OUTPUT_NAME, "cuda", device_id, self.io_dtype, shape, int(out.data.ptr))
        # ONNX Runtime works on its own CUDA stream: CuPy's writes must be done before it reads.
        self.am.synchronize()
        self.session.run_with_iobinding(binding, run_options)
        binding.synchronize_outputs()
        return out

    def free_cached_memory(self) -> None:
        """Shrink ONNX Runtime's device arena now: one one-tile run with the arena-shrinkage run option.

        ONNX Runtime's Python API shrinks an arena only through this run option, at the end of the run
        that carries it (also when that run fails in execution), returning every region with nothing
        allocated in it. The weights live outside the arena
        (:data:`INITIALIZERS_OUTSIDE_ARENA`), so after this the arena holds nothing.
        """
        if self._arena is None or not self._grown or self.session is None:
            return
        options = self._ort.RunOptions()
        options.add_run_config_entry(ARENA_SHRINKAGE, self._arena)
        try:
            self._run(self.am.xp.zeros((1, 1) + self.patch_zyx, dtype=self.io_dtype), options)
        except Exception as exc:  # noqa: BLE001 - the arena was shrunk anyway; the caller's retry decides
            log.warning("%s: the run that shrinks ONNX Runtime's arena failed (%s: %s)", self, type(exc).__name__, exc)
        self._grown = False

    def close(self) -> None:
        self.session = None


def openvino_cache_dir() -> Path:
    """Where OpenVINO keeps compiled models: ``$POCKETSEG_OPENVINO_CACHE``, else ``pocketseg/openvino`` in the user's
    cache folder (``$XDG_CACHE_HOME``, else ``~/.cache``). Never a package folder, whose files are checksummed."""
    override = os.environ.get(OPENVINO_CACHE_ENV)
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pocketseg" / "openvino"


@functools.lru_cache(maxsize=1)
def _openvino_core() -> Any:
    return _import_openvino().Core()


def compile_openvino(path: Path, precision: str, *, threads: int | None = None, cache_dir: Path | None = None) -> Any:
    """OpenVINO's CPU compilation of the ONNX file ``path`` at ``precision`` (fp32 or bf16), latency hint.

    The inference precision is always pinned, and read back from the compiled model: left unset, OpenVINO
    computes in bf16 on CPUs that have it. ``threads``: ``INFERENCE_NUM_THREADS`` (None: OpenVINO's choice);
    ``cache_dir``: OpenVINO's ``CACHE_DIR`` (None: no cache). OpenVINO 2026.4 keeps one cached blob per model
    file for both precisions and applies the precision when it loads it; the read-back covers a cached model too.
    """
    if precision not in OPENVINO_PRECISION:
        raise InputError(None, f"OpenVINO runs precision {' or '.join(OPENVINO_PRECISION)}, not {precision!r}")
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": OPENVINO_PRECISION[precision]}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    if cache_dir is not None:
        config["CACHE_DIR"] = str(cache_dir)
    try:
        compiled = _openvino_core().compile_model(str(path), "CPU", config)
    except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses of its own for unreadable models
        raise InputError(path, f"OpenVINO cannot compile the model ({type(exc).__name__}: {exc})") from None
    hint = compiled.get_property("INFERENCE_PRECISION_HINT")
    got = hint.to_string() if hasattr(hint, "to_string") else str(hint)
    if got != OPENVINO_PRECISION[precision]:
        raise EngineUnavailableError(f"{path}: OpenVINO compiled the model with inference precision {got}, not the "
                                     f"{OPENVINO_PRECISION[precision]} asked for")
    return compiled


def _usable_cache_dir(package_dir: Path, cache_dir: Path | None) -> Path | None:
    """The cache folder, created; None (no caching, with a warning) where it cannot be written or would sit inside
    the package."""
    cache = openvino_cache_dir() if cache_dir is None else Path(cache_dir)
    if cache.resolve().is_relative_to(package_dir.resolve()):
        log.warning("OpenVINO cache %s is inside the model package %s, whose files are checksummed; compiling "
                    "without a cache (set %s elsewhere)", cache, package_dir, OPENVINO_CACHE_ENV)
        return None
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("OpenVINO cache %s cannot be created (%s); compiling without a cache", cache, exc.strerror or exc)
        return None
    return cache


class OpenVinoEngine(Engine):
    """OpenVINO on the CPU from the package's fp32 ONNX, at fp32 or bf16 (pinned), NumPy arrays in and out."""

    backend = "openvino"

    def __init__(self, package_dir: Path, stage: Stage, device: str, precision: str, *, threads: int | None = None,
                 member: int = 0, cache_dir: Path | None = None):
        super().__init__(stage, device, precision, member)
        if device != "cpu":
            raise EngineUnavailableError(f"this runtime runs OpenVINO on the CPU only, not on {device}")
        if "onnx-fp32" not in self.files:
            raise InputError(package_dir, f"stage {stage.name} has no fp32 ONNX file, which OpenVINO reads")
        path = Path(package_dir) / self.files["onnx-fp32"]
        self.cache_dir = _usable_cache_dir(Path(package_dir), cache_dir)
        self.compiled = compile_openvino(path, precision, threads=threads, cache_dir=self.cache_dir)
        inputs = {name for port in self.compiled.inputs for name in port.get_names()}
        outputs = {name for port in self.compiled.outputs for name in port.get_names()}
        if INPUT_NAME not in inputs or OUTPUT_NAME not in outputs:
            raise InputError(path, f"the ONNX model's tensors are {sorted(inputs | outputs)}, expected {INPUT_NAME!r} "
                                   f"and {OUTPUT_NAME!r}")
        self._output = self.compiled.output(OUTPUT_NAME)
        self.request = self.compiled.create_infer_request()

    def __call__(self, batch: Any) -> Any:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        return self.request.infer({INPUT_NAME: batch})[self._output]

    def transient(self, batch: Any) -> Any:
        # The request's own output tensor, no copy: a detail tile's 31 MB of logits would otherwise be a fresh
        # allocation per tile, whose first-touch page faults cost more than the copy itself.
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        return self.request.infer({INPUT_NAME: batch}, share_inputs=True, share_outputs=True)[self._output]

    def close(self) -> None:
        self.request = None
        self.compiled = None


class TorchEngine(Engine):
    """PyTorch from the package's safetensors weights; fp16 autocast on CUDA (normalisation stays fp32)."""

    backend = "torch"

    def __init__(self, package_dir: Path, stage: Stage, device: str, precision: str, member: int = 0):
        super().__init__(stage, device, precision, member)
        # torch, safetensors and the network module (which needs torch) are optional: the torch backend only.
        self.torch = torch = importlib.import_module("torch")
        from safetensors.torch import load_file  # optional (train extra)

        from pocketseg.runtime.network import PocketUNet, stage_config  # needs torch

        path = Path(package_dir) / self.files["torch"]
        net = PocketUNet(stage_config(stage), deep_supervision=False)
        try:
            net.load_state_dict(load_file(str(path)))
        except (RuntimeError, OSError, ValueError) as exc:
            raise InputError(path, f"weights do not fit the manifest's network ({type(exc).__name__}: {exc})") from None
        self.torch_device = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
        self.net = net.to(self.torch_device).eval()

    def free_cached_memory(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()
            self.torch.cuda.empty_cache()

    def close(self) -> None:
        self.net = None
        self.free_cached_memory()

    def __call__(self, batch: Any) -> Any:
        torch = self.torch
        if self.device == "cpu":
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        else:
            x = torch.from_dlpack(self.am.xp.ascontiguousarray(batch, dtype=self.am.xp.float32))
        with torch.inference_mode(), torch.autocast(self.torch_device.type, dtype=torch.float16,
                                                    enabled=self.device == "cuda" and self.precision == "fp16"):
            y = self.net(x)
        if self.device == "cpu":
            return y.numpy()
        return self.am.xp.from_dlpack(y.contiguous())


class TensorRTEngine(Engine):
    """A deserialized TensorRT engine; CuPy buffers passed as tensor addresses, run on CuPy's current stream.

    The current stream is the predictor's own non-blocking stream (:meth:`ArrayModule.stream_scope`), so
    TensorRT is ordered after the CuPy work that made its input without a device-wide synchronisation.
    Called where the current stream is CuPy's null stream (the legacy default stream, which synchronises
    with every blocking stream of the device), the engine runs on a non-blocking stream of its own instead,
    ordered after the null stream's queued work and before what is queued there later, by events.
    """

    backend = "tensorrt"

    def __init__(self, package_dir: Path, stage: Stage, device: str, precision: str, engine_file: str,
                 member: int = 0):
        super().__init__(stage, device, precision, member)
        trt = self.trt = import_tensorrt()
        path = Path(package_dir) / engine_file
        # Engines built where the ONNX parser used a plugin (InstanceNormalization_TRT, TensorRT 8.6/9.x
        # before NATIVE_INSTANCENORM was set) load only once TensorRT's plugins are registered.
        init_plugins(trt)
        self._runtime = trt.Runtime(tensorrt_logger(trt))
        self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise InputError(path, "TensorRT cannot deserialize this engine: built by another TensorRT version or for "
                                   "another GPU, or it holds a plugin layer that is not registered here (TensorRT's "
                                   "log above says which); rebuild it with pocketseg build-engine")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise TensorRTError(f"{path}: TensorRT could not create an execution context: out of memory")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        if INPUT_NAME not in names or OUTPUT_NAME not in names:
            raise InputError(path, f"engine tensors are {names}, expected {INPUT_NAME!r} and {OUTPUT_NAME!r}")
        self.in_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(INPUT_NAME)))
        self.out_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(OUTPUT_NAME)))
        record = next(e for e in stage.engines if e.file == engine_file)
        self.max_batch = int(record.max_batch)
        self._own_stream: Any = None  # made on the first call from the null stream

    def __call__(self, batch: Any) -> Any:
        xp = self.am.xp
        batch = xp.ascontiguousarray(batch, dtype=self.in_dtype)
        if not self.context.set_input_shape(INPUT_NAME, tuple(batch.shape)):
            raise TensorRTError(f"TensorRT refused input shape {tuple(batch.shape)} (max batch {self.max_batch})")
        out = xp.empty(tuple(self.context.get_tensor_shape(OUTPUT_NAME)), dtype=self.out_dtype)
        self.context.set_tensor_address(INPUT_NAME, int(batch.data.ptr))
        self.context.set_tensor_address(OUTPUT_NAME, int(out.data.ptr))
        current = xp.cuda.get_current_stream()
        if current.ptr:
            self._execute(current.ptr)
            return out
        # CuPy's null stream is the legacy default stream: running TensorRT there would synchronise the device.
        if self._own_stream is None:
            self._own_stream = self.am.new_stream()
        own = self._own_stream
        own.wait_event(current.record())  # after the null stream's work that made the input
        self._execute(own.ptr)
        current.wait_event(own.record())  # before the null stream's later work that reads the output
        return out

    def _execute(self, stream_ptr: int) -> None:
        if not self.context.execute_async_v3(stream_ptr):
            raise TensorRTError("TensorRT execution failed (out of memory or a bad input; see TensorRT's log)")

    def close(self) -> None:
        self.context = None
        self.engine = None


def cuda_provider_options(device_id: int) -> dict[str, Any]:
    """Options of ONNX Runtime's CUDA provider for ``device_id``.

    ``arena_extend_strategy`` ``kSameAsRequested``: the arena grows by what a run asks for, not to the next
    power of two (the default), which could hold nearly twice the memory a tile needs.
    """
    return {"device_id": int(device_id), "arena_extend_strategy": "kSameAsRequested"}


def engine_key(stage: str, member: int = 0) -> str:
    """The key of a stage's network in :attr:`Selection.engine_files`: ``roi``, ``detail``, ``detail#1`` ..."""
    return stage if member == 0 else f"{stage}#{member}"


def open_engine(package_dir: str | Path, stage: Stage, selection: Selection, *, threads: int | None = None,
                member: int = 0) -> Engine:
    """The engine of network ``member`` of ``stage`` (0: its ``files``; k: its ``ensemble[k - 1]``)."""
    package_dir = Path(package_dir)
    if selection.backend == "onnxruntime":
        return OnnxRuntimeEngine(package_dir, stage, selection.device, selection.precision, threads=threads,
                                 member=member)
    if selection.backend == "openvino":
        return OpenVinoEngine(package_dir, stage, selection.device, selection.precision, threads=threads,
                              member=member)
    if selection.backend == "torch":
        if importlib.util.find_spec("safetensors") is None:
            raise MissingDependencyError("safetensors", "The torch backend", "train")
        return TorchEngine(package_dir, stage, selection.device, selection.precision, member=member)
    if selection.backend == "tensorrt":
        return TensorRTEngine(package_dir, stage, selection.device, selection.precision,
                              selection.engine_files[engine_key(stage.name, member)], member=member)
    raise InputError(None, f"unknown backend {selection.backend!r}")
