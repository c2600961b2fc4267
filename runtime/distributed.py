"""``pocketseg predict --ray``: many scans over many GPUs and machines on a Ray cluster, surviving worker loss.

The driver (the process that runs ``pocketseg predict``) plans the cases, starts one worker (a Ray
actor) per GPU of the cluster, or one per ``cpus_per_worker`` CPU cores where there is no GPU, and
hands each worker :data:`~pocketseg.runtime.predict.CASES_IN_FLIGHT` cases at a time. A worker loads
the model package once and runs every case through :func:`pocketseg.runtime.predict.predict_case`,
the per-case function of folder mode: it reads the scan from and writes the outputs to the shared
file system (only paths and a small result travel through Ray), one case computing while the next
is read and the previous written, every file written atomically.

Faults:

* a case that fails on its own (a bad scan) is reported in the results table and the run goes on;
* a worker that dies (killed, out of memory, its node lost) is replaced by a new one, and the cases
  it held are retried on any worker, each alone on its worker (so that a case that kills its worker
  again takes no other case with it), each at most ``retries`` more times. A retried case may replace
  the side files its lost attempt left without a label map (the label map is written last), and the
  temporary ``.part`` files of the lost attempt are removed, so every case ends written once or failed;
* Ctrl-C stops the workers and removes the temporary files of the cases they held: no output file
  is ever partial, and ``--continue`` redoes only the unfinished cases.

Every case that ends, and every attempt lost with a worker, is appended to ``OUTPUT/run.jsonl``
as it happens (case, status, error, attempt, worker node and pid, device, backend, seconds per stage).

Ray is an optional dependency (the ``ray`` extra), imported when a run starts.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from pocketseg.atomic import ensure_dir, json_text
from pocketseg.dicom import is_study_tree
from pocketseg.errors import InputError, PocketsegError, require
from pocketseg.layout import case_name, is_nifti_path, label_name, nifti_files
from pocketseg.runtime.cascade import CascadePredictor
from pocketseg.runtime.memory_limit import parse_size
from pocketseg.runtime.dicom_output import output_types
from pocketseg.runtime.predict import (CASES_IN_FLIGHT, CaseJob, CaseOptions, CaseResult, PredictFailures,
                                       check_dicom_outputs, plan_cases, plan_study_tree, predict_case)
from pocketseg.signing import trusted_keys_folder

__all__ = ["FAULT_ENV", "RUN_TABLE", "CaseWorker", "RunSummary", "plan_inputs", "predict_ray", "run_cases"]

log = logging.getLogger(__name__)

#: The results table a run appends to, in the output folder.
RUN_TABLE = "run.jsonl"
#: Fault injection for tests and drills: ``CASE:STAGE:MARKER`` makes the worker that reaches STAGE (``read``,
#: ``predict`` or ``write``) of CASE end its process at once, the first time only (the MARKER file records it);
#: without a MARKER (``CASE:STAGE:``) every time.
FAULT_ENV = "POCKETSEG_RAY_FAULT"
#: Endings of a text list of input paths.
LIST_ENDINGS = (".txt", ".csv", ".tsv", ".lst")


# ------------------------------------------------------------------------------------------------------ inputs

def _read_list(path: Path) -> list[Path]:
    """The paths of a list file: one per line, or a CSV/TSV column named path/image/input/file (else the first)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot be read as a list of paths ({exc})") from None
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise InputError(path, "lists no input path")
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    if path.suffix.lower() in (".csv", ".tsv"):
        rows = list(csv.reader(lines, delimiter=delimiter))
        header = [cell.strip().lower() for cell in rows[0]]
        named = [i for i, name in enumerate(header) if name in ("path", "image", "input", "file")]
        column = named[0] if named else 0
        if named:
            rows = rows[1:]
        entries = [row[column].strip() for row in rows if len(row) > column and row[column].strip()]
    else:
        entries = [line.strip() for line in lines]
    # Relative paths are relative to the list, so a list travels with its data on the shared file system.
    return [p if p.is_absolute() else path.parent / p for p in map(Path, entries)]


