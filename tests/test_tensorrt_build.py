"""TensorRT engine building: version logic, trtexec lines, engine selection, build control flow.

TensorRT is not installable everywhere (it comes from NVIDIA's packages and needs a GPU), so the
control flow of :func:`build_engine` is exercised against :class:`FakeTensorRT`, a small stand-in
that implements only what the build touches, under the names of the real Python API, and refuses
what the documentation says is not allowed. The tests marked ``tensorrt`` build and run a real
engine and are skipped where TensorRT or a GPU is missing.

API facts the fake follows (TensorRT Python API docs, docs.nvidia.com/deeplearning/tensorrt/.../python_api,
and the pybind sources python/src/infer/pyCore.cpp and python/src/parsers/pyOnnx.cpp of NVIDIA/TensorRT
at tags v8.6.1, v10.0.0, v10.12.0, v11.0):
* ``Builder(logger)``, ``create_network(flags=0)``, ``create_builder_config()``,
  ``create_optimization_profile()``, ``build_serialized_network(network, config)`` -> IHostMemory or None.
* ``NetworkDefinitionCreationFlag``: 8.6 has EXPLICIT_BATCH (=0) and no STRONGLY_TYPED; 10.x has
  EXPLICIT_BATCH (=0, deprecated, ignored: "networks are always explicit batch") and STRONGLY_TYPED (=1);
  11.0 has no EXPLICIT_BATCH and STRONGLY_TYPED (=0) is deprecated and ignored (always strongly typed).
  Strongly typed: "Setting layer precision and layer output types is not allowed".
* ``BuilderFlag.FP16``, ``OBEY_PRECISION_CONSTRAINTS``, ``PREFER_PRECISION_CONSTRAINTS`` exist in 8.6 and 10.x
  (FP16 and OBEY deprecated in 10.12, "superseded by strong typing") and were removed in 11.0.
* ``IBuilderConfig.set_memory_pool_limit(pool, pool_size)`` with ``MemoryPoolType.WORKSPACE``;
  ``set_flag(flag)``; ``add_optimization_profile(profile)``; ``create_timing_cache(serialized_timing_cache)``
  (``b""`` makes a new cache); ``set_timing_cache(cache, ignore_mismatch)`` -> bool (False for a cache from
  another device unless ignore_mismatch); ``get_timing_cache()`` -> ITimingCache or None;
  ``ITimingCache.serialize()`` -> IHostMemory.
* ``IOptimizationProfile.set_shape(input, min, opt, max)``.
* ``OnnxParser(network, logger)``, ``parse_from_file(model)`` -> bool, ``num_errors``, ``get_error(index)``
  -> ParserError with ``code()``, ``desc()``, ``node()``; 8.x's ONNX parser needs an explicit-batch network.
  ``set_flag(flag)`` with ``OnnxParserFlag.NATIVE_INSTANCENORM`` (8.6 and later): InstanceNormalization
  becomes TensorRT's native normalization layer; without it the 8.6/9.x parser makes an
  ``InstanceNormalization_TRT`` plugin layer (native is the default from 10.0).
* ``INetworkDefinition.num_inputs/get_input(i)/num_layers/get_layer(i)``; ``ITensor.name/shape/dtype``;
  ``ILayer.name/type/num_outputs/precision/set_output_type(index, dtype)``; ``LayerType.NORMALIZATION``
  (native InstanceNormalization) and ``PLUGIN_V2`` (8.6's default InstanceNormalization_TRT plugin);
  ``trt.float32``/``trt.float16`` are ``DataType.FLOAT``/``DataType.HALF``; ``Logger(Logger.WARNING)``.
"""

from __future__ import annotations

import enum
import importlib.util
import json
import logging
import shlex
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from pocketseg.engine_build import tensorrt_build as tb
from pocketseg.engine_build.tensorrt_build import (EngineBuildError, build_engine, build_mode, build_package_engines,
                                                   trtexec_command)
from pocketseg.runtime import tensorrt_probe as probe
from pocketseg.runtime.tensorrt_probe import (GpuIdentity, TensorRTError, engine_matches, gpu_identity, import_tensorrt,
                                              normalize_compute_capability, parse_nvidia_smi, parse_version,
                                              select_engine, tensorrt_available)
from pocketseg.errors import InputError, MissingDependencyError
from pocketseg.manifest import (MANIFEST_NAME, EngineRecord, Intensity, Manifest, Network, Stage, load_package)

PATCH = (8, 16, 16)
ORIN = GpuIdentity("Orin", "8.7")


@pytest.fixture(autouse=True)
def _fresh_logger_cache(monkeypatch):
    """Each fake module gets its own trt.Logger; the module's cache would otherwise keep every fake alive."""
    monkeypatch.setattr(probe, "_LOGGERS", {})
    monkeypatch.setattr(probe, "_PLUGINS", {})


# ------------------------------------------------------------------------------------------------ pure logic

@pytest.mark.parametrize("version, parsed, mode", [
    ("8.6.2", (8, 6), "fp16-flag"),
    ("8.6.2.3", (8, 6), "fp16-flag"),
    ("9.3.0", (9, 3), "fp16-flag"),
    ("10.3.0", (10, 3), "strongly-typed"),
    ("10.12.0", (10, 12), "strongly-typed"),
    ("11.0.0", (11, 0), "strongly-typed"),
])
def test_parse_version_and_build_mode(version, parsed, mode):
    assert parse_version(version) == parsed
    assert build_mode(version) == mode
    assert build_mode(parsed) == mode


def test_old_or_unreadable_versions_are_refused():
    with pytest.raises(EngineBuildError, match="8.5 is too old"):
        build_mode("8.5.3")
    with pytest.raises(InputError, match="cannot read the TensorRT version"):
        parse_version("ten")


