"""The nnU-Net v2 file layout, in one place.

nnU-Net names a case's image ``CASE_0000.nii.gz`` (``_0000``: the first and, for
CT, only input channel) and its label map ``CASE.nii.gz``; a raw data set holds
``dataset.json``, ``imagesTr/``, ``labelsTr/`` (and pocketseg's
``imagesUnlabeled/``). Every part of pocketseg that maps files to case names, or
case names to files, goes through these functions.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CHANNEL_SUFFIX", "NIFTI_SUFFIXES", "case_name", "image_name", "is_nifti_path", "label_name",
           "list_images", "nifti_files", "strip_nifti"]

#: nnU-Net's suffix of a case's (first) input channel.
CHANNEL_SUFFIX = "_0000"
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DEFAULT_ENDING = ".nii.gz"
IMAGES_TR, LABELS_TR, IMAGES_UNLABELED = "imagesTr", "labelsTr", "imagesUnlabeled"


def is_nifti_path(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def strip_nifti(name: str) -> str:
    """``name`` without its ``.nii`` / ``.nii.gz`` ending (any case)."""
    lower = name.lower()
    for suffix in sorted(NIFTI_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def case_name(path: str | os.PathLike) -> str:
    """``CASE`` for ``CASE_0000.nii.gz``, ``CASE.nii.gz`` or a DICOM series folder ``CASE``."""
    p = Path(path)
    stem = strip_nifti(p.name) if p.is_file() or is_nifti_path(p) else p.name
    return stem.removesuffix(CHANNEL_SUFFIX)


def image_name(case: str, ending: str = DEFAULT_ENDING) -> str:
    """The file name of a case's image: ``CASE_0000.nii.gz``."""
    return f"{case}{CHANNEL_SUFFIX}{ending}"


def label_name(case: str, ending: str = DEFAULT_ENDING) -> str:
    """The file name of a case's label map (and of a prediction): ``CASE.nii.gz``."""
    return f"{case}{ending}"


def nifti_files(folder: str | os.PathLike) -> list[Path]:
    """The visible NIfTI files of a folder, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and is_nifti_path(p) and not p.name.startswith("."))


def list_images(folder: str | os.PathLike, ending: str = DEFAULT_ENDING) -> dict[str, Path]:
    """``{case: image}`` for the ``CASE_0000<ending>`` files of an nnU-Net images folder, sorted by case."""
    suffix = CHANNEL_SUFFIX + ending
    return {p.name[: -len(suffix)]: p for p in sorted(Path(folder).glob(f"*{suffix}"))}


def list_labels(folder: str | os.PathLike, ending: str = DEFAULT_ENDING) -> dict[str, Path]:
    """``{case: label map}`` for the ``CASE<ending>`` files of an nnU-Net labels (or predictions) folder."""
    return {p.name[: -len(ending)]: p for p in sorted(Path(folder).glob(f"*{ending}")) if not p.name.startswith(".")}
