"""TensorRT FP16 engines from a model package's ONNX files, for the GPU this runs on.

Two ways to get an FP16 engine, chosen from the installed TensorRT version:

``strongly-typed`` (TensorRT >= 10.0; the only way from 11.0)
    Parse the mixed-precision ONNX (``onnx-fp16``: fp16 weights and activations,
    InstanceNormalization in fp32 between Casts) into a network created with
    ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``. Precision comes from the
    graph's types; no precision builder flag is set. TensorRT 11 removed
    ``BuilderFlag.FP16`` and the precision-constraint flags, and every network is
    strongly typed there (the creation flag is deprecated and ignored, so none is
    passed).

``fp16-flag`` (TensorRT 8.6 .. 9.x, e.g. JetPack 6.0's 8.6)
    Parse the fp32 ONNX (``onnx-fp32``) into an explicit-batch network, set
    ``BuilderFlag.FP16`` and pin the InstanceNormalization layers to fp32 with
    ``layer.precision`` / ``set_output_type`` and
    ``BuilderFlag.OBEY_PRECISION_CONSTRAINTS``.

In both modes the ONNX parser gets ``OnnxParserFlag.NATIVE_INSTANCENORM``: TensorRT's own
normalization layer instead of the ``InstanceNormalization_TRT`` plugin, which the 8.6/9.x
parser uses by default (native is the default only from 10.0). An engine holding that plugin
deserializes only in a process that registered TensorRT's plugins first; the parser does so
while building, a process that only loads engines does not, and its
``deserialize_cuda_engine`` then returns None ("could not find plugin").

Engines are specific to the GPU (compute capability) and the TensorRT version,
so their file names carry both (``roi_fp16_sm87_trt10.8.engine``) and the
runtime only uses an engine whose record matches (:func:`select_engine`).

Equivalent ``trtexec`` command lines are logged for every build
(:func:`trtexec_command`); the workspace is given in MiB without a suffix there,
which TensorRT 8.6's trtexec (MiB only) and 10.x (MiB by default) both read.

TensorRT's import, the GPU's identity and the matching of engine records live in
:mod:`pocketseg.runtime.tensorrt_probe`, shared with the runtime that loads the
engines. TensorRT is imported when a build starts; nothing here needs it at
import time.
"""

from __future__ import annotations

import logging
import os
import shlex
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from pocketseg.atomic import atomic_write_bytes, check_writable_target
from pocketseg.errors import InputError
from pocketseg.manifest import INPUT_NAME, MANIFEST_NAME, EngineRecord, Manifest, Stage, load_package
from pocketseg.runtime.tensorrt_probe import (MIN_VERSION, GpuIdentity, TensorRTError, engine_matches, gpu_identity,
                                              import_tensorrt, parse_version, tensorrt_logger)
from pocketseg.signing import SIGNATURE_NAME

log = logging.getLogger(__name__)

STRONGLY_TYPED = "strongly-typed"
FP16_FLAG = "fp16-flag"
TARGET_FP32 = "onnx-fp32"
TARGET_FP16 = "onnx-fp16"
PRECISION = "fp16"


class EngineBuildError(TensorRTError):
    """TensorRT could not build an engine, or this machine cannot build one (version, GPU)."""


# --------------------------------------------------------------------------------------------------- import, version

def build_mode(version: str | Sequence[int]) -> str:
    """``"strongly-typed"`` for TensorRT >= 10.0 (required from 11.0), ``"fp16-flag"`` for 8.6 .. 9.x."""
    major, minor = parse_version(version)
    if (major, minor) < MIN_VERSION:
        raise EngineBuildError(f"TensorRT {major}.{minor} is too old: pocketseg builds engines with TensorRT "
                               f"{MIN_VERSION[0]}.{MIN_VERSION[1]} (JetPack 6.0) or newer")
    return STRONGLY_TYPED if major >= 10 else FP16_FLAG


def _version_tag(version: str) -> str:
    major, minor = parse_version(version)
    return f"{major}.{minor}"


