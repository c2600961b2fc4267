"""Time writing the DICOM outputs of one large case: the DICOM SEG and the RT Structure Set.

Run as ``python -m pocketseg.benchmarks.dicom_write [--shape 512x512x300] [--labels 14] [--repeat 3]
[--out DIR]`` (needs the ``dicom`` extra).

A synthetic CT series of the given shape (0.8 mm pixels, 2 mm slices) is written once into a
temporary folder with :func:`pocketseg.synth.dicom_series.write_phantom_series`; its label map holds
``--labels`` ellipsoids with FLARE ids, organ-sized (in-plane radii of 33-72 voxels, 120-190 slices
long). Each writer is then timed best-of-N, wall clock (:func:`time.perf_counter`) and the process's
CPU time (:func:`time.process_time`, which other users of a shared machine do not inflate as much).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from pocketseg.benchmarks.nifti_read import parse_shape
from pocketseg.benchmarks.report import write_json
from pocketseg.dicom import read_series_grid
from pocketseg.runtime.dicom_output import Algorithm
from pocketseg.atomic import atomic_write_bytes
from pocketseg.runtime.dicom_seg import dicom_seg_bytes
from pocketseg.runtime.rtstruct import rtstruct_bytes
from pocketseg.synth.dicom_series import write_phantom_series

log = logging.getLogger("pocketseg.benchmarks.dicom_write")


def ellipsoid_labels(shape: tuple[int, int, int], n_labels: int) -> np.ndarray:
    """``n_labels`` disjoint ellipsoids on a 4x4 in-plane grid, ids 1..n (uint8, (i, j, k))."""
    columns, rows, slices = shape
    i, j, k = np.ogrid[:columns, :rows, :slices]
    out = np.zeros(shape, dtype=np.uint8)
    centres = [(columns * (0.2 + 0.2 * a), rows * (0.2 + 0.2 * b)) for a in range(4) for b in range(4)]
    scale = min(columns, rows) / 512
    for label, (ci, cj) in enumerate(centres[:n_labels], start=1):
        r = (30 + 3 * label) * scale
        extent = (60 + 5 * label) * slices / 300
        out[((i - ci) / r) ** 2 + ((j - cj) / (0.8 * r)) ** 2 + ((k - slices / 2) / extent) ** 2 <= 1] = label
    return out


def run(shape: tuple[int, int, int], n_labels: int, repeat: int) -> dict:
    labels = ellipsoid_labels(shape, n_labels)
    algorithm = Algorithm(model_name="benchmark", model_digest="0" * 64)
    results: dict = {"shape": list(shape), "labels": n_labels, "repeat": repeat, "machine": platform.node(),
                     "cpus": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory(prefix="pocketseg-dicom-write-") as tmp:
        folder = Path(tmp)
        write_phantom_series(folder / "series", pixel_spacing=(0.8, 0.8), labels_ijk=labels)
        files = read_series_grid(folder / "series").files
        for name, encode in (("dicom_seg", dicom_seg_bytes), ("rtstruct", rtstruct_bytes)):
            walls, cpus = [], []
            for _ in range(repeat):
                wall, cpu = time.perf_counter(), time.process_time()
                # encoded and written as predict does (the writes: pocketseg.atomic)
                out = atomic_write_bytes(folder / f"out.{name}.dcm", encode(labels, files, algorithm=algorithm),
                                         overwrite=True)
                walls.append(time.perf_counter() - wall)
                cpus.append(time.process_time() - cpu)
            results[name] = {"wall_s_best": round(min(walls), 2), "cpu_s_best": round(min(cpus), 2),
                             "wall_s": [round(w, 2) for w in walls], "cpu_s": [round(c, 2) for c in cpus],
                             "bytes": out.stat().st_size, "megabytes": round(out.stat().st_size / 1e6, 1)}
            log.info("%s: best %.2f s wall, %.2f s CPU, %.1f MB", name, min(walls), min(cpus),
                     out.stat().st_size / 1e6)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=parse_shape, default=(512, 512, 300), help="columns x rows x slices")
    parser.add_argument("--labels", type=int, default=14, help="labels in the map (1-16) [14]")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per writer [3]")
    parser.add_argument("--out", type=Path, default=None, help="folder for dicom_write.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # it logs every copied module at INFO
    results = run(args.shape, max(1, min(args.labels, 16)), max(1, args.repeat))
    if args.out is not None:
        write_json(args.out / "dicom_write.json", results, overwrite=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
