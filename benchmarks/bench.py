"""``pocketseg bench``: wall time and memory per case, cold and warm, optionally against nnU-Net v2.

    pocketseg bench -m PKG_DIR -o OUT_DIR [--device cpu|cuda] [--sizes 512x512x55,512x512x100]
                    [--cases DIR] [--compare nnunet] [--roi-from-labels]

Per case (FLARE 2023 paper, Table 6: case, image size, time, max GPU memory, total GPU memory):

* **cold**: a fresh process per case, as FLARE times a container: interpreter start,
  imports, model loading, reading the NIfTI file, both stages, post-processing,
  writing the label map. The parent times the process from start to exit and samples
  its memory: the GPU's used memory through NVML (:mod:`.memory`), or on the CPU the
  child's resident set size; the kernel's peak RSS of the child (``wait4``) is kept too.
* **warm**: one process loads the model once (and runs one untimed warm-up prediction),
  then reads, predicts and writes each case while sampling its own memory.

Memory is sampled every 0.1 s; the report gives the maximum and the area under the
curve (sum of samples x 0.1 s, MB·s), both as read (FLARE) and minus the reading when
the run began (the idle baseline: the idle GPU before a cold run, the loaded and idle
process before a warm case; on the CPU a cold process has no baseline, 0).

Cases: synthetic 512x512xN phantoms at the slice counts of Table 6 by default, written
once to ``OUT_DIR/cases`` (nnU-Net layout: ``imagesTr``, ``labelsTr``) and reused, or
the NIfTI images of ``--cases DIR``. ``--roi-from-labels`` skips the ROI stage and runs
the detail stage on the box of the case's labels plus the package's ROI margin: for
timing the paper-size nets, which have no trained weights, on a realistic crop.

``--compare nnunet`` runs nnU-Net v2's predictor on the same networks, weights and
cases (:mod:`.peers.nnunet`, tile step 1, no Gaussian, no mirroring) in the same
cold/warm harness, and reports the ratios of time and peak memory and the agreement
of the two label maps. Outputs in OUT_DIR (:mod:`.report`): ``bench.md``, ``bench.csv``,
``bench.json``, ``memory.png``; label maps in ``labels/``, child logs in ``logs/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from pocketseg import labels as L
from pocketseg.atomic import check_targets, ensure_dir, write_text
from pocketseg.benchmarks.memory import (INTERVAL_S, MemorySampler, memory_reader_details, open_gpu_reader,
                                         open_reader, open_rss_reader, own_peak_rss_mb)
from pocketseg.benchmarks.report import BENCH_FILES, write_bench_report, write_json
from pocketseg.errors import InputError, MissingDependencyError, OutputError, PocketsegError
from pocketseg.geometry import grow_box
from pocketseg.imageio import load_volume
from pocketseg.layout import IMAGES_TR, LABELS_TR, case_name, image_name, is_nifti_path, label_name
from pocketseg.manifest import Manifest, load_package
from pocketseg.nifti import read_nifti, write_labels, write_nifti
from pocketseg.runtime.arrays import bounding_box
from pocketseg.runtime.cascade import CascadePredictor
from pocketseg.runtime.engines import resolve
from pocketseg.synth.phantom import make_phantom
from pocketseg.types import Shape3
from pocketseg.volume import Volume, canonical_zyx

__all__ = [
    "DEFAULT_SIZES",
    "PEERS",
    "TABLE6_SLICES",
    "BenchCase",
    "BenchSetup",
    "folder_cases",
    "label_agreement",
    "machine_info",
    "parse_sizes",
    "prepare",
    "roi_box_from_labels",
    "run_bench",
    "synthetic_cases",
]

log = logging.getLogger(__name__)

#: Slice counts of the cases of Table 6 of the FLARE 2023 paper (all 512x512 in-plane).
TABLE6_SLICES = (55, 100, 150, 215, 334, 448, 499, 554)
DEFAULT_SIZES: tuple[Shape3, ...] = tuple((512, 512, n) for n in TABLE6_SLICES)
#: Peer pipelines of ``compare``: name -> how the report calls it.
PEERS = {"nnunet": "nnU-Net v2"}
PEER_SETTINGS = {"nnunet": "nnU-Net v2's `nnUNetPredictor` with the package's networks and weights and its sliding "
                           "window (tile step 1 - overlap, Gaussian weighting as the package says: tile step 1.0 and "
                           "none in the paper's settings), no mirroring/TTA, its own preprocessing, resampling and export; "
                           "ROI box, crop and post-processing as pocketseg's cascade (benchmarks/peers/nnunet.py)."}
#: Orientation of the synthetic cases: fixed, so a run is reproducible from its seed (LPS as DICOM-derived files).
CASE_ORIENTATION = "LPS"
CASES_RECORD = "cases.json"
#: Prefix of the result lines a worker process writes on stdout (other output there is a library's chatter).
MARKER = "@@pocketseg-bench "
WORKER_MODULE = "pocketseg.benchmarks.bench"
MODES = ("cold", "warm")


class BenchError(PocketsegError, RuntimeError):
    """The benchmark could not run (no case succeeded, a worker could not start)."""


# ----------------------------------------------------------------------------------------------------------- cases

@dataclass(frozen=True)
class BenchCase:
    """One image to time, with its labels (for ``roi_from_labels``) where known."""

    name: str
    image: Path
    labels: Path | None
    shape_ijk: Shape3

    @property
    def size(self) -> str:
        return " × ".join(map(str, self.shape_ijk))


def parse_sizes(sizes: str | Sequence[Sequence[int]] | None) -> tuple[Shape3, ...]:
    """Image sizes (i, j, k): ``"512x512x55,128x128x20"`` or a sequence of triples; None: Table 6's sizes.

    The phantom's in-plane matrix is square, so i must equal j.
    """
    if sizes is None:
        return DEFAULT_SIZES
    if isinstance(sizes, str):
        items: list[Any] = [s.strip() for s in sizes.split(",") if s.strip()]
        if not items:
            raise InputError(None, f"sizes must list at least one IxJxK size, got {sizes!r}")
    else:
        items = list(sizes)
    out: list[Shape3] = []
    for item in items:
        parts = item.lower().replace("×", "x").split("x") if isinstance(item, str) else list(item)
        try:
            shape = tuple(int(p) for p in parts)
        except (TypeError, ValueError):
            shape = ()
        if len(shape) != 3 or min(shape) < 1:
            raise InputError(None, f"size {item!r} is not IxJxK with three positive integers (e.g. 512x512x55)")
        if shape[0] != shape[1]:
            raise InputError(None, f"size {item!r}: synthetic cases have a square in-plane matrix (I = J)")
        if shape[0] < 64:
            raise InputError(None, f"size {item!r}: the in-plane matrix must be at least 64 to hold the phantom")
        if shape not in out:
            out.append(shape)  # type: ignore[arg-type]
    return tuple(out)


def _case_name(shape: Shape3) -> str:
    return "bench_" + "x".join(map(str, shape))


def synthetic_cases(folder: str | os.PathLike, sizes: str | Sequence[Sequence[int]] | None = None, *, seed: int = 0,
                    progress: bool = True) -> list[BenchCase]:
    """Synthetic phantoms of the given sizes in ``folder`` (imagesTr/, labelsTr/), made once and then reused.

    ``folder/cases.json`` records the seed of each case; a case made with another seed
    or of another shape is made again.
    """
    root = Path(folder)
    shapes = parse_sizes(sizes)
    images, labels = ensure_dir(root / IMAGES_TR, "cases folder"), ensure_dir(root / LABELS_TR, "cases folder")
    record_path = root / CASES_RECORD
    try:
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        record = {}
    cases, todo = [], []
    for shape in shapes:
        name = _case_name(shape)
        case = BenchCase(name, images / image_name(name), labels / label_name(name), shape)
        known = record.get(name, {})
        if not (case.image.is_file() and case.labels.is_file() and known.get("seed") == seed
                and tuple(known.get("shape_ijk", ())) == shape):
            todo.append(case)
        cases.append(case)
    for case in tqdm(todo, desc="synthesize cases", unit="case", disable=not progress or not todo):
        ph = make_phantom(seed, slices=case.shape_ijk[2], matrix=case.shape_ijk[0], orientation=CASE_ORIENTATION)
        write_nifti(ph.image, case.image, affine=ph.affine, overwrite=True)
        write_nifti(ph.labels, case.labels, affine=ph.affine, dtype=np.uint8, overwrite=True)
        record[case.name] = {"seed": seed, "shape_ijk": list(case.shape_ijk), "orientation": CASE_ORIENTATION,
                             "spacing_mm": ph.meta["spacing_mm"]}
        _write_json(record_path, record)
    return cases


def _write_json(path: Path, data: Any) -> None:
    write_json(path, data, overwrite=True)


def _natural_key(path: Path) -> list[Any]:
    """Sort key putting bench_512x512x55 before bench_512x512x100, as a table of growing sizes reads."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def folder_cases(images: str | os.PathLike, labels: str | os.PathLike | None = None) -> list[BenchCase]:
    """The NIfTI images of a folder (``CASE_0000.nii.gz`` or ``CASE.nii.gz``), with ``labels/CASE.nii.gz`` where present.

    ``labels`` defaults to the sibling ``labelsTr`` folder of an nnU-Net ``imagesTr``.
    """
    folder = Path(images)
    if not folder.is_dir():
        raise InputError(folder, "does not exist" if not folder.exists() else "is not a folder")
    label_dir = Path(labels) if labels is not None else folder.parent / LABELS_TR
    if labels is not None and not label_dir.is_dir():
        raise InputError(label_dir, "labels folder does not exist")
    cases = []
    for path in sorted(folder.iterdir(), key=_natural_key):
        if not path.is_file() or path.name.startswith(".") or not is_nifti_path(path):
            continue
        name = case_name(path)
        try:
            shape = tuple(int(n) for n in nib.load(path).shape)
        except Exception as exc:  # noqa: BLE001 - nibabel raises several types for unreadable headers
            raise InputError(path, f"not a readable NIfTI image ({type(exc).__name__}: {exc})") from None
        if len(shape) != 3:
            raise InputError(path, f"expected a 3D image, got shape {shape}")
        label = next((p for p in (label_dir / f"{name}.nii.gz", label_dir / f"{name}.nii") if p.is_file()), None)
        cases.append(BenchCase(name, path, label, shape))  # type: ignore[arg-type]
    if not cases:
        raise InputError(folder, "holds no .nii/.nii.gz images")
    return cases