# ----------------------------------------------------------------------------------------------------- GPU identity

# --------------------------------------------------------------------------------------------------------- trtexec

def _workspace_mib(workspace_gb: float) -> int:
    if not workspace_gb > 0:
        raise InputError(None, f"workspace_gb must be positive, got {workspace_gb}")
    return max(1, int(round(workspace_gb * 1024)))


def _check_shape_args(patch_zyx: Sequence[int], max_batch: int) -> tuple[int, int, int]:
    patch = tuple(int(v) for v in patch_zyx)
    if len(patch) != 3 or min(patch) < 1:
        raise InputError(None, f"patch_zyx must be three positive sizes, got {tuple(patch_zyx)}")
    if int(max_batch) < 1:
        raise InputError(None, f"max_batch must be at least 1, got {max_batch}")
    return patch  # type: ignore[return-value]


def trtexec_command(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *, patch_zyx: Sequence[int],
                    max_batch: int, workspace_gb: float, timing_cache: str | os.PathLike | None,
                    strongly_typed: bool, fp32_layers: Sequence[str] = ()) -> str:
    """The ``trtexec`` command line that builds the same engine as :func:`build_engine`.

    ``fp32_layers`` (weakly typed builds only) are the layer names pinned to fp32; they become
    ``--precisionConstraints=obey --layerPrecisions=...:fp32 --layerOutputTypes=...:fp32``.
    """
    z, y, x = _check_shape_args(patch_zyx, max_batch)

    def shape(batch: int) -> str:
        return f"{INPUT_NAME}:{batch}x1x{z}x{y}x{x}"

    args = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}",
            f"--minShapes={shape(1)}", f"--optShapes={shape(max_batch)}", f"--maxShapes={shape(max_batch)}",
            # MiB without a suffix: 8.6 reads the number as MiB (a "G" suffix would be dropped, giving 4 MiB),
            # 10.x accepts suffixes and defaults to MiB.
            f"--memPoolSize=workspace:{_workspace_mib(workspace_gb)}"]
    if timing_cache is not None:
        args.append(f"--timingCacheFile={timing_cache}")
    if strongly_typed:
        args.append("--stronglyTyped")
    else:
        args.append("--fp16")
        if fp32_layers:
            args += ["--precisionConstraints=obey",
                     "--layerPrecisions=" + ",".join(f"{name}:fp32" for name in fp32_layers),
                     "--layerOutputTypes=" + ",".join(f"{name}:fp32" for name in fp32_layers)]
    args.append("--skipInference")
    return " ".join(shlex.quote(str(a)) for a in args)


# ---------------------------------------------------------------------------------------------------------- build

def _network_flags(trt, mode: str, version: str) -> int:
    flags = trt.NetworkDefinitionCreationFlag
    if mode == FP16_FLAG:
        return 1 << int(flags.EXPLICIT_BATCH)  # required for ONNX in 8.x; deprecated and ignored from 10.0
    if parse_version(version)[0] >= 11:
        return 0  # always strongly typed; STRONGLY_TYPED is deprecated and ignored in 11.0
    if not hasattr(flags, "STRONGLY_TYPED"):
        raise EngineBuildError(f"TensorRT {version} has no NetworkDefinitionCreationFlag.STRONGLY_TYPED")
    return 1 << int(flags.STRONGLY_TYPED)


def _native_instance_norm(trt, parser, mode: str, source: Path) -> None:
    """Ask the parser for TensorRT's native InstanceNormalization layer instead of its plugin.

    The flag exists from 8.6 on (and is the default from 10.0); without it an 8.6/9.x engine
    holds ``InstanceNormalization_TRT`` plugin layers and cannot be loaded by a process that did
    not register TensorRT's plugins.
    """
    flag = getattr(getattr(trt, "OnnxParserFlag", None), "NATIVE_INSTANCENORM", None)
    if flag is None:
        if mode == FP16_FLAG:
            log.warning("%s: TensorRT %s has no OnnxParserFlag.NATIVE_INSTANCENORM; InstanceNormalization may "
                        "become a plugin layer that only loads where TensorRT's plugins are registered",
                        source, trt.__version__)
        return
    parser.set_flag(flag)


