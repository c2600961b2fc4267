"""The reference model: a cascade trained on synthetic phantoms only, for the demo and the accuracy guards.

    python -m pocketseg.benchmarks.reference_model [--out build/reference-model] [--publish models/reference]
        [--start-from PKG]

(``make reference-model``.) The recipe (:data:`RECIPE`) is fixed and seeded: 20 fully labelled full-size
phantoms to train on, 10 held-out phantoms of another seed to score on, the ``roi-cpu`` ROI net and the
``detail-ref`` detail net (AdamW: in a short budget it learns where SGD with momentum 0.99 is still at
background, docs/reference-model.md), poly learning-rate decay, bf16 autocast where the CPU computes bf16
natively, no mirroring. The detail net trains in three phases: on crops of the true organ box plus the ROI
margin, then (``detail_widen``, from phase 1's weights) on crops widened as the trained ROI net's boxes are,
then (``detail_more``, from phase 2's weights) on 40 phantoms of another seed, crops widened the same way.
On a machine with a CUDA GPU the same recipe trains there (AMP), which takes minutes.

Steps, each skipped when its output is complete, so an interrupted run continues where it stopped
(training resumes from its last checkpoint): synthesize -> train ROI -> train detail (phases 1 to 3) ->
export the package (fp32 and fp16 ONNX, weights, checked against PyTorch; again whenever the nets changed)
-> predict the held-out phantoms with the full cascade -> FLARE evaluation -> ``report.md`` /
``report.json`` / ``learning_curve.png``. ``--start-from PKG`` takes the ROI net and the detail net from a
package the recipe's first steps (or all of them) made, as its report says, instead of training those steps
again; the folder remembers it. From a package of every step nothing trains: the package is exported again
with the recipe's inference settings (``RECIPE["inference"]``, the package's sliding window) and scored.
``--publish`` copies the package and its report into the repository folder that ships it (at most 5 MB).

The model has seen nothing but phantoms: it is for the demo and for regression tests, not for real CT.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from pocketseg import labels as L
from pocketseg.atomic import (
    atomic_output_dir,
    atomic_write_bytes,
    ensure_dir,
    read_json,
    write_text,
)
from pocketseg.benchmarks.report import write_json
from pocketseg.errors import InputError, MissingDependencyError, OutputError
from pocketseg.evaluation.evaluate import evaluate_folders
from pocketseg.evaluation.metrics import dice, organ_column
from pocketseg.manifest import sha256_file
from pocketseg.plotting import png_bytes, pyplot
from pocketseg.runtime.engines import cpu_bf16_support
from pocketseg.runtime.network import PocketUNet, count_parameters
from pocketseg.runtime.predict import predict
from pocketseg.synth.dataset import synthesize_dataset
from pocketseg.trainer import checkpoint as ckpt
from pocketseg.trainer.package import export_package, final_checkpoint, write_finished_run
from pocketseg.trainer.presets import get_preset
from pocketseg.trainer.train import train

log = logging.getLogger(__name__)

#: What the reference model is trained and scored on, and how. Changing any value changes the model.
RECIPE: dict[str, Any] = {
    "train_data": {"full": 20, "seed": 2026},
    "heldout_data": {"full": 10, "seed": 9000},
    # Phantoms of another seed for phase 3 of the detail net (more steps on data it has not seen yet).
    "extra_data": {"full": 40, "seed": 2027},
    "roi": {"preset": "roi-cpu", "epochs": 16, "iterations": 50, "batch_size": 2, "optimizer": "adamw", "lr": 0.003,
            "schedule": "poly", "mirror": False, "val_fraction": 0.1, "val_every": 4, "seed": 0},
    "detail": {"preset": "detail-ref", "epochs": 55, "iterations": 50, "batch_size": 2, "optimizer": "adamw",
               "lr": 0.003, "schedule": "poly", "mirror": False, "val_fraction": 0.1, "val_every": 5, "seed": 0},
    # Phase 2 of the detail net: from phase 1's weights, on crops widened as the ROI net's boxes are (it also
    # marks bowel next to the organs, so its boxes reach up to 1.5x the organs' extent; docs/reference-model.md).
    "detail_widen": {"stage": "detail", "init": "detail", "preset": "detail-ref", "epochs": 15, "iterations": 50,
                     "batch_size": 2, "optimizer": "adamw", "lr": 0.001, "schedule": "poly", "mirror": False,
                     "crop_widen_mm": 60.0, "val_fraction": 0.1, "val_every": 5, "seed": 1},
    # Phase 3: from phase 2's weights, on the 40 extra phantoms, crops widened as in phase 2.
    "detail_more": {"stage": "detail", "init": "detail_widen", "data": "extra_data", "preset": "detail-ref",
                    "epochs": 15, "iterations": 50, "batch_size": 2, "optimizer": "adamw", "lr": 0.001,
                    "schedule": "poly", "mirror": False, "crop_widen_mm": 60.0, "val_fraction": 0.1, "val_every": 5,
                    "seed": 2},
    # The package's sliding window (manifest ``inference``). Not the paper's tile step 1.0: with tiles that abut,
    # this small net misses large parts of the big organs, depending on where the ROI box puts the tile borders
    # (docs/reference-model.md, "Overlapping tiles").
    "inference": {"overlap": 0.5, "gaussian": True},
}
#: The shipped package's limit (ONNX fp32 + fp16 + weights + report).
MAX_PUBLISHED_BYTES = 5 * 1024 * 1024
INTENDED_USE = "trained on synthetic phantoms only - for the demo and regression tests, not for real CT"
PACKAGE_FILES = ("manifest.json", "export_report.json", "roi.onnx", "roi_fp16.onnx", "roi.safetensors",
                 "detail.onnx", "detail_fp16.onnx", "detail.safetensors")
REPORT_FILES = ("report.md", "report.json", "learning_curve.png")


def _device() -> tuple[str, bool, str]:
    """(training device, bf16 autocast on the CPU, why)."""
    if torch.cuda.is_available():
        return "cuda", False, f"CUDA GPU {torch.cuda.get_device_name(0)} (AMP)"
    native, why = cpu_bf16_support()
    return "cpu", native, (f"CPU, bf16 autocast ({why})" if native else f"CPU, fp32 ({why})")


def _synth(folder: Path, spec: dict[str, int]) -> bool:
    """Synthesize the data set unless it is there; whether it was made now."""
    if (folder / "dataset.json").is_file():
        return False
    synthesize_dataset(folder, full=spec["full"], seed=spec["seed"], workers=min(2, os.cpu_count() or 1))
    return True


#: The data sets of the recipe and their folders in the recipe folder.
DATA_FOLDERS = {"train_data": "train-data", "extra_data": "extra-data", "heldout_data": "heldout"}
#: ... and the name of their synthesis in the recipe's timings.
SYNTH_STEPS = {"train_data": "synth_train", "extra_data": "synth_extra", "heldout_data": "synth_heldout"}


def _data_needed(taken: list[str]) -> set[str]:
    """The data sets a recipe folder makes: those of the steps it trains (not those taken from a start package)
    and the held-out set."""
    return {RECIPE[step].get("data", "train_data") for step in STEPS if step not in taken} | {"heldout_data"}


def _train(step: str, out: Path, runs: dict[str, Path], cache: Path, device: str, cpu_bf16: bool) -> bool:
    """Train (or resume) one step of the recipe unless its run is finished; whether it trained now."""
    spec = dict(RECIPE[step])
    stage, init = spec.pop("stage", step), spec.pop("init", None)
    data = out / DATA_FOLDERS[spec.pop("data", "train_data")]
    run_dir = runs[step]
    latest = run_dir / ckpt.LATEST
    if latest.is_file() and ckpt.load_checkpoint(latest).get("finished"):
        return False
    init_weights = None
    if init is not None and not latest.is_file():
        init_weights = final_checkpoint(runs[init])
    train(data, stage=stage, out=run_dir, resume=latest.is_file(), device=device, cache=cache, cpu_bf16=cpu_bf16,
          init_weights=init_weights, **spec)
    return True


#: The recipe's training steps in order; the package takes the ROI net and the last detail step.
STEPS = ("roi", "detail", "detail_widen", "detail_more")
#: The package's weight files: the ROI net, and the detail net of the last detail step the package was made by.
WEIGHT_FILES = ("roi", "detail")
#: In the recipe folder: which package the first steps came from (and its training record), once started from one.
START_MARKER = "start_from.json"
#: In the recipe folder: the SHA-256 of the checkpoints the package in ``model/`` was exported from.
EXPORT_INPUTS = "export_inputs.json"
_TRAIN_FIELDS = ("params", "spacing_mm_zyx", "patch_zyx", "iterations", "seconds", "last_val_mean_dice")


def start_package_report(package: Path) -> dict[str, Any]:
    """What ``--start-from`` keeps of a package the recipe made: its path, the steps it was made by (the first
    :data:`STEPS`, at least the ROI net and one detail step, possibly all), the SHA-256 of its ROI and detail weights
    and its training record; one clear error for a package that is not such a package."""
    package = Path(package)
    report = read_json(package / "report.json", missing="is missing: not a published reference model")
    manifest = read_json(package / "manifest.json", missing="is missing: not a model package")
    recipe = report.get("recipe") if isinstance(report, dict) else None
    if not isinstance(recipe, dict):
        raise InputError(package / "report.json", "holds no recipe: not a reference-model report")
    steps = [step for step in STEPS if step in recipe]
    if steps != list(STEPS[:len(steps)]) or len(steps) < 2:
        raise InputError(package / "report.json", f"was made by the steps {', '.join(steps) or '(none)'}: not the "
                                                  f"first steps of this recipe ({', '.join(STEPS)})")
    data = sorted({RECIPE[step].get("data", "train_data") for step in steps})
    differs = [f"{key}.{k}: package {recipe.get(key, {}).get(k)!r}, recipe {v!r}"
               for key in (*data, *steps) for k, v in RECIPE[key].items()
               if not isinstance(recipe.get(key), dict) or recipe[key].get(k) != v]
    if differs:
        raise InputError(package, "was not made by the first steps of this recipe (" + "; ".join(differs[:4])
                         + ("; ..." if len(differs) > 4 else "") + "); train from scratch instead")
    train_record = report.get("train", {})
    missing = [f"train.{step}.{f}" for step in steps for f in _TRAIN_FIELDS if f not in train_record.get(step, {})]
    missing += [k for k in ("device", "machine", "seconds") if k not in report]
    if missing:
        raise InputError(package / "report.json", f"lacks {', '.join(missing)}")
    sha = {}
    for name in WEIGHT_FILES:
        weights = package / f"{name}.safetensors"
        if not weights.is_file():
            raise InputError(weights, "is missing from the start package")
        intensity = manifest.get("stages", {}).get(name, {}).get("intensity")
        if not isinstance(intensity, dict):
            raise InputError(package / "manifest.json", f"has no intensity statistics of the {name} stage")
        sha[name] = sha256_file(weights)
    return {"package": str(package), "steps": steps, "sha256": sha,
            "train": {step: train_record[step] for step in steps},
            "device": report["device"], "machine": report["machine"], "seconds": report["seconds"],
            "intensity": {name: manifest["stages"][name]["intensity"] for name in WEIGHT_FILES}}


def _start_steps(start: dict[str, Any] | None) -> list[str]:
    """The steps a start record provides (one written before records named their steps: the first two)."""
    return [] if start is None else list(start.get("steps", STEPS[:2]))


def _run_from_package(start: dict[str, Any], step: str, run_dir: Path) -> None:
    """The finished run folder of ``step`` holding the start package's net of that stage (its weights and intensity
    statistics)."""
    try:
        from safetensors.torch import load_file  # optional (train extra), only with --start-from
    except ImportError:
        raise MissingDependencyError("safetensors", "--start-from", "train") from None
    spec = RECIPE[step]
    stage = spec.get("stage", step)
    weights_path = Path(start["package"]) / f"{stage}.safetensors"
    if sha256_file(weights_path) != start["sha256"][stage]:
        raise InputError(weights_path, "changed since this recipe folder was started from it")
    write_finished_run(run_dir, stage, spec["preset"], load_file(str(weights_path)),
                       intensity=start["intensity"][stage], dataset=f"the {stage} net of {start['package']}",
                       seed=spec["seed"], epochs=spec["epochs"], iterations=spec["iterations"],
                       batch_size=spec["batch_size"], lr=spec["lr"], schedule=spec["schedule"], mirror=spec["mirror"],
                       optimizer=spec["optimizer"])


def _start(out: Path, start_from: Path | None) -> dict[str, Any] | None:
    """The start record of the recipe folder: from ``start_from`` (checked against what ``out`` holds), or the one
    ``out`` was started with, or None (everything trained here)."""
    marker = out / START_MARKER
    recorded = read_json(marker) if marker.is_file() else None
    if start_from is None:
        return recorded
    start = start_package_report(start_from)
    if recorded is not None and (recorded["sha256"] != start["sha256"]
                                 or _start_steps(recorded) != _start_steps(start)):
        raise InputError(out, f"was started from other nets ({recorded['package']}); use a new --out")
    trained_here = [step for step in start["steps"] if (out / "runs" / step).exists()]
    if recorded is None and trained_here:
        raise InputError(out, f"holds {' and '.join(trained_here)} runs trained here; --start-from needs a new --out")
    return start


def _source() -> dict[str, Any]:
    return {"trainer": "pocketseg reference-model recipe (pocketseg.benchmarks.reference_model)",
            "training_data": f"{RECIPE['train_data']['full']} + {RECIPE['extra_data']['full']} synthetic phantoms, "
                             f"pocketseg synth seeds {RECIPE['train_data']['seed']} and {RECIPE['extra_data']['seed']}",
            "intended_use": INTENDED_USE}


def _history(run: Path) -> list[dict[str, Any]]:
    path = run / "history.json"
    return read_json(path) if path.is_file() else []


def plot_learning_curves(histories: dict[str, list[dict[str, Any]]]) -> bytes:
    """Train loss and validation mean DSC of each step the recipe trained here, against the iteration."""
    plt = pyplot("The learning-curve plot")
    if not histories:
        raise ValueError("no training step ran in this recipe folder: nothing to plot")
    fig, axes = plt.subplots(1, len(histories), figsize=(6 * len(histories), 4))
    for ax, (step, history) in zip(np.atleast_1d(axes), histories.items()):
        per_epoch = RECIPE[step]["iterations"]
        its = [h["epoch"] * per_epoch for h in history]
        ax.plot(its, [h["train_loss"] for h in history], color="tab:blue", label="train loss")
        ax.set_xlabel("iteration")
        ax.set_ylabel("train loss (CE + Dice)")
        ax.set_title(f"{step} ({RECIPE[step]['preset']})")
        val = [h for h in history if h.get("val_dice")]
        if val:
            ax2 = ax.twinx()
            ax2.plot([h["epoch"] * per_epoch for h in val], [h["val_mean_dice"] for h in val], "o-", color="black",
                     label="validation mean DSC")
            ax2.set_ylim(0, 1)
            ax2.set_ylabel("validation mean DSC")
            ax2.legend(loc="center right")
        ax.legend(loc="upper right")
    fig.tight_layout()
    return png_bytes(fig, dpi=80)


def _organ_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-class rows (the 13 organs and the tumor) of an evaluation summary."""
    rows = []
    for label_id in L.FOREGROUND_IDS:
        col = organ_column(label_id)
        rows.append({"id": label_id, "name": L.BY_ID[label_id].display, "dsc": summary["mean"][f"{col}_DSC"],
                     "dsc_std": summary["std"][f"{col}_DSC"], "nsd": summary["mean"][f"{col}_NSD"]})
    return rows


