"""Every GPU check in one command, with one report: the CuPy tests, the cascade on the GPU against the CPU,
the paper-size benchmark with its memory curve.

    make gpu-check            # on a lent GPU machine, offline (docs/development.md, "Checks on a GPU")
    make gpu-check DRY=1      # anywhere: the same steps with tiny inputs on the NumPy path
    python -m pocketseg.benchmarks.gpu_check [--out DIR] [--dry-run] [--steps a,b] [--budget STEP=S] ...

Each step runs in a process group of its own with its own time budget. A step that overruns
is killed with everything it started, and the report still says what it had done by then;
whatever happens, the report is written. Default budgets (an H100/H200; 465 s together, about
8 minutes with unpacking the kit):

* ``environment`` (30 s): ``pocketseg doctor --json``: the card, driver, CUDA, CuPy, cuCIM, torch.
* ``gpu-tests`` (135 s): ``pytest -m gpu tests/``, the CuPy variants of resampling, the sliding
  window, post-processing and the metrics against the NumPy path.
* ``cascade`` (120 s): the cascade on the real CT examples (when found, else said so) and on two
  synthetic phantoms, on the GPU (CuPy, torch fp32 with TF32 off, and fp16) and on the CPU
  (NumPy, torch fp32): voxel agreement of the label maps (fp32: at least 99.9 %, required; fp16:
  required only for a trained ``--model``, since untrained nets have near-tied logits) and the
  time of each stage. Default nets: untrained ``roi-cpu``/``detail-cpu``, which the CPU runs in
  seconds.
* ``bench`` (the time left, at least 180 s): ``run_bench`` with the paper-size nets (``roi`` and
  ``detail`` presets, He-initialised, ROI box from the labels) on the torch backend in fp16, at
  the slice counts of Table 6 from the smallest up, as many as the time left predicts to fit,
  cold and warm, GPU memory through NVML every 0.1 s (maximum, area under the curve), with
  ``--compare nnunet`` on the same nets when nnU-Net v2 is installed.

The dry run (``dry_run=True``) walks the same steps on the CPU: the NumPy twins of a few CuPy
tests, the cascade with the tiny presets on small phantoms (and the smallest CT example) with
the NumPy path standing in for the GPU, and the bench with the tiny presets at 64x64x20 on the
torch backend in fp32; it checks the plumbing and measures nothing.

Outputs in ``out`` (by default ``$OUT`` when set, else ``gpu-check-output``), four files:
``gpu-report.md``, ``gpu-report.json`` (everything, every memory sample), ``gpu-memory.png`` and
``gpu-check.log`` (this run's log and the end of each step's). ``--publish DIR`` copies a report
into ``docs/benchmarks/gpu/DATE-CARD.md`` (and ``.png``), where GPU reports are committed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from pocketseg.atomic import atomic_write_bytes, check_targets, ensure_dir, read_json, write_text
from pocketseg.benchmarks.bench import DEFAULT_SIZES, label_agreement, parse_sizes, run_bench
from pocketseg.benchmarks.report import (COMPARISON_COLUMNS, RUN_COLUMNS, Column, Curve, markdown_table,
                                         plot_memory_curves, run_rows, write_json)
from pocketseg.errors import InputError, PocketsegError
from pocketseg.imageio import load_volume
from pocketseg.layout import is_nifti_path
from pocketseg.runtime.cascade import CascadePredictor
from pocketseg.synth.phantom import make_phantom
from pocketseg.types import Shape3
from pocketseg.version import __version__
from pocketseg.volume import Volume

__all__ = ["AGREEMENT_MIN", "REPORT_FILES", "STEPS", "Step", "find_ct_examples", "predict_seconds",
           "publish_report", "run_gpu_check"]

log = logging.getLogger(__name__)

#: Voxel agreement of the GPU's labels with the CPU's that the check requires.
AGREEMENT_MIN = 0.999
#: The report's files in the output folder (the GPU machine returns at most 8).
REPORT_FILES = {"markdown": "gpu-report.md", "json": "gpu-report.json", "plot": "gpu-memory.png",
                "log": "gpu-check.log"}
OUT_ENV = "OUT"
DEFAULT_OUT = "gpu-check-output"
CT_EXAMPLES_ENV = "POCKETSEG_CT_EXAMPLES"
DEFAULT_KIT = "gpu-kit"
#: Seconds a step keeps back from its budget to write its result before the parent kills it.
RESERVE_S = 5.0
#: A step is not started with less time than this left.
MIN_STEP_S = 2.0
#: Bytes of each step's log kept in the report's log file.
LOG_TAIL_BYTES = 200_000
WORKER_MODULE = "pocketseg.benchmarks.gpu_check"
#: Prediction of a bench size's time from the smaller ones is multiplied by this (load varies).
PLAN_SAFETY = 1.15


@dataclass(frozen=True)
class Step:
    """One step of the check: its name, its default budget (real run / dry run, seconds) and what it does."""

    name: str
    budget_s: float
    dry_budget_s: float
    title: str
    #: Takes the time the steps before it left unused (the bench: as many sizes as fit).
    elastic: bool = False


STEPS: tuple[Step, ...] = (
    Step("environment", 30, 60, "Machine and versions (pocketseg doctor)"),
    Step("gpu-tests", 135, 60, "GPU tests: the CuPy variants against the NumPy path"),
    Step("cascade", 120, 180, "Cascade on the GPU against the CPU"),
    Step("bench", 180, 240, "Benchmark: the paper-size nets at the sizes of Table 6", elastic=True),
)
STEP_NAMES = tuple(s.name for s in STEPS)
TOTAL_BUDGET_S = 465.0
DRY_TOTAL_BUDGET_S = 600.0

#: The cascade step's inputs and nets, real run and dry run.
CASCADE_PRESETS = {"roi": "roi-cpu", "detail": "detail-cpu"}
DRY_PRESETS = {"roi": "roi-tiny", "detail": "detail-tiny"}
CASCADE_PHANTOMS = ((0, 512, 80), (1, 512, 120))  # (seed, in-plane matrix, slices)
DRY_PHANTOMS = ((0, 64, 20), (1, 64, 24))
#: The bench step's nets: the paper's (FLARE 2023 Pocket U-Nets).
BENCH_PRESETS = {"roi": "roi", "detail": "detail"}
DRY_BENCH_SIZES: tuple[Shape3, ...] = ((64, 64, 20),)
#: What the dry run's test step runs: the NumPy twins of CuPy tests (the same test bodies).
DRY_TEST_ARGS = ("tests/test_metrics.py", "-m", "not gpu", "-k", "numpy")
GPU_TEST_ARGS = ("tests", "-m", "gpu")


class GpuCheckError(PocketsegError, RuntimeError):
    """A step could not do its work (the message says why); the report records it."""


# ------------------------------------------------------------------------------------------------------ helpers

def resolve_out(out: str | os.PathLike | None) -> Path:
    """The report folder: ``out``, else ``$OUT`` (the GPU machine's folder that comes back), else a local one."""
    if out is not None:
        return Path(out)
    return Path(os.environ[OUT_ENV]) if os.environ.get(OUT_ENV) else Path(DEFAULT_OUT)


def find_ct_examples(explicit: str | os.PathLike | None = None, *, root: str | os.PathLike = ".",
                     kit: str | os.PathLike = DEFAULT_KIT) -> tuple[Path | None, list[str]]:
    """(the real CT examples folder or None, where it was looked for).

    ``explicit`` or ``$POCKETSEG_CT_EXAMPLES`` is the only place looked at when given (as the
    tests do); else ``ROOT/../shared/data/ct_examples`` beside the clone, then the kit's carried
    copy ``KIT/carry/ct_examples``.
    """
    if explicit is not None:
        candidates = [Path(explicit)]
    elif os.environ.get(CT_EXAMPLES_ENV):
        candidates = [Path(os.environ[CT_EXAMPLES_ENV])]
    else:
        candidates = [Path(root).resolve().parent / "shared" / "data" / "ct_examples",
                      Path(kit) / "carry" / "ct_examples"]
    for folder in candidates:
        if folder.is_dir():
            return folder, [str(c) for c in candidates]
    return None, [str(c) for c in candidates]


def predict_seconds(history: Sequence[tuple[int, float]], slices: int) -> float | None:
    """Predicted seconds of a bench size from the sizes before it ((slices, seconds), ascending); None: no data.

    One earlier size: its time scaled by the slice ratio (an over-estimate, since part of a
    run is fixed). Two or more: the line through the last two, never falling, times a margin.
    """
    if not history:
        return None
    n2, t2 = history[-1]
    if len(history) == 1:
        return t2 * max(slices / n2, 1.0) * PLAN_SAFETY
    n1, t1 = history[-2]
    slope = max((t2 - t1) / (n2 - n1), 0.0) if n2 != n1 else 0.0
    return max(t2 + slope * (slices - n2), t2) * PLAN_SAFETY


def _versions(names: Sequence[str]) -> dict[str, str | None]:
    """Installed versions without importing anything (a CUDA library must not start in the parent)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _commit(root: Path) -> str | None:
    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=root,
                              capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None  # no git or no repository (the GPU machine gets the tree without its history)
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def _tail(path: Path, n_bytes: int = LOG_TAIL_BYTES) -> str:
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(size - n_bytes, 0))
            return handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _last_lines(text: str, n: int) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()][-n:]


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return re.sub(r"^nvidia-", "", slug) or "unknown"


# ----------------------------------------------------------------------------------------------- running steps

def _kill_group(proc: subprocess.Popen) -> None:
    """End a step and everything it started (its own process group): TERM, then KILL after 3 s."""
    for sig, wait_s in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue


def run_step_process(argv: Sequence[str], *, budget_s: float, log_path: Path, cwd: Path, env: Mapping[str, str],
                     stdout_path: Path | None = None) -> dict[str, Any]:
    """Run one step's command with a time budget; stderr (and stdout, unless ``stdout_path``) to ``log_path``.

    Returns ``{"returncode", "seconds", "timed_out"}``; an overrun kills the step's whole process group.
    """
    start = time.monotonic()
    with open(log_path, "wb") as err:
        out = open(stdout_path, "wb") if stdout_path is not None else None  # noqa: SIM115 - closed below
        try:
            proc = subprocess.Popen(list(argv), cwd=cwd, env=dict(env), stdout=out if out is not None else err,
                                    stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                code: int | None = proc.wait(timeout=max(budget_s, 0.01))
                timed_out = False
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                code, timed_out = proc.returncode, True
            except BaseException:  # interrupted: leave nothing running on the GPU
                _kill_group(proc)
                raise
        finally:
            if out is not None:
                out.close()
    return {"returncode": code, "seconds": round(time.monotonic() - start, 2), "timed_out": timed_out}


def _step_env(ct_dir: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    # The repository root holds the core folder `pocketseg/` alone; the installed package (rooms mapped in) must
    # win, so the current folder is never put first on sys.path (python -P).
    env["PYTHONSAFEPATH"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("MPLBACKEND", "Agg")
    if ct_dir is not None:
        env[CT_EXAMPLES_ENV] = str(ct_dir.resolve())
    return env


# ------------------------------------------------------------------------------------------ steps: the parent's side

def _environment_result(outcome: dict[str, Any], stdout_path: Path) -> dict[str, Any]:
    try:
        doctor = read_json(stdout_path)
    except InputError as exc:
        return {"status": "failed", "summary": f"no doctor report ({exc})"}
    gpus = doctor.get("gpus", {})
    devices = gpus.get("devices") or []
    libs = doctor.get("libraries", {})
    card = devices[0]["name"] if devices else None
    summary = (f"{card}, driver {gpus.get('driver_version')}, CUDA {gpus.get('cuda_driver_version')}"
               if card else "no GPU found: " + "; ".join(gpus.get("tried") or []))
    return {"status": "ok", "summary": summary, "doctor": doctor, "card": card,
            "cupy_usable": bool(libs.get("cupy", {}).get("usable"))}


def parse_junit(path: Path) -> dict[str, Any]:
    """Counts and the failed and skipped tests of a pytest JUnit XML file."""
    root = ET.parse(path).getroot()
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failed, skipped = [], []
    for case in root.iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        kinds = {child.tag: child for child in case}
        if "failure" in kinds or "error" in kinds:
            child = kinds.get("failure", kinds.get("error"))
            counts["failed" if "failure" in kinds else "errors"] += 1
            failed.append({"test": test_id, "message": (child.get("message") or child.text or "").strip()[:500]})
        elif "skipped" in kinds:
            counts["skipped"] += 1
            skipped.append({"test": test_id, "reason": (kinds["skipped"].get("message") or "").strip()[:300]})
        else:
            counts["passed"] += 1
    return {**counts, "total": sum(counts.values()), "failures": failed, "skips": skipped}


_RESULT_LINE = re.compile(r"^(\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def _progress_from_log(text: str) -> dict[str, int]:
    """What a killed pytest had reported (``-v`` lines) before the end."""
    counts: dict[str, int] = {}
    for line in text.splitlines():
        match = _RESULT_LINE.match(line.strip())
        if match:
            counts[match.group(2).lower()] = counts.get(match.group(2).lower(), 0) + 1
    return counts


def _tests_result(outcome: dict[str, Any], junit: Path, log_path: Path, dry_run: bool) -> dict[str, Any]:
    if not junit.is_file():
        progress = _progress_from_log(_tail(log_path, 2_000_000))
        done = ", ".join(f"{n} {k}" for k, n in sorted(progress.items())) or "nothing"
        return {"status": "timeout" if outcome["timed_out"] else "error",
                "summary": f"no JUnit report; the log shows {done} before the end", "progress": progress}
    tests = parse_junit(junit)
    summary = (f"{tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
               f"{tests['skipped']} skipped of {tests['total']}")
    if tests["failed"] or tests["errors"]:
        status = "failed"
    elif tests["passed"] == 0:
        status = "failed"
        summary += ": no test ran" + (" (the GPU tests skip without CuPy and a GPU)" if not dry_run else "")
    else:
        status = "ok"
    return {"status": status, "summary": summary, "tests": tests}


def _cascade_verdict(data: dict[str, Any]) -> tuple[str, str]:
    inputs = data.get("inputs", [])
    rows = [(i, name, v) for i in inputs for name, v in (i.get("variants") or {}).items()]
    errors = [i for i in inputs if i.get("error")] + [v for _, _, v in rows if v.get("error")]
    low = [(i["name"], name, v["voxel_agreement"]) for i, name, v in rows
           if v.get("required") and v.get("voxel_agreement") is not None and v["voxel_agreement"] < AGREEMENT_MIN]
    measured = [v["voxel_agreement"] for _, _, v in rows if v.get("voxel_agreement") is not None]
    if data.get("error"):
        return "failed", str(data["error"])
    if not measured:
        return "failed", "no input was compared"
    lowest = min(measured)
    text = f"{len(inputs)} inputs, lowest voxel agreement {100 * lowest:.3f} %"
    if low:
        worst = ", ".join(f"{n} ({v}): {100 * a:.3f} %" for n, v, a in low)
        return "failed", f"{text}; below {100 * AGREEMENT_MIN:.1f} %: {worst}"
    if errors:
        return "failed", f"{text}; {len(errors)} runs failed"
    return "ok", f"{text} (required: {100 * AGREEMENT_MIN:.1f} % where marked)"


def _bench_verdict(data: dict[str, Any]) -> tuple[str, str]:
    if data.get("error"):
        return "failed", str(data["error"])
    sizes = data.get("sizes", [])
    ok = [s for s in sizes if s.get("result")]
    failed = [s for s in sizes if s.get("error")]
    skipped = data.get("skipped_sizes", [])
    text = (f"{len(ok)} of {len(ok) + len(failed) + len(skipped)} sizes ran"
            + (f" (up to {ok[-1]['size']})" if ok else "")
            + (f"; {len(skipped)} left out for time" if skipped else "")
            + (f"; {len(failed)} failed" if failed else ""))
    bad_runs = [r for s in ok for r in s["result"].get("runs", []) if r.get("status") != "ok"]
    if failed or not ok:
        return "failed", text
    if bad_runs:
        return "failed", f"{text}; {len(bad_runs)} runs failed"
    return "ok", text


# --------------------------------------------------------------------------------------------- steps: the workers

def _untrained(folder: Path, presets: Mapping[str, str]) -> Path:
    """A model package of He-initialised nets of the given presets (fp32 files; the torch backend casts)."""
    # The package writer exports with torch (train and export extras); only the steps that build nets load it.
    from pocketseg.trainer.package import untrained_package  # needs torch

    return untrained_package(folder, roi=presets["roi"], detail=presets["detail"], fp16=False, check=False,
                             overwrite=True)


def _limit_threads(threads: int | None) -> None:
    """CPU threads of torch (the torch backend reads none itself): the dry run takes one, since torch's default on a
    small machine that is busy with other work waits more than it computes."""
    if threads:
        import torch  # optional (train extra): the torch backend runs the nets

        torch.set_num_threads(int(threads))


def _disable_tf32() -> dict[str, Any]:
    """fp32 on the GPU as on the CPU: no TF32 in convolutions and matrix products (the agreement measures the
    array code, not TF32's 10-bit mantissa)."""
    import torch  # optional (train extra): the torch backend runs the nets

    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        # torch >= 2.9: the per-backend setting; mixing it with the older flags is an error when they are read.
        conv.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        return {"cudnn_conv_fp32_precision": "ieee", "matmul_fp32_precision": "ieee"}
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    return {"cudnn_allow_tf32": False, "matmul_allow_tf32": False}


def _ct_inputs(folder: Path | None, smallest_only: bool) -> list[dict[str, Any]]:
    """The images of the CT examples folder: NIfTI files other than segmentations, and DICOM series folders."""
    if folder is None:
        return []
    items = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and is_nifti_path(path) and "seg" not in path.name.lower():
            items.append({"name": path.name, "path": str(path), "bytes": path.stat().st_size})
        elif path.is_dir() and any(p.is_file() for p in path.iterdir()):
            items.append({"name": path.name + "/", "path": str(path),
                          "bytes": sum(p.stat().st_size for p in path.rglob("*") if p.is_file())})
    if smallest_only and items:
        items = [min(items, key=lambda item: item["bytes"])]
    return items


def _phantom_volume(seed: int, matrix: int, slices: int) -> Volume:
    ph = make_phantom(seed, slices=slices, matrix=matrix, orientation="LPS")
    return Volume(np.asarray(ph.image), ph.affine, source=Path(f"phantom_{seed}_{matrix}x{matrix}x{slices}"))


def _prediction_record(prediction: Any) -> dict[str, Any]:
    return {"timings_s": {k: round(float(v), 4) for k, v in prediction.timings_s.items()},
            "roi_box_zyx": [list(b) for b in prediction.roi_box_zyx], "warnings": list(prediction.warnings)}


def _cascade_worker(spec: dict[str, Any]) -> None:
    """GPU (or, dry, the NumPy path again) against the CPU on each input; the result file grows per input."""
    result_path = Path(spec["result"])
    work = ensure_dir(Path(spec["work"]) / "cascade")
    dry = spec["dry_run"]
    result: dict[str, Any] = {"inputs": [], "ct_examples": spec.get("ct_examples"),
                              "ct_looked_at": spec.get("ct_looked_at", [])}

    def save() -> None:
        write_json(result_path, result, overwrite=True)

    try:
        t0 = time.perf_counter()
        trained = spec.get("model") is not None
        model = Path(spec["model"]) if trained else _untrained(work / "model", spec["presets"])
        result.update(model=str(model), trained=trained, presets=None if trained else dict(spec["presets"]),
                      build_s=round(time.perf_counter() - t0, 2))
        variants = ([("NumPy path (dry run)", "cpu", "fp32", True)] if dry else
                    [("GPU fp32", "cuda", "fp32", True), ("GPU fp16", "cuda", "fp16", trained)])
        if not dry:
            result["tf32"] = _disable_tf32()
        threads = spec.get("threads")
        _limit_threads(threads)
        reference = CascadePredictor(model, device="cpu", backend="torch", precision="fp32", threads=threads)
        result["reference"] = {"device": "cpu", "backend": "torch", "precision": "fp32",
                               "labelling": reference.am.label_library}
        predictors = []
        for name, device, precision, required in variants:
            predictor = CascadePredictor(model, device=device, backend="torch", precision=precision, threads=threads)
            predictors.append((name, predictor, required))
        result["variants"] = [{"name": n, "device": p.device, "backend": p.backend,
                               "precision": p.selection.precision, "required": r, "labelling": p.am.label_library,
                               "load_s": round(p.load_time_s, 3)} for n, p, r in predictors]
        save()
        inputs: list[tuple[dict[str, Any], Any]] = []
        for item in _ct_inputs(Path(spec["ct_examples"]) if spec.get("ct_examples") else None, dry):
            inputs.append(({"name": item["name"], "kind": "CT example"}, lambda p=item["path"]: load_volume(p)))
        for seed, matrix, slices in spec["phantoms"]:
            inputs.append(({"name": f"phantom {matrix}x{matrix}x{slices} (seed {seed})", "kind": "phantom"},
                           lambda s=seed, m=matrix, n=slices: _phantom_volume(s, m, n)))
        warm = False
        for entry, load in inputs:
            result["inputs"].append(entry)
            try:
                volume = load()
                entry.update(shape=list(volume.shape), spacing_mm=[round(float(s), 3) for s in volume.spacing_mm])
                if not warm:  # first calls compile CuPy's kernels and pick cuDNN's algorithms: timed apart
                    entry["first_call_s"] = {}
                    for name, predictor, _ in predictors:
                        t = time.perf_counter()
                        predictor.predict(volume)
                        entry["first_call_s"][name] = round(time.perf_counter() - t, 3)
                    warm = True
                ref = reference.predict(volume)
                entry["cpu"] = _prediction_record(ref)
                entry["variants"] = {}
                for name, predictor, required in predictors:
                    record: dict[str, Any] = {"required": required}
                    entry["variants"][name] = record
                    try:
                        pred = predictor.predict(volume)
                        agreement = label_agreement(ref.labels, pred.labels)
                        record.update(_prediction_record(pred), same_roi_box=pred.roi_box_zyx == ref.roi_box_zyx,
                                      voxel_agreement=agreement["voxel_agreement"],
                                      foreground_agreement=agreement["foreground_agreement"],
                                      mean_dice=agreement["mean_dice"])
                    except Exception as exc:  # one failing variant is reported; the others still run
                        log.exception("%s on %s failed", name, entry["name"])
                        record["error"] = f"{type(exc).__name__}: {exc}"
            except Exception as exc:  # an unreadable input is reported; the others still run
                log.exception("%s failed", entry["name"])
                entry["error"] = f"{type(exc).__name__}: {exc}"
            save()
        for _, predictor, _ in predictors:
            predictor.close()
        reference.close()
    except Exception as exc:
        log.exception("cascade step failed")
        result["error"] = f"{type(exc).__name__}: {exc}"
    save()


def _bench_worker(spec: dict[str, Any]) -> None:
    """``run_bench`` per size, smallest first, while the time left is predicted to hold the next size."""
    start = time.monotonic()
    deadline = start + float(spec["budget_s"]) - RESERVE_S
    result_path = Path(spec["result"])
    work = ensure_dir(Path(spec["work"]) / "bench")
    sizes = sorted(parse_sizes([tuple(s) for s in spec["sizes"]]), key=lambda s: (s[2], s[0]))
    result: dict[str, Any] = {"sizes": [], "skipped_sizes": [], "device": spec["device"], "backend": "torch",
                              "precision": spec["precision"], "budget_s": spec["budget_s"]}

    def save() -> None:
        write_json(result_path, result, overwrite=True)

    try:
        compare = spec["compare"]
        if compare == "auto":
            compare = "nnunet" if importlib.util.find_spec("nnunetv2") is not None else None
        result["compare"] = compare
        if compare is None:
            result["compare_note"] = ("nnU-Net v2 is not installed here" if spec["compare"] == "auto"
                                      else "comparison switched off")
        t0 = time.monotonic()
        model = _untrained(work / "model", spec["presets"])
        result.update(model=str(model), presets=dict(spec["presets"]), build_s=round(time.monotonic() - t0, 2))
        save()
        history: list[tuple[int, float]] = []
        for shape in sizes:
            name = "x".join(map(str, shape))
            left = deadline - time.monotonic()
            predicted = predict_seconds(history, shape[2])
            if left <= 0 or (predicted is not None and predicted > left):
                result["skipped_sizes"].append({"size": name, "predicted_s": predicted, "left_s": round(left, 1)})
                save()
                continue
            t = time.monotonic()
            entry: dict[str, Any] = {"size": name, "shape_ijk": list(shape)}
            result["sizes"].append(entry)
            try:
                entry["result"] = run_bench(model, work / name, device=spec["device"], backend="torch",
                                            precision=spec["precision"], sizes=[shape], compare=compare,
                                            roi_from_labels=True, threads=spec.get("threads"), overwrite=True,
                                            progress=False)
            except Exception as exc:  # one failing size is reported; the next may still fit
                log.exception("bench at %s failed", name)
                entry["error"] = f"{type(exc).__name__}: {exc}"
            entry["seconds"] = round(time.monotonic() - t, 2)
            history.append((shape[2], entry["seconds"]))
            save()
    except Exception as exc:
        log.exception("bench step failed")
        result["error"] = f"{type(exc).__name__}: {exc}"
    save()


WORKERS = {"cascade": _cascade_worker, "bench": _bench_worker}


# --------------------------------------------------------------------------------------------------- the check

def _plan_budgets(steps: Sequence[Step], dry_run: bool, budgets: Mapping[str, float] | None) -> dict[str, float]:
    planned = {s.name: float(s.dry_budget_s if dry_run else s.budget_s) for s in steps}
    for name, seconds in (budgets or {}).items():
        if name not in STEP_NAMES:
            raise InputError(None, f"budget for an unknown step {name!r}; steps: {', '.join(STEP_NAMES)}")
        if not isinstance(seconds, (int, float)) or seconds <= 0:
            raise InputError(None, f"budget of {name} must be a positive number of seconds, got {seconds!r}")
        planned[name] = float(seconds)
    return planned


def _select_steps(steps: Sequence[str] | str | None) -> list[Step]:
    if steps is None:
        return list(STEPS)
    names = [s.strip() for s in steps.split(",")] if isinstance(steps, str) else list(steps)
    unknown = [n for n in names if n not in STEP_NAMES]
    if unknown or not names:
        raise InputError(None, f"unknown steps {unknown or names!r}; choose from {', '.join(STEP_NAMES)}")
    return [s for s in STEPS if s.name in names]


def run_gpu_check(out: str | os.PathLike | None = None, *, dry_run: bool = False,
                  steps: Sequence[str] | str | None = None, budgets: Mapping[str, float] | None = None,
                  total_budget_s: float | None = None, ct_examples: str | os.PathLike | None = None,
                  model: str | os.PathLike | None = None, sizes: str | Sequence[Sequence[int]] | None = None,
                  compare: str = "auto", root: str | os.PathLike = ".", kit: str | os.PathLike = DEFAULT_KIT,
                  work: str | os.PathLike | None = None, keep_work: bool = False,
                  overwrite: bool = False) -> dict[str, Any]:
    """Run the GPU check's steps, each in its own process group with a time budget, and write the report.

    ``out``: report folder (default ``$OUT``, else ``gpu-check-output``). ``dry_run``: tiny inputs on
    the CPU. ``steps``: a subset of :data:`STEPS` by name. ``budgets``: seconds per step name,
    replacing the defaults; ``total_budget_s``: all steps together (465 s; dry run 600 s).
    ``ct_examples``: the real CT examples folder (default: see :func:`find_ct_examples`).
    ``model``: a trained package for the cascade step (default: untrained ``roi-cpu``/``detail-cpu``).
    ``sizes``: the bench's sizes (default: Table 6's). ``compare``: ``auto`` (nnU-Net when installed;
    off in a dry run), ``nnunet`` or ``none``. ``root``: the repository (its ``tests/``).
    ``kit``: the kit folder (its carried CT examples, its record). ``work``: scratch folder
    (default: a temporary one, removed unless ``keep_work``). Returns what ``gpu-report.json`` holds.
    """
    out_dir = resolve_out(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(out_dir, "exists and is not a folder")
    check_targets([out_dir / name for name in REPORT_FILES.values()], overwrite=overwrite)
    selected = _select_steps(steps)
    planned = _plan_budgets(selected, dry_run, budgets)
    total = float(total_budget_s) if total_budget_s is not None else (DRY_TOTAL_BUDGET_S if dry_run else TOTAL_BUDGET_S)
    if total <= 0:
        raise InputError(None, f"total_budget_s must be positive, got {total_budget_s!r}")
    if compare not in ("auto", "nnunet", "none"):
        raise InputError(None, f"compare must be auto, nnunet or none, got {compare!r}")
    if compare == "nnunet" and importlib.util.find_spec("nnunetv2") is None:
        raise InputError(None, "compare=nnunet needs nnU-Net v2 (the kit's peer archive, or pip install 'pocketseg[peers]')")
    if model is not None and not Path(model).is_dir():
        raise InputError(model, "is not a model package folder")
    bench_sizes = parse_sizes(sizes) if sizes is not None else (DRY_BENCH_SIZES if dry_run else DEFAULT_SIZES)
    root_dir = Path(root).resolve()
    ct_dir, ct_looked = find_ct_examples(ct_examples, root=root_dir, kit=kit)

    notes: list[str] = []

    def note(message: str, *args: Any) -> None:
        log.info(message, *args)
        notes.append(f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} {message % args}")

    scratch = Path(work) if work is not None else Path(tempfile.mkdtemp(prefix="pocketseg-gpu-check-"))
    ensure_dir(scratch, "work folder")
    env = _step_env(ct_dir)
    started = datetime.now(timezone.utc)
    result: dict[str, Any] = {
        "format": 1, "created": started.isoformat(timespec="seconds"), "dry_run": dry_run,
        "pocketseg_version": __version__, "commit": _commit(root_dir), "kit": _kit_record(Path(kit)),
        "python": sys.version.split()[0], "executable": sys.executable, "cpus": os.cpu_count(),
        "versions": _versions(("numpy", "scipy", "nibabel", "isal", "connected-components-3d", "pydicom",
                               "cupy-cuda13x", "cupy-cuda12x", "cucim-cu13", "cucim-cu12", "torch", "onnxruntime",
                               "nvidia-ml-py", "nnunetv2", "SimpleITK", "pytest", "matplotlib")),
        "total_budget_s": total, "ct_examples": None if ct_dir is None else str(ct_dir), "ct_looked_at": ct_looked,
        "settings": {"steps": [s.name for s in selected], "budgets_s": planned, "model": None if model is None
                     else str(model), "sizes": [list(s) for s in bench_sizes], "compare": compare},
        "steps": [],
    }
    begun = time.monotonic()
    deadline = begun + total
    note("GPU check%s: steps %s, %.0f s in all; report in %s", " (dry run)" if dry_run else "",
             ", ".join(s.name for s in selected), total, out_dir)
    try:
        for index, step in enumerate(selected):
            left = deadline - time.monotonic()
            later = sum(planned[s.name] for s in selected[index + 1:])
            budget = min(planned[step.name], left)
            if step.elastic:  # takes what the steps before it left, but leaves the later ones their share
                budget = max(budget, left - later)
            record: dict[str, Any] = {"name": step.name, "title": step.title, "budget_s": round(budget, 1)}
            result["steps"].append(record)
            if left < MIN_STEP_S:
                record.update(status="skipped", summary=f"only {max(left, 0):.0f} s of the total budget left")
                continue
            note("step %s: budget %.0f s", step.name, budget)
            record.update(_run_one(step.name, budget, scratch, root_dir, env, dry_run=dry_run, model=model,
                                   ct_dir=ct_dir, ct_looked=ct_looked, sizes=bench_sizes, compare=compare))
            note("step %s: %s in %.1f s: %s", step.name, record["status"], record.get("seconds", 0),
                     record.get("summary", ""))
    finally:
        result["seconds"] = round(time.monotonic() - begun, 1)
        result["ok"] = bool(result["steps"]) and all(s["status"] == "ok" for s in result["steps"])
        result["publish_as"] = publish_name(result)
        _write_report(result, out_dir, scratch, notes, overwrite=overwrite)
        if work is None and not keep_work:
            shutil.rmtree(scratch, ignore_errors=True)
    return result


def _run_one(name: str, budget: float, scratch: Path, root: Path, env: Mapping[str, str], *, dry_run: bool,
             model: Any, ct_dir: Path | None, ct_looked: list[str], sizes: Sequence[Shape3],
             compare: str) -> dict[str, Any]:
    """Run one step and read what it left, whether it finished, failed or was killed."""
    log_path = scratch / f"{name}.log"
    py = sys.executable
    if name == "environment":
        stdout_path = scratch / "environment.json"
        outcome = run_step_process([py, "-m", "pocketseg", "doctor", "--json"], budget_s=budget, log_path=log_path,
                                   cwd=scratch, env=env, stdout_path=stdout_path)
        record = _environment_result(outcome, stdout_path)
    elif name == "gpu-tests":
        if not (root / "tests" / "conftest.py").is_file():
            return {"status": "skipped", "summary": f"no tests/ in {root} (run from the repository root)",
                    "log": str(log_path)}
        junit = scratch / "gpu-tests.xml"
        selection = DRY_TEST_ARGS if dry_run else GPU_TEST_ARGS
        argv = [py, "-m", "pytest", *selection, "-v", "-p", "no:cacheprovider", f"--junitxml={junit}",
                "--continue-on-collection-errors"]
        outcome = run_step_process(argv, budget_s=budget, log_path=log_path, cwd=root, env=env)
        record = _tests_result(outcome, junit, log_path, dry_run)
        record["command"] = " ".join(["python", "-m", "pytest", *selection])
    else:
        spec_path, result_path = scratch / f"{name}-spec.json", scratch / f"{name}.json"
        spec: dict[str, Any] = {"step": name, "dry_run": dry_run, "work": str(scratch), "result": str(result_path),
                                "budget_s": budget, "threads": 1 if dry_run else None}
        if name == "cascade":
            spec.update(model=None if model is None else str(Path(model).resolve()),
                        presets=DRY_PRESETS if dry_run else CASCADE_PRESETS,
                        phantoms=DRY_PHANTOMS if dry_run else CASCADE_PHANTOMS,
                        ct_examples=None if ct_dir is None else str(ct_dir.resolve()), ct_looked_at=ct_looked)
        else:
            spec.update(presets=DRY_PRESETS if dry_run else BENCH_PRESETS, sizes=[list(s) for s in sizes],
                        device="cpu" if dry_run else "cuda", precision="fp32" if dry_run else "fp16",
                        compare=("none" if dry_run and compare == "auto" else compare))
            spec["compare"] = None if spec["compare"] == "none" else spec["compare"]
        write_json(spec_path, spec, overwrite=True)
        outcome = run_step_process([py, "-m", WORKER_MODULE, "--step", str(spec_path)], budget_s=budget,
                                   log_path=log_path, cwd=scratch, env=env)
        data = read_json(result_path) if result_path.is_file() else {}
        status, summary = (_cascade_verdict if name == "cascade" else _bench_verdict)(data) if data else \
            ("error", "the step wrote no result")
        record = {"status": status, "summary": summary, "data": data}
    record.update(seconds=outcome["seconds"], returncode=outcome["returncode"], log=str(log_path))
    if outcome["timed_out"]:
        record["status"] = "timeout"
        record["summary"] = f"overran its budget of {budget:.0f} s and was stopped; before that: {record['summary']}"
    elif outcome["returncode"] not in (0, None) and record["status"] == "ok":
        record.update(status="error", summary=f"exit status {outcome['returncode']}; {record['summary']}")
    if record["status"] != "ok":
        record["log_tail"] = _last_lines(_tail(log_path), 15)
    return record


def _kit_record(kit: Path) -> dict[str, Any] | None:
    """What the kit says of itself: ``site/unpack.json`` on the GPU machine (it holds ``kit.json`` as ``kit``)."""
    for path, wrap in ((kit / "site" / "unpack.json", False), (kit / "carry" / "kit.json", True)):
        if path.is_file():
            try:
                data = read_json(path)
            except InputError:
                continue
            return {"kit": data} if wrap else data
    return None


# --------------------------------------------------------------------------------------------------- the report

def _step(result: Mapping[str, Any], name: str) -> dict[str, Any]:
    return next((s for s in result.get("steps", []) if s["name"] == name), {})


def card_name(result: Mapping[str, Any]) -> str | None:
    return _step(result, "environment").get("card")


def publish_name(result: Mapping[str, Any]) -> str:
    """``DATE-CARD`` of ``docs/benchmarks/gpu/DATE-CARD.md``."""
    date = str(result.get("created", ""))[:10] or datetime.now(timezone.utc).date().isoformat()
    card = card_name(result)
    return f"{date}-{_slug(card) if card else ('cpu-dry-run' if result.get('dry_run') else 'no-gpu')}"


def _machine_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    env = _step(result, "environment")
    doctor = env.get("doctor") or {}
    gpus, libs = doctor.get("gpus", {}), doctor.get("libraries", {})
    devices = gpus.get("devices") or []
    versions = result.get("versions", {})

    def lib(name: str) -> str | None:
        entry = libs.get(name) or {}
        return entry.get("version") if entry.get("installed") else None

    card = "—"
    if devices:
        d = devices[0]
        card = (f"{d['name']}, {d.get('memory_total_mib') or '?'} MiB, compute capability "
                f"{d.get('compute_capability') or '?'}" + (f" (+{len(devices) - 1} more)" if len(devices) > 1 else ""))
    cupy, torch = libs.get("cupy") or {}, libs.get("torch") or {}
    labelling = {v.get("labelling") for v in (_step(result, "cascade").get("data") or {}).get("variants", [])}
    rows = [("card", card),
            ("driver", gpus.get("driver_version")),
            ("CUDA (driver supports)", gpus.get("cuda_driver_version")),
            ("CUDA runtime (CuPy)", cupy.get("cuda_runtime_version")),
            ("CuPy", lib("cupy")),
            ("cuCIM", lib("cucim")),
            ("labelling on the device", ", ".join(sorted(x for x in labelling if x)) or None),
            ("torch", (lib("torch") or "—") + (f" (CUDA {torch['cuda']})" if torch.get("cuda") else "")),
            ("ONNX Runtime", lib("onnxruntime")),
            ("nvidia-ml-py", lib("nvidia-ml-py")),
            ("Python", result.get("python")),
            ("CPUs", result.get("cpus"))]
    others = ", ".join(f"{k} {v}" for k, v in versions.items() if v and k not in ("torch", "onnxruntime", "nvidia-ml-py"))
    rows.append(("other packages", others or None))
    return [{"item": k, "value": "—" if v in (None, "") else str(v)} for k, v in rows]


STEP_COLUMNS = (Column("name", "step"), Column("status", "status"), Column("seconds", "time (s)", ".1f", "right"),
                Column("budget_s", "budget (s)", ".0f", "right"), Column("summary", "summary"))
AGREEMENT_COLUMNS = (Column("input", "input"), Column("shape", "shape"), Column("variant", "GPU run"),
                     Column("voxel_pct", "voxel agreement (%)", ".4f", "right"),
                     Column("fg_pct", "foreground agreement (%)", ".3f", "right"),
                     Column("same_box", "same ROI box"), Column("required", "≥ 99.9 % required"),
                     Column("verdict", "verdict"))


def _tests_section(record: Mapping[str, Any]) -> list[str]:
    lines = [f"`{record.get('command', 'pytest')}`: {record.get('summary', '')}.", ""]
    tests = record.get("tests") or {}
    for failure in tests.get("failures", [])[:30]:
        lines.append(f"- FAILED `{failure['test']}`: {failure['message'].splitlines()[0] if failure['message'] else ''}")
    reasons: dict[str, int] = {}
    for skip in tests.get("skips", []):
        reasons[skip["reason"]] = reasons.get(skip["reason"], 0) + 1
    for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:10]:
        lines.append(f"- skipped ×{n}: {reason}")
    return lines + [""]


def _cascade_section(record: Mapping[str, Any], dry_run: bool) -> list[str]:
    data = record.get("data") or {}
    if not data:
        return [record.get("summary", "not run"), ""]
    presets = data.get("presets")
    nets = (f"untrained (He-initialised) `{presets['roi']}`/`{presets['detail']}`" if presets
            else f"the trained package `{data.get('model')}`")
    lines = [f"Nets: {nets}. Reference: the CPU (NumPy/SciPy, torch fp32, labelling with "
             f"{(data.get('reference') or {}).get('labelling', '?')}). "
             + ("" if dry_run else "GPU fp32 runs with TF32 off, so that it differs from the CPU in the array code "
                                   "and kernel order only. ")
             + f"Agreement = share of voxels with the same label; {100 * AGREEMENT_MIN:.1f} % is required where "
               "marked (fp16 only for trained nets: untrained nets have near-tied logits).", ""]
    if data.get("ct_examples"):
        lines.append(f"CT examples from `{data['ct_examples']}`.")
    else:
        lines.append("**CT examples not found** (looked at: " + ", ".join(f"`{p}`" for p in data.get("ct_looked_at", []))
                     + "): only the phantoms ran. Carry them with `make gpu-wheels CT=1` (as many as fit).")
    lines.append("")
    rows, times = [], []
    for item in data.get("inputs", []):
        shape = "×".join(map(str, item.get("shape", []))) or None
        if item.get("error"):
            rows.append({"input": item["name"], "shape": shape, "verdict": f"error: {item['error']}"})
            continue
        cpu = item.get("cpu") or {}
        times.append({"input": item["name"], "run": "CPU", **cpu.get("timings_s", {})})
        for name, v in (item.get("variants") or {}).items():
            if v.get("error"):
                rows.append({"input": item["name"], "shape": shape, "variant": name, "verdict": f"error: {v['error']}"})
                continue
            agreement = v.get("voxel_agreement")
            passed = agreement is not None and agreement >= AGREEMENT_MIN
            rows.append({"input": item["name"], "shape": shape, "variant": name,
                         "voxel_pct": None if agreement is None else 100 * agreement,
                         "fg_pct": None if v.get("foreground_agreement") is None else 100 * v["foreground_agreement"],
                         "same_box": "yes" if v.get("same_roi_box") else "no", "required": "yes" if v.get("required")
                         else "no", "verdict": ("pass" if passed else "FAIL") if v.get("required")
                         else ("≥ 99.9 %" if passed else "below (not required)")})
            times.append({"input": item["name"], "run": name, **v.get("timings_s", {})})
    if rows:
        lines += [markdown_table(rows, AGREEMENT_COLUMNS)]
    if times:
        keys = list(dict.fromkeys(k for t in times for k in t if k not in ("input", "run")))
        cols = [Column("input", "input"), Column("run", "run")] + [Column(k, k, ".3f", "right") for k in keys]
        lines += [("Stage times (s), after one untimed first call per GPU run "
                   "(`upload` includes reorienting; `roi` is the ROI stage, `detail` the detail stage):"), "",
                  markdown_table(times, cols)]
    first = next((i.get("first_call_s") for i in data.get("inputs", []) if i.get("first_call_s")), None)
    if first:
        lines.append("First call (kernel compilation, algorithm choice): "
                     + ", ".join(f"{k} {v:.1f} s" for k, v in first.items()) + ".")
        lines.append("")
    return lines


def _bench_rows(data: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rows, comparison = [], []
    for entry in data.get("sizes", []):
        bench = entry.get("result")
        if bench:
            rows.extend(run_rows(bench))
            comparison.extend(bench.get("comparison") or [])
    return rows, comparison


def _bench_section(record: Mapping[str, Any], dry_run: bool, plot: bool) -> list[str]:
    data = record.get("data") or {}
    if not data:
        return [record.get("summary", "not run"), ""]
    presets = data.get("presets") or {}
    compare = data.get("compare")
    lines = [f"`run_bench` per size: untrained `{presets.get('roi')}`/`{presets.get('detail')}` nets, device "
             f"{data.get('device')}, torch backend, {data.get('precision')}, ROI box from the labels (the ROI stage "
             f"skipped), cold and warm; "
             + ("memory: NVML's device used memory" if not dry_run else "memory: the process's RSS")
             + " every 0.1 s, max and total (sum of samples × 0.1 s, MB·s). "
             + (f"Compared with {compare}." if compare else f"No peer ({data.get('compare_note', 'off')})."),
             f"Nets built in {data.get('build_s', 0):.0f} s.", ""]
    for skipped in data.get("skipped_sizes", []):
        predicted = skipped.get("predicted_s")
        lines.append(f"- {skipped['size']}: left out, " + (f"predicted {predicted:.0f} s" if predicted else "no time")
                     + f" with {skipped['left_s']:.0f} s left")
    for entry in data.get("sizes", []):
        if entry.get("error"):
            lines.append(f"- {entry['size']}: **failed**: {entry['error']}")
        else:
            lines.append(f"- {entry['size']}: {entry.get('seconds', 0):.0f} s for its cold and warm runs")
    rows, comparison = _bench_rows(data)
    lines.append("")
    if rows:
        lines.append(markdown_table(rows, RUN_COLUMNS))
    if comparison:
        lines += ["Peer comparison (time ratio = peer / pocketseg; memory ratio = pocketseg / peer):", "",
                  markdown_table(comparison, COMPARISON_COLUMNS)]
    if plot:
        lines += [f"![GPU memory over time]({REPORT_FILES['plot']})", ""]
    return lines


def report_markdown(result: Mapping[str, Any], *, plot: bool) -> str:
    """The whole ``gpu-report.md``."""
    dry = result.get("dry_run")
    card = card_name(result) or ("none (dry run on the CPU)" if dry else "none found")
    kit = result.get("kit") or {}
    lines = [f"# GPU check: {card}, {str(result.get('created', ''))[:10]}", ""]
    if dry:
        lines += [("**Dry run on the CPU**: the steps with tiny nets and inputs on the NumPy path. It checks the "
                   "check's plumbing and measures nothing."), ""]
    verdict = "all steps ok" if result.get("ok") else "NOT all steps ok"
    packed = kit.get("kit") or {}
    commit = result.get("commit") or (f"{packed['commit']} (the kit's)" if packed.get("commit") else "unknown")
    lines += [f"pocketseg {result.get('pocketseg_version')}, commit `{commit}`, "
              f"created {result.get('created')}; {verdict}; {result.get('seconds', 0):.0f} s of "
              f"{result.get('total_budget_s', 0):.0f} s. Command: `make gpu-check"
              + (" DRY=1" if dry else "") + "`. Publish as "
              f"`docs/benchmarks/gpu/{result.get('publish_as')}.md`.", ""]
    if kit.get("pocketseg"):
        lines += [f"Kit: pocketseg {kit['pocketseg']}; packed at commit `{packed.get('commit')}`.", ""]
    lines += ["## Machine", "", markdown_table(_machine_rows(result), (Column("item", "item"), Column("value", "value"))),
              "## Steps", "", markdown_table(result.get("steps", []), STEP_COLUMNS)]
    sections = {"gpu-tests": lambda r: _tests_section(r), "cascade": lambda r: _cascade_section(r, bool(dry)),
                "bench": lambda r: _bench_section(r, bool(dry), plot)}
    for record in result.get("steps", []):
        if record["name"] in sections:
            lines += [f"## {record['title']}", ""]
            if record["status"] != "ok":
                lines += [f"**{record['status']}**: {record.get('summary', '')}", ""]
            lines += sections[record["name"]](record)
    problems = [r for r in result.get("steps", []) if r["status"] not in ("ok", "skipped")]
    if problems:
        lines += ["## Overruns and failures", ""]
        for record in problems:
            lines += [f"`{record['name']}` ({record['status']}): {record.get('summary', '')}", ""]
            if record.get("log_tail"):
                lines += ["The end of its log:", "", "```text", *record["log_tail"], "```", ""]
            else:
                lines += ["Its log is empty.", ""]
    return "\n".join(lines).rstrip() + "\n"


def _memory_curves(result: Mapping[str, Any]) -> list[Curve]:
    data = _step(result, "bench").get("data") or {}
    curves = []
    for entry in data.get("sizes", []):
        for run in (entry.get("result") or {}).get("runs", []):
            memory = run.get("memory") or {}
            if run.get("status") == "ok" and memory.get("used_mb"):
                curves.append(Curve(panel=run["mode"], label=f"{entry['size']} ({run['pipeline']})",
                                    times_s=memory["times_s"], used_mb=memory["used_mb"], color_key=entry["size"],
                                    dashed=run["pipeline"] != "pocketseg"))
    return curves


def _write_report(result: dict[str, Any], out_dir: Path, scratch: Path, log_lines: list[str], *,
                  overwrite: bool) -> None:
    """The four report files; each written even when another fails."""
    ensure_dir(out_dir, "report folder")
    paths = {kind: out_dir / name for kind, name in REPORT_FILES.items()}
    plot = False
    curves = _memory_curves(result)
    if curves:
        try:
            png = plot_memory_curves(curves, title=f"GPU check, bench: {card_name(result) or 'no GPU'}",
                                     ylabel="memory (MB)")
            atomic_write_bytes(paths["plot"], png, overwrite=overwrite)
            plot = True
        except Exception as exc:  # noqa: BLE001 - a missing matplotlib must not cost the rest of the report
            log.warning("no memory plot: %s", exc)
            result.setdefault("notes", []).append(f"no memory plot: {type(exc).__name__}: {exc}")
    result["files"] = {k: str(p) for k, p in paths.items() if k != "plot" or plot}
    write_json(paths["json"], result, overwrite=overwrite)
    write_text(paths["markdown"], report_markdown(result, plot=plot), overwrite=overwrite)
    parts = ["\n".join(log_lines)]
    for step in result.get("steps", []):
        if step.get("log"):
            parts.append(f"\n===== step {step['name']} ({step['status']}): the end of {Path(step['log']).name} =====\n"
                         + _tail(Path(step["log"])))
    write_text(paths["log"], "\n".join(parts) + "\n", overwrite=overwrite)
    log.info("GPU check report: %s", paths["markdown"])


def publish_report(report_dir: str | os.PathLike, docs_dir: str | os.PathLike = "docs/benchmarks/gpu", *,
                   overwrite: bool = False) -> Path:
    """Copy a report into ``docs_dir`` as ``DATE-CARD.md`` (and ``DATE-CARD.png``), ready to commit."""
    folder = Path(report_dir)
    result = read_json(folder / REPORT_FILES["json"])
    name = result.get("publish_as") or publish_name(result)
    target = Path(docs_dir) / f"{name}.md"
    check_targets([target, target.with_suffix(".png")], overwrite=overwrite)
    ensure_dir(target.parent, "reports folder")
    text = (folder / REPORT_FILES["markdown"]).read_text(encoding="utf-8")
    png = folder / REPORT_FILES["plot"]
    if png.is_file():
        atomic_write_bytes(target.with_suffix(".png"), png.read_bytes(), overwrite=overwrite)
        text = text.replace(f"]({REPORT_FILES['plot']})", f"]({name}.png)")
    return write_text(target, text, overwrite=overwrite)


# --------------------------------------------------------------------------------------------------- entry point

def _budget(text: str) -> tuple[str, float]:
    name, _, seconds = text.partition("=")
    try:
        return name.strip(), float(seconds)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected STEP=SECONDS, got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["--step"]:  # a step's worker process (internal)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        spec = read_json(args_list[1])
        WORKERS[spec["step"]](spec)
        return 0
    parser = argparse.ArgumentParser(prog="python -m pocketseg.benchmarks.gpu_check",
                                     description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--out", type=Path, default=None, help=f"report folder (default: ${OUT_ENV}, else {DEFAULT_OUT})")
    parser.add_argument("--dry-run", action="store_true", help="the same steps with tiny inputs on the CPU")
    parser.add_argument("--steps", default=None, help=f"comma-separated subset of {','.join(STEP_NAMES)}")
    parser.add_argument("--budget", dest="budgets", type=_budget, action="append", default=[],
                        metavar="STEP=SECONDS", help="replace a step's time budget (repeatable)")
    parser.add_argument("--total-budget", dest="total_budget_s", type=float, default=None,
                        help=f"seconds for all steps (default {TOTAL_BUDGET_S:g}; dry run {DRY_TOTAL_BUDGET_S:g})")
    parser.add_argument("--ct-examples", type=Path, default=None, help="the real CT examples folder")
    parser.add_argument("--model", type=Path, default=None, help="a trained model package for the cascade step")
    parser.add_argument("--sizes", default=None, help="bench sizes, e.g. 512x512x55,512x512x100 (default: Table 6)")
    parser.add_argument("--compare", choices=("auto", "nnunet", "none"), default="auto", help="the bench's peer")
    parser.add_argument("--root", type=Path, default=Path("."), help="the repository root (its tests/)")
    parser.add_argument("--kit", type=Path, default=Path(DEFAULT_KIT), help="the kit folder (make gpu-wheels)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--keep-work", action="store_true", help="keep the temporary scratch folder")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier report in the folder")
    parser.add_argument("--publish", type=Path, default=None, metavar="REPORT_DIR",
                        help="copy the report in REPORT_DIR to docs/benchmarks/gpu/DATE-CARD.md and stop")
    args = parser.parse_args(args_list)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        if args.publish is not None:
            print(f"wrote {publish_report(args.publish, overwrite=args.overwrite)}")
            return 0
        result = run_gpu_check(args.out, dry_run=args.dry_run, steps=args.steps, budgets=dict(args.budgets),
                               total_budget_s=args.total_budget_s, ct_examples=args.ct_examples, model=args.model,
                               sizes=args.sizes, compare=args.compare, root=args.root, kit=args.kit, work=args.work,
                               keep_work=args.keep_work, overwrite=args.overwrite)
    except PocketsegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for step in result["steps"]:
        print(f"{step['name']:<12} {step['status']:<8} {step.get('seconds', 0):7.1f} s  {step.get('summary', '')}")
    print(f"report: {result['files']['markdown']}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