def _parse(trt, network, logger, source: Path, mode: str) -> None:
    parser = trt.OnnxParser(network, logger)
    _native_instance_norm(trt, parser, mode, source)
    if parser.parse_from_file(str(source)):
        return
    problems = []
    for i in range(parser.num_errors):
        error = parser.get_error(i)
        problems.append(f"node {error.node()}: {error.desc()}")
    raise InputError(source, "TensorRT's ONNX parser refused it: " + ("; ".join(problems) or "no details given"))


def _check_input(trt, network, source: Path, mode: str, patch: tuple[int, int, int], max_batch: int) -> None:
    tensors = [network.get_input(i) for i in range(network.num_inputs)]
    by_name = {t.name: t for t in tensors}
    if INPUT_NAME not in by_name or len(tensors) != 1:
        raise InputError(source, f"has inputs {sorted(by_name)}; a pocketseg network has the one input {INPUT_NAME!r}")
    tensor = by_name[INPUT_NAME]
    shape = tuple(int(d) for d in tensor.shape)
    if len(shape) != 5 or shape[1] != 1 or shape[2:] != patch:
        raise InputError(source, f"input {INPUT_NAME!r} has shape {shape}, expected (batch, 1, {', '.join(map(str, patch))}) "
                                 "from the stage's patch_zyx")
    if shape[0] != -1 and shape[0] < max_batch:
        raise InputError(source, f"has a fixed batch of {shape[0]}; max_batch {max_batch} needs a dynamic batch")
    want = trt.float16 if mode == STRONGLY_TYPED else trt.float32
    if tensor.dtype != want:
        detail = ("the mixed-precision ONNX (onnx-fp16) is needed: a strongly typed network keeps the file's types"
                  if mode == STRONGLY_TYPED else
                  "TensorRT before 10.0 builds FP16 engines from the fp32 ONNX (onnx-fp32) with the FP16 flag")
        raise InputError(source, f"input {INPUT_NAME!r} is {tensor.dtype}, expected {want}: {detail}")


def _pin_instance_norm_fp32(trt, network) -> list[str]:
    """Pin normalization layers (and any InstanceNormalization_TRT plugin layer, should a parser still
    produce one) to fp32.

    The pocketseg networks have no other plugin layers; any plugin layer is pinned, which is safe (fp32).
    """
    kinds = [getattr(trt.LayerType, name) for name in ("NORMALIZATION", "PLUGIN_V2", "PLUGIN_V3")
             if hasattr(trt.LayerType, name)]
    pinned = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in kinds:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            pinned.append(layer.name)
    return pinned


def _attach_timing_cache(config, path: Path | None):
    """Load ``path`` (if it exists) into a timing cache attached to ``config``; returns the cache (keep it alive).

    A cache made on another GPU or TensorRT version is refused by TensorRT (``ignore_mismatch=False``);
    the build then starts from an empty cache, which replaces the file afterwards.
    """
    if path is None:
        return None
    data = path.read_bytes() if path.is_file() else b""
    problem = None
    try:
        cache = config.create_timing_cache(data)
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            problem = "was made for another GPU or TensorRT version"
    except Exception as exc:  # noqa: BLE001 - a corrupt cache file must not stop the build
        problem = f"is unreadable ({exc})"
    if problem is None:
        return cache
    if data:
        log.warning("timing cache %s %s; starting a new one", path, problem)
        cache = config.create_timing_cache(b"")
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return cache
    raise EngineBuildError(f"TensorRT refused a new, empty timing cache for {path}")


