"""``pocketseg bench --backends``: one row per inference backend x precision, in the spirit of Ultralytics' benchmark.

    pocketseg bench --backends -m PKG_DIR -o OUT_DIR [--device cpu|cuda] [--sizes 512x512x55,512x512x100]

For each of torch / onnxruntime / openvino / tensorrt x fp32 / fp16 / bf16 (:data:`runtime.engines.BACKENDS`,
:data:`runtime.engines.PRECISIONS`): the export target whose file the row loads (from
:data:`engine_build.targets.EXPORT_TARGETS`), the size of those files for both stages,
the DSC and NSD (organ mean, FLARE 2023 metrics, :func:`benchmarks.metrics.score_case`)
against the synthetic cases' labels, the time per case in a loaded process and a
status. Whether a row can run here is decided by :func:`runtime.engines.resolve`, as
``pocketseg predict`` decides it; a row that cannot run (not installed, no GPU, fp16 on
the CPU, no TensorRT engine for this GPU) or fails while running is a row with its
reason, never a crash of the table.

Outputs in OUT_DIR (:mod:`.report`): ``backends.md``, ``backends.csv``, ``backends.json``;
the synthetic cases are shared with ``pocketseg bench`` in ``OUT_DIR/cases``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from pocketseg import labels as L
from pocketseg.benchmarks.bench import check_inputs, check_output, load_average, machine_info, prepare
from pocketseg.benchmarks.memory import MemorySourceError, open_gpu_reader
from pocketseg.benchmarks.report import BACKEND_FILES, write_backends_report
from pocketseg.engine_build.targets import EXPORT_TARGETS, ExportTarget
from pocketseg.errors import InputError, PocketsegError
from pocketseg.evaluation.evaluate import score_prediction
from pocketseg.evaluation.metrics import organ_column
from pocketseg.imageio import load_volume
from pocketseg.nifti import read_nifti
from pocketseg.runtime.arrays import cuda_available
from pocketseg.runtime.cascade import CascadePredictor
from pocketseg.runtime.engines import BACKENDS, PRECISIONS, EngineUnavailableError, probe_backends, resolve

__all__ = ["BACKEND_SIZES", "benchmark_backends", "row_target"]

log = logging.getLogger(__name__)

#: Default cases of the table: the two smallest sizes of Table 6 (each row predicts every case).
BACKEND_SIZES = ((512, 512, 55), (512, 512, 100))
#: The file format each backend reads. TensorRT runs engines built from the fp16 ONNX (pocketseg build-engine).
_FORMAT = {"torch": ".safetensors", "onnxruntime": ".onnx", "openvino": ".onnx", "tensorrt": ".onnx"}


#: How to get each backend, for the reason of an "unavailable" row (the full probe detail goes to the JSON).
_INSTALL = {"torch": "pip install 'pocketseg[train]'", "onnxruntime": "pip install 'pocketseg[runtime]'",
            "openvino": "pip install 'pocketseg[openvino]'",
            "tensorrt": "pip install 'pocketseg[tensorrt]' (x86_64) or JetPack's python3-libnvinfer (Jetson)"}


def row_target(backend: str, precision: str) -> ExportTarget | None:
    """The export target whose file a (backend, precision) row loads, looked up in EXPORT_TARGETS.

    torch reads its safetensors weights at any precision (fp16: autocast on CUDA); ONNX
    Runtime and TensorRT read the ONNX target of the row's precision (TensorRT through its
    engines), OpenVINO the fp32 ONNX for fp32 and bf16. None when the table has no such target.
    """
    suffix = _FORMAT.get(backend)
    if suffix is None:
        raise InputError(None, f"unknown backend {backend!r}")
    # OpenVINO computes bf16 from the fp32 graph (its inference precision), like fp32.
    wanted = "fp32" if backend == "openvino" and precision == "bf16" else precision
    for target in EXPORT_TARGETS:
        if target.suffix.endswith(suffix) and (backend == "torch" or target.precision == wanted):
            return target
    return None


def _files_mb(package: Path, names: Sequence[str]) -> float | None:
    try:
        return sum((package / n).stat().st_size for n in names) / 2**20
    except OSError:
        return None


def _organ_means(scores: dict[str, float]) -> tuple[float, float]:
    dsc = [scores[f"{organ_column(i)}_DSC"] for i in L.ORGAN_IDS]
    nsd = [scores[f"{organ_column(i)}_NSD"] for i in L.ORGAN_IDS]
    return float(np.mean(dsc)), float(np.mean(nsd))


def _run_row(package: Path, row: dict[str, Any], cases, boxes: dict[str, Any], *, threads: int | None,
             warmup: bool) -> None:
    """Predict every case with one backend x precision; fills the row's numbers (raises on failure)."""
    restore_threads = None
    if threads is not None and row["backend"] == "torch":
        import torch  # optional (train extra): only for the torch rows

        # CascadePredictor's threads steer ONNX Runtime; torch's intra-op pool is set here, and restored after.
        restore_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
    predictor = CascadePredictor(package, device=row["device"], backend=row["backend"], precision=row["precision"],
                                 threads=threads)
    try:
        row["load_s"] = predictor.load_time_s
        if warmup and cases:
            # Lazy initialisation (ONNX Runtime's arena, CuPy kernels, cuDNN/TensorRT tactics) is not per-case cost.
            predictor.predict(load_volume(cases[0].image), roi_box_zyx=boxes.get(cases[0].name))
        per_case = []
        for case in cases:
            volume = load_volume(case.image)
            box = boxes.get(case.name)
            prediction = predictor.predict(volume, roi_box_zyx=None if box is None else tuple(map(tuple, box)))
            entry: dict[str, Any] = {"case": case.name, "time_s": prediction.timings_s["total"]}
            if case.labels is not None:
                scores = score_prediction(prediction.labels, read_nifti(case.labels))
                entry["dsc_organ_mean"], entry["nsd_organ_mean"] = _organ_means(scores)
            per_case.append(entry)
    finally:
        predictor.close()
        if restore_threads is not None:
            import torch  # optional: only when the torch row changed its threads above

            torch.set_num_threads(restore_threads)
    row["per_case"] = per_case
    row["time_s_per_case"] = float(np.mean([c["time_s"] for c in per_case]))
    scored = [c for c in per_case if "dsc_organ_mean" in c]
    if scored:
        row["dsc_organ_mean"] = float(np.mean([c["dsc_organ_mean"] for c in scored]))
        row["nsd_organ_mean"] = float(np.mean([c["nsd_organ_mean"] for c in scored]))
        row["dsc_organ_mean_pct"] = 100 * row["dsc_organ_mean"]
        row["nsd_organ_mean_pct"] = 100 * row["nsd_organ_mean"]


