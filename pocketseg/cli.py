"""The ``pocketseg`` command line: a thin layer over the package's public functions.

Every flag of a subcommand is a keyword argument of the function it calls, so
``pocketseg X --help`` documents the Python API too. Errors about user input
are printed as one line (``pocketseg: error: ...``) with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pocketseg import __version__
from pocketseg.errors import PocketsegError

log = logging.getLogger("pocketseg")

# Options that steer the CLI itself rather than the called function.
_CLI_ONLY = {"command", "verbose", "quiet", "json", "handler"}


def _cmd_synth(args: argparse.Namespace) -> int:
    from pocketseg.synth.dataset import synthesize_dataset

    out = synthesize_dataset(**_kwargs(args), progress=not args.quiet)
    print(out)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from pocketseg.volume import volume_info

    info = volume_info(**_kwargs(args))
    if args.json:
        print(json.dumps(info))
    else:
        sp = " x ".join(f"{s:g}" for s in info["spacing_mm"])
        print(f"{info['path']}\n  shape        {' x '.join(map(str, info['shape']))} (i, j, k)\n"
              f"  spacing      {sp} mm\n  orientation  {info['orientation']}{' (oblique)' if info['oblique'] else ''}\n"
              f"  dtype        {info['dtype']}\n  range        {info['min']:g} .. {info['max']:g}")
    return 0


def _require(module: str, feature: str, extra: str) -> None:
    from pocketseg.errors import require

    require(module, feature, extra)


def _cmd_model_info(args: argparse.Namespace) -> int:
    _require("torch", "Network presets", "train")
    from pocketseg.trainer.presets import model_info

    rows = model_info(**_kwargs(args))
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'preset':<12} {'stage':<7} {'params':>10} {'GFLOP/patch':>12}  {'spacing mm (z,y,x)':<20} {'patch (z,y,x)':<15} description")
    for r in rows:
        sp = "x".join(f"{v:g}" for v in r["spacing_mm_zyx"])
        patch = "x".join(map(str, r["patch_zyx"]))
        gflops = f"{r['gflops_per_patch']:.1f}" if "gflops_per_patch" in r else "-"
        print(f"{r['name']:<12} {r['stage']:<7} {r['params'] / 1e6:>9.3f}M {gflops:>12}  {sp:<20} {patch:<15} {r['description']}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    _require("torch", "Training", "train")
    from pocketseg.trainer.train import train

    out = train(**_kwargs(args), progress=not args.quiet)
    print(out)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    _require("torch", "Export", "export")
    from pocketseg.engine_build.export import export_package

    print(export_package(**_kwargs(args)))
    return 0


def _cmd_build_engine(args: argparse.Namespace) -> int:
    from pocketseg.engine_build.tensorrt_build import build_package_engines

    manifest = build_package_engines(**_kwargs(args), progress=not args.quiet)
    for stage in manifest.stages.values():
        for engine in stage.engines:
            print(f"{stage.name}: {engine.file} (TensorRT {engine.tensorrt_version}, sm {engine.compute_capability})")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from pocketseg.runtime.predict import predict

    written = predict(**_kwargs(args), progress=not args.quiet)
    for path in written:
        print(path)
    if not written:
        print("nothing to do: every case is finished (--continue)", file=sys.stderr)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from pocketseg.benchmarks.evaluate import evaluate_folders, format_table

    summary = evaluate_folders(**_kwargs(args), progress=not args.quiet)
    print(format_table(summary), end="")
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from pocketseg.runtime.doctor import diagnose, format_report

    report = diagnose(**_kwargs(args))
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    kwargs = _kwargs(args)
    backends = kwargs.pop("backends")
    if backends:
        from pocketseg.benchmarks.backends import benchmark_backends

        # Flags of the timing run that the backend table has no use for: refused, not silently ignored.
        timing_only = {"backend": ("--backend", "auto"), "precision": ("--precision", "auto"),
                       "compare": ("--compare", None), "cold": ("--no-cold", True), "warm": ("--no-warm", True)}
        used = [flag for key, (flag, default) in timing_only.items() if kwargs.pop(key) != default]
        if used:
            raise PocketsegError(f"{', '.join(used)}: not used by --backends (every backend x precision is a row)")
        result = benchmark_backends(**kwargs, progress=not args.quiet)
        from pocketseg.benchmarks.report import BACKEND_COLUMNS, markdown_table

        print(markdown_table(result["rows"], BACKEND_COLUMNS), end="")
    else:
        from pocketseg.benchmarks.bench import run_bench
        from pocketseg.benchmarks.report import bench_table_markdown

        result = run_bench(**kwargs, progress=not args.quiet)
        print(bench_table_markdown(result), end="")
    for path in result["files"].values():
        print(path)
    return 0


def _cmd_demo_report(args: argparse.Namespace) -> int:
    from pocketseg.benchmarks.report import write_demo_report

    print(write_demo_report(**_kwargs(args)))
    return 0


def _cmd_selftrain(args: argparse.Namespace) -> int:
    _require("torch", "Self-training", "train")
    from pocketseg.trainer.selftrain import parse_shard, selftrain

    work = selftrain(**_kwargs(args), progress=not args.quiet)
    if parse_shard(args.shard)[0] == 0:
        print(work / "report.md")
    return 0


def _kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k not in _CLI_ONLY}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pocketseg",
        description="Cascaded Pocket U-Net segmentation of abdominal CT (FLARE 2023 organs and tumors).",
    )
    parser.add_argument("--version", action="version", version=f"pocketseg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors; no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("synth", help="synthesize a FLARE-like abdominal CT data set (nnU-Net v2 raw layout)",
                       description="Synthesize realistic FLARE 2023-like abdominal CT with labels: fully labelled, "
                                   "partially labelled and unlabelled cases, in the nnU-Net v2 raw layout.")
    p.add_argument("out_dir", metavar="OUT_DIR", help="data set folder to create (must not exist or be empty)")
    p.add_argument("--full", type=int, default=4, help="fully labelled cases (13 organs + tumors) [4]")
    p.add_argument("--partial", type=int, default=0, help="partially labelled cases (some classes annotated) [0]")
    p.add_argument("--unlabeled", type=int, default=0, help="unlabelled cases (image only) [0]")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same data [0]")
    p.add_argument("--slices", type=int, default=None, help="exact slice count of every case (default: random 50-600)")
    p.add_argument("--small", action="store_true", help="tiny volumes (128x128 in-plane) for tests")
    p.add_argument("--matrix", type=int, default=None, help="in-plane matrix size (default 512, or 128 with --small)")
    p.add_argument("--preview", action="store_true", help="write a PNG preview per case (axial/coronal/sagittal)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    p.add_argument("--workers", type=int, default=1, help="cases synthesized in parallel processes [1]")
    p.set_defaults(handler=_cmd_synth)

    p = sub.add_parser("info", help="show geometry and intensity range of a NIfTI file or DICOM series",
                       description="Print shape, spacing (mm), orientation codes, dtype and intensity range.")
    p.add_argument("path", metavar="PATH", help=".nii/.nii.gz file or DICOM series folder")
    p.add_argument("--series-uid", dest="series_uid", default=None,
                   help="SeriesInstanceUID to read when a DICOM folder holds several series")
    p.add_argument("--json", action="store_true", help="print JSON with keys shape, spacing_mm, orientation, dtype, min, max")
    p.set_defaults(handler=_cmd_info)

    p = sub.add_parser("model-info", help="parameters and FLOPs per patch of every network preset",
                       description="List the network presets with parameter counts and FLOPs per patch.")
    p.add_argument("--json", action="store_true", help="print a JSON list of objects (keys include name and params)")
    p.add_argument("--no-flops", dest="flops", action="store_false", help="skip the FLOP count (faster)")
    p.set_defaults(handler=_cmd_model_info)

    p = sub.add_parser("train", help="train the ROI or detail net of the cascade on a raw nnU-Net v2 data set",
                       description="Train one cascade stage (nnU-Net-style preprocessing, augmentation and loss). "
                                   "Multi-GPU/multi-node: launch with torchrun --nproc_per_node N -m pocketseg train ... "
                                   "(across nodes the run folder and cache must be on a shared filesystem).")
    p.add_argument("dataset", metavar="DATASET", help="raw data set folder (dataset.json, imagesTr/, labelsTr/)")
    p.add_argument("--stage", required=True, choices=["roi", "detail"], help="cascade stage to train")
    p.add_argument("--preset", required=True, help="network preset (see pocketseg model-info), e.g. detail or detail-cpu")
    p.add_argument("--epochs", type=int, required=True, help="number of epochs")
    p.add_argument("--out", "-o", required=True, help="run folder (created; must be new unless --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="training device [auto]")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--fold", type=int, default=0, help="validation fold of a fixed 5-fold split [0]")
    split.add_argument("--val-fraction", dest="val_fraction", type=float, default=None,
                       help="hold out this fraction of cases for validation instead of a fold")
    p.add_argument("--iterations", type=int, default=250, help="iterations per epoch [250]")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=2, help="patches per iteration [2]")
    p.add_argument("--lr", type=float, default=0.01, help="initial learning rate [0.01]")
    p.add_argument("--schedule", choices=["step", "poly"], default="step",
                   help="step: halve every 200 epochs (paper); poly: nnU-Net's polynomial decay [step]")
    p.add_argument("--val-every", dest="val_every", type=int, default=5, help="validate every N epochs [5]")
    p.add_argument("--workers", type=int, default=None, help="background data-loading processes [auto]")
    p.add_argument("--seed", type=int, default=0, help="random seed [0]")
    p.add_argument("--cache", default=None, help="preprocessing cache folder [$POCKETSEG_CACHE or ~/.cache/pocketseg]")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="disable mixed precision on CUDA")
    p.set_defaults(handler=_cmd_train)

    p = sub.add_parser("export", help="export a ROI run and a detail run to a model package (ONNX, fp16 ONNX, weights)",
                       description="Write a model package: manifest.json with checksums, fp32 and mixed-precision fp16 "
                                   "ONNX of both nets and safetensors weights, checked against PyTorch.")
    p.add_argument("--roi", required=True, help="run folder of the ROI net (pocketseg train --stage roi)")
    p.add_argument("--detail", required=True, help="run folder of the detail net (pocketseg train --stage detail)")
    p.add_argument("-o", "--out", required=True, help="package folder to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing package folder")
    p.add_argument("--no-fp16", dest="fp16", action="store_false", help="skip the fp16 ONNX")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the parity and fp16 agreement checks")
    p.add_argument("--strict", action="store_true", help="fail if the fp16 ONNX agrees with fp32 on < 99.9 %% of voxels")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17) [17]")
    p.set_defaults(handler=_cmd_export)

    p = sub.add_parser("build-engine", help="build TensorRT FP16 engines for this GPU into a model package",
                       description="Build TensorRT engines from a package's ONNX files (needs TensorRT and a GPU); "
                                   "records them in manifest.json and prints the equivalent trtexec command.")
    p.add_argument("package_dir", metavar="PKG_DIR", help="model package folder (pocketseg export)")
    p.add_argument("--workspace-gb", dest="workspace_gb", type=float, default=4.0, help="builder workspace [4 GB]")
    p.add_argument("--timing-cache", dest="timing_cache", default=None, help="timing cache file to reuse and update")
    p.add_argument("--max-batch", dest="max_batch", type=int, default=1, help="largest batch of the profile [1]")
    p.set_defaults(handler=_cmd_build_engine)

    p = sub.add_parser("predict", help="segment CT scans with a model package (NIfTI file, DICOM series or folder)",
                       description="Segment the 13 FLARE organs and tumors: ROI net, crop, detail net, largest "
                                   "component per organ. INPUT is a .nii/.nii.gz file, a DICOM series folder or a folder "
                                   "of NIfTI files (then OUTPUT is a folder; CASE_0000.nii.gz -> CASE.nii.gz).")
    p.add_argument("-i", "--input", required=True, help="NIfTI file, DICOM series folder, or folder of NIfTI files")
    p.add_argument("-o", "--output", required=True,
                   help="label file (.nii.gz) for one scan, or a folder (one CASE.nii.gz per scan)")
    p.add_argument("-m", "--model", required=True, help="model package folder (pocketseg export)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run [auto: cuda if usable]")
    p.add_argument("--backend", default="auto", choices=["auto", "tensorrt", "onnxruntime", "torch"],
                   help="inference engine [auto: tensorrt > onnxruntime > torch, whichever can run]")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16"],
                   help="network precision [auto: fp16 on cuda, fp32 on cpu]")
    p.add_argument("--statistics", action="store_true",
                   help="write CASE.statistics.json: per class volume (mL) and mean HU, timings")
    p.add_argument("--preview", action="store_true", help="write CASE.png: three views with the label overlay")
    p.add_argument("--overlap", type=float, default=0.0,
                   help="tile overlap fraction in [0, 1); 0 is the paper's tile step 1.0 [0]")
    p.add_argument("--gaussian", action="store_true", help="blend overlapping tiles with Gaussian weights")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=1, help="tiles per network call [1]")
    p.add_argument("--continue", dest="resume", action="store_true", help="skip cases whose outputs already exist")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--series-uid", dest="series_uid", default=None,
                   help="SeriesInstanceUID to read when a DICOM folder holds several series")
    p.add_argument("--no-intensity-check", dest="check_intensities", action="store_false",
                   help="run even on images that do not look like CT in HU (constant, no air)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of ONNX Runtime [all cores]")
    p.set_defaults(handler=_cmd_predict)

    p = sub.add_parser("evaluate", help="FLARE 2023 DSC and NSD of a folder of predictions against ground truth",
                       description="Score predictions (CASE.nii.gz) against same-named ground-truth label maps as the "
                                   "FLARE 2023 evaluation does (DSC; NSD at per-class tolerances); writes per_case.csv, "
                                   "summary.json and table.md into OUT_DIR.")
    p.add_argument("--pred", required=True, metavar="DIR", help="folder of predicted label maps, CASE.nii.gz")
    p.add_argument("--gt", required=True, metavar="DIR", help="folder of ground-truth label maps, CASE.nii.gz (they give the spacing)")
    p.add_argument("-o", "--out", required=True, metavar="OUT_DIR", help="output folder (created if missing)")
    p.add_argument("--overwrite", action="store_true", help="replace existing per_case.csv, summary.json and table.md")
    p.add_argument("--workers", type=int, default=1, help="cases scored in parallel processes [1]")
    p.set_defaults(handler=_cmd_evaluate)

    p = sub.add_parser("doctor", help="check this machine for the runtime (GPU, driver, backends) and a package's engines",
                       description="Report Python, platform, GPUs (NVML, else nvidia-smi), driver and CUDA versions, "
                                   "TensorRT / ONNX Runtime / CuPy / cuCIM / torch versions and which backend and "
                                   "device 'auto' picks; with -m, whether the package's checksums verify and which "
                                   "of its TensorRT engines match this GPU and TensorRT version.")
    p.add_argument("-m", "--model", metavar="PKG_DIR", default=None,
                   help="model package folder to check (checksums, TensorRT engines, backend choice)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(handler=_cmd_doctor)

    p = sub.add_parser("bench", help="time and memory per case, cold and warm (FLARE Table 6), optionally vs nnU-Net v2",
                       description="Efficiency benchmark of a model package: per case the wall time of a fresh process "
                                   "(cold, model loading included, as FLARE times a container) and of a loaded process "
                                   "(warm), and memory sampled every 0.1 s (GPU: NVML device used memory, else "
                                   "cudaMemGetInfo; CPU: process RSS) with its maximum and area (sum x 0.1 s, MB*s). "
                                   "Writes bench.md, bench.csv, bench.json and memory.png into OUT_DIR. With --backends: "
                                   "the backend x precision table (backends.md/.csv/.json) instead.")
    p.add_argument("-m", "--model", required=True, metavar="PKG_DIR", help="model package folder (pocketseg export)")
    p.add_argument("-o", "--out", required=True, metavar="OUT_DIR", help="output folder (created if missing)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run [auto: cuda if usable]")
    p.add_argument("--backend", default="auto", choices=["auto", "tensorrt", "onnxruntime", "torch"],
                   help="inference engine of pocketseg [auto]")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16"],
                   help="network precision [auto: fp16 on cuda, fp32 on cpu]")
    p.add_argument("--sizes", default=None, metavar="IxJxK,...",
                   help="synthetic cases to make once in OUT_DIR/cases, e.g. 512x512x55,512x512x100 "
                        "[bench: Table 6's 512x512x{55,100,150,215,334,448,499,554}; --backends: 512x512x{55,100}]")
    p.add_argument("--cases", default=None, metavar="DIR", help="folder of NIfTI images to use instead of synthetic cases")
    p.add_argument("--labels", default=None, metavar="DIR",
                   help="label maps of --cases, CASE.nii.gz (default: the sibling labelsTr folder)")
    p.add_argument("--compare", default=None, choices=["nnunet"],
                   help="also run nnU-Net v2's predictor on the same nets and cases (needs pocketseg[peers])")
    p.add_argument("--roi-from-labels", dest="roi_from_labels", action="store_true",
                   help="skip the ROI stage: the detail stage runs on the labels' box plus the ROI margin "
                        "(for timing nets without trained weights; the report says so)")
    p.add_argument("--no-cold", dest="cold", action="store_false", help="skip the fresh-process (cold) runs")
    p.add_argument("--no-warm", dest="warm", action="store_false", help="skip the loaded-process (warm) runs")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="no untimed warm-up prediction before the warm runs")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic cases [0]")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of ONNX Runtime / torch [all cores]")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report in OUT_DIR")
    p.add_argument("--backends", action="store_true",
                   help="instead: the torch/onnxruntime/tensorrt x fp32/fp16 table (size, DSC, time, status per row)")
    p.set_defaults(handler=_cmd_bench)

    p = sub.add_parser("demo-report", help="one Markdown page of a demo run: previews, evaluation, bench",
                       description="Write a Markdown report linking data previews and prediction previews and "
                                   "including the evaluation table and the bench table with its memory plot.")
    p.add_argument("out", metavar="REPORT.md", help="Markdown file to write")
    p.add_argument("--previews", default=None, metavar="DIR", help="data set preview PNGs (pocketseg synth --preview)")
    p.add_argument("--predictions", default=None, metavar="DIR", help="predict output folder with --preview PNGs")
    p.add_argument("--evaluation", default=None, metavar="DIR", help="pocketseg evaluate output folder (table.md)")
    p.add_argument("--bench", default=None, metavar="DIR", help="pocketseg bench output folder (bench.json, memory.png)")
    p.add_argument("--title", default="pocketseg demo", help="report title")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report")
    p.set_defaults(handler=_cmd_demo_report)

    p = sub.add_parser("selftrain", help="semi-supervised self-training of the detail net with pseudo labels (resumable)",
                       description="Train the ROI net once and the detail net in rounds: round 1 on the fully labelled "
                                   "cases, later rounds also on partially labelled (ground truth + pseudo labels) and "
                                   "unlabelled (pseudo labels) cases; score each case's pseudo-label stability "
                                   "(uncertainty.json), keep the cases under the threshold and train the final model "
                                   "on them. Rerun the same command to continue after an interruption. Writes "
                                   "WORK/report.md, report.json, uncertainty.png and the final package WORK/final/model.")
    p.add_argument("dataset", metavar="DATASET", help="raw data set folder (dataset.json, imagesTr/, labelsTr/, imagesUnlabeled/)")
    p.add_argument("--work", required=True, metavar="DIR", help="work folder (created; rerun with it to continue)")
    p.add_argument("--rounds", type=int, default=3, help="pseudo-labelling rounds, >= 2 [3]")
    p.add_argument("--threshold", type=float, default=None,
                   help="keep cases whose uncertainty is under this [median of the observed scores]")
    p.add_argument("--no-tumor-pseudo", dest="tumor_pseudo", action="store_false",
                   help="keep tumor voxels of pseudo labels out of training (they become background)")
    p.add_argument("--annotated-from-labels", dest="annotated_from_labels", action="store_true",
                   help="annotated classes of a labelled case = classes present in its label file "
                        "(default: dataset.json's pocketseg record)")
    p.add_argument("--preset", default="detail", help="detail net preset [detail]")
    p.add_argument("--roi-preset", dest="roi_preset", default="roi", help="ROI net preset [roi]")
    p.add_argument("--roi-run", dest="roi_run", default=None, help="use this trained ROI run instead of training one")
    p.add_argument("--epochs", type=int, default=1000, help="epochs of every training [1000]")
    p.add_argument("--iterations", type=int, default=250, help="iterations per epoch [250]")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=2, help="patches per iteration [2]")
    p.add_argument("--holdout", type=float, default=0.2,
                   help="fraction of fully labelled cases held out and scored after every round [0.2]")
    p.add_argument("--seed", type=int, default=0, help="random seed of every training [0]")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="training and labelling device [auto]")
    p.add_argument("--workers", type=int, default=None, help="background data-loading processes [auto]")
    p.add_argument("--cache", default=None, help="preprocessing cache folder [WORK/cache]")
    p.add_argument("--shard", default="0/1", metavar="I/N",
                   help="pseudo-label only every N-th case starting at I; 0/N also runs the schedule and waits for "
                        "the other shards [0/1]")
    p.set_defaults(handler=_cmd_selftrain)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except PocketsegError as exc:
        print(f"pocketseg: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pocketseg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
