"""The ``pocketseg`` command line's arguments: one argparse parser for the whole CLI.

Shared by :mod:`pocketseg.cli` (which dispatches each subcommand to its room's
public function), the container entry point (which finds a subcommand's model
package argument) and the generated CLI reference (``docs/cli.md``). It
describes arguments only and imports none of the rooms, so any layer may read
it. Every flag of a subcommand is a keyword argument of the function it calls.
"""

from __future__ import annotations

import argparse

from pocketseg.labels import DEFAULT_TOLERANCE_MM
from pocketseg.version import __version__

__all__ = ["build_parser", "cli_reference", "subcommand_parser"]


#: Choices of --device, --backend and --precision (the runtime's DEVICES, BACKENDS, PRECISIONS, with "auto").
DEVICE_CHOICES = ("auto", "cpu", "cuda")
BACKEND_CHOICES = ("auto", "tensorrt", "onnxruntime", "openvino", "torch")
PRECISION_CHOICES = ("auto", "fp32", "fp16", "bf16")
OUTPUT_TYPE_CHOICES = ("nifti", "dicom-seg", "dicom-rtstruct")


def _positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (thread counts, batch sizes)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _engine_options(p: argparse.ArgumentParser, backend_help: str) -> None:
    """--device, --backend and --precision of the commands that run a model package."""
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES, help="where to run [auto: cuda if usable]")
    p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES, help=backend_help)
    p.add_argument("--precision", default="auto", choices=PRECISION_CHOICES,
                   help="network precision; bf16: CPU with native bf16, openvino backend [auto: fp16 on cuda; "
                        "on cpu bf16 where openvino runs it natively and the package verified it, else fp32]")


def _sign_key_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sign-key", dest="sign_key", default=None, metavar="PRIVATE_KEY",
                   help="sign the package with this Ed25519 private key (pocketseg keygen): writes signature.json")