def label_boxes(cases: Sequence[BenchCase], margin_mm: float) -> dict[str, Any]:
    """Per case, the ROI box of ``--roi-from-labels``: its labels' box plus the margin (canonical z, y, x)."""
    boxes: dict[str, Any] = {}
    for case in cases:
        if case.labels is None:
            raise InputError(case.image, "has no label file, which --roi-from-labels needs "
                                         "(give the labels folder with --labels)")
        boxes[case.name] = [list(b) for b in roi_box_from_labels(read_nifti(case.labels), margin_mm)]
    return boxes


def roi_box_from_labels(labels: Volume, margin_mm: float) -> tuple[tuple[int, int], ...]:
    """The canonical (z, y, x) box ([start, stop) per axis) of ``labels > 0`` plus ``margin_mm``, clipped.

    The margin is rounded up to whole voxels per axis (:func:`pocketseg.geometry.grow_box`), as the
    cascade widens the ROI net's box.
    """
    data, spacing = canonical_zyx(labels)
    box = bounding_box(np.asarray(data) > 0)
    if box is None:
        raise InputError(labels.source, "has no labels > 0, so it gives no ROI box (--roi-from-labels)")
    return tuple((sl.start, sl.stop) for sl in grow_box(box, spacing, margin_mm, data.shape))


