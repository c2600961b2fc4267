"""Train the CPU-sized detail net on synthetic CT for a fixed time budget and score held-out cases.

    python -m pocketseg.benchmarks.train_cpu [--minutes 15] [--train-cases 12] [--test-cases 4] [--out DIR]

Steps: synthesize a training set and a separate test set (``pocketseg synth``,
256x256 in-plane, so one CPU machine can make and preprocess them in minutes);
train ``detail-cpu`` one epoch to measure its speed, then resume with as many
epochs as fit the budget; finally compute per-organ DSC on the held-out test
cases. Scoring is done for the detail stage alone on its resampled grid, with
each case cropped to its true foreground box plus the ROI margin (what a
perfect ROI stage would give); the full cascade in original space is the
runtime's benchmark.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from pocketseg.atomic import ensure_dir
from pocketseg.benchmarks.report import write_json
from pocketseg.manifest import Intensity
from pocketseg.runtime.network import PocketUNet
from pocketseg.synth.dataset import synthesize_dataset
from pocketseg.trainer import checkpoint as ckpt
from pocketseg.trainer.data import SamplingConfig
from pocketseg.trainer.dataset import open_dataset
from pocketseg.trainer.preprocess import preprocess_cases
from pocketseg.trainer.presets import get_preset
from pocketseg.trainer.train import train, validate

log = logging.getLogger(__name__)


def run(out: Path, minutes: float, train_cases: int, test_cases: int, iterations: int, seed: int) -> dict:
    ensure_dir(out)
    data, test, cache, run_dir = out / "train-data", out / "test-data", out / "cache", out / "run"
    t0 = time.perf_counter()
    if not (data / "dataset.json").is_file():
        synthesize_dataset(data, full=train_cases, seed=seed, matrix=256, slices=120, workers=2)
    if not (test / "dataset.json").is_file():
        synthesize_dataset(test, full=test_cases, seed=seed + 1000, matrix=256, slices=120, workers=2)
    t_data = time.perf_counter() - t0

    common = dict(stage="detail", preset="detail-cpu", out=run_dir, cache=cache, iterations=iterations,
                  val_fraction=0.15, val_every=1000, device="cpu", seed=seed)
    t1 = time.perf_counter()
    if not (run_dir / ckpt.LATEST).is_file():
        train(data, epochs=1, **common)
    first = json.loads((run_dir / "history.json").read_text())[0]["seconds"]
    epochs = max(1, int(minutes * 60 // max(first, 1e-3)))
    done = int(ckpt.load_checkpoint(run_dir / ckpt.LATEST)["epoch"])
    if epochs > done:
        train(data, epochs=epochs, resume=True, **{**common, "val_every": max(1, epochs // 6)})
    t_train = time.perf_counter() - t1

    config = json.loads((run_dir / "config.json").read_text())
    preset = get_preset("detail-cpu", "detail")
    stats = Intensity(**config["intensity"])
    cases = open_dataset(test).labelled(full_only=True)
    folder = preprocess_cases(cases, stats, preset.spacing_mm_zyx, cache)
    model = PocketUNet(preset.unet_config(), deep_supervision=True)
    model.load_state_dict(ckpt.load_checkpoint(run_dir / ckpt.LATEST)["model"])
    sampling = SamplingConfig(stage="detail", patch_zyx=preset.patch_zyx, spacing_mm_zyx=preset.spacing_mm_zyx,
                              strides=preset.strides, num_classes=preset.num_classes, augment=False)
    dice = validate(model, folder, [c.name for c in cases], sampling, torch.device("cpu"))
    history = json.loads((run_dir / "history.json").read_text())
    return {
        "preset": "detail-cpu", "train_cases": train_cases, "test_cases": test_cases, "epochs": len(history),
        "iterations_per_epoch": iterations, "batch_size": 2, "budget_minutes": minutes,
        "seconds_data": round(t_data, 1), "seconds_train": round(t_train, 1),
        "train_loss_first": history[0]["train_loss"], "train_loss_last": history[-1]["train_loss"],
        "test_dice": dice, "test_mean_dice_organs": float(np.mean([v for k, v in dice.items() if k != "tumor"])),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=15.0, help="training time budget [15]")
    parser.add_argument("--train-cases", type=int, default=12)
    parser.add_argument("--test-cases", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=25, help="iterations per epoch [25]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench-output/train_cpu"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    res = run(args.out, args.minutes, args.train_cases, args.test_cases, args.iterations, args.seed)
    write_json(args.out / "train_cpu.json", res, overwrite=True)
    print(f"detail-cpu, {res['epochs']} epochs x {res['iterations_per_epoch']} it in {res['seconds_train'] / 60:.1f} min "
          f"on CPU; train loss {res['train_loss_first']:.3f} -> {res['train_loss_last']:.3f}")
    print(f"held-out DSC ({res['test_cases']} synthetic cases, detail stage on its grid, true-box ROI crop):")
    for name, value in res["test_dice"].items():
        print(f"  {name:<22} {value:.3f}")
    print(f"  {'mean of organs':<22} {res['test_mean_dice_organs']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