def _trusted_keys_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trusted-keys", dest="trusted_keys", default=None, metavar="DIR",
                   help="folder of trusted public keys (*.pub): refuse a package not signed by one of them "
                        "[$POCKETSEG_TRUSTED_KEYS; unset: signatures are not required]")


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

    p = sub.add_parser("info", help="show geometry and intensity range of a NIfTI file or DICOM series",
                       description="Print shape, spacing (mm), orientation codes, dtype and intensity range; for a "
                                   "DICOM study tree (patients/studies/series folders) list its series and the case "
                                   "each CT series becomes in predict.")
    p.add_argument("path", metavar="PATH", help=".nii/.nii.gz file, DICOM series folder or DICOM study tree")
    p.add_argument("--series-uid", dest="series_uid", default=None,
                   help="SeriesInstanceUID to read when a DICOM folder holds several series")
    p.add_argument("--json", action="store_true", help="print JSON with keys shape, spacing_mm, orientation, dtype, min, max")

    p = sub.add_parser("model-info", help="parameters and FLOPs per patch of every network preset",
                       description="List the network presets with parameter counts and FLOPs per patch.")
    p.add_argument("--json", action="store_true", help="print a JSON list of objects (keys include name and params)")
    p.add_argument("--no-flops", dest="flops", action="store_false", help="skip the FLOP count (faster)")

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
    p.add_argument("--batch-size", dest="batch_size", type=_positive_int, default=2, help="patches per iteration [2]")
    p.add_argument("--lr", type=float, default=0.01, help="initial learning rate [0.01]")
    p.add_argument("--schedule", choices=["step", "poly"], default="step",
                   help="step: halve every 200 epochs (paper); poly: nnU-Net's polynomial decay [step]")
    p.add_argument("--val-every", dest="val_every", type=int, default=5, help="validate every N epochs [5]")
    p.add_argument("--workers", type=int, default=None, help="background data-loading processes [auto]")
    p.add_argument("--seed", type=int, default=0, help="random seed [0]")
    p.add_argument("--cache", default=None, help="preprocessing cache folder [$POCKETSEG_CACHE or ~/.cache/pocketseg]")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="disable mixed precision on CUDA")
    p.add_argument("--cpu-bf16", dest="cpu_bf16", action="store_true",
                   help="bf16 autocast when training on the CPU (fast with AVX-512 BF16 or AMX; weights stay fp32)")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd",
                   help="sgd: Nesterov momentum 0.99 (paper, nnU-Net); adamw: fewer iterations to learn, for short "
                        "CPU budgets (use --lr 0.003) [sgd]")
    p.add_argument("--no-mirror", dest="mirror", action="store_false",
                   help="no mirroring augmentation (keeps left and right organs apart in small patches)")
    p.add_argument("--crop-widen-mm", dest="crop_widen_mm", type=float, default=0.0, metavar="MM",
                   help="detail stage: widen each side of the ROI-like training crop by a random 0..MM mm, as an ROI "
                        "net that also marks neighbouring tissue does at inference [0]")
    p.add_argument("--init-weights", dest="init_weights", default=None, metavar="FILE",
                   help="start from these weights (fine-tuning): a package's roi/detail.safetensors or a run's "
                        "checkpoint_*.pt of the same preset")

    p = sub.add_parser("export", help="export a ROI run and a detail run to a model package (ONNX, fp16 ONNX, weights)",
                       description="Write a model package: manifest.json with checksums, fp32 and mixed-precision fp16 "
                                   "ONNX of both nets and safetensors weights, checked against PyTorch.")
    p.add_argument("--roi", required=True, help="run folder of the ROI net (pocketseg train --stage roi)")
    p.add_argument("--detail", required=True, help="run folder of the detail net (pocketseg train --stage detail)")
    p.add_argument("-o", "--out", required=True, help="package folder to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing package folder")
    p.add_argument("--no-fp16", dest="fp16", action="store_false", help="skip the fp16 ONNX")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the parity and fp16 agreement checks")
    p.add_argument("--strict", action="store_true",
                   help="fail if the fp16 ONNX, or bf16 inference (measured where OpenVINO runs bf16 natively), "
                        "agrees with fp32 on < 99.9 %% of voxels")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17) [17]")
    p.add_argument("--overlap", type=float, default=0.0,
                   help="the package's tile overlap unless predict says otherwise; 0 is the paper's tile step 1.0 [0]")
    p.add_argument("--gaussian", action="store_true",
                   help="the package blends overlapping tiles with Gaussian weights unless predict says otherwise")
    _sign_key_option(p)

    p = sub.add_parser("import-nnunet", help="import a trained nnU-Net v2 model (results folder) as a model package",
                       description="Turn an nnU-Net v2 results folder (DatasetXXX/Trainer__Plans__Configuration with "
                                   "dataset.json, plans.json and fold_*/checkpoint_*.pth) into a model package whose "
                                   "runtime reproduces nnUNetPredictor: the same network, preprocessing, tiling, "
                                   "mirroring, fold ensemble and resampling, checked against nnU-Net's own network "
                                   "when nnU-Net is installed. PlainConvUNet and ResidualEncoderUNet models; 2D, "
                                   "nnU-Net's own cascade, region-based and multi-channel models are refused.")
    p.add_argument("results", metavar="RESULTS_DIR", help="the results folder .../Trainer__Plans__Configuration")
    p.add_argument("-o", "--out", required=True, metavar="PKG_DIR", help="package folder to create")
    p.add_argument("--folds", nargs="+", default=None, metavar="FOLD",
                   help="folds to use: all (fold_all) or numbers [what nnU-Net's predictor uses: fold_0..4 that exist, "
                        "else fold_all]; several folds are averaged")
    p.add_argument("--checkpoint", default="checkpoint_final.pth", help="checkpoint file of each fold [checkpoint_final.pth]")
    p.add_argument("--orientation", choices=["native", "RAS"], default=None,
                   help="voxel order the model was trained in: native (nnU-Net's SimpleITKIO/NibabelIO) or RAS "
                        "(NibabelIOWithReorient; TotalSegmentator's models) [from the plans' reader]")
    p.add_argument("--no-tta", dest="tta", action="store_false",
                   help="no test-time mirroring (nnU-Net's default mirrors over the axes the model allows)")
    p.add_argument("--overlap", type=float, default=0.5,
                   help="tile overlap of the sliding window; nnU-Net's tile step 0.5 is overlap 0.5 [0.5]")
    p.add_argument("--roi", default=None, metavar="RESULTS_DIR",
                   help="another nnU-Net results folder to run first as the ROI stage (the paper's cascade: its "
                        "labels' box plus the ROI margin is what the model segments)")
    p.add_argument("--labels", default=None, metavar="MAP.json",
                   help="map the model's classes onto FLARE 2023 names: {\"model label name or id\": \"FLARE name\" "
                        "or null}; unnamed classes are dropped (written as background)")
    p.add_argument("--no-fp16", dest="fp16", action="store_false", help="skip the fp16 ONNX")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the parity checks (ONNX vs torch, fp16 vs fp32, the network vs nnU-Net's own)")
    p.add_argument("--strict", action="store_true",
                   help="fail if the fp16 ONNX, or bf16 inference (measured where OpenVINO runs bf16 natively), "
                        "agrees with fp32 on < 99.9 %% of voxels")
    p.add_argument("--overwrite", action="store_true", help="replace an existing package folder")
    _sign_key_option(p)

    p = sub.add_parser("keygen", help="make an Ed25519 key pair for signing model packages",
                       description="Write NAME.key (the private key, readable by its owner only) and NAME.pub (the "
                                   "public key) into DIR. Sign packages with the private key (export/import-nnunet "
                                   "--sign-key, pocketseg sign); put the public key into the folder that predict and "
                                   "doctor get as --trusted-keys. Existing key files are never replaced.")
    p.add_argument("out_dir", metavar="DIR", help="folder for the two key files (created if missing)")
    p.add_argument("--name", default="pocketseg", help="file name of the keys, NAME.key and NAME.pub [pocketseg]")

    p = sub.add_parser("sign", help="sign an existing model package with an Ed25519 private key",
                       description="Verify a model package (manifest and every file's checksum) and write its "
                                   "signature, signature.json: the key's id and an Ed25519 signature of the "
                                   "manifest's content digest, which covers every file through its checksum.")
    p.add_argument("package_dir", metavar="PKG_DIR", help="model package folder")
    p.add_argument("--key", required=True, metavar="PRIVATE_KEY", help="private key file (pocketseg keygen)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing signature")

    p = sub.add_parser("build-engine", help="build TensorRT FP16 engines for this GPU into a model package",
                       description="Build TensorRT engines from a package's ONNX files (needs TensorRT and a GPU); "
                                   "records them in manifest.json and prints the equivalent trtexec command.")
    p.add_argument("package_dir", metavar="PKG_DIR", help="model package folder (pocketseg export)")
    p.add_argument("--workspace-gb", dest="workspace_gb", type=float, default=4.0, help="builder workspace [4 GB]")
    p.add_argument("--timing-cache", dest="timing_cache", default=None, help="timing cache file to reuse and update")
    p.add_argument("--max-batch", dest="max_batch", type=int, default=1, help="largest batch of the profile [1]")

    p = sub.add_parser("predict", help="segment CT scans with a model package (NIfTI file, DICOM series or folder)",
                       description="Segment the 13 FLARE organs and tumors: ROI net, crop, detail net, largest "
                                   "component per organ. INPUT is a .nii/.nii.gz file, a DICOM series folder, a folder "
                                   "of NIfTI files (then OUTPUT is a folder; CASE_0000.nii.gz -> CASE.nii.gz) or a DICOM "
                                   "study tree: patients/studies/series folders at any depth, one case per CT series "
                                   "(PATIENT_DATE_sSERIES.nii.gz; localizers and other modalities are skipped). With --ray "
                                   "the cases run on the workers of a Ray cluster, surviving worker loss.")
    p.add_argument("-i", "--input", required=True,
                   help="NIfTI file, DICOM series folder, folder of NIfTI files, or DICOM study tree")
    p.add_argument("-o", "--output", required=True,
                   help="label file (.nii.gz) for one scan, or a folder (one CASE.nii.gz per scan)")
    p.add_argument("-m", "--model", required=True, help="model package folder (pocketseg export)")
    _engine_options(p, "inference engine [auto: on cuda tensorrt > onnxruntime > torch, on cpu openvino > "
                       "onnxruntime > torch, whichever can run; torch first for nnU-Net-exact inference on the CPU]")
    p.add_argument("--statistics", action="store_true",
                   help="write NAME.statistics.json beside each label map NAME.nii.gz: per class volume (mL) "
                        "and mean HU, timings")
    p.add_argument("--preview", action="store_true",
                   help="write NAME.png beside each label map NAME.nii.gz: three views with the label overlay")
    p.add_argument("--overlap", type=float, default=None,
                   help="tile overlap fraction in [0, 1); 0 is the paper's tile step 1.0 "
                        "[the package's: 0 for pocketseg's own, 0.5 for imported nnU-Net models]")
    p.add_argument("--gaussian", action="store_true", default=None,
                   help="blend overlapping tiles with nnU-Net's Gaussian weights [the package's setting]")
    p.add_argument("--fast", action="store_true",
                   help="the paper's settings for any package: tile step 1, uniform blending, no test-time mirroring, "
                        "labels back to the original grid (faster; for imported models not nnU-Net-exact)")
    p.add_argument("--batch-size", dest="batch_size", type=_positive_int, default=1, help="tiles per network call [1]")
    p.add_argument("--continue", dest="resume", action="store_true", help="skip cases whose outputs already exist")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--series-uid", dest="series_uid", default=None,
                   help="SeriesInstanceUID to read when a DICOM folder holds several series")
    p.add_argument("--no-intensity-check", dest="check_intensities", action="store_false",
                   help="run even on images that do not look like CT in HU (constant, no air)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads of the engine (ONNX Runtime, OpenVINO) and of the CPU resampling [all cores]")
    p.add_argument("--output-type", dest="output_type", action="append", choices=OUTPUT_TYPE_CHOICES, default=None,
                   help="what to write per case; repeat for several: nifti (NAME.nii.gz), dicom-seg (NAME.seg.dcm, "
                        "DICOM SEG), dicom-rtstruct (NAME.rtstruct.dcm, RT Structure Set); the DICOM ones need DICOM "
                        "input or --dicom-reference [nifti]")
    p.add_argument("--dicom-reference", dest="dicom_reference", default=None, metavar="DIR",
                   help="for a NIfTI input: the DICOM series folder it was converted from; DICOM outputs reference it "
                        "(its grid must be the NIfTI's)")
    p.add_argument("--max-memory", dest="max_memory", default=None, metavar="SIZE",
                   help="refuse a scan whose resampled grids and label buffers would need more memory than SIZE "
                        "(8GiB, 512MiB, 16GB), estimated from its header before anything is allocated "
                        "[75%% of the machine's physical memory]")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run the cases on a Ray cluster (needs pocketseg[ray]): no value starts one on this machine, "
                        "'auto' joins the cluster of this node, else a cluster address (ray://HEAD:10001); INPUT is "
                        "then a folder or a .txt/.csv list of paths, OUTPUT a folder on a file system every node "
                        "shares, with run.jsonl, the results table (docs/ray.md)")
    p.add_argument("--workers", type=_positive_int, default=None,
                   help="with --ray: at most this many workers [one per GPU, else one per --cpus-per-worker cores]")
    p.add_argument("--cpus-per-worker", dest="cpus_per_worker", type=_positive_int, default=None,
                   help="with --ray: CPU cores of each worker (ONNX Runtime threads of a CPU worker) [1]")
    p.add_argument("--retries", type=int, default=None,
                   help="with --ray: times a case is retried after its worker died [2]")
    _trusted_keys_option(p)

    p = sub.add_parser("evaluate", help="FLARE 2023 DSC and NSD of a folder of predictions against ground truth",
                       description="Score predictions (CASE.nii.gz) against same-named ground-truth label maps as the "
                                   "FLARE 2023 evaluation does (DSC; NSD at per-class tolerances); writes per_case.csv, "
                                   "summary.json and table.md into OUT_DIR.")
    p.add_argument("--pred", required=True, metavar="DIR", help="folder of predicted label maps, CASE.nii.gz")
    p.add_argument("--gt", required=True, metavar="DIR", help="folder of ground-truth label maps, CASE.nii.gz (they give the spacing)")
    p.add_argument("-o", "--out", required=True, metavar="OUT_DIR", help="output folder (created if missing)")
    p.add_argument("--overwrite", action="store_true", help="replace existing per_case.csv, summary.json and table.md")
    p.add_argument("--workers", type=int, default=1, help="cases scored in parallel processes [1]")
    p.add_argument("--labels", default=None, metavar="PKG|JSON",
                   help="score the label set of a model package (its folder or manifest.json) or a dataset.json "
                        "[FLARE 2023's 14 classes]; FLARE names keep FLARE's tolerances and rules")
    p.add_argument("--tolerance-mm", type=float, default=DEFAULT_TOLERANCE_MM,
                   help=f"NSD tolerance of classes that are not FLARE classes [{DEFAULT_TOLERANCE_MM:g}]")

    p = sub.add_parser("doctor", help="check this machine for the runtime (GPU, driver, backends) and a package's engines",
                       description="Report Python, platform, GPUs (NVML, else nvidia-smi), driver and CUDA versions, "
                                   "TensorRT / ONNX Runtime / CuPy / cuCIM / torch versions and which backend and "
                                   "device 'auto' picks; with -m, whether the package's checksums verify and which "
                                   "of its TensorRT engines match this GPU and TensorRT version.")
    p.add_argument("-m", "--model", metavar="PKG_DIR", default=None,
                   help="model package folder to check (checksums, signature, TensorRT engines, backend choice)")
    _trusted_keys_option(p)
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")

    p = sub.add_parser("bench", help="time and memory per case, cold and warm (FLARE Table 6), optionally vs nnU-Net v2",
                       description="Efficiency benchmark of a model package: per case the wall time of a fresh process "
                                   "(cold, model loading included, as FLARE times a container) and of a loaded process "
                                   "(warm), and memory sampled every 0.1 s (GPU: NVML device used memory, else "
                                   "cudaMemGetInfo; CPU: process RSS) with its maximum and area (sum x 0.1 s, MB*s). "
                                   "Writes bench.md, bench.csv, bench.json and memory.png into OUT_DIR. With --backends: "
                                   "the backend x precision table (backends.md/.csv/.json) instead.")
    p.add_argument("-m", "--model", required=True, metavar="PKG_DIR", help="model package folder (pocketseg export)")
    p.add_argument("-o", "--out", required=True, metavar="OUT_DIR", help="output folder (created if missing)")
    _engine_options(p, "inference engine of pocketseg [auto]")
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
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads of ONNX Runtime / OpenVINO / torch and of the CPU resampling [all cores]")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report in OUT_DIR")
    p.add_argument("--backends", action="store_true",
                   help="instead: the torch/onnxruntime/tensorrt x fp32/fp16 table (size, DSC, time, status per row)")

    p = sub.add_parser("demo-report", help="one Markdown page of a demo run: previews, evaluation, bench",
                       description="Write a Markdown report linking data previews and prediction previews and "
                                   "including the evaluation table and the bench table with its memory plot.")
    p.add_argument("out", metavar="REPORT.md", help="Markdown file to write")
    p.add_argument("--previews", default=None, metavar="DIR", help="data set preview PNGs (pocketseg synth --preview)")
    p.add_argument("--predictions", default=None, metavar="DIR", help="predict output folder with --preview PNGs")
    p.add_argument("--evaluation", default=None, metavar="DIR", help="pocketseg evaluate output folder (table.md)")
    p.add_argument("--bench", default=None, metavar="DIR", help="pocketseg bench output folder (bench.json, memory.png)")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="the model package that made the predictions (named in the report with its source)")
    p.add_argument("--title", default="pocketseg demo", help="report title")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report")

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
    p.add_argument("--batch-size", dest="batch_size", type=_positive_int, default=2, help="patches per iteration [2]")
    p.add_argument("--holdout", type=float, default=0.2,
                   help="fraction of fully labelled cases held out and scored after every round [0.2]")
    p.add_argument("--seed", type=int, default=0, help="random seed of every training [0]")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="training and labelling device [auto]")
    p.add_argument("--workers", type=int, default=None, help="background data-loading processes [auto]")
    p.add_argument("--cache", default=None, help="preprocessing cache folder [WORK/cache]")
    p.add_argument("--shard", default="0/1", metavar="I/N",
                   help="pseudo-label only every N-th case starting at I; 0/N also runs the schedule and waits for "
                        "the other shards [0/1]")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="pseudo-label each round on a Ray cluster instead of shards (needs pocketseg[ray]): no value "
                        "starts one on this machine, 'auto' joins this node's cluster, else a cluster address")
    p.add_argument("--cpus-per-worker", dest="cpus_per_worker", type=_positive_int, default=None,
                   help="with --ray: CPU cores of each pseudo-labelling worker where there is no GPU [1]")
    # -v/-q also after the command (`pocketseg predict ... -q`); SUPPRESS keeps the global value unless given.
    for command in sub.choices.values():
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        command.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def subcommand_parser(command: str) -> argparse.ArgumentParser | None:
    """The parser of one subcommand (``predict``, ``bench``, ...), or None when there is no such subcommand."""
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(command)
    return None


