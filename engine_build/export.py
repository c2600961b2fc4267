"""Export trained runs to a model package: safetensors weights, fp32 ONNX, mixed-precision fp16 ONNX.

For each stage: rebuild the network from the run's ``config.json``, load its
best checkpoint (else the latest), export ONNX (opset 17, fixed patch size,
dynamic batch, input ``image`` / output ``logits``), clean the graph with
onnx-graphsurgeon (fold constants, clean up, topological sort), and check it
against PyTorch on a real synthetic-CT patch prepared exactly as the runtime
would (canonical orientation, CT normalisation with the run's statistics,
resampling to the stage spacing): max |Δlogit| must be <= 1e-3 in fp32, scaled
by the largest |logit| when that exceeds 1 (see :func:`parity_tolerance`). The
fp16 graph is checked with ONNX Runtime: argmax agreement with fp32 should be
>= 99.9 % of voxels (a warning below, an error with ``strict``; ONNX Runtime on
CPU has no fp16 kernels, so this measures the rounding of weights and I/O). Everything is written into a temporary folder that is
renamed into place only when complete, and ``manifest.json`` lists the
SHA-256 of every file.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from pocketseg.atomic import atomic_output_dir, chmod_like_new
from pocketseg.errors import InputError, MissingDependencyError, PocketsegError
from pocketseg.manifest import MANIFEST_NAME, Intensity, Manifest, Network, PostProcess, Stage
from pocketseg.engine_build.targets import file_name

log = logging.getLogger(__name__)

OPSET = 17
MAX_OPSET = 20  # the highest opset torch's TorchScript exporter writes


class ExportCheckError(PocketsegError, RuntimeError):
    """The exported graph failed a parity or precision check; nothing was written."""
PARITY_TOL = 1e-3
FP16_AGREEMENT_MIN = 0.999


def _require(module: str, feature: str, extra: str = "export"):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(module, feature, extra) from None


def load_run(run_dir: str | os.PathLike, stage: str):
    """(config, preset, network in eval mode, fp32 weights) of a training run; clear errors for anything unusable."""
    import torch

    from pocketseg.trainer import checkpoint as ckpt
    from pocketseg.trainer.network import PocketUNet
    from pocketseg.trainer.presets import get_preset

    run = Path(run_dir)
    if not run.is_dir():
        raise InputError(run, "run folder does not exist")
    config_path = run / "config.json"
    if not config_path.is_file():
        raise InputError(run, "is not a pocketseg training run (no config.json)")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(config_path, f"is not valid JSON ({exc})") from None
    if not (isinstance(config.get("preset"), dict) and "name" in config["preset"]
            and isinstance(config.get("intensity"), dict)):
        raise InputError(config_path, "is not a pocketseg run config (no preset name or intensity statistics)")
    if config.get("stage") != stage:
        raise InputError(run, f"is a {config.get('stage')!r} run, but the {stage} net was asked for")
    preset = get_preset(config["preset"]["name"], stage)
    current = json.loads(json.dumps(preset.to_dict()))  # tuples become lists, as in config.json
    if any(config["preset"].get(k) != v for k, v in current.items() if k != "description"):
        raise InputError(run, f"was trained with a preset {preset.name!r} that differs from this pocketseg's")
    path = run / ckpt.BEST if (run / ckpt.BEST).is_file() else run / ckpt.LATEST
    if not path.is_file():
        raise InputError(run, f"has no checkpoint ({ckpt.BEST} or {ckpt.LATEST})")
    state = ckpt.load_checkpoint(path)
    if state.get("stage") != stage or state.get("preset") != preset.name:
        raise InputError(path, f"checkpoint is {state.get('stage')}/{state.get('preset')}, expected {stage}/{preset.name}")
    net = PocketUNet(preset.unet_config(), deep_supervision=False)
    try:
        net.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise InputError(path, f"checkpoint weights do not fit preset {preset.name!r} ({str(exc).splitlines()[0]})") from None
    return config, preset, net.eval(), {k: v.detach().to(torch.float32).contiguous() for k, v in state["model"].items()}


def parity_patch(intensity: dict[str, float], spacing_mm_zyx, patch_zyx, *, seed: int = 0) -> np.ndarray:
    """A normalised synthetic-CT patch at the stage's spacing, centred on the abdomen, as the runtime prepares it."""
    from pocketseg.runtime.resample import resample_image, separate_z_axis
    from pocketseg.synth.phantom import make_phantom
    from pocketseg.trainer.preprocess import IntensityStats, canonical_zyx
    from pocketseg.volume import Volume

    ph = make_phantom(seed, matrix=192, slices=80)
    image, spacing = canonical_zyx(Volume(ph.image, ph.affine))
    labels, _ = canonical_zyx(Volume(ph.labels, ph.affine))
    centre = np.argwhere(labels > 0).mean(axis=0)
    half = np.asarray(patch_zyx) * np.asarray(spacing_mm_zyx) / np.asarray(spacing) / 2
    lo = np.clip(np.round(centre - half).astype(int), 0, None)
    hi = np.minimum(np.round(centre + half).astype(int), image.shape)
    crop = image[tuple(slice(a, b) for a, b in zip(lo, hi))]
    stats = IntensityStats(**intensity)
    return resample_image(stats.normalize(crop), tuple(patch_zyx), order=3,
                          separate_z=separate_z_axis(spacing, spacing_mm_zyx))