def plan_inputs(input: str | os.PathLike, output: str | os.PathLike) -> list[CaseJob]:
    """The cases of INPUT: a folder of NIfTI files (as folder mode), a folder of DICOM series folders (one case per
    folder), a DICOM study tree of patients/studies/series folders (one case per CT series, as folder mode), or a
    text/CSV list of NIfTI files and DICOM series folders; outputs ``OUTPUT/CASE.nii.gz``."""
    src, dst = Path(input), Path(output)
    if not src.exists():
        raise InputError(src, "does not exist")
    if is_nifti_path(dst):
        raise InputError(dst, "--ray writes a folder of label maps: OUTPUT must be a folder, not a file name")
    if src.is_dir() and nifti_files(src):
        return plan_cases(src, dst)[0]
    if src.is_dir():
        sources = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
        # Sub-folders that are themselves trees (patients holding studies holding series): the whole folder is
        # planned as a study tree, a case per CT series named as folder mode names it; sub-folders that hold
        # the files of a series stay one case each, named after the folder.
        if any(is_study_tree(p) for p in sources):
            return plan_study_tree(src, dst)
        if not sources:
            raise InputError(src, "holds neither NIfTI files nor DICOM series folders")
    elif src.suffix.lower() in LIST_ENDINGS:
        sources = _read_list(src)
    else:
        raise InputError(src, "--ray takes a folder of NIfTI files, a folder of DICOM series folders or a list of "
                              f"paths ({', '.join(LIST_ENDINGS)}); one scan runs without --ray")
    jobs, seen = [], {}
    for source in sources:
        name = case_name(source)
        if name in seen:
            raise InputError(src, f"{seen[name]} and {source} map to the same case name {name!r}")
        seen[name] = source
        jobs.append(CaseJob(name, source, dst / label_name(name)))
    clash = [j.output for j in jobs if j.output.resolve() in {s.resolve() for s in sources}]
    if clash:
        raise InputError(clash[0], "an output would replace an input image; choose another OUTPUT folder")
    return jobs


# ------------------------------------------------------------------------------------------------------ worker