def benchmark_backends(model: str | os.PathLike, out: str | os.PathLike, *, device: str = "auto",
                       sizes: str | Sequence[Sequence[int]] | None = None, cases: str | os.PathLike | None = None,
                       labels: str | os.PathLike | None = None, roi_from_labels: bool = False, warmup: bool = True,
                       seed: int = 0, threads: int | None = None, overwrite: bool = False,
                       progress: bool = True) -> dict[str, Any]:
    """The backend x precision table of a model package on one device; writes ``backends.{md,csv,json}`` into ``out``.

    ``device``: ``auto`` (cuda when CuPy sees a GPU), ``cpu`` or ``cuda``. ``sizes``:
    synthetic cases (default :data:`BACKEND_SIZES`), made once in ``out/cases``, or
    ``cases``: a folder of NIfTI images with labels in ``labels`` (default: the
    sibling ``labelsTr``; cases without labels are timed, not scored).
    ``roi_from_labels``, ``warmup``, ``threads``: as :func:`.bench.run_bench`.
    Returns the result written to ``backends.json`` (``result["rows"]``).
    """
    out_dir = check_output(out, list(BACKEND_FILES.values()), overwrite=overwrite)
    if device not in ("auto", "cpu", "cuda"):
        raise InputError(None, f"device must be one of auto, cpu, cuda, got {device!r}")
    check_inputs(sizes, cases, threads)
    setup = prepare(out_dir, model, sizes=sizes, default_sizes=BACKEND_SIZES, cases=cases, labels=labels,
                    roi_from_labels=roi_from_labels, seed=seed, progress=progress)
    package, manifest, bench_cases, boxes = setup.package, setup.manifest, setup.cases, setup.boxes
    if device == "auto":
        device = "cuda" if cuda_available()[0] else "cpu"
    load_start = load_average()

    installed = probe_backends(import_torch=False)
    rows: list[dict[str, Any]] = []
    grid = [(b, p) for b in BACKENDS for p in PRECISIONS]
    with tqdm(grid, desc="backends", unit="row", disable=not progress) as bar:
        for backend, precision in bar:
            bar.set_postfix_str(f"{backend} {precision}")
            target = row_target(backend, precision)
            row: dict[str, Any] = {"backend": backend, "precision": precision, "device": device,
                                   "target": None if target is None else target.name, "status": "ok", "reason": ""}
            rows.append(row)
            files = ([] if target is None else
                     [s.files[target.name] for s in manifest.stages.values() if target.name in s.files])
            try:
                if not installed[backend].installed:
                    # Said first: resolve() would name a later obstacle (fp16 on the CPU, fp32 TensorRT engines).
                    row["detail"] = installed[backend].detail
                    raise EngineUnavailableError(f"{backend} is not installed here; {_INSTALL[backend]}")
                selection = resolve(backend, device, manifest, precision)
            except PocketsegError as exc:
                row.update(status="unavailable", reason=str(exc))
                row["model_mb"] = _files_mb(package, files) if files and backend != "tensorrt" else None
                continue
            if backend == "tensorrt":
                files = list(selection.engine_files.values())
            row["model_mb"] = _files_mb(package, files) if files else None
            if target is None or len(files) < len(manifest.stages):
                row.update(status="unavailable",
                           reason=f"the package has no {target.name if target else precision} file for every stage "
                                  f"(exported with --no-fp16?)")
                continue
            try:
                start = time.perf_counter()
                _run_row(package, row, bench_cases, boxes, threads=threads, warmup=warmup)
                log.info("%s %s: %.1f s", backend, precision, time.perf_counter() - start)
            except Exception as exc:  # noqa: BLE001 - a failing row is a row with its reason, as in Ultralytics' benchmark
                log.warning("%s %s failed: %s: %s", backend, precision, type(exc).__name__, exc)
                row.update(status="failed", reason=f"{type(exc).__name__}: {exc}")

    gpu = None
    if device == "cuda":
        try:
            reader = open_gpu_reader(0)
            gpu = getattr(reader, "device_name", "CUDA GPU")
            reader.close()
        except MemorySourceError:
            gpu = "CUDA GPU"
    result: dict[str, Any] = {
        "format": 1,
        "model": str(package),
        "model_presets": {name: stage.preset for name, stage in manifest.stages.items()},
        "device": device,
        "machine": machine_info(gpu, load_start),
        "settings": {"roi_from_labels": roi_from_labels, "warmup": warmup, "threads": threads, "seed": seed},
        "cases": [{"case": c.name, "size": c.size, "image": str(c.image),
                   "labels": None if c.labels is None else str(c.labels), "roi_box_zyx": boxes.get(c.name)}
                  for c in bench_cases],
        "rows": rows,
    }
    write_backends_report(result, out_dir, overwrite=overwrite)
    return result