def export_onnx(net, patch_zyx, path: Path, opset: int = OPSET) -> None:
    """torch -> ONNX with a fixed patch and dynamic batch, then graphsurgeon cleanup."""
    import torch

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
        torch.onnx.export(net, (dummy,), str(raw), opset_version=opset, input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, do_constant_folding=True,
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
    import torch

    x = np.ascontiguousarray(patch[None, None], dtype=np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    got = _ort_session(onnx_path).run(["logits"], {"image": x})[0]
    return {"max_abs_logit_diff": float(np.abs(got - ref).max()), "max_abs_logit": float(np.abs(ref).max()),
            "argmax_agreement": float((got.argmax(1) == ref.argmax(1)).mean())}


def check_fp16(fp32_path: Path, fp16_path: Path, patch: np.ndarray) -> dict[str, float]:
    """Argmax agreement and max |Δlogit| of the fp16 graph against fp32 (ONNX Runtime, CPU)."""
    x = np.ascontiguousarray(patch[None, None], dtype=np.float32)
    ref = _ort_session(fp32_path).run(["logits"], {"image": x})[0]
    sess16 = _ort_session(fp16_path)
    dtype = np.float16 if sess16.get_inputs()[0].type == "tensor(float16)" else np.float32
    got = sess16.run(["logits"], {"image": x.astype(dtype)})[0].astype(np.float32)
    return {"argmax_agreement": float((got.argmax(1) == ref.argmax(1)).mean()),
            "max_abs_logit_diff": float(np.abs(got - ref).max())}


def _stage_files(stage: str, folder: Path, net, weights, preset, config, *, fp16: bool, check: bool, opset: int,
                 strict: bool, report: dict[str, Any]) -> Stage:
    safetensors = _require("safetensors.torch", "Writing safetensors weights")
    files = {"torch": file_name(stage, "torch"), "onnx-fp32": file_name(stage, "onnx-fp32")}
    safetensors.save_file(weights, str(folder / files["torch"]), metadata={"stage": stage, "preset": preset.name})
    export_onnx(net, preset.patch_zyx, folder / files["onnx-fp32"], opset)
    info: dict[str, Any] = {"onnx_fp32_bytes": (folder / files["onnx-fp32"]).stat().st_size}
    patch = parity_patch(config["intensity"], preset.spacing_mm_zyx, preset.patch_zyx) if check or fp16 else None
    if check:
        parity = check_parity(net, folder / files["onnx-fp32"], patch)
        info.update({f"fp32_{k}": v for k, v in parity.items()})
        tol = parity_tolerance(parity["max_abs_logit"])
        if parity["max_abs_logit_diff"] > tol:
            raise ExportCheckError(f"{stage}: ONNX export differs from PyTorch by {parity['max_abs_logit_diff']:.3g} "
                               f"> {tol:.3g} (max |Δlogit|; largest |logit| {parity['max_abs_logit']:.3g})")
    if fp16:
        onnx = _require("onnx", "ONNX export")
        from pocketseg.engine_build.fp16 import convert_to_mixed_fp16

        files["onnx-fp16"] = file_name(stage, "onnx-fp16")
        mixed = convert_to_mixed_fp16(onnx.load(str(folder / files["onnx-fp32"])))
        onnx.save(mixed, str(folder / files["onnx-fp16"]))
        info["onnx_fp16_bytes"] = (folder / files["onnx-fp16"]).stat().st_size
        if check:
            info.update({f"fp16_{k}": v for k, v in check_fp16(folder / files["onnx-fp32"], folder / files["onnx-fp16"], patch).items()})
            info["fp16_verified"] = info["fp16_argmax_agreement"] >= FP16_AGREEMENT_MIN
            if not info["fp16_verified"]:
                # Barely trained nets have near-tied logits, which fp16 rounding flips; a trained net agrees on
                # >= 99.9 % of voxels. Keep the package, say so loudly, and let strict exports refuse it.
                message = (f"{stage}: fp16 ONNX agrees with fp32 on {100 * info['fp16_argmax_agreement']:.3f} % of voxels "
                           f"(< {100 * FP16_AGREEMENT_MIN:.1f} %); check accuracy before deploying fp16")
                if strict:
                    raise ExportCheckError(message)
                log.warning(message)
    report[stage] = info
    log.info("%s: %s", stage, ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items()))
    return Stage(name=stage, preset=preset.name,
                 network=Network(preset.width, preset.kernels, preset.strides, preset.channels_growth),
                 num_classes=preset.num_classes, spacing_mm_zyx=preset.spacing_mm_zyx, patch_zyx=preset.patch_zyx,
                 intensity=Intensity(**config["intensity"]), files=files)


def export_package(roi: str | os.PathLike, detail: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                   fp16: bool = True, check: bool = True, strict: bool = False, opset: int = OPSET) -> Path:
    """Write a complete model package from a ROI run and a detail run; returns the package folder.

    ``strict`` also refuses a package whose fp16 graph agrees with fp32 on fewer than 99.9 % of voxels
    (otherwise a warning, recorded in ``export_report.json``).
    """
    if not OPSET <= opset <= MAX_OPSET:
        raise InputError(None, f"opset must be {OPSET}-{MAX_OPSET} (TensorRT needs >= 17; the exporter writes <= {MAX_OPSET}), "
                               f"got {opset}")
    runs = {"roi": load_run(roi, "roi"), "detail": load_run(detail, "detail")}
    report: dict[str, Any] = {}
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        stages = {name: _stage_files(name, tmp, net, weights, preset, config, fp16=fp16, check=check, opset=opset,
                                     strict=strict, report=report)
                  for name, (config, preset, net, weights) in runs.items()}
        margin = float(runs["detail"][0].get("roi_margin_mm", 20.0))
        manifest = Manifest(stages=stages, roi_margin_mm=margin, postprocess=PostProcess()).with_checksums(tmp)
        (tmp / MANIFEST_NAME).write_text(manifest.to_json())
        (tmp / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
        for path in tmp.iterdir():  # some writers create owner-only files; a package is meant to be shared
            chmod_like_new(path, 0o666)
    return Path(out)


#: CT normalisation statistics typical of contrast-enhanced abdominal organs, for untrained packages.
TYPICAL_CT_INTENSITY = {"mean": 90.0, "std": 60.0, "percentile_00_5": -80.0, "percentile_99_5": 280.0}


def write_untrained_run(folder: str | os.PathLike, stage: str, preset_name: str, *,
                        intensity: dict[str, float] | None = None, seed: int = 0) -> Path:
    """A run folder as ``pocketseg train`` leaves it, with He-initialised (untrained) weights.

    For timing and testing the deployment chain where no trained weights exist (the
    paper-size nets on a CPU-only machine): the outputs are meaningless, the cost is real.
    """
    import torch

    from pocketseg.trainer import checkpoint as ckpt
    from pocketseg.trainer.network import PocketUNet
    from pocketseg.trainer.presets import get_preset
    from pocketseg.trainer.train import RunConfig

    preset = get_preset(preset_name, stage)
    folder = Path(folder)
    folder.mkdir(parents=True)
    cfg = RunConfig(stage=stage, preset=preset.to_dict(), intensity=dict(intensity or TYPICAL_CT_INTENSITY),
                    dataset="untrained", train_cases=[], val_cases=[], epochs=0, iterations=0, batch_size=1,
                    lr=0.0, schedule="step", seed=seed)
    (folder / "config.json").write_text(json.dumps(asdict(cfg)))
    torch.manual_seed(seed)
    net = PocketUNet(preset.unet_config(), deep_supervision=True)
    ckpt.save_checkpoint(folder / ckpt.LATEST, {"model": net.state_dict(), "stage": stage, "preset": preset.name,
                                                "epoch": 0, "finished": True})
    return folder


def untrained_package(out: str | os.PathLike, *, roi: str = "roi-cpu", detail: str = "detail-cpu",
                      intensity: dict[str, float] | None = None, seed: int = 0, fp16: bool = True,
                      check: bool = False, overwrite: bool = False) -> Path:
    """A model package of untrained nets of the given presets (see :func:`write_untrained_run`)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="pocketseg-untrained-") as tmp:
        roi_run = write_untrained_run(Path(tmp) / "roi", "roi", roi, intensity=intensity, seed=seed)
        detail_run = write_untrained_run(Path(tmp) / "detail", "detail", detail, intensity=intensity, seed=seed + 1)
        return export_package(roi_run, detail_run, out, overwrite=overwrite, fp16=fp16, check=check)