def test_trtexec_command_strongly_typed():
    line = trtexec_command("pkg/roi_fp16.onnx", "pkg/roi_fp16_sm87_trt10.3.engine", patch_zyx=PATCH, max_batch=4,
                           workspace_gb=4.0, timing_cache="cache.bin", strongly_typed=True)
    args = shlex.split(line)
    assert args[0] == "trtexec"
    assert "--onnx=pkg/roi_fp16.onnx" in args and "--saveEngine=pkg/roi_fp16_sm87_trt10.3.engine" in args
    assert "--minShapes=image:1x1x8x16x16" in args
    assert "--optShapes=image:4x1x8x16x16" in args and "--maxShapes=image:4x1x8x16x16" in args
    assert "--memPoolSize=workspace:4096" in args  # MiB, no suffix: read the same by 8.6 and 10.x trtexec
    assert "--timingCacheFile=cache.bin" in args and "--stronglyTyped" in args and "--skipInference" in args
    assert "--fp16" not in args and not any(a.startswith("--precisionConstraints") for a in args)


def test_trtexec_command_fp16_flag_quotes_paths_and_pins_layers():
    line = trtexec_command("my pkg/roi.onnx", "my pkg/roi.engine", patch_zyx=PATCH, max_batch=1, workspace_gb=2.5,
                           timing_cache=None, strongly_typed=False, fp32_layers=["enc0/norm", "enc1/norm"])
    args = shlex.split(line)
    assert "--onnx=my pkg/roi.onnx" in args and "--saveEngine=my pkg/roi.engine" in args
    assert "--fp16" in args and "--stronglyTyped" not in args
    assert "--memPoolSize=workspace:2560" in args
    assert "--optShapes=image:1x1x8x16x16" in args and "--maxShapes=image:1x1x8x16x16" in args
    assert "--precisionConstraints=obey" in args
    assert "--layerPrecisions=enc0/norm:fp32,enc1/norm:fp32" in args
    assert "--layerOutputTypes=enc0/norm:fp32,enc1/norm:fp32" in args
    assert not any(a.startswith("--timingCacheFile") for a in args)
    with pytest.raises(InputError, match="max_batch"):
        trtexec_command("a", "b", patch_zyx=PATCH, max_batch=0, workspace_gb=1, timing_cache=None, strongly_typed=True)


def _record(file: str, version: str, cap: str, gpu: str = "Orin") -> EngineRecord:
    return EngineRecord(file, "fp16", version, cap, gpu, 1)


def test_engine_matches_needs_same_tensorrt_minor_and_compute_capability():
    record = _record("roi_fp16_sm87_trt10.3.engine", "10.3.0.30", "8.7")
    assert engine_matches(record, "10.3.1", "8.7")
    assert engine_matches(record, "10.3.0", "87")
    assert not engine_matches(record, "10.4.0", "8.7")
    assert not engine_matches(record, "8.6.2", "8.7")
    assert not engine_matches(record, "10.3.0", "8.6")
    assert not engine_matches(replace(record, tensorrt_version="unknown"), "10.3.0", "8.7")


def test_select_engine_picks_the_matching_record():
    stage = Stage(name="roi", preset="roi", network=Network(8, ((3, 3, 3),), ((1, 1, 1),)), num_classes=2,
                  spacing_mm_zyx=(5.0, 4.0, 4.0), patch_zyx=PATCH, intensity=Intensity(0.0, 1.0, -100.0, 300.0),
                  files={}, engines=(_record("a.engine", "8.6.2", "8.7"), _record("b.engine", "10.3.0", "9.0", "H100"),
                                     _record("c.engine", "10.3.0", "8.7")))
    assert select_engine(stage, "10.3.0", "8.7").file == "c.engine"
    assert select_engine(stage, "8.6.2.3", "8.7").file == "a.engine"
    assert select_engine(stage, "10.3.0", "9.0").gpu_name == "H100"
    assert select_engine(stage, "10.8.0", "8.7") is None
    assert select_engine(replace(stage, engines=()), "10.3.0", "8.7") is None