def label_agreement(ours: np.ndarray, peer: np.ndarray, names: Mapping[int, str] | None = None) -> dict[str, Any]:
    """Voxel agreement and per-class Dice of two label maps of one shape.

    ``dice`` maps class names (``names``, default FLARE 2023's) to Dice in [0, 1], None
    where the class is in neither map; ``mean_dice`` averages the classes present in
    either map. ``foreground_agreement`` is the agreement over the union of both
    foregrounds.
    """
    a, b = np.asarray(ours), np.asarray(peer)
    if a.shape != b.shape:
        raise ValueError(f"label maps differ in shape: {a.shape} and {b.shape}")
    known = {lab.id: lab.display for lab in L.LABELS} if names is None else dict(names)
    n = max(int(a.max(initial=0)), int(b.max(initial=0)), max(known, default=0)) + 1
    joint = np.bincount(a.astype(np.int64).ravel() * n + b.astype(np.int64).ravel(), minlength=n * n).reshape(n, n)
    total = int(joint.sum())
    same = int(np.trace(joint))
    fg_union = total - int(joint[0, 0])
    dice: dict[str, float | None] = {}
    for cls in range(1, n):
        both, in_a, in_b = int(joint[cls, cls]), int(joint[cls].sum()), int(joint[:, cls].sum())
        name = known.get(cls, str(cls))
        dice[name] = None if in_a + in_b == 0 else 2.0 * both / (in_a + in_b)
    present = [v for v in dice.values() if v is not None]
    return {"voxel_agreement": same / total if total else 1.0,
            "foreground_agreement": (same - int(joint[0, 0])) / fg_union if fg_union else 1.0,
            "voxels": total, "dice": dice, "mean_dice": float(np.mean(present)) if present else None}


# ---------------------------------------------------------------------------------------- setup shared with --backends