def report_markdown(report: dict[str, Any]) -> str:
    """The training report of the reference model (what ships beside the package)."""
    r = report
    lines = ["# The pocketseg reference model", "",
             f"**{INTENDED_USE}.** It has never seen a real CT; on real scans it is not expected to work "
             "(docs/reference-model.md gives what it does on the real CT examples).", "",
             "## Recipe", "",
             f"- training data: {r['recipe']['train_data']['full']} fully labelled full-size phantoms, "
             f"`pocketseg synth --seed {r['recipe']['train_data']['seed']}`",
             f"- extra training data (step {STEPS[-1]}): {r['recipe']['extra_data']['full']} phantoms, "
             f"`pocketseg synth --seed {r['recipe']['extra_data']['seed']}`",
             f"- held-out data: {r['recipe']['heldout_data']['full']} phantoms, seed "
             f"{r['recipe']['heldout_data']['seed']} (never trained on)",
             f"- device: {r['device']}; {r['machine']}"]
    for step in STEPS:
        s, t = r["recipe"][step], r["train"][step]
        extra = []
        if s.get("init"):
            extra.append(f"starts from the weights of step {s['init']}")
        if s.get("crop_widen_mm"):
            extra.append(f"training crops widened by up to {s['crop_widen_mm']:g} mm per side")
        if s.get("data", "train_data") != "train_data":
            extra.append(f"trained on the {s['data'].replace('_', ' ')}")
        origin = (f" (trained earlier by the same recipe, taken from `{t['from_package']}`)"
                  if t.get("from_package") else "")
        lines.append(f"- {step}: preset `{s['preset']}` ({t['params']:,} parameters, spacing "
                     f"{' x '.join(f'{v:g}' for v in t['spacing_mm_zyx'])} mm, patch "
                     f"{'x'.join(map(str, t['patch_zyx']))}), {s['epochs']} epochs x {s['iterations']} iterations x "
                     f"batch {s['batch_size']} = {t['iterations']} iterations, {s['optimizer']}, lr {s['lr']} "
                     f"{s['schedule']}, mirroring {'on' if s['mirror'] else 'off'}"
                     + "".join(f", {e}" for e in extra)
                     + f", {t['seconds'] / 60:.1f} min; last validation mean DSC {t['last_val_mean_dice']:.3f}"
                     + origin)
    steps = {"synth_train": "synthesis of the training set", "synth_extra": "synthesis of the extra training set",
             "synth_heldout": "synthesis of the held-out set", "train_roi": "ROI training",
             "train_detail": "detail training (phase 1)", "train_detail_widen": "detail training (phase 2, widened crops)",
             "train_detail_more": "detail training (phase 3, extra phantoms)", "export": "export",
             "predict_and_evaluate": "held-out prediction and evaluation"}
    start = r.get("start_from")
    if start:
        taken = _start_steps(start)
        made = {SYNTH_STEPS[key] for key in _data_needed(taken)}
        steps = {k: v for k, v in steps.items()
                 if k.removeprefix("train_") not in taken and (not k.startswith("synth_") or k in made)}
        lines.append(f"- steps {', '.join(taken)} come from `{start['package']}`, which the same recipe made on "
                     f"{start['device']}; {start['machine']}")
    timed = [f"{what} {r['seconds'][key] / 60:.1f} min" for key, what in steps.items() if key in r["seconds"]]
    untimed = [what for key, what in steps.items() if key not in r["seconds"]]
    lines += [f"- wall time of the recipe's steps on this machine: {', '.join(timed)}"
              + (f" (not recorded: {', '.join(untimed)})" if untimed else ""),
              f"- total of these steps: {sum(r['seconds'].values()) / 60:.1f} min", "",
              "## Held-out phantoms, full cascade in original space (FLARE 2023 DSC / NSD)", "",
              "| id | organ | DSC | ± | NSD |", "|--:|:--|--:|--:|--:|"]
    for row in r["heldout"]["organs"]:
        lines.append(f"| {row['id']} | {row['name']} | {row['dsc']:.3f} | {row['dsc_std']:.3f} | {row['nsd']:.3f} |")
    lines += [f"| | **mean of the 13 organs** | **{r['heldout']['organ_mean_dsc']:.3f}** | | "
              f"**{r['heldout']['organ_mean_nsd']:.3f}** |", "",
              "## Export checks", "",
              "| net | fp32 ONNX vs PyTorch argmax | fp16 vs fp32 argmax | fp16 verified |", "|:--|--:|--:|:--|"]
    for stage in ("roi", "detail"):
        e = r["export"][stage]
        lines.append(f"| {stage} | {100 * e['fp32_argmax_agreement']:.3f} % | {100 * e['fp16_argmax_agreement']:.3f} % "
                     f"| {'yes' if e['fp16_verified'] else 'no'} |")
    lines += ["", f"Package size: {r['package_bytes'] / 1e6:.2f} MB. Learning curves: `learning_curve.png`.", ""]
    return "\n".join(lines)