def _build(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *, patch_zyx: Sequence[int], max_batch: int,
           workspace_gb: float, timing_cache: str | os.PathLike | None, fp32_onnx: str | os.PathLike | None,
           trt, gpu: GpuIdentity | None, overwrite: bool, shown_engine_path: str | os.PathLike, verbose: bool
           ) -> EngineRecord:
    patch = _check_shape_args(patch_zyx, max_batch)
    max_batch = int(max_batch)
    workspace_bytes = _workspace_mib(workspace_gb) * (1 << 20)
    trt = import_tensorrt() if trt is None else trt
    version = str(trt.__version__)
    mode = build_mode(version)
    if mode == STRONGLY_TYPED:
        source = Path(onnx_path)
    else:
        source = Path(fp32_onnx if fp32_onnx is not None else onnx_path)
    if not source.is_file():
        raise InputError(source, "ONNX file not found")
    engine_path = check_writable_target(engine_path, overwrite=overwrite)
    cache_path = None if timing_cache is None else check_writable_target(timing_cache, overwrite=True)
    gpu = gpu_identity() if gpu is None else gpu

    logger = tensorrt_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, mode, version))
    _parse(trt, network, logger, source, mode)
    _check_input(trt, network, source, mode, patch, max_batch)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    pinned: list[str] = []
    if mode == FP16_FLAG:
        config.set_flag(trt.BuilderFlag.FP16)
        pinned = _pin_instance_norm_fp32(trt, network)
        if pinned:
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        else:
            log.warning("%s: no InstanceNormalization layer found to keep in fp32", source)

    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, min=(1, 1, *patch), opt=(max_batch, 1, *patch), max=(max_batch, 1, *patch))
    config.add_optimization_profile(profile)
    cache = _attach_timing_cache(config, cache_path)

    command = trtexec_command(source, shown_engine_path, patch_zyx=patch, max_batch=max_batch,
                              workspace_gb=workspace_gb, timing_cache=cache_path,
                              strongly_typed=mode == STRONGLY_TYPED, fp32_layers=pinned)
    log.log(logging.INFO if verbose else logging.DEBUG,
            "building a TensorRT %s %s engine for %s (%s); equivalent command:\n  %s",
            version, mode, gpu.name, gpu.sm, command)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT {version} could not build an engine from {source} (its log above says why); "
                               f"nothing was written to {shown_engine_path}")
    atomic_write_bytes(engine_path, memoryview(serialized), overwrite=overwrite)
    if cache_path is not None and cache is not None:
        built_cache = config.get_timing_cache()
        if built_cache is not None:
            atomic_write_bytes(cache_path, memoryview(built_cache.serialize()), overwrite=True)
    return EngineRecord(file=Path(shown_engine_path).name, precision=PRECISION, tensorrt_version=version,
                        compute_capability=gpu.compute_capability, gpu_name=gpu.name, max_batch=max_batch)


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *, patch_zyx: Sequence[int],
                 max_batch: int = 1, workspace_gb: float = 4.0, timing_cache: str | os.PathLike | None = None,
                 fp32_onnx: str | os.PathLike | None = None, trt=None, gpu: GpuIdentity | None = None,
                 overwrite: bool = True) -> EngineRecord:
    """Build an FP16 engine for this GPU and write it atomically to ``engine_path``.

    ``onnx_path`` is the mixed-precision ONNX (used by TensorRT >= 10); ``fp32_onnx`` the fp32 ONNX that
    TensorRT 8.6/9.x builds from with the FP16 flag (``onnx_path`` is used when it is not given).
    The profile covers batches 1 .. ``max_batch`` (optimised for ``max_batch``) at the fixed patch size.
    ``timing_cache`` is read when it exists and rewritten after a successful build.
    ``trt`` replaces the ``tensorrt`` module and ``gpu`` the probed GPU identity (tests).
    Nothing is written when the build fails.
    """
    return _build(onnx_path, engine_path, patch_zyx=patch_zyx, max_batch=max_batch, workspace_gb=workspace_gb,
                  timing_cache=timing_cache, fp32_onnx=fp32_onnx, trt=trt, gpu=gpu, overwrite=overwrite,
                  shown_engine_path=engine_path, verbose=True)


