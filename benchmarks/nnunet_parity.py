"""nnU-Net parity: an imported nnU-Net v2 model in pocketseg against nnU-Net's own predictor.

    python -m pocketseg.benchmarks.nnunet_parity [--work DIR] [--out DIR] [--preset harness] [--no-speed]
    python -m pocketseg.benchmarks.nnunet_parity --make-fixture tests/fixtures/nnunet_tiny

The harness first builds a genuine nnU-Net v2 results folder with nnU-Net's own
tools (cached in ``--work``): synthetic phantoms in nnU-Net's raw layout,
nnU-Net's fingerprint, plans and preprocessing, one small added configuration
(:class:`Preset`: its spacing, patch and a 4-stage PlainConvUNet, so that a few
hundred iterations take minutes on 2 CPU cores), and nnU-Net's stock
``nnUNetTrainer``, shortened by setting its epoch and iteration counts. The
model is then imported (``pocketseg import-nnunet``) and every case is
segmented by both, each in a fresh process as a user runs it:

* nnU-Net: ``nnUNetPredictor`` with its defaults (tile step 0.5, Gaussian,
  mirroring) from the NIfTI file to the NIfTI file;
* pocketseg: ``pocketseg predict`` with the package's settings (nnU-Net-exact)
  and with ``--fast``.

Cases: held-out phantoms stored in two orientations (RAS and LPS), the real CT
examples in ``../shared/data/ct_examples/`` when that folder exists (the DICOM
series converted to NIfTI once, so that both read the same file), and, for
speed and memory, a 512x512x200 phantom. For each case and mode the report gives
voxel agreement, foreground agreement (over the union of both foregrounds),
per-class Dice against nnU-Net's labels, the wall time of the process and its
peak resident memory (the process and its children, sampled every 0.1 s), and
the ratios. ``--make-fixture`` writes the small results folder the tests use
(preset ``fixture``; optimizer state stripped, under 2 MB).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
from pocketseg.benchmarks.bench import label_agreement
from pocketseg.benchmarks.memory import MemorySampler, open_rss_reader
from pocketseg.benchmarks.report import Column, markdown_table, write_json
from pocketseg.engine_build.nnunet_import import import_nnunet

from pocketseg.atomic import ensure_dir, read_json, write_text
from pocketseg.errors import InputError
from pocketseg.imageio import load_volume
from pocketseg.nifti import read_nifti, write_nifti
from pocketseg.synth.dataset import synthesize_dataset
from pocketseg.synth.phantom import make_phantom

log = logging.getLogger(__name__)

#: Real CT examples (read where present; never copied into the project).
CT_EXAMPLES = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "ct_examples"
CONFIGURATION = "3d_parity"
TRAINER = "nnUNetTrainer"
PLANS = "nnUNetPlans"


@dataclass(frozen=True)
class Preset:
    """A genuine nnU-Net model small enough for 2 CPU cores: the data, the added configuration, the training."""

    dataset_id: int
    cases: int  # training phantoms (128x128 matrix, ``slices`` slices)
    slices: int
    spacing: tuple[float, float, float]  # the configuration's target spacing, z, y, x (mm)
    patch: tuple[int, int, int]
    features: tuple[int, ...]  # per stage; strides (1,1,1), (1,2,2), then (2,2,2)
    epochs: int
    iterations: int  # training iterations per epoch
    folds: tuple[str, ...]
    lr: float = 0.01  # nnU-Net's initial learning rate (its default 0.01)
    seed: int = 0

    @property
    def dataset_name(self) -> str:
        return f"Dataset{self.dataset_id:03d}_PocketsegParity"

    def key(self) -> str:
        """What the cached results folder depends on (with nnU-Net's version)."""
        text = json.dumps({**asdict(self), "nnunetv2": _nnunet_version()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


PRESETS = {
    # the committed test fixture: a small trained model (liver and stomach predicted), under 2 MB
    "fixture": Preset(dataset_id=871, cases=8, slices=64, spacing=(8.0, 8.0, 8.0), patch=(32, 40, 40),
                      features=(8, 16, 32, 64), epochs=150, iterations=20, folds=("all",), lr=0.05),
    # the harness's model: trained long enough that the liver and the large organs are predicted
    "harness": Preset(dataset_id=872, cases=12, slices=64, spacing=(8.0, 8.0, 8.0), patch=(32, 40, 40),
                      features=(16, 32, 64, 128), epochs=100, iterations=20, folds=("all",), lr=0.05),
}


def _nnunet_version() -> str:
    try:
        return version("nnunetv2")
    except PackageNotFoundError:
        return "absent"


def _nnunet_env(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(nnUNet_raw=str(work / "nnUNet_raw"), nnUNet_preprocessed=str(work / "nnUNet_preprocessed"),
               nnUNet_results=str(work / "nnUNet_results"), nnUNet_def_n_proc="1")
    return env


def _run_worker(task: dict[str, Any], env: dict[str, str] | None = None, log_path: Path | None = None) -> None:
    """Run one nnU-Net task (``_worker``) in a fresh interpreter; its output goes to ``log_path``."""
    cmd = [sys.executable, "-m", "pocketseg.benchmarks.nnunet_parity", "--worker", json.dumps(task)]
    with open(log_path or os.devnull, "w") as out:
        done = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = "".join(Path(log_path).read_text().splitlines(keepends=True)[-15:]) if log_path else ""
        raise RuntimeError(f"nnU-Net task {task['task']} failed (exit {done.returncode}); log {log_path}:\n{tail}")


# ------------------------------------------------------------------------------------------- the nnU-Net model

def tiny_configuration(plans: dict[str, Any], preset: Preset) -> dict[str, Any]:
    """The added configuration: the planned 3d_fullres with the preset's spacing, patch and network."""
    base = plans["configurations"]["3d_fullres"]
    stages = len(preset.features)
    strides = [[1, 1, 1], [1, 2, 2]] + [[2, 2, 2]] * (stages - 2)
    return {
        "inherits_from": "3d_fullres",
        "data_identifier": f"{PLANS}_{CONFIGURATION}",
        "spacing": list(preset.spacing),
        "patch_size": list(preset.patch),
        "batch_size": 2,
        "architecture": {
            "network_class_name": base["architecture"]["network_class_name"],
            "arch_kwargs": {
                "n_stages": stages, "features_per_stage": list(preset.features),
                "conv_op": "torch.nn.modules.conv.Conv3d",
                "kernel_sizes": [[1, 3, 3]] + [[3, 3, 3]] * (stages - 1), "strides": strides,
                "n_conv_per_stage": [2] * stages, "n_conv_per_stage_decoder": [1] * (stages - 1),
                "conv_bias": True, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
            },
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        },
    }


def results_folder(work: Path, preset: Preset) -> Path:
    return work / "nnUNet_results" / preset.dataset_name / f"{TRAINER}__{PLANS}__{CONFIGURATION}"


def build_results(work: str | os.PathLike, preset: Preset, *, progress: bool = True) -> Path:
    """A genuine nnU-Net results folder for ``preset`` (made once; reused while the preset and nnU-Net match)."""
    work = ensure_dir(Path(work))
    stamp = work / "build.json"
    folder = results_folder(work, preset)
    if stamp.is_file() and read_json(stamp).get("key") == preset.key() and folder.is_dir():
        return folder
    for sub in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        shutil.rmtree(work / sub, ignore_errors=True)
    started = time.perf_counter()
    synthesize_dataset(work / "nnUNet_raw" / preset.dataset_name, full=preset.cases, seed=preset.seed,
                       slices=preset.slices, small=True, progress=progress)
    env = _nnunet_env(work)
    log.info("nnU-Net: fingerprint, plans, preprocessing of %s", preset.dataset_name)
    _run_worker({"task": "plan", "preset": asdict(preset)}, env, work / "plan.log")
    for fold in preset.folds:
        log.info("nnU-Net: training fold %s (%d epochs x %d iterations)", fold, preset.epochs, preset.iterations)
        _run_worker({"task": "train", "preset": asdict(preset), "fold": fold},
                    {**env, "nnUNet_n_proc_DA": "0"}, work / f"train_{fold}.log")
    write_json(stamp, {"key": preset.key(), "preset": asdict(preset), "nnunetv2": _nnunet_version(),
                       "build_s": round(time.perf_counter() - started, 1)}, overwrite=True)
    return folder


def _plan(preset: Preset) -> None:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (  # the peer: nnU-Net itself
        extract_fingerprints, plan_experiments, preprocess)
    from nnunetv2.paths import nnUNet_preprocessed  # the peer's folders, set by the environment

    extract_fingerprints([preset.dataset_id], num_processes=1, check_dataset_integrity=True)
    plan_experiments([preset.dataset_id])
    plans_file = Path(nnUNet_preprocessed) / preset.dataset_name / f"{PLANS}.json"
    plans = json.loads(plans_file.read_text())
    plans["configurations"][CONFIGURATION] = tiny_configuration(plans, preset)
    plans_file.write_text(json.dumps(plans, indent=2))
    preprocess([preset.dataset_id], PLANS, (CONFIGURATION,), (1,))


def _train(preset: Preset, fold: str) -> None:
    import torch  # the peer's trainer runs on torch
    from nnunetv2.run.run_training import get_trainer_from_args

    trainer = get_trainer_from_args(str(preset.dataset_id), CONFIGURATION, fold if fold == "all" else int(fold),
                                    TRAINER, PLANS, device=torch.device("cpu"))
    trainer.num_epochs = preset.epochs
    trainer.num_iterations_per_epoch = preset.iterations
    trainer.num_val_iterations_per_epoch = 2
    trainer.save_every = 10**6
    trainer.initial_lr = preset.lr
    trainer.run_training()


def _predict(folder: str, folds: list[str], pairs: list[list[str]]) -> None:
    import torch  # the peer's predictor runs on torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)  # its defaults otherwise
    predictor.initialize_from_trained_model_folder(folder, tuple(f if f == "all" else int(f) for f in folds))
    outputs = [str(out).removesuffix(".nii.gz") for _, out in pairs]
    predictor.predict_from_files([[image] for image, _ in pairs], outputs, save_probabilities=False,
                                 overwrite=True, num_processes_preprocessing=1, num_processes_segmentation_export=1)


def _worker(task: dict[str, Any]) -> None:
    preset = Preset(**{k: tuple(v) if isinstance(v, list) else v for k, v in task.get("preset", {}).items()}) \
        if task.get("preset") else None
    if task["task"] == "plan":
        _plan(preset)
    elif task["task"] == "train":
        _train(preset, task["fold"])
    elif task["task"] == "predict":
        _predict(task["folder"], task["folds"], task["pairs"])
    else:
        raise ValueError(f"unknown task {task['task']!r}")


def strip_checkpoint(src: Path, dst: Path) -> None:
    """What nnUNetPredictor and the import read of a checkpoint: weights, trainer, configuration, mirror axes."""
    import torch  # checkpoints are torch files

    state = torch.load(src, map_location="cpu", weights_only=False)  # our own freshly trained file
    slim = {"network_weights": state["network_weights"], "trainer_name": state["trainer_name"],
            "init_args": {"configuration": state["init_args"]["configuration"], "fold": state["init_args"]["fold"]},
            "inference_allowed_mirroring_axes": state.get("inference_allowed_mirroring_axes"),
            "current_epoch": int(state["current_epoch"])}
    torch.save(slim, dst)


def make_fixture(out: str | os.PathLike, work: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """The committed test fixture: preset ``fixture``, checkpoints stripped, dataset.json trimmed."""
    preset = PRESETS["fixture"]
    source = build_results(Path(work), preset)
    target = Path(out) / preset.dataset_name / source.name
    if target.exists():
        if not overwrite:
            raise InputError(target, "exists; pass --overwrite to replace the fixture")
        shutil.rmtree(target)
    ensure_dir(target)
    data = read_json(source / "dataset.json")
    write_json(target / "dataset.json", {k: data[k] for k in ("name", "channel_names", "labels", "numTraining",
                                                              "file_ending")})
    shutil.copyfile(source / "plans.json", target / "plans.json")
    for fold in preset.folds:
        ensure_dir(target / f"fold_{fold}")
        strip_checkpoint(source / f"fold_{fold}" / "checkpoint_final.pth",
                         target / f"fold_{fold}" / "checkpoint_final.pth")
    write_json(target / "fixture.json", {
        "made_by": "python -m pocketseg.benchmarks.nnunet_parity --make-fixture " + str(out),
        "preset": asdict(preset), "nnunetv2": _nnunet_version(),
        "note": "nnU-Net's own planning, preprocessing and nnUNetTrainer on synthetic phantoms; "
                "optimizer state stripped"}, overwrite=True)
    return target


# ------------------------------------------------------------------------------------------------------- the cases

@dataclass(frozen=True)
class Case:
    name: str
    path: Path
    kind: str  # phantom | real | speed


def phantom_cases(folder: Path, *, seed: int = 900, slices: int = 40, speed: bool = False) -> list[Case]:
    """Held-out phantoms (seeds never used in training) in RAS and LPS order; the 512x512x200 speed case."""
    ensure_dir(folder)
    cases = []
    for k, orientation in enumerate(("RAS", "LPS")):
        path = folder / f"phantom_{orientation}.nii.gz"
        if not path.is_file():
            ph = make_phantom(seed + k, small=True, slices=slices, orientation=orientation)
            write_nifti(ph.image, path, affine=ph.affine)
        cases.append(Case(f"phantom_{orientation}", path, "phantom"))
    if speed:
        path = folder / "phantom_512x512x200.nii.gz"
        if not path.is_file():
            ph = make_phantom(seed + 10, slices=200, matrix=512, orientation="LPS")
            write_nifti(ph.image, path, affine=ph.affine)
        cases.append(Case("phantom_512x512x200", path, "speed"))
    return cases


def real_cases(folder: Path, examples: Path = CT_EXAMPLES) -> list[Case]:
    """The real CT examples that exist (the DICOM series written once as NIfTI, so both read one file)."""
    if not examples.is_dir():
        return []
    cases = [Case(p.name.removesuffix(".nii.gz"), p, "real") for p in sorted(examples.glob("*.nii.gz"))
             if "_seg" not in p.name]
    series = examples / "dicom_series"
    if series.is_dir():
        path = ensure_dir(folder) / "dicom_series.nii.gz"
        if not path.is_file():
            volume = load_volume(series)
            write_nifti(np.asarray(volume.data), path, affine=volume.affine)
        cases.append(Case("dicom_series", path, "real"))
    return cases


# --------------------------------------------------------------------------------------------------- the runs

def _measure(cmd: Sequence[str], env: dict[str, str] | None, log_path: Path) -> dict[str, float]:
    """Wall time and peak RSS (the process and its children) of one command."""
    with open(log_path, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(list(cmd), env=env, stdout=out, stderr=subprocess.STDOUT)
        sampler = MemorySampler(open_rss_reader(proc.pid)).start(baseline_mb=0.0)
        code = proc.wait()
        wall = time.perf_counter() - start
        trace = sampler.stop()
    if code != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"{cmd[2] if len(cmd) > 2 else cmd[0]} failed (exit {code}); log {log_path}:\n{tail}")
    return {"wall_s": wall, "peak_rss_mb": trace.max_mb}


def predict_nnunet(folder: Path, folds: Sequence[str], pairs: Sequence[tuple[Path, Path]], *,
                   log_path: Path) -> dict[str, float]:
    """nnUNetPredictor (its defaults) on ``(image, output)`` pairs, in one fresh process; its time and memory."""
    task = {"task": "predict", "folder": str(folder), "folds": list(folds),
            "pairs": [[str(a), str(b)] for a, b in pairs]}
    env = _nnunet_env(log_path.parent)
    return _measure([sys.executable, "-m", "pocketseg.benchmarks.nnunet_parity", "--worker", json.dumps(task)],
                    env, log_path)


#: pocketseg's modes: nnU-Net-exact as the package sets it (on the CPU its default backend is torch, the kernels
#: nnU-Net runs), the same with ONNX Runtime, and the paper's settings (--fast, ONNX Runtime).
MODES = {"exact": [], "exact-ort": ["--backend", "onnxruntime"], "fast": ["--fast"]}


def predict_pocketseg(package: Path, image: Path, out: Path, *, mode: str, log_path: Path) -> dict[str, float]:
    """``pocketseg predict`` on one image in a fresh process; its time and memory."""
    cmd = [sys.executable, "-m", "pocketseg", "predict", "-m", str(package), "-i", str(image), "-o", str(out),
           "--device", "cpu", "--overwrite"] + MODES[mode]
    return _measure(cmd, None, log_path)


def compare(ours: Path, theirs: Path, names: dict[int, str]) -> dict[str, Any]:
    a, b = np.asarray(read_nifti(ours).data), np.asarray(read_nifti(theirs).data)
    return label_agreement(a, b, names=names)


def run(work: Path, out: Path, preset: Preset, *, speed: bool = True, examples: Path = CT_EXAMPLES) -> dict:
    folder = build_results(work / "model", preset)
    package = work / "package"
    stamp = package / "import_key.json"
    if not stamp.is_file() or read_json(stamp).get("key") != preset.key():
        import_nnunet(folder, package, folds=list(preset.folds), fp16=False, overwrite=True)
        write_json(package / "import_key.json", {"key": preset.key()}, overwrite=True)
    manifest = read_json(package / "manifest.json")
    names = {int(v): k for k, v in manifest["labels"].items()}
    cases_dir = work / "cases"
    cases = phantom_cases(cases_dir, speed=speed) + real_cases(cases_dir, examples)
    runs = ensure_dir(out / "runs")
    rows: list[dict[str, Any]] = []
    for case in cases:
        log.info("case %s", case.name)
        theirs = runs / f"{case.name}_nnunet.nii.gz"
        peer = predict_nnunet(folder, preset.folds, [(case.path, theirs)], log_path=runs / f"{case.name}_nnunet.log")
        shape = list(read_nifti(case.path).shape)
        for mode in MODES:
            ours = runs / f"{case.name}_{mode}.nii.gz"
            me = predict_pocketseg(package, case.path, ours, mode=mode, log_path=runs / f"{case.name}_{mode}.log")
            rows.append({"case": case.name, "kind": case.kind, "shape": "x".join(map(str, shape)), "mode": mode,
                         **compare(ours, theirs, names),
                         "nnunet_s": peer["wall_s"], "pocketseg_s": me["wall_s"],
                         "speedup": peer["wall_s"] / me["wall_s"],
                         "nnunet_rss_mb": peer["peak_rss_mb"], "pocketseg_rss_mb": me["peak_rss_mb"],
                         "rss_ratio": me["peak_rss_mb"] / peer["peak_rss_mb"]})
    report = {"preset": asdict(preset), "nnunetv2": _nnunet_version(), "cpu_count": os.cpu_count(),
              "model": str(folder), "package": str(package), "rows": rows}
    write_json(out / "nnunet_parity.json", report, overwrite=True)
    write_text(out / "nnunet_parity.md", markdown(report), overwrite=True)
    return report


COLUMNS = (Column("case", "case"), Column("shape", "shape"), Column("mode", "mode"),
           Column("voxel_pct", "voxels agree %", ".4f"), Column("fg_pct", "foreground agree %", ".4f"),
           Column("min_dice", "min Dice", ".5f"), Column("worst", "worst class"),
           Column("nnunet_s", "nnU-Net s", ".1f"), Column("pocketseg_s", "pocketseg s", ".1f"),
           Column("speedup", "speed-up", ".2f"), Column("nnunet_rss_mb", "nnU-Net RSS MB", ".0f"),
           Column("pocketseg_rss_mb", "pocketseg RSS MB", ".0f"), Column("rss_ratio", "RSS ratio", ".2f"))


def _table_row(row: dict[str, Any]) -> dict[str, Any]:
    dice = {k: v for k, v in row["dice"].items() if v is not None}
    worst = min(dice, key=dice.get) if dice else None
    return {**row, "voxel_pct": 100 * row["voxel_agreement"], "fg_pct": 100 * row["foreground_agreement"],
            "min_dice": dice[worst] if worst else None, "worst": worst or "—"}


def markdown(report: dict[str, Any]) -> str:
    p = report["preset"]
    head = (f"nnU-Net v2 {report['nnunetv2']} model: PlainConvUNet {p['features']}, spacing {p['spacing']} mm, "
            f"patch {p['patch']}, {p['epochs']} x {p['iterations']} iterations, folds {p['folds']}; "
            f"{report['cpu_count']} CPUs. nnU-Net: nnUNetPredictor defaults; pocketseg: `predict` (exact: the "
            f"package's settings, torch on the CPU; exact-ort: `--backend onnxruntime`) and `predict --fast`. "
            f"Times and peak RSS are whole processes (children included).\n\n")
    return head + markdown_table([_table_row(r) for r in report["rows"]], COLUMNS) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("bench-output/nnunet_parity/work"),
                        help="cache of the nnU-Net model, the package and the cases")
    parser.add_argument("--out", type=Path, default=Path("bench-output/nnunet_parity"))
    parser.add_argument("--preset", choices=sorted(PRESETS), default="harness")
    parser.add_argument("--no-speed", dest="speed", action="store_false", help="skip the 512x512x200 case")
    parser.add_argument("--make-fixture", type=Path, metavar="DIR", help="write the test fixture into DIR")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing fixture")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(json.loads(args.worker))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.make_fixture:
        print(make_fixture(args.make_fixture, args.work / "fixture", overwrite=args.overwrite))
        return 0
    report = run(args.work / args.preset, args.out, PRESETS[args.preset], speed=args.speed)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
