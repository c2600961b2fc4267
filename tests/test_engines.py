"""Backend selection and the engines behind one interface (CPU here; GPU variants need a lent GPU)."""

from __future__ import annotations

import subprocess
import sys
import types

import fake_cupy
import numpy as np
import pytest

from pocketseg.errors import InputError
from pocketseg.manifest import EngineRecord, Intensity, Network, Stage, load_package
from pocketseg.runtime import engines
from pocketseg.runtime import tensorrt_probe as probe
from pocketseg.runtime.arrays import DeviceUnavailableError, cuda_available

pytest.importorskip("onnxruntime", reason="onnxruntime (extra 'runtime') is not installed")
no_gpu = pytest.mark.skipif(cuda_available()[0], reason="this test describes a machine without a usable GPU")


def _cpu_auto() -> str:
    """The backend ``auto`` takes on the CPU here: OpenVINO where it runs, else ONNX Runtime."""
    return "openvino" if "cpu" in engines.probe_backends(import_torch=False)["openvino"].devices else "onnxruntime"


@no_gpu
def test_auto_picks_openvino_else_onnxruntime_on_the_cpu(tiny_package, monkeypatch):
    sel = engines.resolve(manifest=load_package(tiny_package))
    assert (sel.backend, sel.device, sel.precision) == (_cpu_auto(), "cpu", "fp32")
    assert "CPU" in sel.reason
    real = engines._available_on
    monkeypatch.setattr(engines, "_available_on", lambda name, device, m: (False, "not installed", {})
                        if name == "openvino" else real(name, device, m))
    sel = engines.resolve(manifest=load_package(tiny_package))
    assert (sel.backend, sel.precision) == ("onnxruntime", "fp32") and "openvino: not installed" in sel.reason


@no_gpu
def test_exact_inference_prefers_torch_on_the_cpu_and_falls_back_to_onnxruntime(tiny_package, monkeypatch):
    pytest.importorskip("torch")
    manifest = load_package(tiny_package)
    exact = engines.resolve(manifest=manifest, exact=True)
    assert exact.backend == "torch" and "nnU-Net-exact" in exact.reason
    assert engines.resolve(manifest=manifest, exact=False).backend == _cpu_auto()
    assert "openvino" not in engines.EXACT_CPU_ORDER  # not measured to agree with nnU-Net as well as ONNX Runtime
    assert engines.resolve(manifest=manifest, backend="onnxruntime", exact=True).backend == "onnxruntime"
    real = engines._available_on
    monkeypatch.setattr(engines, "_available_on", lambda name, device, m: (False, "not installed", {})
                        if name == "torch" else real(name, device, m))
    fallback = engines.resolve(manifest=manifest, exact=True)
    assert fallback.backend == "onnxruntime" and "torch: not installed" in fallback.reason


@no_gpu
def test_unavailable_choices_say_why():
    with pytest.raises(DeviceUnavailableError, match="cuda"):
        engines.resolve(device="cuda")
    with pytest.raises(engines.EngineUnavailableError, match="tensorrt: runs only on a CUDA GPU, and the device is"):
        engines.resolve(backend="tensorrt", device="cpu", precision="fp32")
    with pytest.raises(engines.EngineUnavailableError, match="runs only on a CUDA GPU"):  # not "engines are fp16"
        engines.resolve(backend="tensorrt")
    with pytest.raises(InputError, match="fp16 needs a CUDA device"):
        engines.resolve(device="cpu", precision="fp16")
    with pytest.raises(InputError, match="backend must be one of"):
        engines.resolve(backend="coreml")
    with pytest.raises(InputError, match="precision must be one of"):
        engines.resolve(precision="int8")
    with pytest.raises(InputError, match="bf16 runs with the openvino backend only"):
        engines.resolve(backend="onnxruntime", device="cpu", precision="bf16")
    assert engines._available_on("openvino", "cuda", None)[:2] == (False, "this runtime runs OpenVINO on the CPU only")


def test_probe_reports_every_backend():
    status = engines.probe_backends(import_torch=False)
    assert set(status) == set(engines.BACKENDS)
    assert status["onnxruntime"].installed and "cpu" in status["onnxruntime"].devices


def test_onnxruntime_and_torch_engines_agree(tiny_package):
    pytest.importorskip("torch")
    manifest = load_package(tiny_package)
    batch = np.random.default_rng(0).normal(size=(2, 1) + manifest.detail.patch_zyx).astype(np.float32)
    outs = {}
    for backend in ("onnxruntime", "torch"):
        sel = engines.resolve(backend=backend, device="cpu", manifest=manifest)
        engine = engines.open_engine(tiny_package, manifest.detail, sel)
        outs[backend] = np.asarray(engine(batch))
        assert outs[backend].shape == (2, 15) + manifest.detail.patch_zyx
    np.testing.assert_allclose(outs["onnxruntime"], outs["torch"], atol=1e-3)


