"""Model packages from torch networks: safetensors weights, fp32 ONNX, mixed-precision fp16 ONNX, checks.

The one writer of model packages (:func:`write_package`), fed with one
:class:`StageExport` per stage by whoever has the networks: the trainer for its
runs (:mod:`pocketseg.trainer.package`), the nnU-Net importer for results
folders. For each stage: export ONNX (opset 17, fixed patch size, dynamic batch,
input ``image`` / output ``logits``), clean the graph with onnx-graphsurgeon
(fold constants, clean up, topological sort), and check it against PyTorch on a
real synthetic-CT patch prepared exactly as the runtime would (canonical
orientation, CT normalisation with the stage's statistics, resampling to the
stage spacing): max |Δlogit| must be <= 1e-3 in fp32, scaled by the largest
|logit| when that exceeds 1 (see :func:`parity_tolerance`). The fp16 graph is
checked with ONNX Runtime: argmax agreement with fp32 should be >= 99.9 % of
voxels (a warning below, an error with ``strict``; ONNX Runtime on CPU has no
fp16 kernels, so this measures the rounding of weights and I/O). Where OpenVINO
is installed and the CPU computes bf16 natively, bf16 inference (OpenVINO, the
fp32 graph) is checked against OpenVINO fp32 on the same patch, with the same
99.9 % rule; the lowest agreement of a stage's networks goes into the manifest
(``Stage.bf16_agreement``), which lets ``precision="auto"`` choose bf16 on
such CPUs. Everything is
written into a temporary folder that is renamed into place only when complete,
and ``manifest.json`` lists the SHA-256 of every file.

torch is imported at the top: this module is the torch exporter, and its
importers that can run without torch import it lazily. ONNX, onnx-graphsurgeon,
ONNX Runtime and safetensors (the ``export`` extra) are imported when a step
needs them, so that a missing one is named with its extra.
"""

from __future__ import annotations

import importlib
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pocketseg.atomic import atomic_output_dir, chmod_like_new, write_json
from pocketseg.engine_build.fp16 import convert_to_mixed_fp16
from pocketseg.engine_build.targets import file_name
from pocketseg.errors import InputError, MissingDependencyError, PocketsegError
from pocketseg.geometry import ROI_MARGIN_MM
from pocketseg.manifest import (AGREEMENT_MIN, INPUT_NAME, MANIFEST_NAME, OUTPUT_NAME, Intensity, Manifest, Network,
                                PostProcess, Stage)
from pocketseg.runtime.engines import compile_openvino, cpu_bf16_support
from pocketseg.runtime.intensity import ct_normalize
from pocketseg.runtime.resample import resample_image, separate_z_axis
from pocketseg.signing import check_signing_key, write_signature
from pocketseg.synth.phantom import make_phantom
from pocketseg.volume import Volume, canonical_zyx

__all__ = ["ExportCheckError", "StageExport", "check_bf16", "check_fp16", "check_parity", "export_onnx", "parity_patch",
           "parity_tolerance", "write_package"]

log = logging.getLogger(__name__)

OPSET = 17
MAX_OPSET = 20  # the highest opset torch's TorchScript exporter writes


class ExportCheckError(PocketsegError, RuntimeError):
    """The exported graph failed a parity or precision check; nothing was written."""


PARITY_TOL = 1e-3
FP16_AGREEMENT_MIN = AGREEMENT_MIN


def _require(module: str, feature: str, extra: str = "export"):
    try:
        return importlib.import_module(module)  # optional (export extra): a missing one is named with its extra
    except ImportError:
        raise MissingDependencyError(module, feature, extra) from None


def parity_patch(intensity: Intensity | None, spacing_mm_zyx, patch_zyx, *, seed: int = 0) -> np.ndarray:
    """A normalised synthetic-CT patch at the stage's spacing, centred on the abdomen, as the runtime prepares it.

    ``intensity``: the stage's CT statistics; None (a stage normalising per image) z-scores the crop.
    """
    ph = make_phantom(seed, matrix=192, slices=80)
    image, spacing = canonical_zyx(Volume(ph.image, ph.affine))
    labels, _ = canonical_zyx(Volume(ph.labels, ph.affine))
    centre = np.argwhere(labels > 0).mean(axis=0)
    half = np.asarray(patch_zyx) * np.asarray(spacing_mm_zyx) / np.asarray(spacing) / 2
    lo = np.clip(np.round(centre - half).astype(int), 0, None)
    hi = np.minimum(np.round(centre + half).astype(int), image.shape)
    crop = image[tuple(slice(a, b) for a, b in zip(lo, hi))].astype(np.float32)
    normalized = ct_normalize(crop, intensity) if intensity is not None else (crop - crop.mean()) / max(crop.std(), 1e-8)
    return resample_image(normalized, tuple(patch_zyx), order=3, separate_z=separate_z_axis(spacing, spacing_mm_zyx))


