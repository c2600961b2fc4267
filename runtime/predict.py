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

Every file is written atomically (temporary file, then rename) and an existing output is
replaced only with ``overwrite``: an interrupted run leaves no partial file.
"""

from __future__ import annotations

import logging
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from pocketseg import labels as L
from pocketseg.atomic import atomic_write_bytes, check_writable_target, ensure_dir, write_json
from pocketseg.dicom import TreeSeries, is_study_tree, read_series_grid, read_tree_series, scan_study_tree
from pocketseg.errors import InputError, PocketsegError, require
from pocketseg.imageio import load_volume
from pocketseg.layout import CHANNEL_SUFFIX, case_name, is_nifti_path, label_name, nifti_files, strip_nifti
from pocketseg.nifti import nifti_image, write_labels
from pocketseg.preview import render_preview
from pocketseg.runtime.cascade import CascadePredictor, Prediction
from pocketseg.runtime.dicom_output import (DICOM_OUTPUT_TYPES, OUTPUT_TYPES, Algorithm, algorithm_of, output_types,
                                            to_series_grid)
from pocketseg.volume import Volume

__all__ = ["CaseJob", "PredictFailures", "case_name", "case_statistics", "plan_cases", "predict", "segment"]

log = logging.getLogger(__name__)


class PredictFailures(PocketsegError):
    """Some cases of a folder could not be segmented; the others were written."""

    def __init__(self, failures: list[tuple[str, str]], done: int):
        self.failures = failures
        lines = "; ".join(f"{case}: {why}" for case, why in failures)
        super().__init__(f"{len(failures)} case(s) failed ({done} written): {lines}")


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

    def output_paths(self, types: Sequence[str] = ("nifti",)) -> dict[str, Path]:
        """The file of each output type: ``NAME.nii.gz``, ``NAME.seg.dcm``, ``NAME.rtstruct.dcm``."""
        return {t: self.output if t == "nifti" else self.output.with_name(self.output_stem + OUTPUT_TYPES[t])
                for t in types}

    def marker(self, types: Sequence[str] = ("nifti",)) -> Path:
        """The output written last, whose presence marks the case finished for ``resume``."""
        return self.output_paths(types)[types[-1] if "nifti" not in types else "nifti"]


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


def _plan_tree(src: Path, dst: Path) -> list[CaseJob]:
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
            return _plan_tree(src, dst), True
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
                   algorithm: Algorithm | None = None, reference: tuple[Any, ...] | None = None) -> list[Path]:
    if statistics:
        report = {"case": job.case, "source": str(job.source), "spacing_mm": list(volume.spacing_mm),
                  "device": prediction.device, "backend": prediction.backend,
                  "timings_s": {k: round(v, 4) for k, v in prediction.timings_s.items()},
                  "warnings": prediction.warnings,
                  "classes": case_statistics(prediction.labels, volume.data, volume.spacing_mm, label_names)}
        write_json(job.statistics_path, report, overwrite=overwrite)
    if preview:
        png = render_preview(volume.data, volume.affine, prediction.labels, title=f"{job.case} - pocketseg",
                             label_names=label_names)
        atomic_write_bytes(job.preview_path, png, overwrite=overwrite)
    paths = job.output_paths(types)
    written = []
    if any(t in DICOM_OUTPUT_TYPES for t in types):
        written += _write_dicom(job, volume, prediction, paths, overwrite=overwrite, label_names=label_names,
                                algorithm=algorithm, reference=reference)
    # The label map last: its presence marks the case finished for ``resume``.
    if "nifti" in types:
        written.append(write_labels(prediction.labels, job.output, reference=volume, overwrite=overwrite))
    return written


def _write_dicom(job: CaseJob, volume: Volume, prediction: Prediction, paths: Mapping[str, Path], *, overwrite: bool,
                 label_names: Mapping[str, int] | None, algorithm: Algorithm | None,
                 reference: tuple[Any, ...] | None) -> list[Path]:
    """The DICOM SEG and RT Structure Set of a case, on the grid of its DICOM series."""
    # optional (dicom extra): highdicom, pydicom and scikit-image are loaded only when a DICOM output is asked for
    from pocketseg.runtime.dicom_seg import write_dicom_seg
    from pocketseg.runtime.rtstruct import write_rtstruct

    if reference is not None:  # NIfTI input: its labels moved onto the series the image came from
        grid = reference[0]
        labels, files = to_series_grid(prediction.labels, volume.affine, grid, job.source), grid.files
    else:
        labels, files = prediction.labels, volume.meta["files"]
    assert algorithm is not None
    written = []
    if "dicom-seg" in paths:
        written.append(write_dicom_seg(labels, files, paths["dicom-seg"], algorithm=algorithm,
                                       label_names=label_names, overwrite=overwrite))
    if "dicom-rtstruct" in paths:
        written.append(write_rtstruct(labels, files, paths["dicom-rtstruct"], algorithm=algorithm,
                                      label_names=label_names, overwrite=overwrite))
    return written


def _finished(job: CaseJob, statistics: bool, preview: bool, types: Sequence[str] = ("nifti",)) -> bool:
    wanted = list(job.output_paths(types).values()) + ([job.statistics_path] if statistics else []) + ([job.preview_path] if preview else [])
    return all(p.is_file() for p in wanted)


def _may_replace(job: CaseJob, overwrite: bool, resume: bool, types: Sequence[str] = ("nifti",)) -> bool:
    """Whether this job may replace its existing outputs: with ``overwrite``, or under ``resume`` the
    side files of a case whose main output (written last) is missing, i.e. an interrupted case."""
    return overwrite or (resume and not job.marker(types).exists())


def _check_targets(job: CaseJob, statistics: bool, preview: bool, overwrite: bool,
                   types: Sequence[str] = ("nifti",)) -> None:
    for path in job.output_paths(types).values():
        check_writable_target(path, overwrite=overwrite)
    if statistics:
        check_writable_target(job.statistics_path, overwrite=overwrite)
    if preview:
        check_writable_target(job.preview_path, overwrite=overwrite)


def predict(input: str | os.PathLike, output: str | os.PathLike, model: str | os.PathLike, *,
            device: str = "auto", backend: str = "auto", precision: str = "auto", statistics: bool = False,
            preview: bool = False, overlap: float | None = None, gaussian: bool | None = None, fast: bool = False,
            batch_size: int = 1,
            resume: bool = False, overwrite: bool = False, series_uid: str | None = None,
            check_intensities: bool = True, threads: int | None = None,
            output_type: str | Sequence[str] | None = None, dicom_reference: str | os.PathLike | None = None,
            progress: bool = True) -> list[Path]:
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
        threads: CPU threads of ONNX Runtime (default: all cores).
        output_type: what to write per case, one or several of ``nifti`` (``NAME.nii.gz``, the default),
            ``dicom-seg`` (``NAME.seg.dcm``) and ``dicom-rtstruct`` (``NAME.rtstruct.dcm``); the DICOM
            ones need DICOM input or ``dicom_reference`` (and the ``dicom`` extra).
        dicom_reference: for one NIfTI input, the DICOM series folder it was converted from; the DICOM
            outputs reference it and are written on its grid, which must be the NIfTI's.
        progress: show progress bars.

    Returns:
        The files written, in case order; per case the DICOM SEG, the RT Structure Set, then the label map
        (those requested).

    Raises:
        InputError: bad input, named with its path (nothing is written for it).
        OutputError: an output exists (without ``overwrite``) or cannot be written.
        PredictFailures: in folder mode, the cases that failed (the others were written).
    """
    types = output_types(output_type)
    jobs, folder_mode = plan_cases(input, output)
    dicom_out = [t for t in types if t in DICOM_OUTPUT_TYPES]
    if dicom_out:
        require("highdicom", f"--output-type {dicom_out[0]}", "dicom")
        require("skimage", f"--output-type {dicom_out[0]}", "dicom")
    reference = None
    if dicom_reference is not None:
        if folder_mode or not is_nifti_path(jobs[0].source):
            raise InputError(Path(dicom_reference), "--dicom-reference is for one NIfTI input (a DICOM input is "
                                                    "its own reference); dicom_reference= from Python")
        if not dicom_out:
            raise InputError(Path(dicom_reference), "--dicom-reference is used only by the DICOM output types "
                                                    "(--output-type dicom-seg / dicom-rtstruct)")
        reference = (read_series_grid(dicom_reference),)
    elif dicom_out and not folder_mode and is_nifti_path(jobs[0].source):
        raise InputError(jobs[0].source, f"--output-type {dicom_out[0]} needs DICOM input, or --dicom-reference DIR "
                                         "naming the DICOM series this NIfTI was converted from")
    elif dicom_out and folder_mode and jobs[0].series is None:
        raise InputError(Path(input), f"--output-type {dicom_out[0]} needs DICOM input; this is a folder of NIfTI "
                                      "files")
    if preview:
        require("matplotlib", "Preview images (--preview)", "viz")
    todo = []
    for job in jobs:
        if resume and _finished(job, statistics, preview, types):
            log.info("%s: finished earlier, skipped (resume)", job.case)
            continue
        todo.append(job)
    if not todo:
        return []
    ensure_dir(Path(output) if folder_mode else jobs[0].output.parent, "output folder")
    volume = None
    if not folder_mode:
        _check_targets(todo[0], statistics, preview, _may_replace(todo[0], overwrite, resume, types), types)
        volume = load_volume(todo[0].source, series_uid=series_uid)
        if reference is not None:  # refuse a mismatched reference before the model runs
            to_series_grid(np.zeros(volume.shape, dtype=np.uint8), volume.affine, reference[0], todo[0].source)

    predictor = CascadePredictor(model, device=device, backend=backend, precision=precision, overlap=overlap,
                                 gaussian=gaussian, fast=fast, batch_size=batch_size, threads=threads,
                                 progress=progress and not folder_mode)
    algorithm = algorithm_of(model, predictor.manifest) if dicom_out else None
    if volume is not None:
        job = todo[0]
        prediction = predictor.predict(volume, check_intensities=check_intensities)
        _log_case(job, prediction)
        return _write_outputs(job, volume, prediction, statistics=statistics, preview=preview,
                              overwrite=_may_replace(job, overwrite, resume, types),
                              label_names=predictor.manifest.labels, types=types, algorithm=algorithm,
                              reference=reference)
    return _predict_folder(predictor, todo, statistics=statistics, preview=preview, overwrite=overwrite,
                           resume=resume, check_intensities=check_intensities, progress=progress, types=types,
                           algorithm=algorithm)