def test_import_tensorrt_explains_where_tensorrt_comes_from(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail, as where it is absent
    with pytest.raises(MissingDependencyError) as info:
        import_tensorrt()
    message = str(info.value)
    assert isinstance(info.value, ImportError)
    assert "Building TensorRT engines" in message and "pocketseg[tensorrt]" in message
    assert "python3-libnvinfer" in message and "pip install tensorrt" in message
    assert not tensorrt_available()


def test_tensorrt_availability_matches_this_environment():
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    assert not tensorrt_available()
    with pytest.raises(MissingDependencyError, match="NVIDIA"):
        import_tensorrt()


def test_compute_capability_forms():
    assert normalize_compute_capability("8.7") == "8.7"
    assert normalize_compute_capability("87") == "8.7"  # CuPy's Device.compute_capability
    assert normalize_compute_capability("100") == "10.0"
    assert normalize_compute_capability((9, 0)) == "9.0"
    assert normalize_compute_capability("sm_120") == "12.0"
    assert GpuIdentity("B200", "10.0").sm == "sm100"
    with pytest.raises(ValueError):
        normalize_compute_capability("[N/A]")


def test_parse_nvidia_smi():
    assert parse_nvidia_smi("NVIDIA H100 80GB HBM3, 9.0\n") == GpuIdentity("NVIDIA H100 80GB HBM3", "9.0")
    two = "NVIDIA A10, 8.6\nNVIDIA GeForce RTX 3090, 8.6\n"
    assert parse_nvidia_smi(two, 1) == GpuIdentity("NVIDIA GeForce RTX 3090", "8.6")
    with pytest.raises(ValueError, match="different compute capability"):
        parse_nvidia_smi("NVIDIA A100, 8.0\nNVIDIA H100, 9.0\n")
    with pytest.raises(ValueError, match="no compute capability"):
        parse_nvidia_smi("Orin, [N/A]\n")
    with pytest.raises(ValueError, match="no GPU"):
        parse_nvidia_smi("\n")


def test_gpu_identity_tries_the_probes_in_order():
    calls = []

    def failing(label):
        def probe(device):
            calls.append(label)
            raise RuntimeError(f"{label} unavailable")
        return probe

    def working(device):
        calls.append("torch")
        return GpuIdentity("NVIDIA L4", "8.9")

    probes = [("cuda-python", failing("cuda-python")), ("nvidia-smi", failing("nvidia-smi")), ("torch", working),
              ("cupy", failing("cupy"))]
    assert gpu_identity(probes=probes) == GpuIdentity("NVIDIA L4", "8.9")
    assert calls == ["cuda-python", "nvidia-smi", "torch"]
    assert [label for label, _ in probe.GPU_PROBES] == ["cuda-python", "nvidia-smi", "torch", "cupy"]
    with pytest.raises(TensorRTError, match="cuda-python: RuntimeError: cuda-python unavailable.*cupy"):
        gpu_identity(probes=[probes[0], probes[3]])


# ------------------------------------------------------------------------------------- the fake TensorRT module

class _Enum(enum.IntEnum):
    def __str__(self):  # pybind enums print as "DataType.FLOAT"
        return f"{type(self).__name__}.{self.name}"


class FakeTensorRT:
    """A stand-in for the ``tensorrt`` module of one version, recording what the build does.

    "ONNX" files for it are JSON: {"input": {"name", "shape", "dtype"}, "layers": [[name, LayerType, outputs]]};
    a file that is not JSON fails to parse.
    """

    def __init__(self, version: str, *, build_fails: bool = False):
        self.__version__ = version
        self.major = int(version.split(".")[0])
        self.build_fails = build_fails
        self.builders: list = []
        self.parsers: list = []
        self.parsed: list[str] = []
        trt = self

        class Severity(_Enum):
            VERBOSE, INFO, WARNING, ERROR = 4, 3, 2, 1  # trt.Logger.Severity

        class Logger:
            WARNING = Severity.WARNING

            def __init__(self, min_severity=Severity.WARNING):
                self.min_severity = min_severity

        if self.major >= 11:  # 11.0: EXPLICIT_BATCH gone, STRONGLY_TYPED deprecated and ignored
            flags = _Enum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 0, "PREFER_AOT_PYTHON_PLUGINS": 1})
            builder_flags = _Enum("BuilderFlag", {"DEBUG": 2, "REFIT": 4})  # FP16/INT8/*_PRECISION_CONSTRAINTS removed
        elif self.major >= 10:
            flags = _Enum("NetworkDefinitionCreationFlag", {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1})
            builder_flags = _Enum("BuilderFlag", {"FP16": 0, "OBEY_PRECISION_CONSTRAINTS": 9,
                                                  "PREFER_PRECISION_CONSTRAINTS": 10})
        else:  # 8.6: no strongly typed networks
            flags = _Enum("NetworkDefinitionCreationFlag", {"EXPLICIT_BATCH": 0, "EXPLICIT_PRECISION": 1})
            builder_flags = _Enum("BuilderFlag", {"FP16": 0, "OBEY_PRECISION_CONSTRAINTS": 9,
                                                  "PREFER_PRECISION_CONSTRAINTS": 10})
        self.Logger = Logger
        self.OnnxParserFlag = _Enum("OnnxParserFlag", {"NATIVE_INSTANCENORM": 0})
        self.NetworkDefinitionCreationFlag = flags
        self.BuilderFlag = builder_flags
        self.MemoryPoolType = _Enum("MemoryPoolType", {"WORKSPACE": 0, "DLA_MANAGED_SRAM": 1})
        self.DataType = _Enum("DataType", {"FLOAT": 0, "HALF": 1, "INT8": 2, "INT32": 3})
        self.float32, self.float16 = self.DataType.FLOAT, self.DataType.HALF
        self.LayerType = _Enum("LayerType", {"CONVOLUTION": 0, "ACTIVATION": 2, "PLUGIN_V2": 20,
                                             "NORMALIZATION": 40})

        class Tensor:
            def __init__(self, name, shape, dtype):
                self.name, self.shape, self.dtype = name, tuple(shape), dtype

        class Layer:
            def __init__(self, network, name, kind, num_outputs):
                self.network, self.name, self.type, self.num_outputs = network, name, kind, num_outputs
                self._precision = trt.float32
                self.output_types: dict[int, object] = {}

            def _refuse_if_strongly_typed(self):
                # "Setting layer precision and layer output types is not allowed" (STRONGLY_TYPED)
                assert not self.network.strongly_typed, "layer precision set on a strongly typed network"

            @property
            def precision(self):
                return self._precision

            @precision.setter
            def precision(self, dtype):
                self._refuse_if_strongly_typed()
                self._precision = dtype

            def set_output_type(self, index, dtype):
                self._refuse_if_strongly_typed()
                assert 0 <= index < self.num_outputs
                self.output_types[index] = dtype

        class NetworkDefinition:
            def __init__(self, flags_value):
                self.flags = flags_value
                if trt.major >= 11:
                    self.strongly_typed = True
                    self.explicit_batch = True
                else:
                    strong = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
                    self.strongly_typed = strong is not None and bool(flags_value & (1 << int(strong)))
                    explicit = trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH
                    self.explicit_batch = trt.major >= 10 or bool(flags_value & (1 << int(explicit)))
                self.inputs: list = []
                self.layers: list = []

            @property
            def num_inputs(self):
                return len(self.inputs)

            def get_input(self, index):
                return self.inputs[index]

            @property
            def num_layers(self):
                return len(self.layers)

            def get_layer(self, index):
                return self.layers[index]

        class ParserError:
            def __init__(self, node, desc):
                self._node, self._desc = node, desc

            def code(self):
                return "ErrorCode.INVALID_GRAPH"

            def desc(self):
                return self._desc

            def node(self):
                return self._node

        class OnnxParser:
            def __init__(self, network, logger):
                assert isinstance(network, NetworkDefinition) and isinstance(logger, Logger)
                self.network, self.errors, self.flags = network, [], set()
                trt.parsers.append(self)

            def set_flag(self, flag):
                assert isinstance(flag, trt.OnnxParserFlag)
                self.flags.add(flag)

            def _instance_norm_kind(self):
                native = trt.major >= 10 or trt.OnnxParserFlag.NATIVE_INSTANCENORM in self.flags
                return trt.LayerType.NORMALIZATION if native else trt.LayerType.PLUGIN_V2

            @property
            def num_errors(self):
                return len(self.errors)

            def get_error(self, index):
                return self.errors[index]

            def parse_from_file(self, model):
                trt.parsed.append(model)
                if not self.network.explicit_batch:
                    self.errors.append(ParserError(-1, "the ONNX parser needs an explicit batch network"))
                    return False
                try:
                    spec = json.loads(Path(model).read_text())
                except (OSError, ValueError):
                    self.errors.append(ParserError(3, "Unsupported ONNX data type: weird (17)"))
                    return False
                net, data = self.network, spec["input"]
                net.inputs.append(Tensor(data["name"], data["shape"], trt.DataType[data["dtype"]]))
                net.layers += [Layer(net, name, self._instance_norm_kind() if kind == "InstanceNormalization"
                                     else trt.LayerType[kind], n) for name, kind, n in spec["layers"]]
                return True

        class OptimizationProfile:
            def __init__(self):
                self.shapes: dict[str, tuple] = {}

            def set_shape(self, input, min, opt, max):  # noqa: A002 - the real keyword names
                assert all(a <= b <= c for a, b, c in zip(min, opt, max)), (min, opt, max)
                self.shapes[input] = (tuple(min), tuple(opt), tuple(max))

        class TimingCache:
            def __init__(self, data: bytes):
                self.data = data

            def serialize(self):
                return self.data + b"+timings"

        class BuilderConfig:
            def __init__(self):
                self.flags: list = []
                self.pool_limits: dict = {}
                self.profiles: list = []
                self.timing_cache = None

            def set_memory_pool_limit(self, pool, pool_size):
                self.pool_limits[pool] = pool_size

            def set_flag(self, flag):
                assert isinstance(flag, trt.BuilderFlag)
                self.flags.append(flag)

            def add_optimization_profile(self, profile):
                self.profiles.append(profile)
                return len(self.profiles) - 1

            def create_timing_cache(self, serialized_timing_cache):
                if bytes(serialized_timing_cache).startswith(b"CORRUPT"):  # not documented: a possible failure
                    raise RuntimeError("invalid timing cache")
                return TimingCache(bytes(serialized_timing_cache))

            def set_timing_cache(self, cache, ignore_mismatch):
                if cache.data.startswith(b"OTHER-GPU") and not ignore_mismatch:
                    return False  # "A failure will be reported if the CUDA device property ... is different"
                self.timing_cache = cache
                return True

            def get_timing_cache(self):
                return self.timing_cache

        class Builder:
            def __init__(self, logger):
                assert isinstance(logger, Logger)
                self.logger = logger
                self.networks: list = []
                self.configs: list = []
                trt.builders.append(self)

            def create_network(self, flags=0):
                network = NetworkDefinition(flags)
                self.networks.append(network)
                return network

            def create_builder_config(self):
                config = BuilderConfig()
                self.configs.append(config)
                return config

            def create_optimization_profile(self):
                return OptimizationProfile()

            def build_serialized_network(self, network, config):
                assert network in self.networks and config in self.configs
                assert config.profiles, "a dynamic batch needs an optimization profile"
                if trt.build_fails:
                    return None
                return f"ENGINE {trt.__version__} {trt.parsed[-1]}".encode()

        self.Builder, self.OnnxParser = Builder, OnnxParser

    # what the tests inspect
    @property
    def builder(self):
        return self.builders[-1]

    @property
    def network(self):
        return self.builder.networks[-1]

    @property
    def config(self):
        return self.builder.configs[-1]