def export_onnx(net, patch_zyx, path: Path, opset: int = OPSET) -> None:
    """torch -> ONNX with a fixed patch and dynamic batch, then graphsurgeon cleanup."""
    onnx = _require("onnx", "ONNX export")
    gs = _require("onnx_graphsurgeon", "ONNX graph cleanup")
    dummy = torch.zeros((1, 1, *patch_zyx), dtype=torch.float32)
    raw = path.with_suffix(".raw.onnx")
    with torch.no_grad(), warnings.catch_warnings():
        # InstanceNorm3d without running statistics always normalises with the instance's own statistics,
        # so the exporter's "train=True" notice describes exactly the inference behaviour.
        warnings.filterwarnings("ignore", message=".*operator 'instance_norm' is set to train=True.*")
        # The TorchScript exporter is used on purpose: it emits one InstanceNormalization node per norm,
        # which the fp16 conversion keeps in fp32 and TensorRT runs fused; the torch.export-based
        # exporter decomposes it into elementary ops.
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*legacy TorchScript-based ONNX export.*")
        # torch's own input-rank checks trip the tracer; the traced shapes are fixed by design (fixed patch).
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(net, (dummy,), str(raw), opset_version=opset, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, do_constant_folding=True,
                          dynamo=False)
    graph = gs.import_onnx(onnx.load(str(raw)))
    graph.fold_constants().cleanup().toposort()
    model = gs.export_onnx(graph)
    model.opset_import[0].version = max(model.opset_import[0].version, opset)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    raw.unlink()


def _ort_session(path: Path):
    ort = _require("onnxruntime", "ONNX Runtime checks")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def parity_tolerance(max_abs_logit: float) -> float:
    """Allowed max |Δlogit| between ONNX Runtime and PyTorch in fp32.

    1e-3 for logits of order 1, growing with the largest logit: torch (oneDNN) and ONNX Runtime (MLAS)
    accumulate in different orders, and a paper-size net (2.6-7.7 TFLOP per patch, 10-12
    InstanceNorms) differs by a few 1e-4 of its logit scale for that reason alone.
    """
    return PARITY_TOL * max(1.0, max_abs_logit)