@dataclass(frozen=True)
class BenchSetup:
    """What both benchmarks start from: the verified package, the output folder and the cases (with ROI boxes)."""

    out_dir: Path
    package: Path
    manifest: Manifest
    cases: list[BenchCase]
    boxes: dict[str, Any]


def check_output(out: str | os.PathLike, files: Sequence[str], *, overwrite: bool) -> Path:
    """The report folder, refused before any work when it is a file or (without ``overwrite``) holds a report."""
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(out_dir, "exists and is not a folder")
    check_targets([out_dir / name for name in files], overwrite=overwrite)
    return out_dir


def check_inputs(sizes: Any, cases: Any, threads: int | None) -> None:
    if sizes is not None and cases is not None:
        raise InputError(cases, "give either sizes (synthetic cases) or a cases folder, not both")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise InputError(None, f"threads must be a positive integer, got {threads!r}")


def prepare(out_dir: Path, model: str | os.PathLike, *, sizes: Any, default_sizes: Any, cases: Any, labels: Any,
            roi_from_labels: bool, seed: int, progress: bool, manifest: Manifest | None = None) -> BenchSetup:
    """Verify the package (unless given its manifest), make or find the cases, and their ROI boxes."""
    package = Path(model)
    manifest = load_package(package) if manifest is None else manifest  # checksums before anything is timed
    bench_cases = (folder_cases(cases, labels) if cases is not None
                   else synthetic_cases(out_dir / "cases", default_sizes if sizes is None else sizes, seed=seed,
                                        progress=progress))
    boxes = label_boxes(bench_cases, manifest.roi_margin_mm) if roi_from_labels else {}
    return BenchSetup(out_dir, package, manifest, bench_cases, boxes)


def load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def machine_info(gpu: str | None, load_start: list[float] | None) -> dict[str, Any]:
    """The machine a benchmark ran on, for its report."""
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "gpu": gpu, "load_average_start": load_start, "load_average_end": load_average()}


# ------------------------------------------------------------------------------------------------ worker processes

class _Pipeline:
    """What a worker runs: pocketseg's cascade or a peer, loaded once."""

    def __init__(self, spec: dict[str, Any]):
        self.name = spec["pipeline"]
        self.device = spec["device"]
        if self.name == "pocketseg":
            if spec.get("threads") and spec["backend"] == "torch":
                import torch  # optional (train extra): the torch backend only

                torch.set_num_threads(int(spec["threads"]))  # threads= of CascadePredictor steers ONNX Runtime, OpenVINO and BLAS

            self.impl: Any = CascadePredictor(spec["model"], device=spec["device"], backend=spec["backend"],
                                              precision=spec["precision"], threads=spec.get("threads"))
            self.backend, self.precision = self.impl.backend, self.impl.selection.precision
        elif self.name == "nnunet":
            # The peer needs torch and nnU-Net (peers extra): imported when it is compared against.
            import torch

            from pocketseg.benchmarks.peers.nnunet import NnUNetCascade  # needs torch and nnU-Net

            if spec.get("threads"):
                torch.set_num_threads(int(spec["threads"]))
            # The package's sliding window, as pocketseg's runtime runs it (the paper's tile step 1 by default).
            self.impl = NnUNetCascade(spec["model"], device=spec["device"])
            # nnU-Net runs the network under autocast on CUDA (mixed fp16), in fp32 on the CPU.
            self.backend, self.precision = "torch", "fp16 autocast" if spec["device"] == "cuda" else "fp32"
        else:
            raise InputError(None, f"unknown pipeline {self.name!r}")

    def predict(self, volume: Volume, box: Sequence[Sequence[int]] | None) -> tuple[np.ndarray, dict[str, float]]:
        if self.name == "pocketseg":
            roi_box = None if box is None else tuple((int(a), int(b)) for a, b in box)
            result = self.impl.predict(volume, roi_box_zyx=roi_box)
            return result.labels, result.timings_s
        labels = self.impl.predict(volume, roi_box_zyx=box)
        return labels, dict(self.impl.last_timings)

    def release(self) -> None:
        """Hand cached device memory back, so that the next case starts from the same idle baseline.

        pocketseg: every engine's cache (torch's caching allocator, ONNX Runtime's arena) and CuPy's pool.
        """
        if self.name == "pocketseg":
            self.impl.free_cached_memory()
        elif self.device == "cuda":
            import torch  # the peer's torch, loaded with it above

            torch.cuda.empty_cache()

    def close(self) -> None:
        if self.name == "pocketseg":
            self.impl.close()


def _emit(event: dict[str, Any]) -> None:
    sys.stdout.write(MARKER + json.dumps(event) + "\n")
    sys.stdout.flush()


