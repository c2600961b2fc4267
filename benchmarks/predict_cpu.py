"""The cascade runtime against nnU-Net v2's predictor on the CPU: same nets, same weights, same scan.

    python -m pocketseg.benchmarks.predict_cpu [--model PKG] [--slices 215] [--out DIR] [--repeats 2]
        [--pipelines openvino,openvino-bf16,onnxruntime,nnunet]

Pipelines: pocketseg on OpenVINO fp32 (``openvino``), on OpenVINO bf16 (``openvino-bf16``,
only on a CPU with native bf16) and on ONNX Runtime (``onnxruntime``), and nnU-Net v2's
predictor (``nnunet``) running the same nets through torch. The stage profile of each
pocketseg run (read, ROI resampling, ROI net, ROI box, detail resampling, detail net,
labels back, components, paste, write) gives the share of the time outside the networks.
OpenVINO's compiled-model cache lives in the output folder; with ``--repeats 2`` (the
default) the best run of each pipeline is a run with a warm cache, as every run after the
first is for a user.

Each pipeline runs in a fresh process, as a user runs it: imports, model loading,
reading the NIfTI file, both stages, post-processing and writing the label map.
The parent measures the process's wall time; the child reports its stage times and
its own peak resident memory (``VmHWM``: see :func:`pocketseg.benchmarks.memory.own_peak_rss_mb`).
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
from pocketseg.benchmarks.cpu_pipeline import NETWORK_PARTS, OURS, PIPELINES
from pocketseg.benchmarks.report import write_json
from pocketseg.imageio import load_volume
from pocketseg.layout import image_name
from pocketseg.nifti import read_nifti, write_nifti
from pocketseg.runtime.cascade import CascadePredictor
from pocketseg.runtime.engines import (
    OPENVINO_CACHE_ENV,
    cpu_bf16_support,
    probe_backends,
)
from pocketseg.runtime.resample import resample_labels, separate_z_axis
from pocketseg.synth.dataset import synthesize_dataset
from pocketseg.synth.phantom import make_phantom
from pocketseg.trainer.package import export_package, untrained_package
from pocketseg.trainer.train import train
from pocketseg.volume import canonical_zyx

log = logging.getLogger(__name__)

def available_pipelines(wanted=PIPELINES) -> tuple[tuple[str, ...], dict[str, str]]:
    """(the pipelines of ``wanted`` this machine runs, {pipeline left out: why})."""
    status = probe_backends(import_torch=False)
    skipped = {}
    for name, (backend, precision) in OURS.items():
        if name not in wanted:
            continue
        if not (status[backend].installed and "cpu" in status[backend].devices):
            skipped[name] = f"{backend} does not run on this CPU here ({status[backend].detail or 'not installed'})"
        elif precision == "bf16" and not (native := cpu_bf16_support())[0]:
            skipped[name] = native[1]
    return tuple(n for n in wanted if n not in skipped), skipped


def run_pipeline(which: str, model: Path, case: Path, work: Path) -> dict:
    """One pipeline in a fresh process: its report (with the child's own peak RSS) and wall time."""
    labels_out = work / f"{which}_labels.nii.gz"
    report_out = work / f"{which}_report.json"
    cmd = [sys.executable, "-m", "pocketseg.benchmarks.cpu_pipeline", which, "--model", str(model),
           "--case", str(case), "--labels-out", str(labels_out), "--report-out", str(report_out)]
    # A cache of compiled OpenVINO models of this benchmark's own: the first run compiles, later ones load.
    env = {**os.environ, OPENVINO_CACHE_ENV: str(work / "openvino-cache")}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    _, status, _ = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{which} pipeline failed with exit status {proc.returncode}")
    report = json.loads(report_out.read_text())
    report.update(wall_s=wall, labels=str(labels_out))
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


def profile(report: dict) -> dict[str, float]:
    """The stage profile of one pocketseg run (seconds): read, the cascade's parts, write, and their shares."""
    t = report["stages_s"]
    parts = {"read": report["read_s"], "upload": t["upload"]}
    parts.update({k: t[k] for k in ("roi.resample", "roi.net", "roi.box", "detail.resample", "detail.net",
                                    "detail.back", "postprocess.components") if k in t})
    named = sum(v for k, v in t.items() if "." in k)
    # What the parts above leave out of the stages: the crop, the label mapping, pasting into the full volume.
    parts["crop and paste"] = max(0.0, sum(t[k] for k in ("roi", "detail", "postprocess")) - named)
    parts["write"] = report["write_s"]
    total = sum(parts.values())
    network = sum(parts.get(k, 0.0) for k in NETWORK_PARTS)
    return {**parts, "total": total, "network": network, "outside_networks": total - network,
            "outside_share": (total - network) / total if total else 0.0}


def _agreement(a: np.ndarray, b: np.ndarray) -> dict:
    fg = (a > 0) | (b > 0)
    return {"voxels": float((a == b).mean()), "foreground_voxels": float((a == b)[fg].mean()) if fg.any() else None,
            "foreground_count": [int((a > 0).sum()), int((b > 0).sum())]}


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
    pipelines, skipped = available_pipelines(pipelines)
    for name, why in skipped.items():
        log.warning("pipeline %s left out: %s", name, why)
    results: dict[str, list[dict]] = {name: [] for name in pipelines}
    for _ in range(repeats):  # alternating, so that a slower phase of a shared machine hits every pipeline
        for name in pipelines:
            log.info("running %s", name)
            results[name].append(run_pipeline(name, model, case, out))
    best = {name: min(runs, key=lambda r: r["wall_s"]) for name, runs in results.items()}
    summary: dict = {"case": str(case), "shape": list(read_nifti(case).shape), "model": str(model),
                     "cpu_count": os.cpu_count(), "bf16": cpu_bf16_support()[1], "repeats": repeats,
                     "skipped": skipped, "runs": results, "best": best,
                     "profiles": {n: profile(best[n]) for n in best if n in OURS}}
    labels = {n: np.asarray(read_nifti(best[n]["labels"]).data) for n in best}
    reference = "onnxruntime" if "onnxruntime" in labels else None
    summary["agreement"] = {f"{n} vs {ref}": _agreement(labels[n], labels[ref])
                            for n in labels for ref in ("nnunet", reference) if ref and ref in labels and n in OURS
                            and n != ref}
    if "nnunet" in best:
        summary["ratios"] = {n: {"end_to_end_speedup": best["nnunet"]["wall_s"] / best[n]["wall_s"],
                                 "predict_speedup": best["nnunet"]["predict_s"] / best[n]["predict_s"],
                                 "peak_rss_ratio": best[n]["peak_rss_mb"] / best["nnunet"]["peak_rss_mb"]}
                             for n in best if n in OURS}
        if trained_tiny:
            summary["roi_stage_agreement"] = roi_stage_agreement(model, case)
    if reference and "openvino" in best:
        summary["openvino_vs_onnxruntime"] = best[reference]["wall_s"] / best["openvino"]["wall_s"]
    return summary


def _print(summary: dict) -> None:
    print(f"case {summary['case']} shape {summary['shape']}, {summary['cpu_count']} CPUs, model {summary['model']}")
    print(f"CPU bf16: {summary['bf16']}")
    for name, why in summary["skipped"].items():
        print(f"left out: {name}: {why}")
    print(f"{'pipeline':<14} {'wall s':>7} {'load s':>7} {'read s':>7} {'predict s':>9} {'write s':>7} {'peak RSS MB':>11}")
    for name, r in summary["best"].items():
        print(f"{name:<14} {r['wall_s']:7.2f} {r['import_and_load_s']:7.2f} {r['read_s']:7.2f} {r['predict_s']:9.2f} "
              f"{r['write_s']:7.2f} {r['peak_rss_mb']:11.0f}")
    if summary["profiles"]:
        names = list(summary["profiles"])
        rows = [k for k in next(iter(summary["profiles"].values())) if k not in ("outside_share",)]
        print("\nstage profile, seconds (read + predict + write; load excluded)")
        print(f"{'stage':<24}" + "".join(f"{n:>15}" for n in names))
        for k in rows:
            print(f"{k:<24}" + "".join(f"{summary['profiles'][n].get(k, 0.0):15.2f}" for n in names))
        print(f"{'outside the networks':<24}" + "".join(f"{100 * summary['profiles'][n]['outside_share']:14.1f}%"
                                                        for n in names) + "   (target <= 20 %)")
    print()
    for name, r in summary.get("ratios", {}).items():
        print(f"{name} vs nnU-Net: end to end {r['end_to_end_speedup']:.2f}x faster (target >= 5 for openvino), "
              f"predict {r['predict_speedup']:.2f}x, peak RSS ratio {r['peak_rss_ratio']:.2f} (target <= 0.5)")
    if "openvino_vs_onnxruntime" in summary:
        print(f"openvino vs onnxruntime: end to end {summary['openvino_vs_onnxruntime']:.2f}x faster (target >= 1.8)")
    for pair, a in summary["agreement"].items():
        fg_text = "-" if a["foreground_voxels"] is None else f"{100 * a['foreground_voxels']:.3f} %"
        print(f"labels {pair}: {100 * a['voxels']:.4f} % of voxels, {fg_text} of foreground "
              f"(foreground voxels {a['foreground_count']})")
    if "roi_stage_agreement" in summary:
        r = summary["roi_stage_agreement"]
        print(f"ROI net alone, labels on the scan's grid: agreement {100 * r['voxels']:.3f} %, foreground Dice "
              f"{r['dice_foreground']:.4f} (foreground voxels: {r['foreground_count']})")


def _pipelines(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in PIPELINES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown pipeline(s) {unknown or text!r}; choose from {', '.join(PIPELINES)}")
    return names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-output/predict_cpu"))
    parser.add_argument("--model", type=Path, default=None, help="model package (default: untrained CPU presets)")
    parser.add_argument("--slices", type=int, default=215)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each pipeline, alternating; the best is kept")
    parser.add_argument("--trained-tiny", action="store_true",
                        help="train roi-tiny/detail-tiny for a few minutes and compare with those (label agreement)")
    parser.add_argument("--pipelines", type=_pipelines, default=PIPELINES,
                        help=f"comma-separated, of {','.join(PIPELINES)} (default: all this machine runs)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    summary = run(args.out, args.model, args.slices, args.seed, args.repeats,
                  pipelines=args.pipelines, trained_tiny=args.trained_tiny)
    name = "predict_cpu_trained_tiny.json" if args.trained_tiny and args.model is None else "predict_cpu.json"
    write_json(args.out / name, summary, overwrite=True)
    _print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