def _spec(dtype: str, patch=PATCH, batch=-1, plugin_norm=False, onnx_norm=False) -> str:
    """``onnx_norm``: InstanceNormalization nodes, which the fake parser maps as its TensorRT version would."""
    norm = "PLUGIN_V2" if plugin_norm else "InstanceNormalization" if onnx_norm else "NORMALIZATION"
    return json.dumps({"input": {"name": "image", "shape": [batch, 1, *patch], "dtype": dtype},
                       "layers": [["conv0", "CONVOLUTION", 1], ["norm0", norm, 1], ["relu0", "ACTIVATION", 1],
                                  ["conv1", "CONVOLUTION", 1], ["norm1", norm, 1], ["head", "CONVOLUTION", 1]]})


@pytest.fixture
def onnx_pair(tmp_path):
    fp32, fp16 = tmp_path / "roi.onnx", tmp_path / "roi_fp16.onnx"
    fp32.write_text(_spec("FLOAT"))
    fp16.write_text(_spec("HALF"))
    return fp32, fp16


@pytest.fixture
def spy_atomic(monkeypatch):
    calls = []
    real = tb.atomic_write_bytes

    def spy(path, payload, *, overwrite=False):
        calls.append((Path(path).name, overwrite))
        return real(path, payload, overwrite=overwrite)

    monkeypatch.setattr(tb, "atomic_write_bytes", spy)
    return calls