def _worker(spec: dict[str, Any]) -> int:
    """Run one pipeline on the spec's cases in this process; one result line per case on stdout."""
    t0 = time.perf_counter()
    pipeline = _Pipeline(spec)
    _emit({"event": "loaded", "load_s": time.perf_counter() - t0, "backend": pipeline.backend,
           "precision": pipeline.precision})
    reader = open_reader(spec["device"], pid=os.getpid()) if spec.get("sample") else None
    cases = spec["cases"]
    if spec.get("warmup") and cases:
        # First calls pay for lazy initialisation (ONNX Runtime's arena, CuPy's kernel compilation, cuDNN/TensorRT
        # tactics); a warm process has paid it already.
        pipeline.predict(load_volume(cases[0]["image"]), cases[0].get("roi_box_zyx"))
        pipeline.release()
    for case in cases:
        sampler = MemorySampler(reader, spec["interval_s"]).start() if reader is not None else None
        event: dict[str, Any] = {"event": "case", "case": case["case"]}
        try:
            start = time.perf_counter()
            volume = load_volume(case["image"])
            t_read = time.perf_counter()
            labels, stages = pipeline.predict(volume, case.get("roi_box_zyx"))
            t_pred = time.perf_counter()
            ensure_dir(Path(case["labels_out"]).parent, "labels folder")
            write_labels(labels, case["labels_out"], reference=volume, overwrite=True)
            t_write = time.perf_counter()
            event.update(status="ok", time_s=t_write - start, read_s=t_read - start, predict_s=t_pred - t_read,
                         write_s=t_write - t_pred, stages_s=stages)
            del labels, volume
        except Exception as exc:  # one failing case is reported; the others still run
            log.exception("%s failed", case["case"])
            event.update(status=f"failed: {type(exc).__name__}: {exc}")
        finally:
            if sampler is not None:
                event["memory"] = sampler.stop().to_dict()
        _emit(event)
        pipeline.release()
    pipeline.close()
    if reader is not None:
        reader.close()
    _emit({"event": "done", "peak_rss_mb": own_peak_rss_mb()})
    return 0


# ------------------------------------------------------------------------------------------------------- the parent

@dataclass
class _Context:
    out: Path
    spec_dir: Path
    settings: dict[str, Any]
    gpu_reader: Any  # a GPU MemoryReader for cold runs on cuda, else None
    env: dict[str, str]


def _events(stream) -> Iterator[dict[str, Any]]:
    for line in stream:
        if line.startswith(MARKER):
            try:
                yield json.loads(line[len(MARKER):])
            except json.JSONDecodeError:
                log.debug("unreadable worker line: %s", line.rstrip())
        elif line.strip():
            log.debug("worker: %s", line.rstrip())


def _wait_unreaped(pid: int) -> None:
    """Wait until ``pid`` has exited without reaping it, so its PID cannot be reused while it is still sampled."""
    if hasattr(os, "waitid") and hasattr(os, "WNOWAIT"):
        with contextlib.suppress(ChildProcessError, InterruptedError):
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)


def _log_tail(path: Path, lines: int = 3) -> str:
    try:
        text = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def _launch(ctx: _Context, spec: dict[str, Any], tag: str) -> tuple[subprocess.Popen, Path]:
    """Start a worker; its stderr goes to a scratch log that :func:`_finish` moves to ``OUT_DIR/logs/TAG.log``."""
    spec_path = ctx.spec_dir / f"{tag}.json"
    write_json(spec_path, spec)
    with open(ctx.spec_dir / f"{tag}.log", "w") as err:  # the child keeps its own descriptor
        proc = subprocess.Popen([sys.executable, "-m", WORKER_MODULE, "--worker", str(spec_path)],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=ctx.env)
    return proc, ctx.out / "logs" / f"{tag}.log"


def _finish(ctx: _Context, proc: subprocess.Popen, log_path: Path) -> tuple[int, float]:
    """Reap the child and keep its log: (exit status, its peak RSS in MB from the kernel).

    The kernel's figure (``ru_maxrss``) includes the parent's peak (:func:`own_peak_rss_mb` says why); it is
    used only where the worker ended before reporting its own.
    """
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    # Streamed into scratch while the child ran; written here in one atomic step like every other output.
    scratch = ctx.spec_dir / log_path.name
    write_text(log_path, scratch.read_text(errors="replace") if scratch.is_file() else "", overwrite=True)
    return proc.returncode, usage.ru_maxrss / 1024.0  # ru_maxrss is in kB on Linux