def test_onnxruntime_runtime_imports_no_torch(tiny_package):
    code = (
        "import sys, numpy as np\n"
        "from pocketseg.runtime.cascade import CascadePredictor\n"
        "from pocketseg.synth.phantom import make_phantom\n"
        "from pocketseg.volume import Volume\n"
        f"p = CascadePredictor({str(tiny_package)!r}, device='cpu', backend='onnxruntime')\n"
        "ph = make_phantom(0, small=True, slices=8)\n"
        "p.predict(Volume(ph.image, ph.affine))\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_auto_device_falls_back_to_the_cpu_when_no_backend_runs_on_the_gpu(monkeypatch):
    # A usable GPU, but no GPU-capable backend installed (plain onnxruntime, no TensorRT, no CUDA torch).
    monkeypatch.setattr(engines, "cuda_available", lambda: (True, ""))
    real = engines._available_on
    monkeypatch.setattr(engines, "_available_on",
                        lambda name, device, manifest: (False, "not here", {}) if device == "cuda" else real(name, device, manifest))
    sel = engines.resolve()
    assert (sel.device, sel.precision) == ("cpu", "fp32") and "no backend can run on the GPU" in sel.reason
    with pytest.raises(engines.EngineUnavailableError):
        engines.resolve(device="cuda")  # an explicit device is never rewritten


# ------------------------------------------------------------------------ TensorRT's runtime side, with fakes

class _FakeTrtRuntimeModule:
    """The part of the ``tensorrt`` module an engine load touches (TensorRT Python API: ``Logger``, ``Runtime``,
    ``init_libnvinfer_plugins(logger, namespace)``, ``nptype``, ``ICudaEngine`` tensor queries,
    ``IExecutionContext.set_input_shape / get_tensor_shape / set_tensor_address / execute_async_v3``).

    Like TensorRT, ``deserialize_cuda_engine`` returns None for an engine holding a plugin layer whose
    creator is not registered ("could not find plugin") — the engine files here all hold one.
    """

    __version__ = "8.6.2"

    def __init__(self):
        module = self
        self.plugins_registered = 0
        self.runtimes: list = []
        self.executed: list[int] = []

        class Logger:
            WARNING = 2

            def __init__(self, min_severity=2):
                self.min_severity = min_severity

        class Context:
            def __init__(self):
                self.shape = None
                self.addresses: dict[str, int] = {}

            def set_input_shape(self, name, shape):
                self.shape = tuple(shape)
                return True

            def get_tensor_shape(self, name):
                return (self.shape[0], 3) + self.shape[2:] if name == "logits" else self.shape

            def set_tensor_address(self, name, ptr):
                self.addresses[name] = ptr

            def execute_async_v3(self, stream_handle):
                module.executed.append(stream_handle)
                return True

        class Engine:
            num_io_tensors = 2

            def get_tensor_name(self, index):
                return ("image", "logits")[index]

            def get_tensor_dtype(self, name):
                return "HALF"

            def create_execution_context(self):
                return Context()

        class Runtime:
            def __init__(self, logger):
                self.logger = logger
                module.runtimes.append(self)

            def deserialize_cuda_engine(self, serialized):
                assert bytes(serialized).startswith(b"ENGINE")
                return Engine() if module.plugins_registered else None

        self.Logger, self.Runtime = Logger, Runtime

    def init_libnvinfer_plugins(self, logger, namespace):
        assert isinstance(logger, self.Logger) and namespace == ""
        self.plugins_registered += 1
        return True

    @staticmethod
    def nptype(dtype):
        return {"HALF": np.float16, "FLOAT": np.float32}[dtype]


@pytest.fixture
def fake_trt(monkeypatch, tmp_path):
    fake = _FakeTrtRuntimeModule()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(probe, "_LOGGERS", {})
    monkeypatch.setattr(probe, "_PLUGINS", {})
    gpu = fake_cupy.fake_gpu_module()
    monkeypatch.setattr(engines, "array_module", lambda device: gpu)
    (tmp_path / "roi.engine").write_bytes(b"ENGINE with an InstanceNormalization_TRT plugin layer")
    stage = Stage(name="roi", preset="roi", network=Network(8, ((3, 3, 3),), ((1, 1, 1),)), num_classes=3,
                  spacing_mm_zyx=(5.0, 4.0, 4.0), patch_zyx=(4, 8, 8), intensity=Intensity(0.0, 1.0, -100.0, 300.0),
                  files={}, engines=(EngineRecord("roi.engine", "fp16", "8.6.2", "8.7", "Orin", 2),))
    return fake, stage, gpu, tmp_path


def test_tensorrt_engine_registers_plugins_before_loading_and_shares_one_logger(fake_trt):
    fake, stage, _, folder = fake_trt
    first = engines.TensorRTEngine(folder, stage, "cuda", "fp16", "roi.engine")
    second = engines.TensorRTEngine(folder, stage, "cuda", "fp16", "roi.engine")
    assert first.engine is not None and second.max_batch == 2
    assert fake.plugins_registered == 1  # once per process
    shared = probe.tensorrt_logger(fake)  # the builder's logger too (engine_build uses the same function)
    assert [r.logger for r in fake.runtimes] == [shared, shared]


def test_tensorrt_engine_that_cannot_load_says_what_to_do(fake_trt, monkeypatch):
    fake, stage, _, folder = fake_trt
    monkeypatch.setattr(fake, "init_libnvinfer_plugins", lambda logger, namespace: False)
    with pytest.raises(InputError, match="plugin layer that is not registered.*pocketseg build-engine"):
        engines.TensorRTEngine(folder, stage, "cuda", "fp16", "roi.engine")


def test_tensorrt_runs_on_the_current_non_blocking_stream(fake_trt):
    fake, stage, gpu, folder = fake_trt
    engine = engines.TensorRTEngine(folder, stage, "cuda", "fp16", "roi.engine")
    stream = gpu.new_stream()
    assert stream.non_blocking and stream.ptr != 0
    batch = np.zeros((2, 1, 4, 8, 8), np.float32)
    with gpu.stream_scope(stream):
        out = engine(batch)
    assert fake.executed == [stream.ptr]
    assert out.shape == (2, 3, 4, 8, 8) and out.dtype == np.float16
    assert gpu.xp.cuda.get_current_stream() is gpu.xp.cuda.null  # the scope restored the null stream


def test_tensorrt_never_runs_on_the_legacy_default_stream(fake_trt):
    fake, stage, gpu, folder = fake_trt
    engine = engines.TensorRTEngine(folder, stage, "cuda", "fp16", "roi.engine")
    null = gpu.xp.cuda.null
    engine(np.zeros((1, 1, 4, 8, 8), np.float32))
    engine(np.zeros((1, 1, 4, 8, 8), np.float32))
    own = gpu.xp.cuda.made[0]
    assert len(gpu.xp.cuda.made) == 1 and own.non_blocking  # one stream of its own, reused
    assert fake.executed == [own.ptr, own.ptr] and 0 not in fake.executed
    # ordered after the null stream's work (the input) and before its later work (reading the output)
    assert [e.stream for e in own.waited] == [null, null]
    assert [e.stream for e in null.waited] == [own, own]


# ------------------------------------------------------------------------------- ONNX Runtime's GPU arena

def test_onnxruntime_cuda_provider_grows_its_arena_as_requested():
    assert engines.cuda_provider_options(1) == {"device_id": 1, "arena_extend_strategy": "kSameAsRequested"}


def test_onnxruntime_cuda_session_is_configured_for_shrinking(tiny_package, monkeypatch):
    """A CUDA session, built against a fake onnxruntime that records what it is given."""
    created = {}

    class SessionOptions:
        def __init__(self):
            self.entries = {}

        def add_session_config_entry(self, key, value):
            self.entries[key] = value

    class InferenceSession:
        def __init__(self, path, sess_options=None, providers=None):
            created.update(path=path, options=sess_options, providers=providers)

        def get_providers(self):
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

        def get_inputs(self):
            return [types.SimpleNamespace(name="image", type="tensor(float16)")]

    ort = types.SimpleNamespace(SessionOptions=SessionOptions, InferenceSession=InferenceSession,
                                GraphOptimizationLevel=types.SimpleNamespace(ORT_ENABLE_ALL=99))
    monkeypatch.setitem(sys.modules, "onnxruntime", ort)
    monkeypatch.setattr(engines, "array_module", lambda device: fake_cupy.fake_gpu_module())
    stage = load_package(tiny_package).detail
    engine = engines.OnnxRuntimeEngine(tiny_package, stage, "cuda", "fp32")
    assert created["providers"][0] == ("CUDAExecutionProvider", engines.cuda_provider_options(0))
    assert created["options"].entries == {engines.INITIALIZERS_OUTSIDE_ARENA: "1"}
    assert engine._arena == "gpu:0"


def test_free_cached_memory_shrinks_the_onnxruntime_arena_in_one_run(tiny_package):
    ort = pytest.importorskip("onnxruntime")
    manifest = load_package(tiny_package)
    sel = engines.resolve(backend="onnxruntime", device="cpu", manifest=manifest)
    engine = engines.open_engine(tiny_package, manifest.detail, sel)
    # A CPU session has no GPU arena; its CPU arena takes the same option, so the real ONNX Runtime
    # validates and runs exactly what a GPU session gets with "gpu:<id>".
    engine._arena = "cpu:0"
    calls = []
    real_run = engine.session.run

    def spy(output_names, input_feed, run_options=None):
        calls.append((input_feed["image"].shape, run_options))
        return real_run(output_names, input_feed, run_options)

    engine.session.run = spy
    engine.free_cached_memory()
    assert calls == []  # nothing ran yet: nothing to shrink
    batch = np.zeros((2, 1) + manifest.detail.patch_zyx, np.float32)
    engine(batch)
    engine.free_cached_memory()
    assert len(calls) == 2 and calls[0][1] is None
    shape, options = calls[1]
    assert shape == (1, 1) + manifest.detail.patch_zyx  # one tile
    assert isinstance(options, ort.RunOptions)
    assert options.get_run_config_entry(engines.ARENA_SHRINKAGE) == "cpu:0"
    engine.free_cached_memory()
    assert len(calls) == 2  # no run since: no second shrink
    engine.close()
    assert engine.session is None
    engine.free_cached_memory()  # a closed engine has nothing to free