def test_build_engine_tensorrt_8_6_uses_fp16_flag_and_pins_instance_norm(tmp_path, onnx_pair, spy_atomic):
    fp32, fp16 = onnx_pair
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"CACHE")
    trt = FakeTensorRT("8.6.2.3")
    engine = tmp_path / "roi_fp16_sm87_trt8.6.engine"
    record = build_engine(fp16, engine, patch_zyx=PATCH, max_batch=3, workspace_gb=2.0, timing_cache=cache,
                          fp32_onnx=fp32, trt=trt, gpu=ORIN)

    assert trt.parsed == [str(fp32)]  # 8.6 has no strongly typed networks: the fp32 ONNX + FP16 flag
    assert trt.network.flags == 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    assert trt.config.flags == [trt.BuilderFlag.FP16, trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS]
    pinned = {layer.name for layer in trt.network.layers if layer.output_types}
    assert pinned == {"norm0", "norm1"}
    for layer in trt.network.layers:
        if layer.name in pinned:
            assert layer.precision == trt.float32 and layer.output_types == {0: trt.float32}
    assert trt.config.pool_limits == {trt.MemoryPoolType.WORKSPACE: 2 << 30}
    assert trt.config.profiles[0].shapes == {"image": ((1, 1, *PATCH), (3, 1, *PATCH), (3, 1, *PATCH))}
    assert engine.read_bytes() == f"ENGINE 8.6.2.3 {fp32}".encode()
    assert cache.read_bytes() == b"CACHE+timings"  # read, then persisted
    assert spy_atomic == [(engine.name, True), (cache.name, True)]
    assert record == EngineRecord(engine.name, "fp16", "8.6.2.3", "8.7", "Orin", 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([fp32.name, fp16.name, cache.name, engine.name])


def test_build_engine_tensorrt_8_6_pins_the_instance_norm_plugin(tmp_path):
    fp32 = tmp_path / "roi.onnx"
    fp32.write_text(_spec("FLOAT", plugin_norm=True))  # 8.6's parser default: InstanceNormalization_TRT plugin
    trt = FakeTensorRT("8.6.1")
    build_engine(fp32, tmp_path / "e.engine", patch_zyx=PATCH, trt=trt, gpu=ORIN)
    assert {layer.name for layer in trt.network.layers if layer.output_types} == {"norm0", "norm1"}
    assert trt.config.flags == [trt.BuilderFlag.FP16, trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS]


@pytest.mark.parametrize("version", ["8.6.1", "9.3.0", "10.3.0"])
def test_instance_norm_is_parsed_into_native_layers_not_plugins(tmp_path, version):
    # An 8.6/9.x engine with InstanceNormalization_TRT plugin layers deserializes only in a process that
    # registered TensorRT's plugins; the parser flag keeps plugins out of the engine altogether.
    dtype = "FLOAT" if version.startswith(("8.", "9.")) else "HALF"
    onnx_file = tmp_path / "roi.onnx"
    onnx_file.write_text(_spec(dtype, onnx_norm=True))
    trt = FakeTensorRT(version)
    build_engine(onnx_file, tmp_path / "e.engine", patch_zyx=PATCH, trt=trt, gpu=ORIN)
    assert trt.parsers[-1].flags == {trt.OnnxParserFlag.NATIVE_INSTANCENORM}
    kinds = {layer.name: layer.type for layer in trt.network.layers}
    assert kinds["norm0"] == kinds["norm1"] == trt.LayerType.NORMALIZATION
    assert trt.LayerType.PLUGIN_V2 not in kinds.values()
    if dtype == "FLOAT":  # fp16-flag mode: the native layers are the ones kept in fp32
        assert {layer.name for layer in trt.network.layers if layer.output_types} == {"norm0", "norm1"}


def test_builder_and_runtime_share_one_logger(tmp_path, onnx_pair):
    _, fp16 = onnx_pair
    trt = FakeTensorRT("10.3.0")
    build_engine(fp16, tmp_path / "a.engine", patch_zyx=PATCH, trt=trt, gpu=ORIN)
    build_engine(fp16, tmp_path / "b.engine", patch_zyx=PATCH, trt=trt, gpu=ORIN)
    loggers = {id(b.logger) for b in trt.builders}
    assert loggers == {id(probe.tensorrt_logger(trt))}  # the runtime's engines take it from the same place


@pytest.mark.parametrize("version", ["10.3.0", "10.12.0"])
def test_build_engine_tensorrt_10_is_strongly_typed(tmp_path, onnx_pair, version):
    fp32, fp16 = onnx_pair
    trt = FakeTensorRT(version)
    engine = tmp_path / "roi.engine"
    record = build_engine(fp16, engine, patch_zyx=PATCH, max_batch=2, fp32_onnx=fp32, trt=trt, gpu=ORIN)
    assert trt.parsed == [str(fp16)]
    assert trt.network.flags == 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert trt.network.strongly_typed
    assert trt.config.flags == []  # no FP16 / precision-constraint flags: the graph's types decide
    assert trt.config.pool_limits == {trt.MemoryPoolType.WORKSPACE: 4 << 30}
    assert trt.config.profiles[0].shapes["image"] == ((1, 1, *PATCH), (2, 1, *PATCH), (2, 1, *PATCH))
    assert trt.config.timing_cache is None
    assert engine.read_bytes() == f"ENGINE {version} {fp16}".encode()
    assert (record.tensorrt_version, record.max_batch, record.precision) == (version, 2, "fp16")


def test_build_engine_tensorrt_11_needs_no_flags(tmp_path, onnx_pair):
    fp32, fp16 = onnx_pair
    trt = FakeTensorRT("11.0.0")
    assert not hasattr(trt.BuilderFlag, "FP16") and not hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH")
    build_engine(fp16, tmp_path / "roi.engine", patch_zyx=PATCH, trt=trt, gpu=GpuIdentity("NVIDIA B200", "10.0"))
    assert trt.parsed == [str(fp16)] and trt.network.flags == 0 and trt.config.flags == []


def test_failed_build_writes_nothing(tmp_path, onnx_pair, spy_atomic):
    fp32, fp16 = onnx_pair
    engine, cache = tmp_path / "roi.engine", tmp_path / "timing.cache"
    engine.write_bytes(b"previous engine")
    cache.write_bytes(b"CACHE")
    with pytest.raises(EngineBuildError, match="could not build an engine.*nothing was written"):
        build_engine(fp16, engine, patch_zyx=PATCH, timing_cache=cache, trt=FakeTensorRT("10.3.0", build_fails=True),
                     gpu=ORIN)
    assert engine.read_bytes() == b"previous engine" and cache.read_bytes() == b"CACHE"
    assert spy_atomic == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([fp32.name, fp16.name, engine.name, cache.name])


def test_parser_errors_name_the_file(tmp_path):
    broken = tmp_path / "roi_fp16.onnx"
    broken.write_bytes(b"\x08\x07garbage")
    with pytest.raises(InputError, match=r"roi_fp16.onnx: TensorRT's ONNX parser refused it: node 3: Unsupported"):
        build_engine(broken, tmp_path / "roi.engine", patch_zyx=PATCH, trt=FakeTensorRT("10.3.0"), gpu=ORIN)
    with pytest.raises(InputError, match="ONNX file not found"):
        build_engine(tmp_path / "missing.onnx", tmp_path / "roi.engine", patch_zyx=PATCH, trt=FakeTensorRT("10.3.0"),
                     gpu=ORIN)
    assert not (tmp_path / "roi.engine").exists()


def test_wrong_onnx_for_the_mode_or_patch_is_refused(tmp_path, onnx_pair):
    fp32, fp16 = onnx_pair
    with pytest.raises(InputError, match="mixed-precision ONNX"):  # fp32 ONNX in a strongly typed network
        build_engine(fp32, tmp_path / "e.engine", patch_zyx=PATCH, trt=FakeTensorRT("10.3.0"), gpu=ORIN)
    with pytest.raises(InputError, match="fp32 ONNX"):  # fp16 ONNX and no fp32_onnx for TensorRT 8.6
        build_engine(fp16, tmp_path / "e.engine", patch_zyx=PATCH, trt=FakeTensorRT("8.6.2"), gpu=ORIN)
    with pytest.raises(InputError, match=r"expected \(batch, 1, 16, 16, 16\)"):
        build_engine(fp16, tmp_path / "e.engine", patch_zyx=(16, 16, 16), trt=FakeTensorRT("10.3.0"), gpu=ORIN)
    fixed = tmp_path / "fixed.onnx"
    fixed.write_text(_spec("HALF", batch=1))
    with pytest.raises(InputError, match="fixed batch of 1"):
        build_engine(fixed, tmp_path / "e.engine", patch_zyx=PATCH, max_batch=2, trt=FakeTensorRT("10.3.0"), gpu=ORIN)
    with pytest.raises(EngineBuildError, match="too old"):
        build_engine(fp16, tmp_path / "e.engine", patch_zyx=PATCH, trt=FakeTensorRT("8.5.3"), gpu=ORIN)
    assert not (tmp_path / "e.engine").exists()


def test_timing_cache_from_another_gpu_is_replaced(tmp_path, onnx_pair, caplog):
    _, fp16 = onnx_pair
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"OTHER-GPU cache")
    trt = FakeTensorRT("10.3.0")
    with caplog.at_level(logging.WARNING, logger=tb.__name__):
        build_engine(fp16, tmp_path / "e.engine", patch_zyx=PATCH, timing_cache=cache, trt=trt, gpu=ORIN)
    assert "another GPU or TensorRT version" in caplog.text
    assert cache.read_bytes() == b"+timings"  # a fresh cache, persisted

    cache.write_bytes(b"CORRUPT")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=tb.__name__):
        build_engine(fp16, tmp_path / "e.engine", patch_zyx=PATCH, timing_cache=cache, trt=trt, gpu=ORIN)
    assert "is unreadable (invalid timing cache)" in caplog.text and cache.read_bytes() == b"+timings"

    new_cache = tmp_path / "new.cache"  # a cache file that does not exist yet is created
    build_engine(fp16, tmp_path / "e.engine", patch_zyx=PATCH, timing_cache=new_cache, trt=trt, gpu=ORIN)
    assert new_cache.read_bytes() == b"+timings"