class CaseWorker:
    """What a Ray actor holds: the loaded package, and one lock so that one case computes while others do I/O.

    Plain Python: :func:`run_cases` makes it a Ray actor with the resources of one worker.
    """

    def __init__(self, model: str, predictor_kwargs: dict[str, Any], options: CaseOptions, fault: str | None = None):
        self.options = options
        self.fault = fault.split(":", 2) if fault else None
        self.network = threading.Lock()
        self.error: str | None = None
        try:
            self.predictor: CascadePredictor | None = CascadePredictor(model, **predictor_kwargs)
        except PocketsegError as exc:  # a bad package: said once by the driver, not once per case
            self.predictor, self.error = None, str(exc)

    def info(self) -> dict[str, Any]:
        if self.predictor is None:
            return {"error": self.error}
        return {"node": socket.gethostname(), "pid": os.getpid(), "device": self.predictor.device,
                "backend": self.predictor.backend}

    def _on_stage(self, stage: str, job: CaseJob) -> None:
        if self.fault and [job.case, stage] == self.fault[:2]:
            if self.fault[2:] and self.fault[2]:
                try:
                    os.close(os.open(self.fault[2], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    return
            log.warning("%s: %s set, ending this worker (pid %d) at %s", job.case, FAULT_ENV, os.getpid(), stage)
            os._exit(137)  # as a kill -9 would: no clean-up, no reply to the driver

    def run(self, job: CaseJob, attempt: int, existed: bool) -> CaseResult:
        if self.predictor is None:
            return CaseResult(job.case, "failed", error=self.error)
        options = self.options
        if attempt > 1:
            # The lost attempt may have written the whole case before its worker died, or side files without the
            # label map: the first counts as written (unless the output was there before the run), the second is
            # redone like an interrupted case under --continue.
            if options.finished(job) and not existed:
                outputs = job.output_paths(options.output_types).values()
                return CaseResult(job.case, "written", output=str(options.marker(job)),
                                  outputs=tuple(map(str, outputs)), device=self.predictor.device,
                                  backend=self.predictor.backend, times_s={})
            options = replace(options, resume=True)
        return predict_case(self.predictor, job, options, compute_lock=self.network, on_stage=self._on_stage)


# -------------------------------------------------------------------------------------------------- the driver

@dataclass
class RunSummary:
    """What a run did: output files written (in case order; per case the DICOM outputs asked for, then the label
    map), failures, attempts lost with their workers."""

    written: list[Path] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    lost: int = 0
    replaced_workers: int = 0


@dataclass
class _Slot:
    actor: Any
    info: dict[str, Any]
    in_flight: dict[Any, tuple[CaseJob, int]] = field(default_factory=dict)
    info_ref: Any = None  # a replacement's info() call, asked for as it starts, until it has answered


class _RunTable:
    """``run.jsonl``: one line per case that ends or attempt that is lost, appended and flushed as it happens."""

    def __init__(self, path: Path, run: str):
        self.path, self.run = path, run
        self.handle = open(path, "a", encoding="utf-8")

    def append(self, job: CaseJob, attempt: int, info: dict[str, Any], result: CaseResult | None = None,
               *, status: str | None = None, error: str | None = None) -> None:
        row = {"run": self.run, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "case": job.case,
               "status": status or result.status, "attempt": attempt, "error": error or (result and result.error),
               "node": info.get("node"), "pid": info.get("pid"),
               "device": (result and result.device) or info.get("device"),
               "backend": (result and result.backend) or info.get("backend"),
               "times_s": result.times_s if result else {}, "source": str(job.source),
               "output": result.output if result else None}
        self.handle.write(json_text(row, indent=None))
        self.handle.flush()  # a line per case as it ends, readable while the run goes on

    def close(self) -> None:
        self.handle.close()


def _remove_parts(job: CaseJob, options: CaseOptions) -> list[Path]:
    """Remove the temporary files (``.NAME.*.part``, :mod:`pocketseg.atomic`) a lost attempt left beside its
    targets; returns them. Called only once the worker that held the case is dead."""
    removed = []
    for target in options.targets(job):
        for part in target.parent.glob(f".{target.name}.*.part"):
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
                removed.append(part)
    return removed


def _running(pid: int) -> bool:
    """Whether the local process ``pid`` still runs (a zombie has ended: it can write nothing more)."""
    if os.path.isdir("/proc/self"):
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
                return handle.read().rsplit(")", 1)[-1].split()[:1] not in (["Z"], ["X"])
        except FileNotFoundError:
            return False
    try:  # no /proc (macOS): ask the kernel
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _settle_infos(rt: Any, slots: Sequence[_Slot], timeout: float) -> None:
    """Take the answers of the replacements' info() calls that have come (waiting at most ``timeout`` seconds)."""
    refs = [slot.info_ref for slot in slots if slot.info_ref is not None]
    if not refs:
        return
    done, _ = rt.wait(refs, num_returns=len(refs), timeout=timeout)
    for slot in slots:
        if slot.info_ref is not None and slot.info_ref in done:
            with contextlib.suppress(Exception):  # a replacement that died at once: lose() handles it
                slot.info = rt.get(slot.info_ref) or {}
            slot.info_ref = None


def _wait_gone(slots: Sequence[_Slot], timeout: float = 10.0) -> None:
    """Wait (at most ``timeout`` seconds) until the processes of the slots' workers on this machine have ended.

    Ray reports an actor dead once it is told so, which can be before its process has stopped: a worker killed
    on Ctrl-C (or whose raylet the signal ended first) may still create a temporary file for a moment. The
    clean-up runs after this wait. Workers on other machines cannot be watched; Ray's report stands for them.
    """
    host = socket.gethostname()
    alive = {slot.info["pid"] for slot in slots if slot.info.get("node") == host and slot.info.get("pid")}
    alive.discard(os.getpid())
    deadline = time.monotonic() + timeout
    while alive and time.monotonic() < deadline:
        alive = {pid for pid in alive if _running(pid)}
        if alive:
            time.sleep(0.05)


@contextlib.contextmanager
def _connected(address: str) -> Iterator[Any]:
    """Ray, connected: an existing connection of this process as it is, else ``local`` (a new cluster on this
    machine, shut down afterwards), ``auto`` (the cluster this node belongs to) or a cluster's address."""
    require("ray", "Distributed prediction (--ray)", "ray")
    import ray  # optional (extra 'ray'): only --ray runs need it

    if ray.is_initialized():
        yield ray
        return
    try:
        # "local" starts a new cluster even where RAY_ADDRESS names another one.
        ray.init(address=address, include_dashboard=False, log_to_driver=True)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise PocketsegError(f"--ray {address}: cannot connect to a Ray cluster ({exc})") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _worker_shape(ray: Any, device: str, cpus_per_worker: int | None, workers: int | None,
                  cases: int) -> tuple[int, dict[str, Any]]:
    """How many workers, and the Ray resources of each: one per GPU, else one per ``cpus_per_worker`` cores."""
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    if device == "cuda" and gpus == 0:
        raise PocketsegError("--device cuda: the Ray cluster has no GPU")
    if device != "cpu" and gpus > 0:
        count, shape = gpus, {"num_gpus": 1, "num_cpus": cpus_per_worker or 1}
    else:
        per = cpus_per_worker or 1
        if per > max(cpus, 1):
            raise PocketsegError(f"--cpus-per-worker {per}: the Ray cluster has only {cpus} CPU cores")
        count, shape = max(1, cpus // per), {"num_gpus": 0, "num_cpus": per}
    return max(1, min(count, workers or count, cases)), shape


def run_cases(model: str | os.PathLike, jobs: Sequence[CaseJob], table: str | os.PathLike, *, ray: str = "local",
              workers: int | None = None, cpus_per_worker: int | None = None, retries: int = 2,
              options: CaseOptions = CaseOptions(), device: str = "auto", backend: str = "auto",
              precision: str = "auto", overlap: float | None = None, gaussian: bool | None = None, fast: bool = False,
              batch_size: int = 1, threads: int | None = None, max_memory: int | None = None,
              trusted_keys: str | None = None, progress: bool = True) -> RunSummary:
    """Segment ``jobs`` on Ray workers (see the module docstring); the results table is appended to ``table``.

    The jobs' output folders must be on a file system every worker shares with this process, and exist by the
    time the workers start; the folder of ``table`` is created then (``predict_ray`` writes both into OUTPUT).
    """
    if int(retries) != retries or retries < 0:
        raise InputError(None, f"retries must be a whole number >= 0, got {retries!r}")
    summary = RunSummary()
    if not jobs:
        return summary
    fault = os.environ.get(FAULT_ENV)
    existed = {job.case: options.marker(job).exists() for job in jobs}
    order = {job.case: i for i, job in enumerate(jobs)}
    with _connected(ray) as rt:
        count, shape = _worker_shape(rt, device, cpus_per_worker, workers, len(jobs))
        on_gpu = shape["num_gpus"] > 0
        predictor_kwargs = {"device": "cuda" if on_gpu else "cpu", "backend": backend, "precision": precision,
                            "overlap": overlap, "gaussian": gaussian, "fast": fast, "batch_size": batch_size,
                            "threads": threads or (None if on_gpu else shape["num_cpus"]), "max_memory": max_memory,
                            "trusted_keys": trusted_keys}
        # max_restarts=0: a dead worker is replaced here, so that its cases go to whichever worker is free.
        remote = rt.remote(CaseWorker).options(max_concurrency=CASES_IN_FLIGHT, max_restarts=0, **shape)

        def start() -> _Slot:
            actor = remote.remote(str(model), predictor_kwargs, options, fault)
            return _Slot(actor, {})

        slots = [start() for _ in range(count)]
        try:
            infos = rt.get([slot.actor.info.remote() for slot in slots])
        except rt.exceptions.RayError as exc:  # e.g. a node without pocketseg, or the same Ray version
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PocketsegError(f"the Ray workers did not start: {first}") from None
        for slot, info in zip(slots, infos):
            if info.get("error"):
                raise PocketsegError(info["error"])
            slot.info = info
        log.info("ray: %d worker(s) (%s) for %d case(s)", count,
                 ", ".join(f"{k}={v}" for k, v in shape.items()), len(jobs))
        run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        ensure_dir(Path(table).parent, "output folder")
        results = _RunTable(Path(table), run_id)
        pending: deque[tuple[CaseJob, int]] = deque((job, 1) for job in jobs)
        written: dict[str, list[Path]] = {}
        bar = tqdm(total=len(jobs), desc="predict (ray)", unit="case", disable=not progress)

        def lose(slot: _Slot, why: str) -> None:
            """The worker of ``slot`` died: make sure it is gone, clean and requeue its cases, replace it."""
            with contextlib.suppress(Exception):
                rt.kill(slot.actor, no_restart=True)
            held = list(slot.in_flight.values())
            # Its other calls fail too once it is dead; wait for that, so no file of it can appear afterwards.
            with contextlib.suppress(Exception):
                rt.wait(list(slot.in_flight), num_returns=len(slot.in_flight), timeout=30)
            _wait_gone([slot])  # before in_flight is cleared: a Ctrl-C here still cleans these cases up
            slot.in_flight.clear()
            for job, attempt in sorted(held, key=lambda held_job: order[held_job[0].case], reverse=True):
                _remove_parts(job, options)
                summary.lost += 1
                if attempt > retries:
                    error = f"its worker died {attempt} time(s) ({why})"
                    results.append(job, attempt, slot.info, status="failed", error=error)
                    summary.failures.append((job.case, error))
                    log.error("%s: %s", job.case, error)
                    bar.update(1)
                else:
                    results.append(job, attempt, slot.info, status="lost", error=why)
                    log.warning("%s: worker %s:%s died (%s); retrying the case", job.case, slot.info.get("node"),
                                slot.info.get("pid"), why)
                    pending.appendleft((job, attempt + 1))
            replacement = start()
            # Its node and pid as soon as it is up, so that a Ctrl-C or its own loss can wait for its process too.
            slot.actor, slot.info, slot.info_ref = replacement.actor, {}, replacement.actor.info.remote()
            summary.replaced_workers += 1

        try:
            while pending or any(slot.in_flight for slot in slots):
                # One case at a time to the least busy worker, those known to be up first: a retried case goes to a
                # running worker rather than wait for the replacement of the one that died to load the package.
                # A retried case runs alone on its worker: which of the cases a dead worker held killed it is
                # unknown, and alone, a second death is charged to that case only, not to others beside it.
                while pending:
                    if pending[0][1] > 1:
                        free = [s for s in slots if not s.in_flight]
                    else:
                        free = [s for s in slots if len(s.in_flight) < CASES_IN_FLIGHT
                                and all(attempt == 1 for _, attempt in s.in_flight.values())]
                    if not free:
                        break
                    slot = min(free, key=lambda s: (not s.info, len(s.in_flight)))
                    job, attempt = pending.popleft()
                    slot.in_flight[slot.actor.run.remote(job, attempt, existed[job.case])] = (job, attempt)
                _settle_infos(rt, slots, timeout=0)
                refs = [ref for slot in slots for ref in slot.in_flight]
                ready, _ = rt.wait(refs, num_returns=1, timeout=1.0)
                for ref in ready:
                    slot = next((s for s in slots if ref in s.in_flight), None)
                    if slot is None:
                        continue  # its worker was found dead while settling an earlier reference of this batch
                    job, attempt = slot.in_flight[ref]
                    try:
                        result: CaseResult = rt.get(ref)
                    except (rt.exceptions.RayActorError, rt.exceptions.ActorUnavailableError) as exc:
                        lose(slot, type(exc).__name__)
                        continue
                    except rt.exceptions.RayTaskError as exc:  # predict_case returns failures; this is a bug
                        result = CaseResult(job.case, "failed", error=f"{type(exc).__name__}: {exc}")
                    del slot.in_flight[ref]
                    if not slot.info:
                        with contextlib.suppress(Exception):
                            slot.info = rt.get(slot.actor.info.remote(), timeout=10)
                    results.append(job, attempt, slot.info, result)
                    if result.status == "written":
                        written[job.case] = [Path(p) for p in result.outputs]
                        bar.set_postfix_str(f"{job.case} {result.times_s.get('total', 0):.1f}s")
                    else:
                        summary.failures.append((job.case, result.error))
                    bar.update(1)
        except BaseException:
            # Ctrl-C (or an error of the driver): stop every worker, wait until each is gone, then remove the
            # temporary files of the cases they held; finished files are complete, the rest is left for --continue.
            held = [job for slot in slots for job, _ in slot.in_flight.values()]
            with contextlib.suppress(BaseException):
                _settle_infos(rt, slots, timeout=1.0)
            for slot in slots:
                with contextlib.suppress(Exception):
                    rt.kill(slot.actor, no_restart=True)
            refs = [ref for slot in slots for ref in slot.in_flight]
            with contextlib.suppress(BaseException):
                if refs:
                    rt.wait(refs, num_returns=len(refs), timeout=30)
            with contextlib.suppress(BaseException):  # a second Ctrl-C skips the wait, not the clean-up
                _wait_gone(slots)
            for job in held:
                _remove_parts(job, options)
            log.warning("ray: stopped; %d case(s) of this run recorded as written, the rest is left for --continue",
                        len(written))
            raise
        finally:
            bar.close()
            results.close()
        for slot in slots:
            with contextlib.suppress(Exception):
                rt.kill(slot.actor, no_restart=True)
    summary.written = [path for job in jobs if job.case in written for path in written[job.case]]
    return summary


def predict_ray(input: str | os.PathLike, output: str | os.PathLike, model: str | os.PathLike, *,
                ray: str = "local", workers: int | None = None, cpus_per_worker: int | None = None, retries: int = 2,
                device: str = "auto", backend: str = "auto", precision: str = "auto", statistics: bool = False,
                preview: bool = False, overlap: float | None = None, gaussian: bool | None = None, fast: bool = False,
                batch_size: int = 1, resume: bool = False, overwrite: bool = False, check_intensities: bool = True,
                threads: int | None = None, max_memory: str | int | None = None,
                output_type: str | Sequence[str] | None = None, dicom_reference: str | os.PathLike | None = None,
                progress: bool = True, trusted_keys: str | os.PathLike | None = None) -> list[Path]:
    """Segment many scans on a Ray cluster (``pocketseg predict --ray``); outputs as folder mode writes them.

    Args:
        input: a folder of NIfTI files, a folder of DICOM series folders, a DICOM study tree, or a list file
            (``.txt``: one path per line; ``.csv``/``.tsv``: a column named path, image, input or file, else the
            first), relative paths relative to the list.
        output: the output folder, ``CASE.nii.gz`` per case, and ``run.jsonl``, the results table.
        model: a model package folder, at the same path on every node.
        ray: ``local`` (start a Ray cluster on this machine), ``auto`` (the cluster this machine belongs to) or a
            cluster's address (``ray://HEAD:10001``, ``HEAD:6379``).
        workers: at most this many workers [one per GPU, else one per ``cpus_per_worker`` cores].
        cpus_per_worker: CPU cores of each worker (and ONNX Runtime threads of a CPU worker) [1].
        retries: times a case is retried after its worker died [2].

    The other arguments are those of :func:`pocketseg.runtime.predict.predict`.

    Raises:
        InputError: bad input (nothing is written).
        PredictFailures: the cases that failed (the others were written).
    """
    types = output_types(output_type)
    if dicom_reference is not None:
        raise InputError(Path(dicom_reference), "--dicom-reference is for one NIfTI input, not for --ray (a DICOM "
                                                "input is its own reference)")
    jobs = plan_inputs(input, output)
    keys = trusted_keys_folder(trusted_keys)  # the driver's folder (or its env variable); each worker checks it
    dicom_out = check_dicom_outputs(types)
    nifti_inputs = [job.source for job in jobs if is_nifti_path(job.source)]
    if dicom_out and nifti_inputs:
        raise InputError(nifti_inputs[0], f"--output-type {dicom_out[0]} needs DICOM input; with --ray every case "
                                          "must be a DICOM series (--dicom-reference is for one NIfTI input)")
    options = CaseOptions(statistics=statistics, preview=preview, overwrite=overwrite, resume=resume,
                          check_intensities=check_intensities, output_types=types)
    if preview:
        require("matplotlib", "Preview images (--preview)", "viz")
    for name, value in (("workers", workers), ("cpus_per_worker", cpus_per_worker)):
        if value is not None and (int(value) != value or value < 1):
            raise InputError(None, f"{name} must be a whole number >= 1, got {value!r}")
    todo = [job for job in jobs if not (resume and options.finished(job))]
    if len(todo) < len(jobs):
        log.info("%d case(s) finished earlier, skipped (--continue)", len(jobs) - len(todo))
    if not todo:
        return []
    summary = run_cases(model, todo, Path(output) / RUN_TABLE, ray=ray, workers=workers, cpus_per_worker=cpus_per_worker,
                        retries=retries, options=options, device=device, backend=backend, precision=precision,
                        overlap=overlap, gaussian=gaussian, fast=fast, batch_size=batch_size, threads=threads,
                        max_memory=parse_size(max_memory), progress=progress,
                        trusted_keys=None if keys is None else str(keys))
    if summary.lost:
        log.warning("%d attempt(s) lost with their workers were retried (%d worker(s) replaced)", summary.lost,
                    summary.replaced_workers)
    if summary.failures:
        raise PredictFailures(summary.failures, len(summary.written))
    return summary.written


def summary_dict(summary: RunSummary) -> dict[str, Any]:
    """The summary as JSON-ready data (benchmarks, reports)."""
    data = asdict(summary)
    data["written"] = [str(p) for p in summary.written]
    return data
