"""Time to synthesize one phantom case, pinned to one CPU core.

    python -m pocketseg.benchmarks.synth_speed [--slices 200] [--repeat 3] [--out DIR]

Reports generation time (anatomy + CT rendering) and the time to write the
image and label map as .nii.gz, per case, best of ``--repeat`` seeds.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from pocketseg.benchmarks.report import write_json
from pocketseg.layout import image_name
from pocketseg.nifti import write_nifti
from pocketseg.synth.phantom import make_phantom

log = logging.getLogger(__name__)


def measure(slices: int = 200, repeat: int = 3, matrix: int = 512) -> dict:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core, as the target says
    gen, write = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(repeat):
            t0 = time.perf_counter()
            ph = make_phantom(seed, slices=slices, matrix=matrix)
            t1 = time.perf_counter()
            write_nifti(ph.image, Path(tmp) / image_name(str(seed)), affine=ph.affine, overwrite=True)
            write_nifti(ph.labels, Path(tmp) / f"{seed}.nii.gz", affine=ph.affine, overwrite=True)
            t2 = time.perf_counter()
            gen.append(t1 - t0)
            write.append(t2 - t1)
            log.info("seed %d: generate %.2f s, write %.2f s", seed, t1 - t0, t2 - t1)
    return {"shape": [matrix, matrix, slices], "cores": 1, "generate_s": gen, "write_s": write,
            "generate_best_s": min(gen), "generate_median_s": float(np.median(gen)),
            "write_median_s": float(np.median(write))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="folder for synth_speed.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    res = measure(args.slices, args.repeat, args.matrix)
    shape = "x".join(map(str, res["shape"]))
    print(f"phantom {shape} on 1 core: generate median {res['generate_median_s']:.2f} s "
          f"(best {res['generate_best_s']:.2f} s; target <= 10 s), write .nii.gz median {res['write_median_s']:.2f} s")
    if args.out:
        write_json(args.out / "synth_speed.json", res, overwrite=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