# ------------------------------------------------------------------------------------------------- packages

def _stage(name: str, engines=()) -> Stage:
    return Stage(name=name, preset=f"{name}-tiny", network=Network(8, ((3, 3, 3),), ((1, 1, 1),)),
                 num_classes=2 if name == "roi" else 15, spacing_mm_zyx=(5.0, 4.0, 4.0), patch_zyx=PATCH,
                 intensity=Intensity(50.0, 60.0, -100.0, 300.0),
                 files={"onnx-fp32": f"{name}.onnx", "onnx-fp16": f"{name}_fp16.onnx", "torch": f"{name}.safetensors"},
                 engines=tuple(engines))


@pytest.fixture
def package(tmp_path):
    folder = tmp_path / "pkg"
    folder.mkdir()
    h100 = EngineRecord("roi_fp16_sm90_trt10.3.engine", "fp16", "10.3.0", "9.0", "NVIDIA H100", 1)
    old_orin = EngineRecord("roi_orin_old.engine", "fp16", "10.3.0.26", "8.7", "Orin", 1)
    manifest = Manifest(stages={"roi": _stage("roi", [h100, old_orin]), "detail": _stage("detail")})
    for stage in manifest.stages.values():
        (folder / stage.files["onnx-fp32"]).write_text(_spec("FLOAT"))
        (folder / stage.files["onnx-fp16"]).write_text(_spec("HALF"))
        (folder / stage.files["torch"]).write_bytes(b"weights")
        for record in stage.engines:
            (folder / record.file).write_bytes(b"engine " + record.file.encode())
    manifest = manifest.with_checksums(folder)
    (folder / MANIFEST_NAME).write_text(manifest.to_json())
    return folder