def _log_case(job: CaseJob, prediction: Prediction) -> None:
    t = prediction.timings_s
    log.info("%s: %.2f s (roi %.2f, detail %.2f, post %.2f) on %s/%s", job.case, t["total"], t["roi"], t["detail"],
             t["postprocess"], prediction.device, prediction.backend)
    # prediction.warnings were logged where they arose (runtime.cascade); they go on into the statistics.


def _read(job: CaseJob) -> Volume:
    return read_tree_series(job.series) if job.series is not None else load_volume(job.source)


def _predict_folder(predictor: CascadePredictor, jobs: list[CaseJob], *, statistics: bool, preview: bool,
                    overwrite: bool, resume: bool, check_intensities: bool, progress: bool,
                    types: Sequence[str] = ("nifti",), algorithm: Algorithm | None = None) -> list[Path]:
    """Read ahead one case and write behind while the current case computes."""
    written: list[Path] = []
    done: list[str] = []
    failures: list[tuple[str, str]] = []
    with ThreadPoolExecutor(1, thread_name_prefix="read") as reader, \
            ThreadPoolExecutor(1, thread_name_prefix="write") as writer:
        pending_write: tuple[CaseJob, Future] | None = None

        def settle(pending: tuple[CaseJob, Future] | None) -> None:
            if pending is None:
                return
            job, future = pending
            try:
                written.extend(future.result())
                done.append(job.case)
            except Exception as exc:  # reported at the end with the other failures
                why = str(exc) if isinstance(exc, PocketsegError) else f"{type(exc).__name__}: {exc}"
                failures.append((job.case, why))
                log.error("%s: %s", job.case, why)

        next_read = reader.submit(_read, jobs[0])
        with tqdm(total=len(jobs), desc="predict", unit="case", disable=not progress) as bar:
            for i, job in enumerate(jobs):
                current = next_read
                if i + 1 < len(jobs):
                    next_read = reader.submit(_read, jobs[i + 1])
                replace = _may_replace(job, overwrite, resume, types)
                try:
                    _check_targets(job, statistics, preview, replace, types)
                    volume = current.result()
                    prediction = predictor.predict(volume, check_intensities=check_intensities)
                    _log_case(job, prediction)
                except Exception as exc:  # a bad case must not stop the others; reported at the end
                    why = str(exc) if isinstance(exc, PocketsegError) else f"{type(exc).__name__}: {exc}"
                    failures.append((job.case, why))
                    log.error("%s: %s", job.case, why)
                    log.debug("%s failed", job.case, exc_info=True)
                    bar.update(1)
                    continue
                settle(pending_write)
                pending_write = (job, writer.submit(_write_outputs, job, volume, prediction, statistics=statistics,
                                                    preview=preview, overwrite=replace,
                                                    label_names=predictor.manifest.labels, types=types,
                                                    algorithm=algorithm))
                bar.set_postfix_str(f"{job.case} {prediction.timings_s['total']:.1f}s")
                bar.update(1)
            settle(pending_write)
    log.info("summary: %d case(s) written%s, %d failed%s", len(done), f" ({', '.join(done)})" if done else "",
             len(failures), f" ({', '.join(case for case, _ in failures)})" if failures else "")
    if failures:
        raise PredictFailures(failures, len(done))
    return written


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
            series_uid: str | None = None, check_intensities: bool = True):
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

    Returns:
        A uint8 ``nibabel.Nifti1Image`` (label ids of the package) with the input's geometry:
        affine, qform and sform exactly as the input's.

    Raises:
        InputError: an unreadable image or package, or an image that is not CT.
    """
    volume = _as_volume(image, series_uid)
    key = (str(Path(model).resolve()), device, backend, precision, overlap, gaussian, bool(fast), int(batch_size))
    predictor = _PREDICTORS.get(key)
    if predictor is None:
        predictor = _PREDICTORS[key] = CascadePredictor(model, device=device, backend=backend, precision=precision,
                                                        overlap=overlap, gaussian=gaussian, fast=fast,
                                                        batch_size=batch_size)
    prediction = predictor.predict(volume, check_intensities=check_intensities)
    image = nifti_image(prediction.labels, reference=volume, dtype=np.uint8)
    # Through bytes once: the returned image then has .affine set from its header, exactly as a
    # reader of the written file would see it, with the input's qform/sform codes untouched.
    return type(image).from_bytes(image.to_bytes())
