"""The reference model: a cascade trained on synthetic phantoms only, for the demo and the accuracy guards.

    python -m pocketseg.benchmarks.reference_model [--out build/reference-model] [--publish models/reference]

(``make reference-model``.) The recipe (:data:`RECIPE`) is fixed and seeded: 20 fully labelled full-size
phantoms to train on, 10 held-out phantoms of another seed to score on, the ``roi-cpu`` ROI net and the
``detail-ref`` detail net (AdamW: in a short budget it learns where SGD with momentum 0.99 is still at
background, docs/reference-model.md), poly learning-rate decay, bf16 autocast where the CPU computes bf16
natively, no mirroring. On a machine with a CUDA GPU the same recipe trains there (AMP), which takes minutes.

Steps, each skipped when its output is complete, so an interrupted run continues where it stopped
(training resumes from its last checkpoint): synthesize -> train ROI -> train detail -> export the package
(fp32 and fp16 ONNX, weights, checked against PyTorch) -> predict the held-out phantoms with the full cascade
-> FLARE evaluation -> ``report.md`` / ``report.json`` / ``learning_curve.png``. ``--publish`` copies the
package and its report into the repository folder that ships it (at most 5 MB).

The model has seen nothing but phantoms: it is for the demo and for regression tests, not for real CT.
"""

from __future__ import annotations

import argparse
import json
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
    write_text,
)
from pocketseg.benchmarks.report import write_json
from pocketseg.errors import OutputError
from pocketseg.evaluation.evaluate import evaluate_folders
from pocketseg.evaluation.metrics import organ_column
from pocketseg.plotting import png_bytes, pyplot
from pocketseg.runtime.engines import cpu_bf16_support
from pocketseg.runtime.network import PocketUNet, count_parameters
from pocketseg.runtime.predict import predict
from pocketseg.synth.dataset import synthesize_dataset
from pocketseg.trainer import checkpoint as ckpt
from pocketseg.trainer.package import export_package
from pocketseg.trainer.presets import get_preset
from pocketseg.trainer.train import train

log = logging.getLogger(__name__)