def run(out: Path, *, start_from: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Run (or continue) the recipe in ``out``; returns the report (also written to ``out``).

    ``start_from``: a package the recipe's first steps made (checked by :func:`start_package_report`); its ROI net
    and detail net are taken from it instead of training those steps again, and the report carries their training
    record from its report.
    """
    start = _start(Path(out), start_from)
    ensure_dir(out, "reference-model folder")
    if start is not None and not (out / START_MARKER).is_file():
        write_json(out / START_MARKER, start)
    device, cpu_bf16, why = _device()
    log.info("reference model: training on %s", why)
    timings_path = out / "timings.json"
    # Wall time of each step, kept across interrupted runs (a step done in an earlier call keeps its time).
    timings: dict[str, float] = read_json(timings_path) if timings_path.is_file() else {}

    def timed(step: str, work) -> None:
        t0 = time.perf_counter()
        if work():
            timings[step] = round(time.perf_counter() - t0, 1)
            write_json(timings_path, timings, overwrite=True)

    heldout, cache = out / DATA_FOLDERS["heldout_data"], out / "cache"
    taken = _start_steps(start)
    needed = _data_needed(taken)
    for key, name in SYNTH_STEPS.items():
        if key in needed:
            timed(name, lambda key=key: _synth(out / DATA_FOLDERS[key], RECIPE[key]))
    runs = {step: out / "runs" / step for step in STEPS}
    # From a start package: its ROI net and the net of the last detail step it was made by become finished runs;
    # the detail steps before that one are not needed (the next step starts from the last one's weights).
    materialized = {"roi", taken[-1]} if taken else set()
    for step in STEPS:
        if step in materialized:
            if not (runs[step] / ckpt.LATEST).is_file():
                shutil.rmtree(runs[step], ignore_errors=True)  # an interrupted copy
                _run_from_package(start, step, runs[step])
        elif step not in taken:
            timed(f"train_{step}", lambda step=step: _train(step, out, runs, cache, device, cpu_bf16))
    model = out / "model"
    # The package is exported again whenever the nets it was made from are not those of the runs now.
    inputs = {"roi": sha256_file(final_checkpoint(runs["roi"])), "detail": sha256_file(final_checkpoint(runs[STEPS[-1]])),
              "inference": RECIPE["inference"]}

    def export() -> bool:
        done = (model / "manifest.json").is_file() and (out / EXPORT_INPUTS).is_file() \
            and read_json(out / EXPORT_INPUTS) == inputs
        if not done:
            export_package(runs["roi"], runs[STEPS[-1]], model, overwrite=True, source=_source(), **RECIPE["inference"])
            write_json(out / EXPORT_INPUTS, inputs, overwrite=True)
        return not done

    timed("export", export)
    predictions, evaluation = out / "predictions", out / "evaluation"
    summary: dict[str, Any] = {}

    def evaluate() -> bool:
        predict(heldout / "imagesTr", predictions, model, overwrite=True, progress=progress)
        summary.update(evaluate_folders(predictions, heldout / "labelsTr", evaluation, overwrite=True,
                                        progress=progress))
        return True

    timed("predict_and_evaluate", evaluate)

    histories = {step: _history(runs[step]) for step in STEPS if step not in taken}
    train_info = {}
    for step in STEPS:
        if step in taken:
            train_info[step] = dict(start["train"][step], from_package=start["package"])
            continue
        spec = RECIPE[step]
        preset = get_preset(spec["preset"], spec.get("stage", step))
        history = histories[step]
        val = [h for h in history if h.get("val_dice")]
        train_info[step] = {
            "params": count_parameters(PocketUNet(preset.unet_config())),
            "spacing_mm_zyx": list(preset.spacing_mm_zyx), "patch_zyx": list(preset.patch_zyx),
            "iterations": len(history) * spec["iterations"],
            "seconds": float(sum(h["seconds"] for h in history)),
            "last_val_mean_dice": val[-1]["val_mean_dice"] if val else float("nan"),
            "last_val_dice": val[-1]["val_dice"] if val else {},
        }
    organs = _organ_rows(summary)
    report = {
        "recipe": RECIPE, "device": why,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs",
        "train": train_info,
        "seconds": timings,
        "heldout": {"cases": summary["num_cases"], "organs": organs,
                    "organ_mean_dsc": summary["organ_mean_DSC"], "organ_mean_nsd": summary["organ_mean_NSD"]},
        "export": read_json(model / "export_report.json"),
        "package_bytes": sum((model / name).stat().st_size for name in PACKAGE_FILES if (model / name).is_file()),
    }
    if start is not None:
        report["start_from"] = {k: start[k] for k in ("package", "sha256", "device", "machine", "seconds")}
        report["start_from"]["steps"] = taken
        for step in taken:  # times of runs this folder once trained itself do not count
            timings.pop(f"train_{step}", None)
    write_json(out / "report.json", report, overwrite=True)
    trained_here = {step: h for step, h in histories.items() if h}
    if not trained_here and start is not None:  # nothing trained here: the curves of the nets are the package's
        taken_curves = Path(start["package"]) / "learning_curve.png"
        if not taken_curves.is_file():
            raise InputError(taken_curves, "is missing from the start package: no learning curves to report")
        curves = taken_curves.read_bytes()
    else:
        curves = plot_learning_curves(trained_here)
    atomic_write_bytes(out / "learning_curve.png", curves, overwrite=True)
    write_text(out / "report.md", report_markdown(report), overwrite=True)
    return report


def publish(out: Path, target: Path) -> Path:
    """Copy the package and its report from the recipe folder ``out`` into ``target`` (replaced whole)."""
    files = [out / "model" / name for name in PACKAGE_FILES] + [out / name for name in REPORT_FILES]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise OutputError(target, f"cannot publish: the recipe's files are missing: {', '.join(missing)}")
    size = sum(f.stat().st_size for f in files)
    if size > MAX_PUBLISHED_BYTES:
        raise OutputError(target, f"the package and report take {size / 2**20:.2f} MiB, over the "
                                  f"{MAX_PUBLISHED_BYTES / 2**20:.0f} MiB the repository ships")
    with atomic_output_dir(target, overwrite=True) as tmp:
        for f in files:
            shutil.copy2(f, tmp / f.name)
    return target


#: The real CT examples that come with a reference segmentation: (scan, reference).
REAL_CT_PAIRS = (("example_ct_sm.nii.gz", "example_seg.nii.gz"), ("dicom_series", "example_seg_dicom.nii.gz"))


def real_ct_scores(model: Path, examples: Path, out: Path) -> list[dict[str, Any]]:
    """DSC per FLARE organ of ``model`` on the real CT examples, against their TotalSegmentator references.

    Both label maps are compared on the reference's voxel grid after reorienting each to RAS (the
    prediction of a DICOM series is written in the series' own orientation). Organs absent from both
    are left out; an organ the model misses or invents scores 0.
    """
    rows = []
    for scan, reference in REAL_CT_PAIRS:
        if not (examples / scan).exists() or not (examples / reference).is_file():
            log.warning("%s: %s or %s missing; left out", examples, scan, reference)
            continue
        target = out / f"{Path(scan).name.split('.')[0]}_pred.nii.gz"
        predict(examples / scan, target, model, overwrite=True, progress=False)
        ref_img = nib.as_closest_canonical(nib.load(examples / reference))
        pred_img = nib.as_closest_canonical(nib.load(target))
        if pred_img.shape != ref_img.shape or not np.allclose(pred_img.affine, ref_img.affine, atol=1e-2):
            raise OutputError(target, f"is not on the grid of {examples / reference}")
        truth = L.totalsegmentator_to_flare(ref_img.dataobj)
        pred = np.asarray(pred_img.dataobj).astype(np.uint8)
        organs = {}
        for organ in L.ORGAN_IDS:
            t, p = truth == organ, pred == organ
            if t.any() or p.any():
                organs[L.BY_ID[organ].display] = {"dsc": dice(p, t), "reference_ml": float(t.sum()),
                                                  "predicted_ml": float(p.sum())}
        ml = float(np.prod(ref_img.header.get_zooms()[:3])) / 1000
        for v in organs.values():
            v["reference_ml"] *= ml
            v["predicted_ml"] *= ml
        rows.append({"scan": scan, "shape": list(ref_img.shape), "organs": organs,
                     "mean_dsc": float(np.mean([v["dsc"] for v in organs.values()])) if organs else float("nan")})
    return rows


def real_ct_markdown(rows: list[dict[str, Any]]) -> str:
    lines = []
    for row in rows:
        lines += [f"### {row['scan']} ({'x'.join(map(str, row['shape']))})", "",
                  "| organ | DSC | reference ml | predicted ml |", "|:--|--:|--:|--:|"]
        for name, v in row["organs"].items():
            lines.append(f"| {name} | {v['dsc']:.3f} | {v['reference_ml']:.1f} | {v['predicted_ml']:.1f} |")
        lines += [f"| **mean** | **{row['mean_dsc']:.3f}** | | |", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("build/reference-model"),
                        help="recipe folder: data, runs, package, report [build/reference-model]")
    parser.add_argument("--publish", type=Path, default=None,
                        help="copy the package and report into this folder (replaced), e.g. models/reference")
    parser.add_argument("--real-ct", type=Path, default=None, metavar="DIR",
                        help="only score the model of --out (or --model) on the real CT examples in DIR "
                             "(../shared/data/ct_examples) against their reference segmentations")
    parser.add_argument("--model", type=Path, default=None, help="the package --real-ct scores [OUT/model]")
    parser.add_argument("--start-from", dest="start_from", type=Path, default=None, metavar="PKG",
                        help="take the ROI net and the detail net from this package, which the recipe's first "
                             "steps (or all of them) made, as its report.json says, instead of training those "
                             "steps again")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.real_ct is not None:
        ensure_dir(args.out / "real-ct")
        rows = real_ct_scores(args.model or args.out / "model", args.real_ct, args.out / "real-ct")
        write_json(args.out / "real-ct" / "real_ct.json", rows, overwrite=True)
        print(real_ct_markdown(rows))
        return 0
    report = run(args.out, start_from=args.start_from, progress=not args.quiet)
    print(report_markdown(report))
    if args.publish is not None:
        print(f"published: {publish(args.out, args.publish)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
