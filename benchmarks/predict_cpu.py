"""The cascade runtime against nnU-Net v2's predictor on the CPU: same nets, same weights, same scan.

    python -m pocketseg.benchmarks.predict_cpu [--model PKG] [--slices 215] [--out DIR] [--repeats 1]

Each pipeline runs in a fresh process, as a user runs it: imports, model loading,
reading the NIfTI file, both stages, post-processing and writing the label map.
The parent measures the process's wall time and its peak resident memory (the
kernel's ``ru_maxrss`` of that child), and the child reports its own stage times.
Peer settings are the paper's: tile step 1 (no overlap beyond covering the volume),
no Gaussian blending, no test-time augmentation; both use every core.

Without ``--model`` the nets are untrained ``roi-cpu``/``detail-cpu`` (He
initialisation, fixed seed): their labels are meaningless but their cost is real.
Label agreement needs nets whose outputs mean something: ``--trained-tiny`` first
trains ``roi-tiny``/``detail-tiny`` on synthetic data for a few minutes (enough to
find the abdomen and the large organs) and compares the pipelines with those. The
scan is a synthetic 512x512xN phantom (:mod:`pocketseg.synth`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pocketseg.atomic import ensure_dir
from pocketseg.benchmarks.report import write_json
from pocketseg.imageio import load_volume
from pocketseg.layout import image_name
from pocketseg.nifti import read_nifti, write_labels, write_nifti
from pocketseg.runtime.cascade import CascadePredictor
from pocketseg.runtime.resample import resample_labels, separate_z_axis
from pocketseg.synth.dataset import synthesize_dataset
from pocketseg.synth.phantom import make_phantom
from pocketseg.trainer.package import export_package, untrained_package
from pocketseg.trainer.train import train
from pocketseg.volume import canonical_zyx

log = logging.getLogger(__name__)

PIPELINES = ("pocketseg", "nnunet")


def _child(which: str, model: Path, case: Path, labels_out: Path, report_out: Path) -> None:
    """Run one pipeline end to end in this process and write its labels and stage times."""
    t0 = time.perf_counter()
    if which == "pocketseg":
        predictor = CascadePredictor(model, device="cpu", backend="auto")
    else:
        from pocketseg.benchmarks.peers.nnunet import NnUNetCascade  # the peer needs nnU-Net (peers extra)

        predictor = NnUNetCascade(model, device="cpu", tile_step_size=1.0, use_gaussian=False)
    t_load = time.perf_counter()
    volume = load_volume(case)
    t_read = time.perf_counter()
    if which == "pocketseg":
        result = predictor.predict(volume)
        labels, stages = result.labels, result.timings_s
    else:
        labels = predictor.predict(volume)
        stages = predictor.last_timings
    t_pred = time.perf_counter()
    write_labels(labels, labels_out, reference=volume, overwrite=True)
    t_write = time.perf_counter()
    report = {"import_and_load_s": t_load - t0, "read_s": t_read - t_load, "predict_s": t_pred - t_read,
              "write_s": t_write - t_pred, "stages_s": stages}
    write_json(report_out, report, overwrite=True)


def _run_child(which: str, model: Path, case: Path, work: Path) -> dict:
    labels_out = work / f"{which}_labels.nii.gz"
    report_out = work / f"{which}_report.json"
    cmd = [sys.executable, "-m", "pocketseg.benchmarks.predict_cpu", "--child", which, "--model", str(model),
           "--case", str(case), "--labels-out", str(labels_out), "--report-out", str(report_out)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{which} pipeline failed with exit status {proc.returncode}")
    report = json.loads(report_out.read_text())
    report.update(wall_s=wall, peak_rss_mb=usage.ru_maxrss / 1024.0, labels=str(labels_out))
    return report


def trained_tiny_package(out: Path, iterations: int = 300, seed: int = 0) -> Path:
    """Train roi-tiny and detail-tiny briefly on synthetic data and export them (reused when present)."""
    model = out / "model_trained_tiny"
    if (model / "manifest.json").is_file():
        return model
    data = out / "tiny-train-data"
    if not (data / "dataset.json").is_file():
        synthesize_dataset(data, full=8, seed=seed + 500, matrix=256, slices=96, workers=2, overwrite=True)
    runs = {}
    for stage, preset in (("roi", "roi-tiny"), ("detail", "detail-tiny")):
        runs[stage] = out / f"tiny-run-{stage}"
        if runs[stage].exists():
            shutil.rmtree(runs[stage])
        train(data, stage=stage, preset=preset, epochs=1, out=runs[stage], iterations=iterations, val_fraction=0.25,
              val_every=1, device="cpu", seed=seed, cache=out / "tiny-cache")
    return export_package(runs["roi"], runs["detail"], model, fp16=False, overwrite=True)


def roi_stage_agreement(model: Path, case: Path) -> dict:
    """Labels of the ROI net alone, brought back to the scan's canonical grid by each pipeline.

    The full cascades of barely trained nets can both be empty; the ROI net learns fast, so its
    labels compare the two pipelines' preprocessing, tiling and resampling back on a network
    whose output means something.
    """
    from pocketseg.benchmarks.peers.nnunet import NnUNetCascade  # the peer needs nnU-Net (peers extra)
    image, spacing = canonical_zyx(load_volume(case))
    ours = CascadePredictor(model, device="cpu")
    roi = ours.manifest.roi
    small = ours._segment_stage(roi, image, spacing, 1)
    mine = resample_labels(small, image.shape, separate_z=separate_z_axis(roi.spacing_mm_zyx, spacing))
    theirs = NnUNetCascade(model, device="cpu").predict_stage("roi", image, spacing)
    both = (mine > 0) & (theirs > 0)
    total = int((mine > 0).sum() + (theirs > 0).sum())
    return {"voxels": float((mine == theirs).mean()), "dice_foreground": 2 * int(both.sum()) / total if total else 1.0,
            "foreground_count": {"pocketseg": int((mine > 0).sum()), "nnunet": int((theirs > 0).sum())}}


def run(out: Path, model: Path | None, slices: int, seed: int, repeats: int, pipelines=PIPELINES,
        trained_tiny: bool = False) -> dict:
    ensure_dir(out)
    case = out / image_name(f"bench_512x512x{slices}")
    if not case.is_file():
        ph = make_phantom(seed, slices=slices, orientation="LPS")
        write_nifti(ph.image, case, affine=ph.affine)
    if model is None and trained_tiny:
        model = trained_tiny_package(out, seed=seed)
    if model is None:
        model = out / "model_untrained_cpu"
        if not (model / "manifest.json").is_file():
            untrained_package(model, roi="roi-cpu", detail="detail-cpu", seed=seed, fp16=False, overwrite=True)
    results: dict[str, list[dict]] = {name: [] for name in pipelines}
    for _ in range(repeats):
        for name in pipelines:
            log.info("running %s", name)
            results[name].append(_run_child(name, model, case, out))
    best = {name: min(runs, key=lambda r: r["wall_s"]) for name, runs in results.items()}
    summary: dict = {"case": str(case), "shape": list(read_nifti(case).shape), "model": str(model),
                     "cpu_count": os.cpu_count(), "repeats": repeats, "runs": results, "best": best}
    if set(pipelines) == set(PIPELINES):
        ours = np.asarray(read_nifti(best["pocketseg"]["labels"]).data)
        peer = np.asarray(read_nifti(best["nnunet"]["labels"]).data)
        fg = (ours > 0) | (peer > 0)
        summary["agreement"] = {
            "voxels": float((ours == peer).mean()),
            "foreground_voxels": float((ours == peer)[fg].mean()) if fg.any() else None,
            "foreground_count": {"pocketseg": int((ours > 0).sum()), "nnunet": int((peer > 0).sum())},
        }
        summary["roi_stage_agreement"] = roi_stage_agreement(model, case)
        summary["ratios"] = {
            "end_to_end_speedup": best["nnunet"]["wall_s"] / best["pocketseg"]["wall_s"],
            "predict_speedup": best["nnunet"]["predict_s"] / best["pocketseg"]["predict_s"],
            "peak_rss_ratio": best["pocketseg"]["peak_rss_mb"] / best["nnunet"]["peak_rss_mb"],
        }
    return summary


def _print(summary: dict) -> None:
    print(f"case {summary['case']} shape {summary['shape']}, {summary['cpu_count']} CPUs, model {summary['model']}")
    print(f"{'pipeline':<10} {'wall s':>8} {'load s':>7} {'read s':>7} {'predict s':>9} {'write s':>7} {'peak RSS MB':>11}  stages")
    for name, r in summary["best"].items():
        stages = ", ".join(f"{k} {v:.2f}" for k, v in r["stages_s"].items())
        print(f"{name:<10} {r['wall_s']:8.2f} {r['import_and_load_s']:7.2f} {r['read_s']:7.2f} {r['predict_s']:9.2f} "
              f"{r['write_s']:7.2f} {r['peak_rss_mb']:11.0f}  {stages}")
    if "ratios" in summary:
        r, a = summary["ratios"], summary["agreement"]
        fg_text = "-" if a["foreground_voxels"] is None else f"{100 * a['foreground_voxels']:.2f} %"
        print(f"end-to-end speed-up {r['end_to_end_speedup']:.2f}x (target >= 3), predict-only {r['predict_speedup']:.2f}x, "
              f"peak RSS ratio {r['peak_rss_ratio']:.2f} (target <= 0.5), label agreement {100 * a['voxels']:.3f} % "
              f"(target >= 99 %), on foreground voxels {fg_text} "
              f"(foreground voxels: {a['foreground_count']})")
        r = summary["roi_stage_agreement"]
        print(f"ROI net alone, labels on the scan's grid: agreement {100 * r['voxels']:.3f} %, foreground Dice "
              f"{r['dice_foreground']:.4f} (foreground voxels: {r['foreground_count']})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-output/predict_cpu"))
    parser.add_argument("--model", type=Path, default=None, help="model package (default: untrained CPU presets)")
    parser.add_argument("--slices", type=int, default=215)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--trained-tiny", action="store_true",
                        help="train roi-tiny/detail-tiny for a few minutes and compare with those (label agreement)")
    parser.add_argument("--only", choices=PIPELINES, default=None, help="run one pipeline only")
    parser.add_argument("--child", choices=PIPELINES, help=argparse.SUPPRESS)
    parser.add_argument("--case", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--labels-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--report-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.child:
        _child(args.child, args.model, args.case, args.labels_out, args.report_out)
        return 0
    summary = run(args.out, args.model, args.slices, args.seed, args.repeats,
                  pipelines=(args.only,) if args.only else PIPELINES, trained_tiny=args.trained_tiny)
    name = "predict_cpu_trained_tiny.json" if args.trained_tiny and args.model is None else "predict_cpu.json"
    write_json(args.out / name, summary, overwrite=True)
    _print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
