"""``pocketseg predict`` and ``pocketseg.segment``: files and folders in, label maps out.

Input forms (as nnU-Net and TotalSegmentator take them):

* one NIfTI file or one DICOM series folder -> one label file (OUTPUT ends in
  ``.nii.gz``/``.nii``; otherwise OUTPUT is a folder and the file is named after the case);
* a folder of NIfTI files -> a folder of label files, ``CASE_0000.nii.gz`` -> ``CASE.nii.gz``
  (nnU-Net's channel suffix is dropped);
* a DICOM study tree (a folder of patients/studies/series folders at any depth, as a PACS exports it) ->
  one case per CT series, named from patient ID, study date and series number; localizers and
  non-CT series are skipped with a log line.

  For folders and trees the model is loaded once; the next scan is read
  and the previous result written in background threads while the current one computes;
  ``resume`` skips finished cases; a bad case is reported and the rest continue, and the
  run ends with the list of failures and a non-zero exit.

Outputs (``output_type``): the NIfTI label map ``NAME.nii.gz``, a DICOM SEG ``NAME.seg.dcm`` and an RT
Structure Set ``NAME.rtstruct.dcm``; the DICOM ones for DICOM input, or for NIfTI input together with the
series it was converted from (``dicom_reference``).

A case's files (statistics, preview, DICOM SEG, RT Structure Set, label map) are staged under
temporary names beside their targets and renamed into place together once all are written, the
case's marker last: the label map, or the last DICOM output when no label map is asked for
(:func:`pocketseg.atomic.staged_files`). An interrupted run or a full disk leaves none of them,
and an existing output is replaced only with ``overwrite``.

Several processes may work on one output folder: in folder mode each case is claimed
with a lock file ``CASE.lock`` beside its outputs (:func:`pocketseg.atomic.try_lock`),
taken atomically and removed when the case is written or has failed. A case that another
process has locked or written since this one started is left to it and counted as done
by another run; at the end a run waits for the cases others still hold, so that every
run ends with the folder complete (or with the failures).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from pocketseg import labels as L
from pocketseg.atomic import FileLock, LockHolder, ensure_dir, json_text, read_lock, staged_files, try_lock
from pocketseg.dicom import SeriesGrid, TreeSeries, is_study_tree, read_series_grid, read_tree_series, scan_study_tree
from pocketseg.errors import InputError, OutputError, PocketsegError, require
from pocketseg.imageio import load_volume
from pocketseg.layout import CHANNEL_SUFFIX, case_name, is_nifti_path, label_name, nifti_files, strip_nifti
from pocketseg.nifti import label_bytes, nifti_image
from pocketseg.preview import render_preview
from pocketseg.runtime.cascade import CascadePredictor, Prediction
from pocketseg.runtime.dicom_output import (DICOM_OUTPUT_TYPES, OUTPUT_TYPES, Algorithm, algorithm_of, output_types,
                                            to_series_grid)
from pocketseg.runtime.memory_limit import parse_size
from pocketseg.signing import trusted_keys_folder
from pocketseg.volume import Volume

__all__ = ["CaseJob", "CaseOptions", "CaseResult", "PredictFailures", "case_name", "case_statistics", "plan_cases",
           "plan_study_tree", "predict", "predict_case", "segment"]

log = logging.getLogger(__name__)


class PredictFailures(PocketsegError):
    """Some cases of a folder could not be segmented; the others were written."""

    def __init__(self, failures: list[tuple[str, str]], done: int, by_others: int = 0):
        self.failures = failures
        lines = "; ".join(f"{case}: {why}" for case, why in failures)
        others = f", {by_others} done by another run" if by_others else ""
        super().__init__(f"{len(failures)} case(s) failed ({done} written{others}): {lines}")


@dataclass(frozen=True)
class CaseJob:
    """One scan to segment and where its outputs go."""

    case: str
    source: Path
    output: Path
    series: TreeSeries | None = None  # a series of a DICOM study tree (source is its folder)

    @property
    def output_stem(self) -> str:
        """The label map's name without its ending: side files are named after the output, never the input
        (two patients' scans may both be called ``ct.nii.gz``)."""
        return strip_nifti(self.output.name)

    @property
    def statistics_path(self) -> Path:
        return self.output.with_name(self.output_stem + ".statistics.json")

    @property
    def preview_path(self) -> Path:
        return self.output.with_name(self.output_stem + ".png")

    @property
    def lock_path(self) -> Path:
        """The lock file of the case while a process works on it (folder mode)."""
        return self.output.with_name(self.output_stem + ".lock")

    def output_paths(self, types: Sequence[str] = ("nifti",)) -> dict[str, Path]:
        """The file of each output type: ``NAME.nii.gz``, ``NAME.seg.dcm``, ``NAME.rtstruct.dcm``."""
        return {t: self.output if t == "nifti" else self.output.with_name(self.output_stem + OUTPUT_TYPES[t])
                for t in types}

    def marker(self, types: Sequence[str] = ("nifti",)) -> Path:
        """The output written last, whose presence marks the case finished for ``resume``: the label map, or
        the last DICOM output when no label map is asked for."""
        return self.output_paths(types)[types[-1] if "nifti" not in types else "nifti"]

    def outputs(self, statistics: bool, preview: bool, types: Sequence[str] = ("nifti",)) -> list[Path]:
        """The files of the case in the order they are published, the marker last (its presence marks the case
        finished)."""
        marker = self.marker(types)
        return (([self.statistics_path] if statistics else []) + ([self.preview_path] if preview else [])
                + [p for p in self.output_paths(types).values() if p != marker] + [marker])


#: nnU-Net's channel suffix of an image file name: ``CASE_0000``, ``CASE_0001`` ...
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def _refuse_extra_channels(folder: Path, files: Sequence[Path]) -> None:
    """Refuse ``CASE_0001``, ``CASE_0002`` ... beside ``CASE_0000``: further channels of a multi-channel case,
    which the CT models do not take (rather than segmenting each as a case of its own)."""
    first = {case_name(f) for f in files if strip_nifti(f.name).endswith(CHANNEL_SUFFIX)}
    for f in files:
        match = _CHANNEL.match(strip_nifti(f.name))
        if match and match["channel"] != CHANNEL_SUFFIX[1:] and match["case"] in first:
            raise InputError(f, f"is channel {int(match['channel'])} of case {match['case']} "
                                f"(beside {match['case']}{CHANNEL_SUFFIX}); multi-channel input is not supported: "
                                f"one CT image per case")


def plan_study_tree(src: Path, dst: Path) -> list[CaseJob]:
    """One job per CT series of a DICOM study tree; the others are logged as skipped."""
    if is_nifti_path(dst):
        raise InputError(dst, "INPUT is a DICOM study tree, so OUTPUT must be a folder, not a file name")
    found = scan_study_tree(src)
    jobs = []
    for series in found:
        where = series.folder.relative_to(src) if series.folder.is_relative_to(src) else series.folder
        if series.skipped:
            log.info("skipped series %s in %s (%s, %d file(s)): %s", series.series_number, where,
                     series.description or "no description", series.n_files, series.skipped)
            continue
        log.info("case %s: series %s in %s (%s, %d file(s))", series.case, series.series_number, where,
                 series.description or "no description", series.n_files)
        jobs.append(CaseJob(series.case, series.folder, dst / label_name(series.case), series))
    log.info("study tree %s: %d CT series to segment, %d series skipped", src, len(jobs), len(found) - len(jobs))
    if not jobs:
        skipped = "; ".join(f"{s.folder.name}: {s.skipped}" for s in found[:5])
        raise InputError(src, f"holds no CT series in its sub-folders ({len(found)} image series found"
                              f"{': ' + skipped if skipped else ''})")
    return jobs


def plan_cases(input: str | os.PathLike, output: str | os.PathLike) -> tuple[list[CaseJob], bool]:
    """The cases of INPUT and their output files; True when INPUT is a folder of NIfTI files or a study tree."""
    src, dst = Path(input), Path(output)
    if not src.exists():
        raise InputError(src, "does not exist")
    if src.is_dir():
        files = nifti_files(src)
        if not files and is_study_tree(src):
            return plan_study_tree(src, dst), True
        if files:
            if is_nifti_path(dst):
                raise InputError(dst, "INPUT is a folder of NIfTI files, so OUTPUT must be a folder, not a file name")
            _refuse_extra_channels(src, files)
            jobs = [CaseJob(case_name(f), f, dst / label_name(case_name(f))) for f in files]
            inputs = {f.resolve() for f in files}
            clash = [j.output for j in jobs if j.output.resolve() in inputs]
            if clash:
                raise InputError(clash[0], "an output would replace an input image; choose another OUTPUT folder")
            names = [j.case for j in jobs]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise InputError(src, f"several images map to the same case name: {', '.join(twice)} "
                                      "(one image per case; multi-channel input is not supported)")
            return jobs, True
        # Otherwise a DICOM series folder (load_volume says so if it is not one).
    elif not is_nifti_path(src):
        raise InputError(src, "unsupported input: expected a .nii/.nii.gz file, a DICOM series folder "
                              "or a folder of NIfTI files")
    name = case_name(src)
    out = dst if is_nifti_path(dst) else dst / label_name(name)
    if out.resolve() == src.resolve():
        raise InputError(out, "OUTPUT is the input image itself; choose another output name")
    return [CaseJob(name, src, out)], False


def case_statistics(labels: np.ndarray, image: np.ndarray, spacing_mm: tuple[float, float, float],
                    label_names: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Per class of the label set (FLARE 2023's when ``label_names`` is None): voxels, volume (mL) and the mean
    intensity of the image under the mask (HU for CT; None where the class is absent)."""
    counts = np.zeros(256, dtype=np.int64)
    sums = np.zeros(256, dtype=np.float64)
    for first in range(0, labels.shape[0], 16):  # slabs: the float64/int64 temporaries stay small
        lab = np.asarray(labels[first : first + 16], dtype=np.uint8).ravel()
        counts += np.bincount(lab, minlength=256)
        sums += np.bincount(lab, weights=np.asarray(image[first : first + 16], dtype=np.float64).ravel(), minlength=256)
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    out: dict[str, Any] = {}
    for label in L.label_set(label_names):
        if label.id == 0:
            continue
        n = int(counts[label.id]) if label.id < counts.size else 0
        out[label.name] = {"id": label.id, "voxels": n, "volume_ml": round(n * voxel_ml, 3),
                           "mean_hu": round(float(sums[label.id] / n), 2) if n else None}
    return out


def _write_outputs(job: CaseJob, volume: Volume, prediction: Prediction, *, statistics: bool, preview: bool,
                   overwrite: bool, label_names: Mapping[str, int] | None = None, types: Sequence[str] = ("nifti",),
                   algorithm: Algorithm | None = None, reference: SeriesGrid | None = None) -> list[Path]:
    """Write the case's files all or nothing: staged beside their targets, renamed into place together once
    every one is written, the marker last (the label map, else the last DICOM output: its presence marks the
    case finished for ``resume``). Returns the outputs of ``types``: DICOM SEG, RT Structure Set, label map."""
    paths = job.output_paths(types)
    marker = job.marker(types)
    dicom = [t for t in types if t in DICOM_OUTPUT_TYPES]
    with staged_files(overwrite=overwrite) as staged:
        if statistics:
            report = {"case": job.case, "source": str(job.source), "spacing_mm": list(volume.spacing_mm),
                      "device": prediction.device, "backend": prediction.backend,
                      "timings_s": {k: round(v, 4) for k, v in prediction.timings_s.items()},
                      "warnings": prediction.warnings,
                      "classes": case_statistics(prediction.labels, volume.data, volume.spacing_mm, label_names)}
            staged.write_text(job.statistics_path, json_text(report))
        if preview:
            staged.write(job.preview_path, render_preview(volume.data, volume.affine, prediction.labels,
                                                          title=f"{job.case} - pocketseg", label_names=label_names))
        payloads = _dicom_payloads(job, volume, prediction, dicom, label_names=label_names, algorithm=algorithm,
                                   reference=reference) if dicom else {}
        if "nifti" in types:
            payloads["nifti"] = label_bytes(prediction.labels, job.output, reference=volume)
        for kind, payload in sorted(payloads.items(), key=lambda item: paths[item[0]] == marker):
            staged.write(paths[kind], payload)
    return list(paths.values())


def _dicom_payloads(job: CaseJob, volume: Volume, prediction: Prediction, types: Sequence[str], *,
                    label_names: Mapping[str, int] | None, algorithm: Algorithm | None,
                    reference: SeriesGrid | None) -> dict[str, bytes]:
    """The DICOM SEG and RT Structure Set of a case, on the grid of its DICOM series, as file contents."""
    # optional (dicom extra): highdicom, pydicom and scikit-image are loaded only when a DICOM output is asked for
    from pocketseg.runtime.dicom_seg import dicom_seg_bytes
    from pocketseg.runtime.rtstruct import rtstruct_bytes

    if algorithm is None:
        raise ValueError("DICOM outputs need the algorithm (model package) that produced them")
    if reference is not None:  # NIfTI input: its labels moved onto the series the image came from
        labels, files = to_series_grid(prediction.labels, volume.affine, reference, job.source), reference.files
    elif "files" in volume.meta:
        labels, files = prediction.labels, volume.meta["files"]
    else:
        raise InputError(job.source, "is not a DICOM series, so its DICOM outputs have no series to reference "
                                     "(--dicom-reference names the one a NIfTI image was converted from)")
    writers = {"dicom-seg": dicom_seg_bytes, "dicom-rtstruct": rtstruct_bytes}
    return {kind: writers[kind](labels, files, algorithm=algorithm, label_names=label_names) for kind in types}


def _finished(job: CaseJob, statistics: bool, preview: bool, types: Sequence[str] = ("nifti",)) -> bool:
    return all(p.is_file() for p in job.outputs(statistics, preview, types))


def _may_replace(job: CaseJob, overwrite: bool, resume: bool, types: Sequence[str] = ("nifti",)) -> bool:
    """Whether this job may replace its existing outputs: with ``overwrite``, or under ``resume`` the
    side files of a case whose marker (the label map, written last) is missing, i.e. an interrupted case."""
    return overwrite or (resume and not job.marker(types).exists())


def _say_what_resume_replaces(job: CaseJob, statistics: bool, preview: bool, overwrite: bool, resume: bool,
                              types: Sequence[str]) -> None:
    """Under ``resume`` (not ``overwrite``) a case without its marker is redone and its existing files replaced:
    an interrupted case, or one whose output types grew since; never silently."""
    if overwrite or not resume or job.marker(types).exists():
        return
    existing = [p for p in job.outputs(statistics, preview, types) if p.exists()]
    if existing:
        log.warning("%s: --continue replaces %s (the case's %s is missing: an interrupted case, or output types "
                    "added since)", job.case, ", ".join(p.name for p in existing), job.marker(types).name)


def _check_targets(job: CaseJob, statistics: bool, preview: bool, overwrite: bool,
                   types: Sequence[str] = ("nifti",)) -> None:
    """Refuse, before any work, outputs that exist (unless they may be replaced), saying which files of the
    case exist and how to go on."""
    outputs = job.outputs(statistics, preview, types)
    for path in outputs:
        if path.is_dir():
            raise OutputError(path, "is a folder, expected a file path")
    if not job.output.parent.is_dir():
        raise OutputError(job.output, f"parent folder {job.output.parent} does not exist")
    if not os.access(job.output.parent, os.W_OK):
        raise OutputError(job.output, f"parent folder {job.output.parent} is not writable")
    if overwrite:
        return
    existing = [p for p in outputs if p.exists()]
    if not existing:
        return
    names = ", ".join(p.name for p in existing)
    marker = job.marker(types)
    what = f"the label map {marker.name}" if marker == job.output else marker.name
    if not marker.exists():
        state = (f"without {what}, left by an interrupted run or an older version "
                 f"({names}): --continue finishes the case and replaces it, --overwrite too")
    elif len(existing) == len(outputs):
        state = f"(the case is finished: {names}): --continue skips finished cases, --overwrite replaces them"
    else:
        missing = ", ".join(p.name for p in outputs if not p.exists())
        state = (f"({what} is there, {missing} not: written without those options): --overwrite writes "
                 f"the case again with every asked file")
    raise OutputError(existing[0], f"already exists {state} (resume=True, overwrite=True from Python)")


def predict(input: str | os.PathLike, output: str | os.PathLike, model: str | os.PathLike, *,
            device: str = "auto", backend: str = "auto", precision: str = "auto", statistics: bool = False,
            preview: bool = False, overlap: float | None = None, gaussian: bool | None = None, fast: bool = False,
            batch_size: int = 1,
            resume: bool = False, overwrite: bool = False, series_uid: str | None = None,
            check_intensities: bool = True, threads: int | None = None, max_memory: str | int | None = None,
            output_type: str | Sequence[str] | None = None, dicom_reference: str | os.PathLike | None = None,
            progress: bool = True, trusted_keys: str | os.PathLike | None = None) -> list[Path]:
    """Segment a NIfTI file, a DICOM series folder, a folder of NIfTI files or a DICOM study tree
    (``pocketseg predict``).

    Args:
        input: a ``.nii``/``.nii.gz`` file, a DICOM series folder, a folder of NIfTI files, or a folder of
            patients/studies/series folders (a DICOM study tree: one case per CT series).
        output: for one scan a label file (``.nii.gz``) or a folder; for a folder of NIfTI files a
            folder that receives one ``CASE.nii.gz`` per ``CASE_0000.nii.gz``; for a study tree a folder
            that receives one ``PATIENT_DATE_sSERIES.nii.gz`` per CT series.
        model: a model package folder (``pocketseg export``).
        device: ``auto`` (a CUDA GPU when one is usable), ``cpu`` or ``cuda``.
        backend: ``auto``, ``tensorrt``, ``onnxruntime`` or ``torch`` (see :func:`pocketseg.runtime.engines.resolve`).
        precision: ``auto`` (fp16 on a GPU, fp32 on the CPU), ``fp32`` or ``fp16``.
        statistics: also write ``NAME.statistics.json`` beside the label map ``NAME.nii.gz`` (volume in mL and
            mean HU per class, timings).
        preview: also write ``NAME.png`` beside it (three views with the label overlay; needs the ``viz`` extra).
        overlap: fraction of a tile shared with its neighbour, in [0, 1); 0 is the paper's tile step 1.0.
            None: the package's (0 for pocketseg's packages, nnU-Net's 0.5 for imported models).
        gaussian: blend overlapping tiles with Gaussian weights (None: the package's setting).
        fast: the paper's settings for any package: tile step 1, uniform blending, no test-time mirroring,
            labels (not logits) back to the original grid; an imported model then runs several times faster
            and its labels differ from nnU-Net's at some boundary voxels (docs/inference.md).
        batch_size: tiles per network call.
        resume: skip cases whose outputs exist, finish interrupted ones (``--continue``).
        overwrite: replace existing outputs; without it an existing output is an error.
        series_uid: the series to read when a DICOM folder holds several.
        check_intensities: refuse images that are not CT in Hounsfield units.
        threads: CPU threads of the engine and of the CPU resampling's BLAS (default: all cores).
        max_memory: the most memory a scan's resampled grids and label buffers may need, in bytes or as a size
            (``8GiB``, ``--max-memory``); a scan estimated above it is refused before anything is allocated.
            None: 75 % of the machine's physical memory (:mod:`pocketseg.runtime.memory_limit`).
        output_type: what to write per case, one or several of ``nifti`` (``NAME.nii.gz``, the default),
            ``dicom-seg`` (``NAME.seg.dcm``) and ``dicom-rtstruct`` (``NAME.rtstruct.dcm``); the DICOM
            ones need DICOM input or ``dicom_reference`` (and the ``dicom`` extra).
        dicom_reference: for one NIfTI input, the DICOM series folder it was converted from; the DICOM
            outputs reference it and are written on its grid, which must be the NIfTI's.
        progress: show progress bars.
        trusted_keys: a folder of trusted Ed25519 public keys (None: ``$POCKETSEG_TRUSTED_KEYS`` when set); the
            package must then be signed by one of them, else nothing runs (docs/model-package.md, "Signatures").

    In folder mode several processes may share one output folder: each case is claimed with a lock file
    (``CASE.lock``), and a case another run has locked or written since this one started is left to it.

    Returns:
        The files this run wrote, in case order; per case the DICOM SEG, the RT Structure Set, then the label
        map (those requested).

    Raises:
        InputError: bad input, named with its path (nothing is written for it).
        InputError: also a scan whose resampled grids would need more memory than ``max_memory``.
        OutputError: an output exists (without ``overwrite``) or cannot be written (a full disk: nothing of
            the case is left behind).
        PredictFailures: in folder mode, the cases that failed (the others were written).
    """
    types = output_types(output_type)
    jobs, folder_mode = plan_cases(input, output)
    if series_uid is not None and (folder_mode or is_nifti_path(jobs[0].source)):
        raise InputError(Path(input), "--series-uid chooses a series in one DICOM series folder; this input is "
                                      f"{'a folder of cases' if folder_mode else 'a NIfTI file'} (series_uid= "
                                      "from Python)")
    for job in jobs:  # outputs inside a DICOM series folder would join the series other tools read
        source = job.series.folder if job.series is not None else job.source
        if source.is_dir() and _is_within(job.output.parent, source):
            raise InputError(job.output.parent, f"is inside the DICOM input folder {source}; write the outputs "
                                                "elsewhere")
    max_bytes = parse_size(max_memory)
    dicom_out = check_dicom_outputs(types)
    reference = None
    if dicom_reference is not None:
        if folder_mode or not is_nifti_path(jobs[0].source):
            raise InputError(Path(dicom_reference), "--dicom-reference is for one NIfTI input (a DICOM input is "
                                                    "its own reference); dicom_reference= from Python")
        if not dicom_out:
            raise InputError(Path(dicom_reference), "--dicom-reference is used only by the DICOM output types "
                                                    "(--output-type dicom-seg / dicom-rtstruct)")
        reference = read_series_grid(dicom_reference)
    elif dicom_out and not folder_mode and is_nifti_path(jobs[0].source):
        raise InputError(jobs[0].source, f"--output-type {dicom_out[0]} needs DICOM input, or --dicom-reference DIR "
                                         "naming the DICOM series this NIfTI was converted from")
    elif dicom_out and folder_mode and jobs[0].series is None:
        raise InputError(Path(input), f"--output-type {dicom_out[0]} needs DICOM input; this is a folder of NIfTI "
                                      "files")
    options = CaseOptions(statistics=statistics, preview=preview, overwrite=overwrite, resume=resume,
                          check_intensities=check_intensities, output_types=types, dicom_reference=reference)
    # What each case's marker was when this run started: one that changes later was written by another run.
    seen = {job.case: _identity(job.marker(types)) for job in jobs}
    if preview:
        require("matplotlib", "Preview images (--preview)", "viz")
    todo = []
    for job in jobs:
        if resume and options.finished(job):
            log.info("%s: finished earlier, skipped (resume)", job.case)
            continue
        todo.append(job)
    if not todo:
        return []
    out_dir = Path(output) if folder_mode else jobs[0].output.parent
    created = not out_dir.exists()
    ensure_dir(out_dir, "output folder")
    try:
        return _predict_planned(todo, folder_mode, options, seen, model=model, device=device, backend=backend,
                                precision=precision, overlap=overlap, gaussian=gaussian, fast=fast,
                                batch_size=batch_size, threads=threads, progress=progress, max_bytes=max_bytes,
                                trusted_keys=trusted_keys, series_uid=series_uid, reference=reference)
    except BaseException:
        # A run refused before it wrote anything (a package that fails its checks, an unreadable input) leaves
        # no folder of its own behind.
        if created and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise


def _is_within(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _predict_planned(todo: list[CaseJob], folder_mode: bool, options: CaseOptions, seen: dict, *, model, device,
                     backend, precision, overlap, gaussian, fast, batch_size, threads, progress, max_bytes,
                     trusted_keys, series_uid, reference) -> list[Path]:
    """:func:`predict` once the cases are planned and checked and the output folder exists."""
    statistics, preview, overwrite, resume = options.statistics, options.preview, options.overwrite, options.resume
    check_intensities, types = options.check_intensities, options.output_types
    volume = None
    if not folder_mode:
        _check_targets(todo[0], statistics, preview, _may_replace(todo[0], overwrite, resume, types), types)
        _say_what_resume_replaces(todo[0], statistics, preview, overwrite, resume, types)
        volume = load_volume(todo[0].source, series_uid=series_uid)
        if reference is not None:  # refuse a mismatched reference before the model runs
            to_series_grid(np.zeros(volume.shape, dtype=np.uint8), volume.affine, reference, todo[0].source)

    predictor = CascadePredictor(model, device=device, backend=backend, precision=precision, overlap=overlap,
                                 gaussian=gaussian, fast=fast, batch_size=batch_size, threads=threads,
                                 progress=progress and not folder_mode, max_memory=max_bytes,
                                 trusted_keys=trusted_keys)
    if volume is not None:
        job = todo[0]
        prediction = predictor.predict(volume, check_intensities=check_intensities)
        _log_case(job, prediction)
        return _write_outputs(job, volume, prediction, statistics=statistics, preview=preview,
                              overwrite=_may_replace(job, overwrite, resume, types),
                              label_names=predictor.manifest.labels, types=types,
                              algorithm=_algorithm(predictor, types), reference=reference)
    return _FolderRun(predictor, seen, options).run(todo, progress=progress)


def check_dicom_outputs(types: Sequence[str]) -> list[str]:
    """The DICOM output types among ``types``; their optional dependencies are required up front."""
    dicom_out = [t for t in types if t in DICOM_OUTPUT_TYPES]
    if dicom_out:
        require("highdicom", f"--output-type {dicom_out[0]}", "dicom")
        require("skimage", f"--output-type {dicom_out[0]}", "dicom")
    return dicom_out


def _algorithm(predictor: CascadePredictor, types: Sequence[str]) -> Algorithm | None:
    """The producer the DICOM outputs record (None when none is asked for)."""
    if not any(t in DICOM_OUTPUT_TYPES for t in types):
        return None
    return algorithm_of(predictor.package_dir, predictor.manifest)


def _log_case(job: CaseJob, prediction: Prediction) -> None:
    t = prediction.timings_s
    log.info("%s: %.2f s (roi %.2f, detail %.2f, post %.2f) on %s/%s", job.case, t["total"], t["roi"], t["detail"],
             t["postprocess"], prediction.device, prediction.backend)
    # prediction.warnings were logged where they arose (runtime.cascade); they go on into the statistics.


# ------------------------------------------------------------------------------------------------- one case

#: Cases in flight at once in folder mode and on each Ray worker: one read ahead, one computing, one written behind.
CASES_IN_FLIGHT = 3


@dataclass(frozen=True)
class CaseOptions:
    """What every case of a run writes, and what it may replace (folder mode and Ray alike)."""

    statistics: bool = False
    preview: bool = False
    overwrite: bool = False
    resume: bool = False
    check_intensities: bool = True
    #: ``nifti``, ``dicom-seg``, ``dicom-rtstruct`` in table order (:func:`~pocketseg.runtime.dicom_output.output_types`)
    output_types: tuple[str, ...] = ("nifti",)
    #: the grid of the DICOM series a NIfTI input was converted from (``--dicom-reference``; one scan only)
    dicom_reference: SeriesGrid | None = None

    def targets(self, job: CaseJob) -> list[Path]:
        """The files the case writes, its marker (written last) first."""
        return list(reversed(job.outputs(self.statistics, self.preview, self.output_types)))

    def marker(self, job: CaseJob) -> Path:
        """The file whose presence marks the case finished."""
        return job.marker(self.output_types)

    def finished(self, job: CaseJob) -> bool:
        return _finished(job, self.statistics, self.preview, self.output_types)


@dataclass(frozen=True)
class CaseResult:
    """How one case ended: ``written`` (``output``, the marker, and ``outputs`` set), ``failed`` (``error`` set) or
    ``stopped`` (by Ctrl-C, nothing written), with per-stage seconds (``read``, ``wait`` for the network, the
    cascade's stages, ``write``)."""

    case: str
    status: str
    output: str | None = None
    outputs: tuple[str, ...] = ()  # every output file of the case: DICOM SEG, RT Structure Set, label map
    error: str | None = None
    device: str | None = None
    backend: str | None = None
    times_s: dict[str, float] = field(default_factory=dict)


def _why(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, PocketsegError) else f"{type(exc).__name__}: {exc}"


def predict_case(predictor: CascadePredictor, job: CaseJob, options: CaseOptions, *,
                 compute_lock: contextlib.AbstractContextManager | None = None,
                 on_stage: Callable[[str, CaseJob], None] | None = None,
                 stop: threading.Event | None = None) -> CaseResult:
    """Read, segment and write one case of a run; a failure of the case is returned, not raised.

    Folder mode and the Ray workers call it for every case. ``compute_lock`` serialises the network
    between the cases in flight, so that one case is read and another written while one computes.
    ``on_stage(stage, job)`` is called before ``read``, ``predict`` and ``write``. Once ``stop`` is set
    (Ctrl-C), a case not yet at its network gives up (status ``stopped``, nothing written); one past it
    is written. Interruptions (KeyboardInterrupt, SystemExit) pass through; the writes are atomic, so
    none leaves a partial file.
    """
    times: dict[str, float] = {}
    prediction: Prediction | None = None
    try:
        types = options.output_types
        replace = _may_replace(job, options.overwrite, options.resume, types)
        _check_targets(job, options.statistics, options.preview, replace, types)
        _say_what_resume_replaces(job, options.statistics, options.preview, options.overwrite, options.resume,
                                  types)
        if on_stage:
            on_stage("read", job)
        t = time.perf_counter()
        volume = _read(job)
        times["read"] = time.perf_counter() - t
        t = time.perf_counter()
        with compute_lock or contextlib.nullcontext():
            times["wait"] = time.perf_counter() - t
            if stop is not None and stop.is_set():
                return CaseResult(job.case, "stopped", times_s=_rounded(times))
            if on_stage:
                on_stage("predict", job)
            prediction = predictor.predict(volume, check_intensities=options.check_intensities)
        times.update(prediction.timings_s)
        _log_case(job, prediction)
        if on_stage:
            on_stage("write", job)
        t = time.perf_counter()
        written = _write_outputs(job, volume, prediction, statistics=options.statistics, preview=options.preview,
                                 overwrite=replace, label_names=predictor.manifest.labels, types=types,
                                 algorithm=_algorithm(predictor, types), reference=options.dicom_reference)
        times["write"] = time.perf_counter() - t
    except Exception as exc:  # a bad case must not stop the others; the caller reports it
        log.error("%s: %s", job.case, _why(exc))
        log.debug("%s failed", job.case, exc_info=True)
        return CaseResult(job.case, "failed", error=_why(exc), device=prediction and prediction.device,
                          backend=prediction and prediction.backend, times_s=_rounded(times))
    return CaseResult(job.case, "written", output=str(job.marker(types)), outputs=tuple(map(str, written)),
                      device=prediction.device, backend=prediction.backend, times_s=_rounded(times))


def _rounded(times: Mapping[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in times.items()}


def _read(job: CaseJob) -> Volume:
    return read_tree_series(job.series) if job.series is not None else load_volume(job.source)


def _identity(path: Path) -> tuple[int, int, int, int] | None:
    """Which file is at ``path`` (device, inode, modification time, size); None if none."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


#: Seconds between looks at the cases other runs hold, and between reminders that this run waits for them.
_POLL_S = 0.5
_REMIND_S = 60.0
#: A lock file that names no owner this long after it was written is not a run's (a run writes its owner in
#: full before the lock appears, or right after creating it where hard links are missing): the case fails.
_UNREADABLE_LOCK_S = 30.0


class _FolderRun:
    """One run over a folder: every case through :func:`predict_case`, :data:`CASES_IN_FLIGHT` at a time around
    one network (one read ahead, one computing, one written behind); each case claimed with its lock file first,
    so that several runs on one folder share the work."""

    def __init__(self, predictor: CascadePredictor, seen: dict[str, tuple | None], options: CaseOptions):
        self.predictor = predictor
        self.seen = seen
        self.options = options
        self.written: list[Path] = []
        self.cases_written: list[str] = []
        self.failures: list[tuple[str, str]] = []
        self.by_others: list[str] = []
        self._locks: list[FileLock] = []  # every lock taken, released at the end whatever happens

    def _written_by_another(self, job: CaseJob) -> bool:
        now = _identity(self.options.marker(job))
        return now is not None and now != self.seen[job.case]

    def _claim(self, job: CaseJob) -> FileLock | LockHolder | None:
        """This run's lock on the case, the holder of the lock, or None: another run has written the case."""
        if self._written_by_another(job):
            return None
        got = try_lock(job.lock_path)
        if isinstance(got, FileLock):
            self._locks.append(got)
            if self._written_by_another(job):  # written and released between the look and the lock
                got.release()
                return None
            if got.took_over is not None:
                log.warning("%s: took over the lock of %s, a process that is gone", job.case, got.took_over.describe())
        return got

    def _record(self, result: CaseResult, bar: tqdm) -> None:
        if result.status == "written":
            self.written.extend(map(Path, result.outputs))
            self.cases_written.append(result.case)
            bar.set_postfix_str(f"{result.case} {result.times_s.get('total', 0):.1f}s")
        elif result.status == "failed":
            self.failures.append((result.case, result.error))
        bar.update(1)

    def run(self, jobs: list[CaseJob], *, progress: bool) -> list[Path]:
        try:
            self._run(jobs, progress=progress)
        finally:  # also on an interruption: no lock of this run outlives it
            for lock in self._locks:
                lock.release()
        log.info("summary: %d case(s) written by this run, %d done by another run, %d failed%s",
                 len(self.cases_written), len(self.by_others), len(self.failures),
                 f" ({', '.join(case for case, _ in self.failures)})" if self.failures else "")
        if self.failures:
            raise PredictFailures(self.failures, len(self.cases_written), len(self.by_others))
        return self.written

    def _run(self, jobs: list[CaseJob], *, progress: bool) -> None:
        held_by_others: list[CaseJob] = []
        network, stop = threading.Lock(), threading.Event()
        with ThreadPoolExecutor(CASES_IN_FLIGHT, thread_name_prefix="case") as pool, \
                tqdm(total=len(jobs), desc="predict", unit="case", disable=not progress) as bar:
            in_flight: deque[tuple[FileLock, Future]] = deque()

            def settle() -> None:
                lock, future = in_flight.popleft()
                try:
                    self._record(future.result(), bar)
                finally:
                    lock.release()

            try:
                for job in jobs:
                    claim = self._claim(job)
                    if claim is None:
                        log.info("%s: written by another run, skipped", job.case)
                        self.by_others.append(job.case)
                        bar.update(1)
                        continue
                    if isinstance(claim, LockHolder):
                        log.info("%s: being segmented by another run (%s), left to it", job.case, claim.describe())
                        held_by_others.append(job)
                        continue
                    if len(in_flight) == CASES_IN_FLIGHT:
                        settle()
                    in_flight.append((claim, pool.submit(predict_case, self.predictor, job, self.options,
                                                         compute_lock=network, stop=stop)))
                while in_flight:
                    settle()
            except BaseException:
                # Ctrl-C: the case at the network finishes and is written, the others give up before theirs.
                stop.set()
                pool.shutdown(cancel_futures=True)
                raise
            self._wait_for_others(held_by_others, bar)

    def _wait_for_others(self, waiting: list[CaseJob], bar: tqdm) -> None:
        """Wait until the cases other runs hold are written; one a run let go of unwritten (it failed, or was
        killed on this host) is segmented here."""
        remind = time.monotonic() + _REMIND_S
        while waiting:
            for job in list(waiting):
                claim = self._claim(job)
                if isinstance(claim, LockHolder):
                    if claim.pid is None and _age_s(job.lock_path) > _UNREADABLE_LOCK_S:
                        waiting.remove(job)
                        self.failures.append((job.case, f"{job.lock_path}: a lock file that names no owner (not "
                                                        "written by a pocketseg run); remove it if no run uses "
                                                        "this folder"))
                        bar.update(1)
                    continue
                waiting.remove(job)
                if claim is None:
                    log.info("%s: written by another run", job.case)
                    self.by_others.append(job.case)
                    bar.update(1)
                    continue
                try:
                    self._record(predict_case(self.predictor, job, self.options), bar)
                finally:
                    claim.release()
            if waiting:
                if time.monotonic() >= remind:
                    log.warning("waiting for %d case(s) that other runs hold: %s (a lock file whose run is gone "
                                "on another host must be removed by hand)", len(waiting),
                                "; ".join(f"{j.case}: {read_lock(j.lock_path).describe()}" for j in waiting))
                    remind = time.monotonic() + _REMIND_S
                time.sleep(_POLL_S)


def _age_s(path: Path) -> float:
    """Seconds since ``path`` was last modified (0 where it is gone)."""
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


# --------------------------------------------------------------------------------------------------- Python API

_PREDICTORS: dict[tuple, CascadePredictor] = {}


def _as_volume(image: Any, series_uid: str | None) -> Volume:
    if isinstance(image, Volume):
        return image
    if isinstance(image, (str, os.PathLike)):
        return load_volume(image, series_uid=series_uid)
    if isinstance(image, nib.spatialimages.SpatialImage):
        data = np.asanyarray(image.dataobj)
        header = image.header if isinstance(image.header, nib.Nifti1Header) else None
        return Volume(data, np.asarray(image.affine, dtype=np.float64), header=header)
    raise InputError(None, f"segment() takes a path, a nibabel image or a pocketseg Volume, got {type(image).__name__}")


def segment(image: Any, model: str | os.PathLike, *, device: str = "auto", backend: str = "auto",
            precision: str = "auto", overlap: float | None = None, gaussian: bool | None = None, fast: bool = False,
            batch_size: int = 1,
            series_uid: str | None = None, check_intensities: bool = True, max_memory: str | int | None = None,
            trusted_keys: str | os.PathLike | None = None):
    """Segment one CT scan and return its label map as a nibabel image (``pocketseg.segment``).

    The loaded model stays cached for the next call with the same model and settings.

    Args:
        image: a path (NIfTI file or DICOM series folder), a nibabel image or a
            :class:`pocketseg.volume.Volume`.
        model: a model package folder.
        device: ``auto``, ``cpu`` or ``cuda``.
        backend: ``auto``, ``tensorrt``, ``onnxruntime`` or ``torch``.
        precision: ``auto``, ``fp32`` or ``fp16``.
        overlap: fraction of a tile shared with its neighbour, in [0, 1) (None: the package's setting).
        gaussian: blend overlapping tiles with Gaussian weights (None: the package's setting).
        fast: the paper's settings for any package (tile step 1, no mirroring, labels back).
        batch_size: tiles per network call.
        series_uid: the series to read when a DICOM folder holds several.
        check_intensities: refuse images that are not CT in Hounsfield units.
        max_memory: the most memory the scan's resampled grids may need (bytes or ``8GiB``; None: 75 % of the
            machine's physical memory).
        trusted_keys: a folder of trusted public keys (None: ``$POCKETSEG_TRUSTED_KEYS`` when set); the package
            must then be signed by one of them.

    Returns:
        A uint8 ``nibabel.Nifti1Image`` (label ids of the package) with the input's geometry:
        affine, qform and sform exactly as the input's.

    Raises:
        InputError: an unreadable image or package, an image that is not CT, or one whose resampled grids
            would need more memory than ``max_memory``.
    """
    volume = _as_volume(image, series_uid)
    max_bytes = parse_size(max_memory)
    keys = trusted_keys_folder(trusted_keys)  # part of the cache key: a cached model passed the same check
    key = (str(Path(model).resolve()), device, backend, precision, overlap, gaussian, bool(fast), int(batch_size),
           max_bytes, None if keys is None else str(keys.resolve()))
    predictor = _PREDICTORS.get(key)
    if predictor is None:
        predictor = _PREDICTORS[key] = CascadePredictor(model, device=device, backend=backend, precision=precision,
                                                        overlap=overlap, gaussian=gaussian, fast=fast,
                                                        batch_size=batch_size, max_memory=max_bytes,
                                                        trusted_keys=keys)
    prediction = predictor.predict(volume, check_intensities=check_intensities)
    image = nifti_image(prediction.labels, reference=volume, dtype=np.uint8)
    # Through bytes once: the returned image then has .affine set from its header, exactly as a
    # reader of the written file would see it, with the input's qform/sform codes untouched.
    return type(image).from_bytes(image.to_bytes())