def _case_spec(case: BenchCase, pipeline: str, mode: str, ctx: _Context, box) -> dict[str, Any]:
    return {"case": case.name, "image": str(case.image), "roi_box_zyx": box,
            "labels_out": str(ctx.out / "labels" / pipeline / mode / f"{case.name}.nii.gz")}


def _worker_spec(ctx: _Context, pipeline: str, cases: list[dict[str, Any]], *, sample: bool, warmup: bool) -> dict:
    s = ctx.settings
    return {"pipeline": pipeline, "model": s["model"], "device": s["device"], "backend": s["backend"],
            "precision": s["precision"], "threads": s["threads"], "cases": cases, "sample": sample,
            "warmup": warmup, "interval_s": s["interval_s"]}


def _failed_run(case: BenchCase, pipeline: str, mode: str, why: str) -> dict[str, Any]:
    return {"case": case.name, "pipeline": pipeline, "mode": mode, "status": f"failed: {why}"}


def _run_cold(ctx: _Context, pipeline: str, case: BenchCase, box) -> dict[str, Any]:
    """One case in a fresh process, timed and memory-sampled from outside."""
    spec = _worker_spec(ctx, pipeline, [_case_spec(case, pipeline, "cold", ctx, box)], sample=False, warmup=False)
    tag = f"{pipeline}-cold-{case.name}"
    # The idle baseline of a cold run: the GPU before the process starts; on the CPU the process does not exist yet.
    baseline = ctx.gpu_reader.read_mb() if ctx.gpu_reader is not None else 0.0
    start = time.perf_counter()
    proc, log_path = _launch(ctx, spec, tag)
    reader = ctx.gpu_reader if ctx.gpu_reader is not None else open_rss_reader(proc.pid)
    sampler = MemorySampler(reader, ctx.settings["interval_s"]).start(baseline_mb=baseline)
    try:
        events = list(_events(proc.stdout))
        _wait_unreaped(proc.pid)
        wall = time.perf_counter() - start
    finally:
        trace = sampler.stop()
    code, peak_rss = _finish(ctx, proc, log_path)
    peak_rss = next((e["peak_rss_mb"] for e in events if e.get("event") == "done"), peak_rss)
    loaded = next((e for e in events if e.get("event") == "loaded"), {})
    result = next((e for e in events if e.get("event") == "case"), None)
    if code != 0 or result is None:
        return _failed_run(case, pipeline, "cold", f"exit status {code}; {_log_tail(log_path)} (log: {log_path})")
    run = {"case": case.name, "pipeline": pipeline, "mode": "cold", **{k: v for k, v in result.items() if k != "event"},
           "load_s": loaded.get("load_s"), "backend": loaded.get("backend"), "precision": loaded.get("precision"),
           "peak_rss_mb": peak_rss, "memory": trace.to_dict(), "labels": spec["cases"][0]["labels_out"],
           "log": str(log_path)}
    if run["status"] == "ok":
        run["in_process_s"] = run["time_s"]  # read + predict + write, as the process itself timed them
        run["time_s"] = wall  # the whole process, as FLARE times a container
    return run


def _run_warm(ctx: _Context, pipeline: str, cases: list[BenchCase], boxes: dict[str, Any], *,
              progress: bool) -> list[dict[str, Any]]:
    """All cases in one process that loads the model once and samples its own memory."""
    specs = [_case_spec(c, pipeline, "warm", ctx, boxes.get(c.name)) for c in cases]
    spec = _worker_spec(ctx, pipeline, specs, sample=True, warmup=ctx.settings["warmup"])
    proc, log_path = _launch(ctx, spec, f"{pipeline}-warm")
    runs: dict[str, dict[str, Any]] = {}
    loaded: dict[str, Any] = {}
    own_peak = None
    with tqdm(total=len(cases), desc=f"warm {pipeline}", unit="case", disable=not progress) as bar:
        for event in _events(proc.stdout):
            if event.get("event") == "loaded":
                loaded = event
            elif event.get("event") == "case":
                runs[event["case"]] = {"pipeline": pipeline, "mode": "warm",
                                       **{k: v for k, v in event.items() if k != "event"},
                                       "load_s": loaded.get("load_s"), "backend": loaded.get("backend"),
                                       "precision": loaded.get("precision"), "log": str(log_path),
                                       "labels": next(s["labels_out"] for s in specs if s["case"] == event["case"])}
                bar.update(1)
            elif event.get("event") == "done":
                own_peak = event["peak_rss_mb"]
    code, peak_rss = _finish(ctx, proc, log_path)
    peak_rss = own_peak if own_peak is not None else peak_rss
    out = []
    for case in cases:
        if case.name in runs:
            runs[case.name]["process_peak_rss_mb"] = peak_rss  # of the whole warm process, all cases
            out.append(runs[case.name])
        else:
            out.append(_failed_run(case, pipeline, "warm", f"the warm process ended (exit status {code}) before this "
                                                           f"case; {_log_tail(log_path)} (log: {log_path})"))
    return out


