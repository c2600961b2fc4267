"""Cases per minute of ``predict --ray`` on a local Ray cluster with 1 and 2 workers, a run with a worker killed,
and the throughput model of docs/ray.md.

    python -m pocketseg.benchmarks.ray_throughput [--cases 12] [--slices 48] [--cpus 2] [--out DIR]

Synthetic phantoms (128 x 128 in-plane) and an untrained package of the tiny presets (the time per case,
not the labels, is what is measured). On one local cluster of ``--cpus`` CPUs: folder mode in one
process (one thread), then ``predict --ray`` with 1 and with 2 one-core workers, then 2 workers with
one of them killed (SIGKILL from outside, as a lost node) once a third of the cases are written; that
run must end with every case written exactly once, no temporary file left, and the same labels as the
undisturbed run. ``--model-only`` prints the throughput model's table for given per-case times.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from pocketseg.benchmarks.report import Column, markdown_table, write_json
from pocketseg.layout import image_name
from pocketseg.nifti import read_nifti, write_nifti
from pocketseg.runtime.distributed import RUN_TABLE, predict_ray
from pocketseg.runtime.predict import predict
from pocketseg.synth.phantom import make_phantom
from pocketseg.trainer.package import export_package, write_untrained_run

log = logging.getLogger(__name__)

#: Intensity record of the untrained package (any CT-like values do).
INTENSITY = {"mean": 80.0, "std": 70.0, "percentile_00_5": -110.0, "percentile_99_5": 320.0}


# ------------------------------------------------------------------------------------------ the throughput model

def throughput_per_hour(gpus: int, compute_s: float, io_s: float, mb_per_case: float, fs_mb_s: float,
                        overlap: bool = True) -> dict[str, float]:
    """Cases per hour of ``gpus`` workers (docs/ray.md, "Throughput model").

    A worker spends ``compute_s`` per case on the network and its own pre/post-processing, and ``io_s``
    reading and writing on the shared file system; with read-ahead and write-behind (three cases in flight)
    the two overlap, so a worker finishes a case every max(compute, io) seconds (their sum without overlap).
    The cluster cannot go faster than the shared file system delivers ``mb_per_case`` per case at
    ``fs_mb_s`` MB/s in all.
    """
    per_worker_s = max(compute_s, io_s) if overlap else compute_s + io_s
    workers_bound = gpus * 3600.0 / per_worker_s
    fs_bound = 3600.0 * fs_mb_s / mb_per_case
    return {"gpus": gpus, "per_worker_s": per_worker_s, "workers_bound": workers_bound, "fs_bound": fs_bound,
            "cases_per_hour": min(workers_bound, fs_bound),
            "limit": "workers" if workers_bound <= fs_bound else "file system"}


def model_table(compute_s: list[float], gpus: list[int], io_s: float, mb_per_case: float,
                fs_mb_s: float) -> list[dict[str, Any]]:
    rows = []
    for c in compute_s:
        for n in gpus:
            r = throughput_per_hour(n, c, io_s, mb_per_case, fs_mb_s)
            rows.append({"s/case on 1 GPU": c, "GPUs": n, "cases/hour": round(r["cases_per_hour"]),
                         "limited by": r["limit"]})
    return rows


# ------------------------------------------------------------------------------------------------ measurement

def _package(root: Path) -> Path:
    roi = write_untrained_run(root / "roi", "roi", "roi-tiny", intensity=INTENSITY, seed=0)
    detail = write_untrained_run(root / "detail", "detail", "detail-tiny", intensity=INTENSITY, seed=1)
    return export_package(roi, detail, root / "model", fp16=False, check=False)


def _cases(folder: Path, count: int, slices: int) -> Path:
    folder.mkdir(parents=True)
    for seed in range(count):
        ph = make_phantom(seed, small=True, slices=slices)
        write_nifti(ph.image, folder / image_name(f"case{seed:02d}"), affine=ph.affine)
    return folder


def _rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / RUN_TABLE).read_text().splitlines()]


def _kill_one_worker_when(out: Path, written: int, record: dict[str, Any]) -> threading.Thread:
    """SIGKILL the worker of the first case in ``out/run.jsonl`` once ``written`` cases are written there."""
    def watch() -> None:
        while True:
            rows = _rows(out) if (out / RUN_TABLE).is_file() else []
            done = [r for r in rows if r["status"] == "written"]
            if len(done) >= written:
                record["killed_pid"] = done[0]["pid"]
                record["killed_after_cases"] = len(done)
                os.kill(done[0]["pid"], signal.SIGKILL)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def measure(cases: int = 12, slices: int = 48, cpus: int = 2) -> dict[str, Any]:
    import ray  # optional (extra 'ray'): this benchmark needs it

    result: dict[str, Any] = {"cases": cases, "shape": [128, 128, slices], "cpus": cpus, "runs": [],
                              "load_average_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="ray-throughput-") as tmp:
        root = Path(tmp)
        model = _package(root / "package")
        images = _cases(root / "images", cases, slices)
        t = time.perf_counter()
        predict(images, root / "single", model, device="cpu", threads=1, progress=False)
        single_s = time.perf_counter() - t
        result["runs"].append({"run": "folder mode, 1 process, 1 thread", "workers": 1, "wall_s": round(single_s, 2),
                               "cases_per_min": round(cases / single_s * 60, 1)})
        ray.init(num_cpus=cpus, include_dashboard=False, object_store_memory=80 * 1024**2, log_to_driver=False)
        try:
            for workers in (1, 2):
                out = root / f"ray{workers}"
                t = time.perf_counter()
                predict_ray(images, out, model, workers=workers, cpus_per_worker=1, device="cpu", progress=False)
                wall = time.perf_counter() - t
                rows = _rows(out)
                busy = [sum(v for k, v in r["times_s"].items() if k in ("read", "total", "write")) for r in rows]
                result["runs"].append({"run": f"--ray, {workers} worker(s) of 1 core", "workers": workers,
                                       "wall_s": round(wall, 2), "cases_per_min": round(cases / wall * 60, 1),
                                       "median_case_s": round(float(np.median(busy)), 3)})
            out, record = root / "killed", {}
            watcher = _kill_one_worker_when(out, max(1, cases // 3), record)
            t = time.perf_counter()
            predict_ray(images, out, model, workers=2, cpus_per_worker=1, device="cpu", progress=False)
            wall = time.perf_counter() - t
            watcher.join(timeout=5)
            rows = _rows(out)
            finals = [r for r in rows if r["status"] != "lost"]
            names = sorted(p.name for p in out.iterdir())
            same = all(np.array_equal(np.asarray(read_nifti(out / f"case{i:02d}.nii.gz").data),
                                      np.asarray(read_nifti(root / "ray2" / f"case{i:02d}.nii.gz").data))
                       for i in range(cases))
            result["killed"] = {
                **record, "wall_s": round(wall, 2), "cases_per_min": round(cases / wall * 60, 1),
                "lost_attempts": sum(r["status"] == "lost" for r in rows),
                "written_rows": sum(r["status"] == "written" for r in finals),
                "each_case_written_once": sorted(r["case"] for r in finals) == [f"case{i:02d}" for i in range(cases)]
                and all(r["status"] == "written" for r in finals),
                "label_maps": sum(n.endswith(".nii.gz") for n in names),
                "temporary_files_left": [n for n in names if n.startswith(".")],
                "labels_equal_undisturbed_run": same,
                "workers_seen": len({r["pid"] for r in rows})}
        finally:
            ray.shutdown()
    result["load_average_after"] = os.getloadavg()  # other jobs on the machine: the runs shared its cores with them
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--slices", type=int, default=48)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster [2]")
    parser.add_argument("--out", type=Path, default=None, help="folder for ray_throughput.json")
    parser.add_argument("--model-only", action="store_true", help="only the throughput model's table")
    parser.add_argument("--gpu-s", default="2,5,10,20", help="model: seconds per case on one GPU (list)")
    parser.add_argument("--io-s", type=float, default=1.5, help="model: read + write seconds per case [1.5]")
    parser.add_argument("--mb-per-case", type=float, default=100.0, help="model: MB read + written per case [100]")
    parser.add_argument("--fs-mb-s", type=float, default=2000.0, help="model: shared file system MB/s, all "
                                                                       "clients together [2000]")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    rows = model_table([float(v) for v in args.gpu_s.split(",")], [1, 8, 64], args.io_s, args.mb_per_case,
                       args.fs_mb_s)
    print(f"throughput model (I/O {args.io_s} s/case overlapped, {args.mb_per_case} MB/case, "
          f"file system {args.fs_mb_s} MB/s):")
    print(markdown_table(rows, [Column(k, k) for k in rows[0]]), end="")
    if args.model_only:
        return 0
    res = measure(args.cases, args.slices, args.cpus)
    res["model"] = rows
    print(f"\n{res['cases']} cases of {'x'.join(map(str, res['shape']))}, local Ray cluster of {res['cpus']} CPUs:")
    print(markdown_table(res["runs"], [Column("run", "run"), Column("wall_s", "wall s", ".1f", "right"),
                                       Column("cases_per_min", "cases/min", ".1f", "right"),
                                       Column("median_case_s", "median s/case in a worker", ".2f", "right")]), end="")
    print("\nworker killed mid-run:", json.dumps(res["killed"]))
    print("load average (1, 5, 15 min) before:", res["load_average_before"], "after:", res["load_average_after"])
    if args.out:
        write_json(args.out / "ray_throughput.json", res)
    return 0 if res["killed"]["each_case_written_once"] and not res["killed"]["temporary_files_left"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