def _usage(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest.upper()}`"
    flags = ", ".join(f"`{flag}`" for flag in action.option_strings)
    if action.nargs == 0:
        return flags
    metavar = action.metavar or action.dest.upper()
    return f"{flags} `{metavar}`" if not action.choices else f"{flags} `{{{','.join(map(str, action.choices))}}}`"


def _cell(text: str | None) -> str:
    """A help text as argparse prints it (``%%`` is a literal per cent sign), safe in a Markdown table cell."""
    return (text or "").replace("%%", "%").replace("|", "\\|").replace("\n", " ")


def cli_reference() -> str:
    """The CLI reference page (``docs/cli.md``) in Markdown, generated from :func:`build_parser`.

    Written from the parser's actions rather than argparse's ``--help`` text, which changes with the
    terminal width and the Python version. ``make docs`` writes it; a test fails when the page is stale.
    """
    parser = build_parser()
    lines = ["# Command-line reference", "",
             "<!-- Generated from pocketseg/commands.py by `make docs`; do not edit by hand. -->", "",
             f"`pocketseg [-v | -q] COMMAND ...` - {parser.description}", "",
             "Global options (before or after the command): `-v`/`--verbose` logs debug messages; `-q`/`--quiet` "
             "shows only warnings and errors and no progress bars; `--version`. Every option of a command is a "
             "keyword argument of the Python function the command calls. Bad input ends with one line, `pocketseg: error: PATH: problem`, and exit status 2.",
             ""]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help for choice in sub._choices_actions}
    lines += ["| command | what it does |", "|:--|:--|"]
    lines += [f"| [`{name}`](#pocketseg-{name}) | {_cell(helps.get(name))} |" for name in sub.choices]
    for name, command in sub.choices.items():
        lines += ["", f"## pocketseg {name}", "", _cell(command.description or helps.get(name)), "",
                  "| argument | default | meaning |", "|:--|:--|:--|"]
        for action in command._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue  # help, and the global -v/-q repeated on every command
            plain = action.default is None or isinstance(action.default, bool) or action.default == argparse.SUPPRESS
            default = "" if plain or not action.option_strings else f"`{action.default}`"
            required = " (required)" if action.required and action.option_strings else ""
            lines.append(f"| {_usage(action)}{required} | {default} | {_cell(action.help)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m pocketseg.commands > docs/cli.md
    print(cli_reference(), end="")