def check_parity(net, onnx_path: Path, patch: np.ndarray) -> dict[str, float]:
    """ONNX Runtime vs PyTorch on one patch, fp32: max |Δlogit|, largest |logit| and argmax agreement."""
    x = np.ascontiguousarray(patch[None, None], dtype=np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    got = _ort_session(onnx_path).run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    return {"max_abs_logit_diff": float(np.abs(got - ref).max()), "max_abs_logit": float(np.abs(ref).max()),
            "argmax_agreement": float((got.argmax(1) == ref.argmax(1)).mean())}


def check_fp16(fp32_path: Path, fp16_path: Path, patch: np.ndarray) -> dict[str, float]:
    """Argmax agreement and max |Δlogit| of the fp16 graph against fp32 (ONNX Runtime, CPU)."""
    x = np.ascontiguousarray(patch[None, None], dtype=np.float32)
    ref = _ort_session(fp32_path).run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    sess16 = _ort_session(fp16_path)
    dtype = np.float16 if sess16.get_inputs()[0].type == "tensor(float16)" else np.float32
    got = sess16.run([OUTPUT_NAME], {INPUT_NAME: x.astype(dtype)})[0].astype(np.float32)
    return {"argmax_agreement": float((got.argmax(1) == ref.argmax(1)).mean()),
            "max_abs_logit_diff": float(np.abs(got - ref).max())}


def check_bf16(fp32_path: Path, patch: np.ndarray) -> dict[str, float]:
    """Argmax agreement and max |Δlogit| of OpenVINO bf16 against OpenVINO fp32 on the fp32 graph (CPU, no cache)."""
    x = np.ascontiguousarray(patch[None, None], dtype=np.float32)
    out = {}
    for precision in ("fp32", "bf16"):
        compiled = compile_openvino(fp32_path, precision)
        out[precision] = compiled.create_infer_request().infer({INPUT_NAME: x})[compiled.output(OUTPUT_NAME)]
    return {"argmax_agreement": float((out["bf16"].argmax(1) == out["fp32"].argmax(1)).mean()),
            "max_abs_logit_diff": float(np.abs(out["bf16"] - out["fp32"]).max())}


@dataclass(frozen=True, eq=False)
class StageExport:
    """One stage of a package to write: its networks in eval mode with their fp32 weights, and what the manifest
    records of the stage (``stage_fields``: the format-2 fields of :class:`pocketseg.manifest.Stage`, e.g. the
    normalisation, voxel order and mirror axes of an imported model).

    ``net``/``weights`` is the stage's network; ``ensemble`` holds more (name, net, weights) networks whose
    logits the runtime averages with it (the folds of an nnU-Net model), written as ``<name>_<member>...``.
    """

    name: str  # "roi" or "detail"
    preset: str  # where the network comes from, e.g. a preset name
    net: torch.nn.Module
    weights: dict[str, torch.Tensor]
    network: Network
    num_classes: int
    spacing_mm_zyx: tuple[float, float, float]
    patch_zyx: tuple[int, int, int]
    intensity: Intensity | None
    stage_fields: dict[str, Any] = field(default_factory=dict)
    member_name: str = ""  # file-name part of ``net`` when the stage is an ensemble, e.g. "fold0"
    ensemble: tuple[tuple[str, torch.nn.Module, dict[str, torch.Tensor]], ...] = ()


def _stage_files(stage: StageExport, folder: Path, *, fp16: bool, check: bool, opset: int, strict: bool,
                 report: dict[str, Any]) -> Stage:
    members = [(stage.member_name, stage.net, stage.weights), *stage.ensemble]
    patch = parity_patch(stage.intensity, stage.spacing_mm_zyx, stage.patch_zyx) if check or fp16 else None
    written = []
    for base, (_, net, weights) in zip(_member_bases(stage, members), members):
        written.append(_network_files(stage, base, net, weights, folder, patch, fp16=fp16, check=check, opset=opset,
                                      strict=strict, report=report))
    bf16 = [report[base].get("bf16_argmax_agreement") for base in _member_bases(stage, members)]
    fields = {**stage.stage_fields, "bf16_agreement": None if None in bf16 else min(bf16)}
    return Stage(name=stage.name, preset=stage.preset, network=stage.network, num_classes=stage.num_classes,
                 spacing_mm_zyx=stage.spacing_mm_zyx, patch_zyx=stage.patch_zyx, intensity=stage.intensity,
                 files=written[0], ensemble=tuple(written[1:]), **fields)


def _member_bases(stage: StageExport, members: list) -> list[str]:
    return [stage.name if len(members) == 1 or not member else f"{stage.name}_{member}" for member, _, _ in members]


def _network_files(stage: StageExport, name: str, net: torch.nn.Module, weights: dict[str, torch.Tensor], folder: Path,
                   patch: np.ndarray | None, *, fp16: bool, check: bool, opset: int, strict: bool,
                   report: dict[str, Any]) -> dict[str, str]:
    """Weights, fp32 ONNX (checked against torch) and fp16 ONNX (checked against fp32) of one network."""
    safetensors = _require("safetensors.torch", "Writing safetensors weights")
    files = {"torch": file_name(name, "torch"), "onnx-fp32": file_name(name, "onnx-fp32")}
    safetensors.save_file(weights, str(folder / files["torch"]), metadata={"stage": stage.name, "preset": stage.preset})
    export_onnx(net, stage.patch_zyx, folder / files["onnx-fp32"], opset)
    info: dict[str, Any] = {"onnx_fp32_bytes": (folder / files["onnx-fp32"]).stat().st_size}
    if check:
        parity = check_parity(net, folder / files["onnx-fp32"], patch)
        info.update({f"fp32_{k}": v for k, v in parity.items()})
        tol = parity_tolerance(parity["max_abs_logit"])
        if parity["max_abs_logit_diff"] > tol:
            raise ExportCheckError(f"{name}: ONNX export differs from PyTorch by {parity['max_abs_logit_diff']:.3g} "
                                   f"> {tol:.3g} (max |Δlogit|; largest |logit| {parity['max_abs_logit']:.3g})")
    if fp16:
        onnx = _require("onnx", "ONNX export")
        files["onnx-fp16"] = file_name(name, "onnx-fp16")
        mixed = convert_to_mixed_fp16(onnx.load(str(folder / files["onnx-fp32"])))
        onnx.save(mixed, str(folder / files["onnx-fp16"]))
        info["onnx_fp16_bytes"] = (folder / files["onnx-fp16"]).stat().st_size
        if check:
            info.update({f"fp16_{k}": v for k, v in check_fp16(folder / files["onnx-fp32"], folder / files["onnx-fp16"],
                                                               patch).items()})
            _judge_agreement(info, "fp16", f"{name}: fp16 ONNX", FP16_AGREEMENT_MIN,
                             "check accuracy before deploying fp16", strict=strict)
    if check:
        _bf16_files_check(name, folder / files["onnx-fp32"], patch, strict=strict, info=info)
    report[name] = info
    log.info("%s: %s", name, ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items()))
    return files