def _check_compare(compare: str | None) -> None:
    if compare is None:
        return
    if compare not in PEERS:
        raise InputError(None, f"compare must be one of {', '.join(PEERS)}, got {compare!r}")
    for module in ("nnunetv2", "torch", "safetensors"):
        if importlib.util.find_spec(module) is None:
            raise MissingDependencyError(module, f"The {PEERS[compare]} comparison (--compare {compare})", "peers")


def _gpu_name(reader: Any) -> str | None:
    return getattr(reader, "device_name", None) if reader is not None else None


def _comparison(runs: list[dict[str, Any]], cases: list[BenchCase], peer: str) -> list[dict[str, Any]]:
    index = {(r["case"], r["pipeline"], r["mode"]): r for r in runs}
    rows = []
    for case in cases:
        row: dict[str, Any] = {"case": case.name, "size": case.size, "peer": peer}
        for mode in MODES:
            ours, theirs = index.get((case.name, "pocketseg", mode)), index.get((case.name, peer, mode))
            if not ours or not theirs or ours["status"] != "ok" or theirs["status"] != "ok":
                continue
            row[f"time_ratio_{mode}"] = theirs["time_s"] / ours["time_s"]
            m_ours, m_theirs = ours.get("memory") or {}, theirs.get("memory") or {}
            if m_ours.get("max_mb") and m_theirs.get("max_mb"):
                row[f"memory_ratio_{mode}"] = m_ours["max_mb"] / m_theirs["max_mb"]
            if m_ours.get("max_above_baseline_mb") and m_theirs.get("max_above_baseline_mb"):
                row[f"memory_above_baseline_ratio_{mode}"] = (m_ours["max_above_baseline_mb"]
                                                              / m_theirs["max_above_baseline_mb"])
        # Label agreement from the warm run's maps where there is one (cold and warm compute the same labels).
        for mode in ("warm", "cold"):
            ours, theirs = index.get((case.name, "pocketseg", mode)), index.get((case.name, peer, mode))
            if ours and theirs and ours["status"] == "ok" and theirs["status"] == "ok":
                agreement = label_agreement(np.asarray(read_nifti(ours["labels"]).data),
                                            np.asarray(read_nifti(theirs["labels"]).data))
                row.update(agreement, labels_from=mode, voxel_agreement_pct=100 * agreement["voxel_agreement"],
                           mean_dice_pct=None if agreement["mean_dice"] is None else 100 * agreement["mean_dice"])
                break
        rows.append(row)
    return rows