def engine_file_name(stage: str, gpu: GpuIdentity, tensorrt_version: str) -> str:
    """``roi_fp16_sm87_trt10.8.engine``: engines only run on the GPU kind and TensorRT version they were built by."""
    return f"{stage}_{PRECISION}_{gpu.sm}_trt{_version_tag(tensorrt_version)}.engine"


def build_package_engines(package_dir: str | os.PathLike, *, workspace_gb: float = 4.0,
                          timing_cache: str | os.PathLike | None = None, max_batch: int = 1, progress: bool = True,
                          trt=None, gpu: GpuIdentity | None = None) -> Manifest:
    """Build an engine per stage of a model package for this GPU and record them in its manifest.

    The package is verified first (checksums). Engines are built to temporary files and only renamed into
    place once every stage built; records for the same compute capability and TensorRT major.minor are
    replaced, records for other GPUs or versions kept. Returns the new manifest (also written to manifest.json).
    """
    folder = Path(package_dir)
    manifest = load_package(folder)
    check_writable_target(folder / MANIFEST_NAME, overwrite=True)
    trt = import_tensorrt() if trt is None else trt
    version = str(trt.__version__)
    mode = build_mode(version)
    gpu = gpu_identity() if gpu is None else gpu
    level = logging.INFO if progress else logging.DEBUG

    plans = []
    for stage in manifest.stages.values():
        fp16, fp32 = stage.files.get(TARGET_FP16), stage.files.get(TARGET_FP32)
        if mode == STRONGLY_TYPED and fp16 is None:
            raise InputError(folder, f"stage {stage.name} has no {TARGET_FP16} file, which TensorRT {version} "
                                     "(strongly typed) builds FP16 engines from; export the package with fp16 ONNX")
        if mode == FP16_FLAG and fp32 is None:
            raise InputError(folder, f"stage {stage.name} has no {TARGET_FP32} file, which TensorRT {version} "
                                     "builds FP16 engines from")
        plans.append((stage, fp16, fp32, engine_file_name(stage.name, gpu, version)))

    built: list[tuple[Stage, Path, str, EngineRecord]] = []
    try:
        for n, (stage, fp16, fp32, name) in enumerate(plans, 1):
            log.log(level, "[%d/%d] %s stage: building %s", n, len(plans), stage.name, name)
            temporary = folder / f".{name}.building"
            built.append((stage, temporary, name, _build(
                folder / (fp16 if mode == STRONGLY_TYPED else fp32), temporary, patch_zyx=stage.patch_zyx,
                max_batch=max_batch, workspace_gb=workspace_gb, timing_cache=timing_cache,
                fp32_onnx=None if fp32 is None else folder / fp32, trt=trt, gpu=gpu, overwrite=True,
                shown_engine_path=folder / name, verbose=progress)))
        for _, temporary, name, _ in built:
            os.replace(temporary, folder / name)
    except BaseException:
        for _, temporary, _, _ in built:
            temporary.unlink(missing_ok=True)
        raise

    stages = dict(manifest.stages)
    for stage, _, name, record in built:
        kept = tuple(e for e in stage.engines
                     if e.file != name and not engine_matches(e, version, gpu.compute_capability))
        stages[stage.name] = replace(stage, engines=kept + (record,))
    new = replace(manifest, stages=stages).with_checksums(folder)
    atomic_write_bytes(folder / MANIFEST_NAME, new.to_json().encode("utf-8"), overwrite=True)
    log.log(level, "recorded %d engine(s) for %s (compute capability %s, TensorRT %s) in %s",
            len(built), gpu.name, gpu.compute_capability, version, folder / MANIFEST_NAME)
    if (folder / SIGNATURE_NAME).exists():
        # The signature covers the manifest, which now lists the engines: it no longer fits, by design.
        log.warning("%s: the package's signature no longer matches its manifest (engines were added); sign it "
                    "again: pocketseg sign %s --key PRIVATE_KEY --overwrite", folder, folder)
    return new
