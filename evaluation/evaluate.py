"""``pocketseg evaluate``: FLARE 2023 DSC and NSD of a folder of predictions against a folder of ground truth.

Cases are matched by file name (``CASE.nii.gz`` in both folders; ``.nii``
too). Each pair must share shape and geometry; spacing and the axial axis come
from the ground truth. Outputs, written atomically into ``out``:

* ``per_case.csv``: one row per case, a ``case`` column, then ``<Organ>_DSC``
  for the 14 classes and ``<Organ>_NSD`` for the 14 classes (fractions in [0, 1]);
* ``summary.json``: :func:`summarize`'s dictionary;
* ``table.md``: mean ± std in percent per organ, tumor and organ mean, in the
  layout of Table 4 of the FLARE 2023 paper.

The metrics themselves are in :mod:`pocketseg.evaluation.metrics`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import os
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from pocketseg.atomic import check_targets, ensure_dir, read_json, write_json, write_text
from pocketseg.errors import InputError, OutputError
from pocketseg.evaluation.metrics import DEFAULT_TOLERANCE_MM, FLARE, Scoring, score_case, scoring_for
from pocketseg.layout import nifti_files, strip_nifti
from pocketseg.nifti import read_nifti
from pocketseg.runtime.arrays import ArrayModule
from pocketseg.types import Affine
from pocketseg.volume import Volume

log = logging.getLogger(__name__)

CSV_NAME, SUMMARY_NAME, TABLE_NAME = "per_case.csv", "summary.json", "table.md"
#: Largest allowed distance (mm) between the grids of a prediction and its ground truth.
GEOMETRY_TOL_MM = 1e-3


def superior_axis(affine: Affine) -> int:
    """The voxel axis (0, 1 or 2) whose direction is closest to world z (superior-inferior)."""
    columns = np.asarray(affine, dtype=np.float64)[:3, :3]
    return int(np.argmax(np.abs(columns[2]) / np.linalg.norm(columns, axis=0)))


def _cases(folder: Path) -> dict[str, Path]:
    """Case name -> NIfTI file of a folder (``CASE.nii.gz`` or ``CASE.nii``)."""
    found: dict[str, Path] = {}
    for path in nifti_files(folder):
        case = strip_nifti(path.name)
        if case in found:
            raise InputError(path, f"case {case!r} appears twice ({found[case].name} and {path.name})")
        found[case] = path
    return found


def _labels(vol: Volume, scoring: Scoring = FLARE) -> np.ndarray:
    """The label map as uint8, or an InputError naming the file when its values are not the scored labels."""
    data = vol.data
    if data.dtype.kind == "f":
        bad = data != np.round(data)
        if bad.any():
            raise InputError(vol.source, f"holds non-integer label values (e.g. {data[bad].flat[0]:g}); a label map is expected")
    if data.size and data.min() < 0:
        raise InputError(vol.source, f"holds negative label values (min {data.min():g})")
    top = data.max() if data.size else 0
    if top > scoring.max_id:
        limit = f"FLARE 2023 labels are 0-{scoring.max_id}" if scoring is FLARE else \
            f"the scored labels are at most {scoring.max_id}"
        raise InputError(vol.source, f"holds label value {top:g}; {limit}")
    return data.astype(np.uint8, copy=False)


def _grid_corners(vol: Volume) -> np.ndarray:
    """World positions (mm) of the 8 corner voxels of a volume's grid, shape (8, 3)."""
    ijk = np.array(np.meshgrid(*[[0, n - 1] for n in vol.shape], indexing="ij")).reshape(3, -1).T
    aff = np.asarray(vol.affine, dtype=np.float64)
    return ijk @ aff[:3, :3].T + aff[:3, 3]


def score_prediction(labels: Any, gt: Volume, *, am: ArrayModule | None = None,
                     scoring: Scoring = FLARE) -> dict[str, float]:
    """DSC and NSD (FLARE 2023's rules) of a predicted label map (the ground truth's voxel order) against ground truth.

    As FLARE's script: the spacing from the ground truth's header zooms (its affine where there is no
    header), the axial axis from its affine.
    """
    spacing = tuple(float(z) for z in gt.header.get_zooms()[:3]) if gt.header is not None else gt.spacing_mm
    return score_case(labels, np.asarray(gt.data).astype(np.uint8), spacing, z_axis=superior_axis(gt.affine), am=am,
                      scoring=scoring)


