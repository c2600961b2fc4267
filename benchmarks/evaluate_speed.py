"""Time FLARE 2023 scoring (DSC + NSD, 14 classes) of one synthetic 512x512xN case.

    python -m pocketseg.benchmarks.evaluate_speed [--slices 300] [--repeat 3] [--seed 0] [--device cpu|cuda]

The ground truth is the phantom's label map (:func:`pocketseg.synth.phantom.make_phantom`);
the prediction is the same map shifted by (1, 2, 1) voxels, so every class has
a non-trivial surface to score. Reports the best of ``--repeat`` calls of
:func:`pocketseg.evaluation.metrics.score_case` (file reading excluded), with
``--device cuda`` on CuPy.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

from pocketseg.benchmarks.report import write_json
from pocketseg.evaluation.evaluate import superior_axis
from pocketseg.evaluation.metrics import COLUMNS, score_case
from pocketseg.geometry import spacing_from_affine
from pocketseg.runtime.arrays import array_module
from pocketseg.synth.phantom import make_phantom

log = logging.getLogger(__name__)


def measure(slices: int = 300, repeat: int = 3, seed: int = 0, device: str = "cpu") -> dict:
    ph = make_phantom(seed, slices=slices)
    gt = np.ascontiguousarray(ph.labels)
    pred = np.roll(gt, (1, 2, 1), axis=(0, 1, 2))
    spacing = spacing_from_affine(ph.affine)
    z_axis = superior_axis(ph.affine)
    am = array_module(device)
    gt, pred = am.to_device(gt), am.to_device(pred)
    times, scores = [], {}
    for _ in range(repeat):
        t0 = time.perf_counter()
        scores = score_case(pred, gt, spacing, z_axis=z_axis, am=am)
        times.append(time.perf_counter() - t0)
        log.info("score_case: %.2f s", times[-1])
    present = sorted(int(v) for v in np.unique(ph.labels) if v)
    return {"shape": list(gt.shape), "spacing_mm": [round(s, 4) for s in spacing], "labels_present": present,
            "device": device, "seconds": times, "best_s": min(times),
            "organ_mean_DSC": float(np.mean([scores[c] for c in COLUMNS[:13]])),
            "organ_mean_NSD": float(np.mean([scores[c] for c in COLUMNS[14:27]]))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pocketseg.benchmarks.evaluate_speed", description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: NumPy -> CuPy arrays")
    parser.add_argument("--out", type=Path, default=None, help="folder for evaluate_speed.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    res = measure(args.slices, args.repeat, args.seed, args.device)
    print(f"score_case {'x'.join(map(str, res['shape']))} ({len(res['labels_present'])} labels) on {res['device']}: "
          f"best {res['best_s']:.2f} s of {args.repeat} (first {res['seconds'][0]:.2f} s); "
          f"organ mean DSC {res['organ_mean_DSC']:.4f}, NSD {res['organ_mean_NSD']:.4f}")
    if args.out:
        write_json(args.out / "evaluate_speed.json", res, overwrite=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