#: What the reference model is trained and scored on, and how. Changing any value changes the model.
RECIPE: dict[str, Any] = {
    "train_data": {"full": 20, "seed": 2026},
    "heldout_data": {"full": 10, "seed": 9000},
    "roi": {"preset": "roi-cpu", "epochs": 16, "iterations": 50, "batch_size": 2, "optimizer": "adamw", "lr": 0.003,
            "schedule": "poly", "mirror": False, "val_fraction": 0.1, "val_every": 4, "seed": 0},
    "detail": {"preset": "detail-ref", "epochs": 55, "iterations": 50, "batch_size": 2, "optimizer": "adamw",
               "lr": 0.003, "schedule": "poly", "mirror": False, "val_fraction": 0.1, "val_every": 5, "seed": 0},
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


def _train(stage: str, data: Path, run: Path, cache: Path, device: str, cpu_bf16: bool) -> bool:
    """Train (or resume) one stage unless its run is finished; whether it trained now."""
    spec = RECIPE[stage]
    latest = run / ckpt.LATEST
    if latest.is_file() and ckpt.load_checkpoint(latest).get("finished"):
        return False
    train(data, stage=stage, out=run, resume=latest.is_file(), device=device, cache=cache, cpu_bf16=cpu_bf16,
          **spec)
    return True


def _source() -> dict[str, Any]:
    return {"trainer": "pocketseg reference-model recipe (pocketseg.benchmarks.reference_model)",
            "training_data": f"{RECIPE['train_data']['full']} synthetic phantoms, pocketseg synth seed "
                             f"{RECIPE['train_data']['seed']}",
            "intended_use": INTENDED_USE}


def _history(run: Path) -> list[dict[str, Any]]:
    return json.loads((run / "history.json").read_text())


def plot_learning_curves(runs: dict[str, Path]) -> bytes:
    """Train loss and validation mean DSC of both stages against the iteration."""
    plt = pyplot("The learning-curve plot")
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4))
    for ax, (stage, run) in zip(np.atleast_1d(axes), runs.items()):
        history = _history(run)
        per_epoch = RECIPE[stage]["iterations"]
        its = [h["epoch"] * per_epoch for h in history]
        ax.plot(its, [h["train_loss"] for h in history], color="tab:blue", label="train loss")
        ax.set_xlabel("iteration")
        ax.set_ylabel("train loss (CE + Dice)")
        ax.set_title(f"{stage} ({RECIPE[stage]['preset']})")
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
             f"- held-out data: {r['recipe']['heldout_data']['full']} phantoms, seed "
             f"{r['recipe']['heldout_data']['seed']} (never trained on)",
             f"- device: {r['device']}; {r['machine']}"]
    for stage in ("roi", "detail"):
        s = r["recipe"][stage]
        t = r["train"][stage]
        lines.append(f"- {stage}: preset `{s['preset']}` ({t['params']:,} parameters, spacing "
                     f"{' x '.join(f'{v:g}' for v in t['spacing_mm_zyx'])} mm, patch "
                     f"{'x'.join(map(str, t['patch_zyx']))}), {s['epochs']} epochs x {s['iterations']} iterations x "
                     f"batch {s['batch_size']} = {t['iterations']} iterations, {s['optimizer']}, lr {s['lr']} "
                     f"{s['schedule']}, mirroring {'on' if s['mirror'] else 'off'}, "
                     f"{t['seconds'] / 60:.1f} min; last validation mean DSC {t['last_val_mean_dice']:.3f}")
    steps = {"synth_train": "synthesis of the training set", "synth_heldout": "synthesis of the held-out set",
             "train_roi": "ROI training", "train_detail": "detail training", "export": "export",
             "predict_and_evaluate": "held-out prediction and evaluation"}
    timed = [f"{what} {r['seconds'][key] / 60:.1f} min" for key, what in steps.items() if key in r["seconds"]]
    untimed = [what for key, what in steps.items() if key not in r["seconds"]]
    lines += [f"- wall time of the recipe's steps on this machine: {', '.join(timed)}"
              + (f" (not recorded: {', '.join(untimed)})" if untimed else ""),
              f"- total: {sum(r['seconds'].values()) / 60:.1f} min", "",
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


def run(out: Path, *, progress: bool = True) -> dict[str, Any]:
    """Run (or continue) the recipe in ``out``; returns the report (also written to ``out``)."""
    ensure_dir(out, "reference-model folder")
    device, cpu_bf16, why = _device()
    log.info("reference model: training on %s", why)
    timings_path = out / "timings.json"
    # Wall time of each step, kept across interrupted runs (a step done in an earlier call keeps its time).
    timings: dict[str, float] = json.loads(timings_path.read_text()) if timings_path.is_file() else {}

    def timed(step: str, work) -> None:
        t0 = time.perf_counter()
        if work():
            timings[step] = round(time.perf_counter() - t0, 1)
            write_json(timings_path, timings, overwrite=True)

    train_data, heldout, cache = out / "train-data", out / "heldout", out / "cache"
    timed("synth_train", lambda: _synth(train_data, RECIPE["train_data"]))
    timed("synth_heldout", lambda: _synth(heldout, RECIPE["heldout_data"]))
    runs = {stage: out / "runs" / stage for stage in ("roi", "detail")}
    for stage, run_dir in runs.items():
        timed(f"train_{stage}", lambda: _train(stage, train_data, run_dir, cache, device, cpu_bf16))
    model = out / "model"
    timed("export", lambda: not (model / "manifest.json").is_file() and
          export_package(runs["roi"], runs["detail"], model, overwrite=True, source=_source()))
    predictions, evaluation = out / "predictions", out / "evaluation"
    summary: dict[str, Any] = {}

    def evaluate() -> bool:
        predict(heldout / "imagesTr", predictions, model, overwrite=True, progress=progress)
        summary.update(evaluate_folders(predictions, heldout / "labelsTr", evaluation, overwrite=True,
                                        progress=progress))
        return True

    timed("predict_and_evaluate", evaluate)

    train_info = {}
    for stage, run_dir in runs.items():
        preset = get_preset(RECIPE[stage]["preset"], stage)
        history = _history(run_dir)
        val = [h for h in history if h.get("val_dice")]
        train_info[stage] = {
            "params": count_parameters(PocketUNet(preset.unet_config())),
            "spacing_mm_zyx": list(preset.spacing_mm_zyx), "patch_zyx": list(preset.patch_zyx),
            "iterations": len(history) * RECIPE[stage]["iterations"],
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
        "export": json.loads((model / "export_report.json").read_text()),
        "package_bytes": sum((model / name).stat().st_size for name in PACKAGE_FILES if (model / name).is_file()),
    }
    write_json(out / "report.json", report, overwrite=True)
    atomic_write_bytes(out / "learning_curve.png", plot_learning_curves(runs), overwrite=True)
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


#: TotalSegmentator v2 "total" ids of the FLARE 2023 organs -> FLARE ids (ct_examples/NOTICE.md).
TOTALSEG_TO_FLARE = {5: 1, 2: 2, 1: 3, 7: 4, 52: 5, 63: 6, 8: 7, 9: 8, 4: 9, 15: 10, 6: 11, 19: 12, 3: 13}
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
        ts = np.asarray(ref_img.dataobj).astype(np.int32)
        truth = np.zeros(ts.shape, dtype=np.uint8)
        for ts_id, flare_id in TOTALSEG_TO_FLARE.items():
            truth[ts == ts_id] = flare_id
        pred = np.asarray(pred_img.dataobj).astype(np.uint8)
        organs = {}
        for organ in L.ORGAN_IDS:
            t, p = truth == organ, pred == organ
            if t.any() or p.any():
                organs[L.BY_ID[organ].display] = {"dsc": 2 * float((t & p).sum()) / float(t.sum() + p.sum()),
                                                  "reference_ml": float(t.sum()), "predicted_ml": float(p.sum())}
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
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.real_ct is not None:
        ensure_dir(args.out / "real-ct")
        rows = real_ct_scores(args.model or args.out / "model", args.real_ct, args.out / "real-ct")
        write_json(args.out / "real-ct" / "real_ct.json", rows, overwrite=True)
        print(real_ct_markdown(rows))
        return 0
    report = run(args.out, progress=not args.quiet)
    print(report_markdown(report))
    if args.publish is not None:
        print(f"published: {publish(args.out, args.publish)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