def test_build_package_engines_records_engines_per_gpu_and_version(package, tmp_path):
    trt = FakeTensorRT("10.3.1")
    cache = tmp_path / "timing.cache"
    manifest = build_package_engines(package, timing_cache=cache, max_batch=2, trt=trt, gpu=ORIN)

    assert [Path(p).name for p in trt.parsed] == ["roi_fp16.onnx", "detail_fp16.onnx"]
    roi = [e.file for e in manifest.roi.engines]
    assert roi == ["roi_fp16_sm90_trt10.3.engine", "roi_fp16_sm87_trt10.3.engine"]  # H100 kept, old Orin replaced
    assert [e.file for e in manifest.detail.engines] == ["detail_fp16_sm87_trt10.3.engine"]
    assert manifest.detail.engines[0] == EngineRecord("detail_fp16_sm87_trt10.3.engine", "fp16", "10.3.1", "8.7",
                                                      "Orin", 2)
    assert load_package(package) == manifest  # written, with checksums that match the files
    assert (package / "roi_fp16_sm87_trt10.3.engine").read_bytes().startswith(b"ENGINE 10.3.1")
    assert select_engine(manifest.roi, "10.3.0", "8.7").file == "roi_fp16_sm87_trt10.3.engine"
    assert cache.read_bytes() == b"+timings+timings"  # the second stage reused the first stage's cache
    assert not [p.name for p in package.iterdir() if p.name.startswith(".")]


def test_build_package_engines_on_tensorrt_8_6_uses_the_fp32_onnx(package):
    trt = FakeTensorRT("8.6.2")
    manifest = build_package_engines(package, trt=trt, gpu=ORIN, progress=False)
    assert [Path(p).name for p in trt.parsed] == ["roi.onnx", "detail.onnx"]
    assert [e.file for e in manifest.roi.engines][-1] == "roi_fp16_sm87_trt8.6.engine"
    assert len(manifest.roi.engines) == 3  # the 10.3 engines of both GPUs stay


def test_build_package_engines_changes_nothing_when_a_stage_fails(package, monkeypatch):
    before = (package / MANIFEST_NAME).read_bytes()
    files_before = sorted(p.name for p in package.iterdir())
    trt = FakeTensorRT("10.3.0")
    real = tb._build

    def second_fails(*args, **kwargs):
        if Path(args[0]).name.startswith("detail"):
            trt.build_fails = True
        return real(*args, **kwargs)

    monkeypatch.setattr(tb, "_build", second_fails)
    with pytest.raises(EngineBuildError):
        build_package_engines(package, trt=trt, gpu=ORIN)
    assert (package / MANIFEST_NAME).read_bytes() == before
    assert sorted(p.name for p in package.iterdir()) == files_before
    load_package(package)