def _bf16_files_check(name: str, fp32_path: Path, patch: np.ndarray, *, strict: bool, info: dict[str, Any]) -> None:
    """bf16 vs fp32 (OpenVINO) into ``info`` where this machine can run bf16; a warning or, ``strict``, an error
    below :data:`AGREEMENT_MIN`."""
    native, why = cpu_bf16_support()
    if not native:
        log.info("%s: bf16 agreement not measured (%s)", name, why)
        return
    info.update({f"bf16_{k}": v for k, v in check_bf16(fp32_path, patch).items()})
    _judge_agreement(info, "bf16", f"{name}: bf16 (OpenVINO)", AGREEMENT_MIN,
                     "--precision auto will not choose bf16 for it", strict=strict)


def _judge_agreement(info: dict[str, Any], precision: str, what: str, minimum: float, advice: str, *,
                     strict: bool) -> None:
    """Record whether ``info``'s ``<precision>_argmax_agreement`` reaches ``minimum``; below it warn or, ``strict``,
    refuse. Barely trained nets have near-tied logits, which reduced precision flips; a trained net agrees on
    >= 99.9 % of voxels, so the package is kept with a loud warning unless the export is strict."""
    agreement = info[f"{precision}_argmax_agreement"]
    info[f"{precision}_verified"] = agreement >= minimum
    if not info[f"{precision}_verified"]:
        message = (f"{what} agrees with fp32 on {100 * agreement:.3f} % of voxels (< {100 * minimum:.1f} %); "
                   f"{advice}")
        if strict:
            raise ExportCheckError(message)
        log.warning(message)


def check_opset(opset: int) -> int:
    if not OPSET <= opset <= MAX_OPSET:
        raise InputError(None, f"opset must be {OPSET}-{MAX_OPSET} (TensorRT needs >= 17; the exporter writes "
                               f"<= {MAX_OPSET}), got {opset}")
    return opset


def write_package(stages: Sequence[StageExport], out: str | os.PathLike, *, roi_margin_mm: float = ROI_MARGIN_MM,
                  postprocess: PostProcess | None = None, overwrite: bool = False, fp16: bool = True,
                  check: bool = True, strict: bool = False, opset: int = OPSET, manifest_fields: dict | None = None,
                  extra_report: dict[str, Any] | None = None, sign_key: str | os.PathLike | None = None) -> Path:
    """Write a complete model package of ``stages``; returns the package folder.

    ``strict`` also refuses a package whose fp16 graph, or whose bf16 inference (measured where OpenVINO runs
    bf16 natively), agrees with fp32 on fewer than 99.9 % of voxels (otherwise a warning, recorded in
    ``export_report.json``; the bf16 agreement also in the manifest). ``manifest_fields`` sets the package-level
    format-2 fields of :class:`pocketseg.manifest.Manifest` (labels, inference settings, modality, source);
    ``extra_report`` is added to ``export_report.json``. The manifest is validated before anything is
    renamed into place; nothing is left at ``out`` on failure. ``sign_key``: an Ed25519 private key file whose
    signature of the manifest is written into the package as ``signature.json`` (:mod:`pocketseg.signing`).
    """
    check_opset(opset)
    if sign_key is not None:
        check_signing_key(sign_key)  # before the export's minutes, not after
    report: dict[str, Any] = dict(extra_report or {})
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        written = {stage.name: _stage_files(stage, tmp, fp16=fp16, check=check, opset=opset, strict=strict,
                                            report=report) for stage in stages}
        manifest = Manifest(stages=written, roi_margin_mm=float(roi_margin_mm),
                            postprocess=postprocess or PostProcess(), **(manifest_fields or {})).with_checksums(tmp)
        problems = manifest.problems()
        if problems:
            raise ExportCheckError("the package's manifest would be refused: " + "; ".join(problems))
        (tmp / MANIFEST_NAME).write_text(manifest.to_json())
        write_json(tmp / "export_report.json", report, indent=2)
        if sign_key is not None:
            write_signature(tmp, sign_key)
        for path in tmp.iterdir():  # some writers create owner-only files; a package is meant to be shared
            chmod_like_new(path, 0o666)
    return Path(out)