def _score_files(case: str, pred_path: Path, gt_path: Path,
                 scoring: Scoring = FLARE) -> tuple[str, dict[str, float] | tuple[str | None, str]]:
    """Read, check and score one case; an input problem comes back as (path, problem), since InputError does not pickle."""
    try:
        gt, pred = read_nifti(gt_path), read_nifti(pred_path)
        if pred.shape != gt.shape:
            raise InputError(pred_path, f"shape {pred.shape} differs from the ground truth's {gt.shape} ({gt_path})")
        offset = float(np.linalg.norm(_grid_corners(pred) - _grid_corners(gt), axis=1).max())
        if offset > GEOMETRY_TOL_MM:
            raise InputError(pred_path, f"voxel grid (affine) differs from the ground truth's ({gt_path}) by up to "
                                        f"{offset:.4g} mm (> {GEOMETRY_TOL_MM:g} mm)")
        # Both label maps are checked (the scored ids only) before scoring.
        scores = score_prediction(_labels(pred, scoring), dataclasses.replace(gt, data=_labels(gt, scoring)),
                                  scoring=scoring)
    except InputError as exc:
        return case, (exc.path, exc.problem)
    log.debug("%s: %s", case, scores)
    return case, scores


def summarize(rows: Mapping[str, Mapping[str, float]], scoring: Scoring = FLARE) -> dict[str, Any]:
    """Means and standard deviations (over cases, ddof 0) of per-case scores keyed as ``scoring``'s columns.

    Keys: ``num_cases``; ``mean`` and ``std`` (per column, e.g. ``Liver_DSC``);
    ``organ_mean_DSC``/``organ_mean_NSD`` (mean over the organs: FLARE's labels 1-13,
    or every class of another label set but a FLARE tumor) with their std over cases of
    each case's organ mean in ``organ_std_DSC``/``organ_std_NSD``; ``tumor_DSC``/
    ``tumor_NSD`` where the tumor is scored; ``tolerance_mm`` per class.
    """
    columns = scoring.columns
    values = np.array([[row[c] for c in columns] for row in rows.values()], dtype=np.float64).reshape(-1, len(columns))
    summary: dict[str, Any] = {
        "num_cases": len(rows),
        "mean": dict(zip(columns, values.mean(axis=0).tolist())),
        "std": dict(zip(columns, values.std(axis=0).tolist())),
    }
    organs = [t for t in scoring.targets if t.organ]
    tumor = next((t for t in scoring.targets if not t.organ), None)
    for metric in ("DSC", "NSD"):
        per_case = values[:, [columns.index(f"{t.column}_{metric}") for t in organs]].mean(axis=1) if organs \
            else np.full(len(rows), np.nan)
        summary[f"organ_mean_{metric}"] = float(per_case.mean()) if len(rows) else float("nan")
        summary[f"organ_std_{metric}"] = float(per_case.std()) if len(rows) else float("nan")
        if tumor is not None:
            summary[f"tumor_{metric}"] = summary["mean"][f"{tumor.column}_{metric}"]
    summary["tolerance_mm"] = {t.column: t.tolerance_mm for t in scoring.targets}
    return summary


def format_csv(rows: Mapping[str, Mapping[str, float]], scoring: Scoring = FLARE) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case", *scoring.columns])
    for case, row in rows.items():
        writer.writerow([case, *(f"{row[c]:.6f}" for c in scoring.columns)])
    return buffer.getvalue()


def format_table(summary: Mapping[str, Any], scoring: Scoring = FLARE) -> str:
    """Markdown table of mean ± std in percent, rows = the classes, then the organ mean (FLARE 2023 paper, Table 4)."""
    def cell(mean: float, std: float) -> str:
        return f"{100 * mean:.2f} ± {100 * std:.2f}"

    organs = "the 13 organs (labels 1-13), tumor excluded" if scoring is FLARE else \
        "every class" + (", tumor excluded" if any(not t.organ for t in scoring.targets) else "")
    lines = [f"{scoring.title}, {summary['num_cases']} case(s): mean ± standard deviation over cases.",
             f"Organ mean: {organs}.", "",
             "| Target | DSC (%) | NSD (%) |", "|:--|--:|--:|"]
    for target in scoring.targets:
        col = target.column
        lines.append(f"| {col.replace('_', ' ')} | {cell(summary['mean'][col + '_DSC'], summary['std'][col + '_DSC'])} "
                     f"| {cell(summary['mean'][col + '_NSD'], summary['std'][col + '_NSD'])} |")
    lines.append(f"| Organ mean | {cell(summary['organ_mean_DSC'], summary['organ_std_DSC'])} "
                 f"| {cell(summary['organ_mean_NSD'], summary['organ_std_NSD'])} |")
    return "\n".join(lines) + "\n"


