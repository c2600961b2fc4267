"""Reading and validating a raw data set in the nnU-Net v2 layout (FLARE 2023 labels).

Expected: ``DATASET/dataset.json``, ``imagesTr/CASE_0000.nii.gz`` and
``labelsTr/CASE.nii.gz``; optionally ``imagesUnlabeled/CASE_0000.nii.gz``.
Which cases are fully or partially labelled comes from
``dataset.json["pocketseg"]`` (as ``pocketseg synth`` writes it): a case listed
in ``annotated_classes`` is partial, with those classes annotated; every other
labelled case is fully annotated (all 14 foreground classes).

All problems are collected and reported together, naming the cases, before any
training starts.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pocketseg import labels as L
from pocketseg.atomic import read_json
from pocketseg.errors import InputError
from pocketseg.imageio import load_volume
from pocketseg.layout import (CHANNEL_SUFFIX, DEFAULT_ENDING, IMAGES_TR, IMAGES_UNLABELED, LABELS_TR, list_images,
                              list_labels)
from pocketseg.nifti import read_nifti

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaseRecord:
    name: str
    image: Path
    label: Path | None  # None for unlabelled cases
    annotated: tuple[int, ...]  # annotated foreground label ids; () for unlabelled

    @property
    def is_full(self) -> bool:
        return self.label is not None and set(self.annotated) >= set(L.FOREGROUND_IDS)


@dataclass(frozen=True)
class RawDataset:
    root: Path
    file_ending: str
    cases: tuple[CaseRecord, ...]

    def labelled(self, *, full_only: bool) -> list[CaseRecord]:
        return [c for c in self.cases if c.label is not None and (c.is_full or not full_only)]


def open_dataset(root: str | os.PathLike) -> RawDataset:
    """List the cases of a raw data set; missing label files or images are reported here."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "data set folder does not exist")
    meta = read_json(root / "dataset.json", missing="not found (expected an nnU-Net v2 raw data set folder with dataset.json)")
    ending = meta.get("file_ending", DEFAULT_ENDING)
    record = meta.get("pocketseg", {})
    partial = {name: tuple(sorted(int(v) for v in ids)) for name, ids in record.get("annotated_classes", {}).items()}
    images_dir, labels_dir = root / IMAGES_TR, root / LABELS_TR
    if not images_dir.is_dir():
        raise InputError(images_dir, f"missing: a raw data set needs {IMAGES_TR}/")
    images = list_images(images_dir, ending)
    labels = list_labels(labels_dir, ending) if labels_dir.is_dir() else {}
    missing_labels = sorted(set(images) - set(labels))
    missing_images = sorted(set(labels) - set(images))
    problems = []
    if missing_labels:
        problems.append(f"no label file in labelsTr/ for {_names(missing_labels)}")
    if missing_images:
        problems.append(f"no image {CHANNEL_SUFFIX}{ending} in imagesTr/ for labels {_names(missing_images)}")
    if problems:
        raise InputError(root, "; ".join(problems))
    cases = [CaseRecord(name, images[name], labels[name], partial.get(name, L.FOREGROUND_IDS)) for name in images]
    unl_dir = root / IMAGES_UNLABELED
    if unl_dir.is_dir():
        cases += [CaseRecord(name, path, None, ()) for name, path in list_images(unl_dir, ending).items()]
    return RawDataset(root=root, file_ending=ending, cases=tuple(cases))


def _names(names: list[str], most: int = 8) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def validate_cases(cases: list[CaseRecord], *, dataset_root: Path, affine_tol_mm: float = 1e-3) -> None:
    """Check every case before training: readable image and label, same shape and affine, labels in 0..14.

    Raises one InputError listing all offending cases.
    """
    if not cases:
        raise InputError(dataset_root, "has no usable cases for this stage (no labelled cases, or none fully labelled)")
    problems: list[str] = []
    for case in cases:
        try:
            image = load_volume(case.image)
            label = read_nifti(case.label) if case.label is not None else None
        except InputError as exc:
            problems.append(f"{case.name}: {exc}")
            continue
        if label is None:
            continue
        if image.shape != label.shape:
            problems.append(f"{case.name}: image shape {image.shape} differs from label shape {label.shape}")
            continue
        if not np.allclose(image.affine, label.affine, atol=affine_tol_mm):
            problems.append(f"{case.name}: image and label affines differ (max {np.abs(image.affine - label.affine).max():.4g} mm)")
        data = label.data
        if data.dtype.kind == "f" and not np.array_equal(data, np.round(data)):
            problems.append(f"{case.name}: label map has non-integer values")
            continue
        lo, hi = float(data.min()), float(data.max())
        if lo < 0 or hi > L.TUMOR:
            bad = sorted(int(v) for v in np.unique(data) if v < 0 or v > L.TUMOR)[:5]
            problems.append(f"{case.name}: label values outside 0-{L.TUMOR}: {bad}")
    if problems:
        raise InputError(dataset_root, f"{len(problems)} bad case(s): " + "; ".join(problems))
