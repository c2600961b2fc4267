"""A training run's model package: read a run folder, export ROI + detail runs, untrained runs for timing.

A run folder (``pocketseg train``) holds ``config.json`` (stage, preset, CT
intensity statistics, ROI margin) and its checkpoints. :func:`load_run` reads
one back into a network with clear errors for anything unusable, and
:func:`export_package` turns a ROI run and a detail run into a model package
through the one package writer, :func:`pocketseg.engine_build.export.write_package`.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from pocketseg.atomic import ensure_dir, write_json
from pocketseg.engine_build.export import OPSET, StageExport, check_opset, write_package
from pocketseg.errors import InputError, OutputError
from pocketseg.geometry import ROI_MARGIN_MM
from pocketseg.manifest import Inference, Intensity, Network, PostProcess
from pocketseg.runtime.network import PocketUNet
from pocketseg.runtime.sliding_window import check_overlap
from pocketseg.trainer import checkpoint as ckpt
from pocketseg.trainer.presets import Preset, get_preset
from pocketseg.trainer.train import RunConfig

__all__ = ["TYPICAL_CT_INTENSITY", "export_package", "final_checkpoint", "load_run", "untrained_package",
           "write_finished_run", "write_untrained_run"]

#: CT normalisation statistics typical of contrast-enhanced abdominal organs, for untrained packages.
TYPICAL_CT_INTENSITY = {"mean": 90.0, "std": 60.0, "percentile_00_5": -80.0, "percentile_99_5": 280.0}


def load_run(run_dir: str | os.PathLike, stage: str) -> tuple[dict[str, Any], Preset, PocketUNet, dict[str, torch.Tensor]]:
    """(config, preset, network in eval mode, fp32 weights) of a training run; clear errors for anything unusable."""
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
    path = final_checkpoint(run)
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


def _stage_export(name: str, run: tuple[dict[str, Any], Preset, PocketUNet, dict[str, torch.Tensor]]) -> StageExport:
    config, preset, net, weights = run
    try:
        intensity = Intensity(**config["intensity"])
    except TypeError as exc:
        raise InputError(None, f"the {name} run's intensity statistics are malformed ({exc})") from None
    return StageExport(name=name, preset=preset.name, net=net, weights=weights,
                       network=Network(preset.width, preset.kernels, preset.strides, preset.channels_growth),
                       num_classes=preset.num_classes, spacing_mm_zyx=preset.spacing_mm_zyx, patch_zyx=preset.patch_zyx,
                       intensity=intensity)


def export_package(roi: str | os.PathLike, detail: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                   fp16: bool = True, check: bool = True, strict: bool = False, opset: int = OPSET,
                   sign_key: str | os.PathLike | None = None, source: dict[str, Any] | None = None,
                   overlap: float = 0.0, gaussian: bool = False) -> Path:
    """Write a complete model package from a ROI run and a detail run (``pocketseg export``); returns its folder.

    Args:
        roi: run folder of the ROI net (``pocketseg train --stage roi``).
        detail: run folder of the detail net.
        out: the package folder to create.
        overwrite: replace an existing package folder (only once the new one is complete).
        fp16: also write the mixed-precision fp16 ONNX (for TensorRT).
        check: check ONNX against PyTorch and fp16 against fp32 on a synthetic-CT patch.
        strict: refuse a package whose fp16 graph, or bf16 inference where OpenVINO runs it natively, agrees with
            fp32 on < 99.9 % of voxels (else a warning).
        opset: ONNX opset, 17..20.
        sign_key: an Ed25519 private key file (``pocketseg keygen``): the package gets its signature,
            ``signature.json`` (docs/model-package.md, "Signatures").
        source: where the networks came from, recorded as the manifest's ``source`` (e.g. the training data and
            the intended use).
        overlap, gaussian: the package's sliding window unless the caller says otherwise (manifest ``inference``):
            the paper's tile step 1.0 (overlap 0, uniform blending) by default; a small net trained briefly can
            need overlapping tiles, as the reference model does (docs/reference-model.md).
    """
    check_opset(opset)
    try:
        inference = Inference(overlap=check_overlap(overlap), gaussian=bool(gaussian))
    except ValueError as err:
        raise InputError(None, str(err)) from None
    runs = {"roi": load_run(roi, "roi"), "detail": load_run(detail, "detail")}
    margin = float(runs["detail"][0].get("roi_margin_mm", ROI_MARGIN_MM))
    return write_package([_stage_export(name, run) for name, run in runs.items()], out, roi_margin_mm=margin,
                         postprocess=PostProcess(), overwrite=overwrite, fp16=fp16, check=check, strict=strict,
                         opset=opset, sign_key=sign_key,
                         manifest_fields={"inference": inference, **({} if source is None else {"source": source})})


def final_checkpoint(run_dir: str | os.PathLike) -> Path:
    """The checkpoint a finished run is exported from: the best validation one where it exists, else the last."""
    run = Path(run_dir)
    return run / ckpt.BEST if (run / ckpt.BEST).is_file() else run / ckpt.LATEST


def write_finished_run(folder: str | os.PathLike, stage: str, preset_name: str, weights: dict[str, torch.Tensor], *,
                       intensity: dict[str, float], dataset: str, seed: int = 0, **record: Any) -> Path:
    """A finished run folder as ``pocketseg train`` leaves it (``config.json``, ``checkpoint_latest.pt``), holding
    ``weights`` of ``preset_name``; ``record`` adds RunConfig fields (epochs, lr, ...) describing where they came from."""
    preset = get_preset(preset_name, stage)
    folder = Path(folder)
    if folder.exists():
        raise OutputError(folder, "already exists; a run folder needs a new folder")
    ensure_dir(folder, "run folder")
    settings = {"epochs": 0, "iterations": 0, "batch_size": 1, "lr": 0.0, "schedule": "step", **record}
    cfg = RunConfig(stage=stage, preset=preset.to_dict(), intensity=dict(intensity), dataset=dataset, train_cases=[],
                    val_cases=[], seed=seed, **settings)
    write_json(folder / "config.json", asdict(cfg), indent=None)
    ckpt.save_checkpoint(folder / ckpt.LATEST, {"model": weights, "stage": stage, "preset": preset.name,
                                                "epoch": cfg.epochs, "finished": True})
    return folder


def write_untrained_run(folder: str | os.PathLike, stage: str, preset_name: str, *,
                        intensity: dict[str, float] | None = None, seed: int = 0) -> Path:
    """A run folder as ``pocketseg train`` leaves it, with He-initialised (untrained) weights.

    For timing and testing the deployment chain where no trained weights exist (the
    paper-size nets on a CPU-only machine): the outputs are meaningless, the cost is real.
    """
    preset = get_preset(preset_name, stage)
    torch.manual_seed(seed)
    net = PocketUNet(preset.unet_config(), deep_supervision=True)
    return write_finished_run(folder, stage, preset_name, net.state_dict(),
                              intensity=intensity or TYPICAL_CT_INTENSITY, dataset="untrained", seed=seed)


def untrained_package(out: str | os.PathLike, *, roi: str = "roi-cpu", detail: str = "detail-cpu",
                      intensity: dict[str, float] | None = None, seed: int = 0, fp16: bool = True,
                      check: bool = False, overwrite: bool = False) -> Path:
    """A model package of untrained nets of the given presets (see :func:`write_untrained_run`)."""
    with tempfile.TemporaryDirectory(prefix="pocketseg-untrained-") as tmp:
        roi_run = write_untrained_run(Path(tmp) / "roi", "roi", roi, intensity=intensity, seed=seed)
        detail_run = write_untrained_run(Path(tmp) / "detail", "detail", detail, intensity=intensity, seed=seed + 1)
        return export_package(roi_run, detail_run, out, overwrite=overwrite, fp16=fp16, check=check)