def label_scoring(labels: str | os.PathLike | Mapping[str, int] | None,
                  tolerance_mm: float = DEFAULT_TOLERANCE_MM) -> Scoring:
    """The scoring of a label set given as ``{name: id}``, a model package, its manifest or a dataset.json."""
    if labels is None or isinstance(labels, Mapping):
        try:
            return scoring_for(labels, tolerance_mm)
        except ValueError as exc:
            raise InputError(None, str(exc)) from None
    path = Path(labels)
    file = path / "manifest.json" if path.is_dir() else path
    data = read_json(file)
    if not isinstance(data, dict) or not isinstance(data.get("labels"), dict):
        raise InputError(file, "has no 'labels' mapping (a model package, its manifest.json or a dataset.json)")
    try:
        names = {str(k): int(v) for k, v in data["labels"].items()}
        return scoring_for(names, tolerance_mm)
    except (TypeError, ValueError) as exc:
        raise InputError(file, f"labels cannot be scored: {exc}") from None


def evaluate_folders(pred: str | os.PathLike, gt: str | os.PathLike, out: str | os.PathLike, *,
                     overwrite: bool = False, workers: int = 1, progress: bool = True,
                     labels: str | os.PathLike | Mapping[str, int] | None = None,
                     tolerance_mm: float = DEFAULT_TOLERANCE_MM) -> dict[str, Any]:
    """Score every ground-truth case of ``gt`` against the same-named file in ``pred``; write the outputs to ``out``.

    ``labels`` (a model package, manifest.json, dataset.json or ``{name: id}``; default
    FLARE 2023's) says which classes are scored: FLARE names keep FLARE's tolerances and
    rules, other classes get ``tolerance_mm``.

    Returns the summary (see :func:`summarize`). A ground-truth case without a
    prediction is an error listing them; a prediction without ground truth is
    logged as a warning and skipped. ``workers`` > 1 scores cases in parallel
    processes. Existing outputs are replaced only with ``overwrite``.
    """
    pred_dir, gt_dir, out_dir = Path(pred), Path(gt), Path(out)
    scoring = label_scoring(labels, tolerance_mm)
    for folder in (pred_dir, gt_dir):
        if not folder.is_dir():
            raise InputError(folder, "does not exist" if not folder.exists() else "is not a folder")
    if int(workers) != workers or workers < 1:
        raise InputError(None, f"workers must be an integer >= 1, got {workers!r}")
    gt_cases, pred_cases = _cases(gt_dir), _cases(pred_dir)
    if not gt_cases:
        raise InputError(gt_dir, "holds no ground-truth .nii.gz files")
    missing = sorted(set(gt_cases) - set(pred_cases))
    if missing:
        shown = ", ".join(missing[:20]) + (f", ... ({len(missing) - 20} more)" if len(missing) > 20 else "")
        raise InputError(pred_dir, f"no prediction for {len(missing)} ground-truth case(s): {shown}")
    extra = sorted(set(pred_cases) - set(gt_cases))
    if extra:
        log.warning("%d prediction(s) in %s have no ground truth and are ignored: %s", len(extra), pred_dir,
                    ", ".join(extra[:20]) + (" ..." if len(extra) > 20 else ""))
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(out_dir, "exists and is not a folder")
    check_targets([out_dir / name for name in (CSV_NAME, SUMMARY_NAME, TABLE_NAME)], overwrite=overwrite)

    jobs = [(case, pred_cases[case], gt_cases[case], scoring) for case in sorted(gt_cases)]
    results: dict[str, dict[str, float]] = {}
    with tqdm(total=len(jobs), desc="evaluate", unit="case", disable=not progress) as bar:
        def collect(case: str, result: dict[str, float] | tuple[str | None, str]) -> None:
            if isinstance(result, tuple):
                raise InputError(*result)
            results[case] = result
            bar.update(1)

        if workers == 1 or len(jobs) == 1:
            for job in jobs:
                collect(*_score_files(*job))
        else:
            with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
                futures = [pool.submit(_score_files, *job) for job in jobs]
                try:
                    for future in as_completed(futures):
                        collect(*future.result())
                except BaseException:
                    for future in futures:
                        future.cancel()
                    raise
    rows = {case: results[case] for case in sorted(results)}
    summary = summarize(rows, scoring)

    ensure_dir(out_dir, "evaluation folder")
    write_text(out_dir / CSV_NAME, format_csv(rows, scoring), overwrite=overwrite)
    write_json(out_dir / SUMMARY_NAME, summary, overwrite=overwrite, indent=2)
    write_text(out_dir / TABLE_NAME, format_table(summary, scoring), overwrite=overwrite)
    log.info("evaluated %d case(s): organ mean DSC %.4f, NSD %.4f -> %s", len(rows), summary["organ_mean_DSC"],
             summary["organ_mean_NSD"], out_dir)
    return summary