def test_build_package_engines_needs_the_fp16_onnx_on_tensorrt_10(package):
    data = json.loads((package / MANIFEST_NAME).read_text())
    data.pop("content_sha256")  # an older package without the digest, whose values still load
    for stage in data["stages"].values():
        name = stage["files"].pop("onnx-fp16")
        data["checksums"].pop(name)
    (package / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(InputError, match="no onnx-fp16 file"):
        build_package_engines(package, trt=FakeTensorRT("10.3.0"), gpu=ORIN)


# -------------------------------------------------------------------------------- a tiny real ONNX network

def tiny_onnx(fp16: bool, patch=PATCH, classes: int = 2, width: int = 4):
    """Conv -> InstanceNormalization -> Relu -> Conv, input "image" (batch, 1, *patch), output "logits".

    The fp16 variant mirrors the package's mixed-precision ONNX: fp16 weights and activations,
    InstanceNormalization in fp32 between Casts.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    dtype = np.float16 if fp16 else np.float32
    elem = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    weights = {"w1": rng.normal(0, 0.3, (width, 1, 3, 3, 3)), "b1": np.zeros(width),
               "w2": rng.normal(0, 0.3, (classes, width, 1, 1, 1)), "b2": np.zeros(classes)}
    inits = [numpy_helper.from_array(v.astype(dtype), k) for k, v in weights.items()]
    inits += [numpy_helper.from_array(np.ones(width, np.float32), "scale"),
              numpy_helper.from_array(np.zeros(width, np.float32), "bias")]
    nodes = [helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], pads=[1] * 6, name="conv1")]
    if fp16:
        nodes += [helper.make_node("Cast", ["c1"], ["c1_32"], to=TensorProto.FLOAT, name="norm1_in"),
                  helper.make_node("InstanceNormalization", ["c1_32", "scale", "bias"], ["n1_32"], name="norm1"),
                  helper.make_node("Cast", ["n1_32"], ["n1"], to=TensorProto.FLOAT16, name="norm1_out")]
    else:
        nodes += [helper.make_node("InstanceNormalization", ["c1", "scale", "bias"], ["n1"], name="norm1")]
    nodes += [helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
              helper.make_node("Conv", ["r1", "w2", "b2"], ["logits"], name="head")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("image", elem, ["batch", 1, *patch])],
                              [helper.make_tensor_value_info("logits", elem, ["batch", classes, *patch])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _ort_logits(model, x):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"image": x})[0]


def test_tiny_onnx_pair_agrees_in_onnxruntime():
    """The fixture of the TensorRT tests is valid even where they are skipped."""
    np = pytest.importorskip("numpy")
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    x = np.random.default_rng(1).normal(size=(2, 1, *PATCH)).astype(np.float32)
    ref = _ort_logits(tiny_onnx(False), x)
    half = _ort_logits(tiny_onnx(True), x.astype(np.float16)).astype(np.float32)
    assert ref.shape == (2, 2, *PATCH)
    assert np.abs(ref - half).max() < 2e-2 * max(1.0, np.abs(ref).max())


# ---------------------------------------------------------------------------------------- real TensorRT

def _real_trt_and_gpu():
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (it comes from NVIDIA's packages)")
    try:
        gpu = gpu_identity()
    except TensorRTError as exc:
        pytest.skip(f"no GPU: {exc}")
    return trt, gpu


#: Loads an engine in a process that never built one, so never registered TensorRT's plugins (as a later
#: `pocketseg predict` does), runs it on torch CUDA tensors and saves the logits: argv engine, input, output.
_LOAD_IN_FRESH_PROCESS = """
import sys
import numpy as np
import tensorrt as trt
import torch

engine_file, input_file, output_file = sys.argv[1:4]
runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
engine = runtime.deserialize_cuda_engine(open(engine_file, "rb").read())
if engine is None:
    sys.exit("deserialize_cuda_engine returned None in a fresh process")
context = engine.create_execution_context()
x = np.load(input_file)
in_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype("image")))
out_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype("logits")))
torch_dtype = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}
image = torch.from_numpy(x.astype(in_dtype)).cuda()
context.set_input_shape("image", tuple(image.shape))
logits = torch.empty(tuple(context.get_tensor_shape("logits")), dtype=torch_dtype[out_dtype], device="cuda")
context.set_tensor_address("image", image.data_ptr())
context.set_tensor_address("logits", logits.data_ptr())
stream = torch.cuda.Stream()
assert context.execute_async_v3(stream.cuda_stream)
stream.synchronize()
np.save(output_file, logits.float().cpu().numpy())
"""


@pytest.mark.tensorrt
def test_real_tensorrt_builds_an_engine_that_runs_in_a_fresh_process(tmp_path):
    trt, gpu = _real_trt_and_gpu()
    np = pytest.importorskip("numpy")
    onnx = pytest.importorskip("onnx")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("running the engine here uses torch CUDA tensors")
    fp32, fp16 = tmp_path / "tiny.onnx", tmp_path / "tiny_fp16.onnx"
    onnx.save(tiny_onnx(False), str(fp32))
    onnx.save(tiny_onnx(True), str(fp16))
    engine_path, cache = tmp_path / "tiny.engine", tmp_path / "timing.cache"
    record = build_engine(fp16, engine_path, patch_zyx=PATCH, max_batch=2, workspace_gb=1.0, timing_cache=cache,
                          fp32_onnx=fp32)
    assert record.compute_capability == gpu.compute_capability and record.tensorrt_version == trt.__version__
    assert engine_path.stat().st_size > 0 and cache.stat().st_size > 0

    # Not in this process: the build registered TensorRT's plugins here, which would hide an engine that
    # needs them (8.6's InstanceNormalization_TRT) from the test.
    x = np.random.default_rng(1).normal(size=(2, 1, *PATCH)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    done = subprocess.run([sys.executable, "-c", _LOAD_IN_FRESH_PROCESS, str(engine_path), str(tmp_path / "x.npy"),
                           str(tmp_path / "logits.npy")], capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    got = np.load(tmp_path / "logits.npy")
    ref = _ort_logits(tiny_onnx(False), x)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 5e-2 * max(1.0, np.abs(ref).max())


@pytest.mark.tensorrt
def test_real_tensorrt_rebuild_reuses_the_timing_cache(tmp_path):
    trt, gpu = _real_trt_and_gpu()
    onnx = pytest.importorskip("onnx")
    fp32, fp16 = tmp_path / "tiny.onnx", tmp_path / "tiny_fp16.onnx"
    onnx.save(tiny_onnx(False), str(fp32))
    onnx.save(tiny_onnx(True), str(fp16))
    cache = tmp_path / "timing.cache"
    first = build_engine(fp16, tmp_path / "a.engine", patch_zyx=PATCH, workspace_gb=1.0, timing_cache=cache,
                         fp32_onnx=fp32)
    size = cache.stat().st_size
    second = build_engine(fp16, tmp_path / "b.engine", patch_zyx=PATCH, workspace_gb=1.0, timing_cache=cache,
                          fp32_onnx=fp32)
    assert first == replace(second, file="a.engine")
    assert cache.stat().st_size >= size
    assert engine_matches(second, trt.__version__, gpu.compute_capability)