def run_bench(model: str | os.PathLike, out: str | os.PathLike, *, device: str = "auto", backend: str = "auto",
              precision: str = "auto", sizes: str | Sequence[Sequence[int]] | None = None,
              cases: str | os.PathLike | None = None, labels: str | os.PathLike | None = None,
              compare: str | None = None, roi_from_labels: bool = False, cold: bool = True, warm: bool = True,
              warmup: bool = True, seed: int = 0, threads: int | None = None, overwrite: bool = False,
              progress: bool = True) -> dict[str, Any]:
    """Time and memory of the cascade (and of a peer) per case, cold and warm; writes the report into ``out``.

    ``model``: model package folder. ``device``/``backend``/``precision``: as
    ``pocketseg predict`` (resolved once, then passed explicitly to every process).
    ``sizes``: synthetic cases, e.g. ``"512x512x55,512x512x100"`` (default: Table 6's
    eight sizes), made once in ``out/cases``; ``cases``: a folder of NIfTI images
    instead, with labels in ``labels`` (default: the sibling ``labelsTr``).
    ``compare``: ``"nnunet"`` adds nnU-Net v2's predictor. ``roi_from_labels``: skip
    the ROI stage, using the labels' box plus the ROI margin. ``cold``/``warm``:
    which runs to make; ``warmup``: one untimed prediction before the warm runs.
    ``threads``: CPU threads of ONNX Runtime / OpenVINO / torch and of the CPU resampling (default: all cores).
    Returns the result written to ``bench.json``; ``result["files"]`` lists the report files.
    """
    out_dir = check_output(out, list(BENCH_FILES.values()), overwrite=overwrite)
    if not (cold or warm):
        raise InputError(None, "nothing to run: both cold and warm runs are switched off")
    check_inputs(sizes, cases, threads)
    _check_compare(compare)
    manifest = load_package(model)  # verifies the checksums before anything is timed
    selection = resolve(backend, device, manifest, precision)
    setup = prepare(out_dir, model, sizes=sizes, default_sizes=None, cases=cases, labels=labels,
                    roi_from_labels=roi_from_labels, seed=seed, progress=progress, manifest=manifest)
    package, bench_cases, boxes = setup.package, setup.cases, setup.boxes

    pipelines = ["pocketseg"] + ([compare] if compare else [])
    gpu_reader = open_gpu_reader(0) if selection.device == "cuda" else None
    memory_reader = gpu_reader if gpu_reader is not None else open_rss_reader()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load_start = load_average()
    env = dict(os.environ)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pocketseg-bench-") as tmp:
        ctx = _Context(out_dir, Path(tmp), {"model": str(package.resolve()), "device": selection.device,
                                            "backend": selection.backend, "precision": selection.precision,
                                            "threads": threads, "interval_s": INTERVAL_S, "warmup": warmup},
                       gpu_reader, env)
        try:
            if cold:
                jobs = [(c, p) for c in bench_cases for p in pipelines]  # pipelines alternate: load drifts hit both
                for case, pipeline in tqdm(jobs, desc="cold runs", unit="run", disable=not progress):
                    runs.append(_run_cold(ctx, pipeline, case, boxes.get(case.name)))
            if warm:
                for pipeline in pipelines:
                    runs.extend(_run_warm(ctx, pipeline, bench_cases, boxes, progress=progress))
        finally:
            if gpu_reader is not None:
                gpu_reader.close()
    for run in runs:
        if run["status"] != "ok":
            log.warning("%s %s %s: %s", run["case"], run["pipeline"], run["mode"], run["status"])
    if not any(r["status"] == "ok" for r in runs):
        raise BenchError(f"every run failed; see the logs in {out_dir / 'logs'} (first: {runs[0]['status']})")

    order = {c.name: i for i, c in enumerate(bench_cases)}
    runs.sort(key=lambda r: (order[r["case"]], MODES.index(r["mode"]), pipelines.index(r["pipeline"])))
    result: dict[str, Any] = {
        "format": 1,
        "created": started,
        "model": str(package),
        "model_presets": {name: stage.preset for name, stage in manifest.stages.items()},
        "roi_margin_mm": manifest.roi_margin_mm,
        "device": selection.device, "backend": selection.backend, "precision": selection.precision,
        "selection_reason": selection.reason,
        "compare": compare,
        "machine": machine_info(_gpu_name(gpu_reader), load_start),
        "memory": {"source": memory_reader.source, "description": memory_reader.description,
                   "tried": getattr(memory_reader, "tried", []), "interval_s": INTERVAL_S,
                   **memory_reader_details(memory_reader),
                   "baseline": ("device used memory before a cold process starts; before each warm case, with the "
                                "model loaded" if gpu_reader is not None else
                                "0 for a cold process; before each warm case, the loaded process's RSS")},
        "settings": {"sizes": None if cases is not None else [list(s) for s in parse_sizes(sizes)],
                     "cases": None if cases is None else str(cases), "roi_from_labels": roi_from_labels,
                     "cold": cold, "warm": warm, "warmup": warmup, "seed": seed, "threads": threads,
                     "batch_size": 1, **dataclasses.asdict(manifest.inference)},
        "cases": [{"case": c.name, "image": str(c.image), "labels": None if c.labels is None else str(c.labels),
                   "shape_ijk": list(c.shape_ijk), "size": c.size, "roi_box_zyx": boxes.get(c.name)}
                  for c in bench_cases],
        "runs": runs,
    }
    if memory_reader is not gpu_reader:
        memory_reader.close()
    if compare:
        result["peer_title"] = PEERS[compare]
        result["peer_settings"] = PEER_SETTINGS[compare]
        result["comparison"] = _comparison(runs, bench_cases, compare)
    write_bench_report(result, out_dir, overwrite=overwrite)
    log.info("bench report: %s", result["files"]["markdown"])
    return result


def _main(argv: Sequence[str] | None = None) -> int:
    """Worker entry point (``python -m pocketseg.benchmarks.bench --worker SPEC``); users run ``pocketseg bench``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] != "--worker":
        sys.stderr.write("usage: python -m pocketseg.benchmarks.bench --worker SPEC.json (internal; use pocketseg bench)\n")
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return _worker(json.loads(Path(args[1]).read_text()))


if __name__ == "__main__":
    sys.exit(_main())
