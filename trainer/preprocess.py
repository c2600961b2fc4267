"""Dataset fingerprint and CT preprocessing as nnU-Net v2 does it, with an on-disk cache.

Per case: reorient to the canonical RAS grid and switch to (z, y, x); crop to the
body (CT is -1000 HU outside the patient, so nnU-Net's crop-to-nonzero would
keep the whole field of view); normalise as nnU-Net's CTNormalization (clip to
the 0.5/99.5 percentiles of foreground intensities pooled over the training
set, then z-score with the foreground mean and std); resample to the stage's
target spacing (image: cubic spline, labels: linear per label, nnU-Net's
separate-z rule for anisotropic data — see :mod:`pocketseg.runtime.resample`).

Preprocessed cases are cached as ``.npy`` files that training opens
memory-mapped, so epochs never redo this work. The cache key covers the input
files (size and mtime), the target spacing, the intensity statistics and the
preprocessing version; a stale cache is never reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from tqdm.auto import tqdm

from pocketseg.atomic import atomic_open, ensure_dir, json_text
from pocketseg.errors import InputError
from pocketseg.imageio import load_volume
from pocketseg.manifest import Intensity
from pocketseg.nifti import read_nifti
from pocketseg.runtime.arrays import bounding_box
from pocketseg.runtime.intensity import ct_normalize
from pocketseg.runtime.resample import resample_image, resample_labels, separate_z_axis, target_shape
from pocketseg.trainer.dataset import CaseRecord
from pocketseg.volume import canonical_zyx

log = logging.getLogger(__name__)

PREPROCESS_VERSION = 2  # 2: cubic resampling clipped to the input range (nnU-Net)
#: Foreground voxels sampled per case for the intensity statistics (nnU-Net samples 10,000).
FOREGROUND_SAMPLES = 10_000
#: Voxel positions kept per class for foreground oversampling.
LOCATIONS_PER_CLASS = 2_000
#: HU above which a voxel counts as body when cropping (air is about -1000 HU, fat about -100 HU).
BODY_THRESHOLD_HU = -500.0


def body_bbox(image_zyx: np.ndarray, threshold: float = BODY_THRESHOLD_HU, margin: int = 2) -> tuple[slice, slice, slice]:
    """Bounding box of the largest connected region above ``threshold`` (the patient, not the table)."""
    step = 4  # a 4x-subsampled mask finds the body at a fraction of the cost
    coarse = image_zyx[::step, ::step, ::step] > threshold
    lab, n = ndi.label(coarse)
    if n == 0:
        return tuple(slice(0, s) for s in image_zyx.shape)  # type: ignore[return-value]
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    box = bounding_box(lab == int(np.argmax(sizes)))
    return tuple(slice(max(sl.start * step - margin * step, 0), min(sl.stop * step + margin * step, n))
                 for sl, n in zip(box, image_zyx.shape))  # type: ignore[return-value]


def _load_pair(case: CaseRecord) -> tuple[np.ndarray, np.ndarray | None, tuple[float, float, float]]:
    image = load_volume(case.image)
    img_zyx, spacing = canonical_zyx(image)
    seg_zyx = None
    if case.label is not None:
        seg_zyx, _ = canonical_zyx(read_nifti(case.label))
        seg_zyx = seg_zyx.astype(np.uint8)
    return img_zyx, seg_zyx, spacing


def _foreground_sample(case: CaseRecord, seed: int) -> tuple[np.ndarray, tuple[float, ...], tuple[int, ...]]:
    img, seg, spacing = _load_pair(case)
    values = img[seg > 0] if seg is not None else np.empty(0, dtype=np.float32)
    rng = np.random.default_rng(seed)
    if values.size > FOREGROUND_SAMPLES:
        values = rng.choice(values, FOREGROUND_SAMPLES, replace=False)
    return values.astype(np.float32), spacing, img.shape


def compute_fingerprint(cases: list[CaseRecord], *, workers: int = 1, progress: bool = True) -> dict[str, Any]:
    """Intensity statistics of the foreground (label > 0) pooled over ``cases``, plus spacings and shapes."""
    seeds = [int.from_bytes(hashlib.sha256(c.name.encode()).digest()[:4], "little") for c in cases]
    with _pool(workers) as pool:
        results = list(tqdm(pool.map(_foreground_sample, cases, seeds), total=len(cases), desc="fingerprint",
                            unit="case", disable=not progress))
    pooled = np.concatenate([r[0] for r in results]) if results else np.empty(0)
    if pooled.size == 0:
        raise InputError(None, "no foreground voxels in the training labels: cannot compute CT normalisation statistics")
    stats = Intensity(mean=float(pooled.mean()), std=float(pooled.std()),
                      percentile_00_5=float(np.percentile(pooled, 0.5)),
                      percentile_99_5=float(np.percentile(pooled, 99.5)))
    return {"intensity": asdict(stats), "spacings_mm_zyx": [list(r[1]) for r in results],
            "shapes_zyx": [list(r[2]) for r in results], "cases": [c.name for c in cases]}


def class_locations(seg: np.ndarray, rng: np.random.Generator, per_class: int = LOCATIONS_PER_CLASS) -> dict[str, list]:
    """Up to ``per_class`` voxel positions (z, y, x) of every label present, for foreground oversampling."""
    out = {}
    for c in np.unique(seg):
        if c == 0:
            continue
        idx = np.flatnonzero(seg == c)
        if idx.size > per_class:
            idx = rng.choice(idx, per_class, replace=False)
        out[str(int(c))] = np.stack(np.unravel_index(np.sort(idx), seg.shape), axis=1).tolist()
    return out


def preprocess_case(case: CaseRecord, stats: Intensity, spacing_mm_zyx: tuple[float, float, float]
                    ) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Canonical orientation, body crop, CT normalisation, resampling of one case."""
    img, seg, spacing = _load_pair(case)
    original_shape = img.shape
    box = body_bbox(img)
    img = img[box]
    seg = seg[box] if seg is not None else None
    new_shape = target_shape(img.shape, spacing, spacing_mm_zyx)
    sep = separate_z_axis(spacing, spacing_mm_zyx)
    data = resample_image(ct_normalize(img, stats), new_shape, order=3, separate_z=sep)
    if seg is not None:
        seg = resample_labels(seg, new_shape, separate_z=sep)
    props: dict[str, Any] = {
        "case": case.name, "original_spacing_mm_zyx": list(spacing), "original_shape_zyx": list(original_shape),
        "body_bbox_zyx": [[s.start, s.stop] for s in box], "shape_zyx": list(new_shape),
        "spacing_mm_zyx": list(spacing_mm_zyx), "annotated": list(case.annotated),
    }
    if seg is not None:
        box = bounding_box(seg > 0)
        props["fg_bbox_zyx"] = None if box is None else [[sl.start, sl.stop] for sl in box]
        seed = int.from_bytes(hashlib.sha256(case.name.encode()).digest()[:4], "little")
        props["class_locations"] = class_locations(seg, np.random.default_rng(seed))
    return data.astype(np.float32), seg, props


def cache_key(cases: list[CaseRecord], stats: Intensity, spacing_mm_zyx) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"v": PREPROCESS_VERSION, "stats": asdict(stats), "spacing": list(spacing_mm_zyx)}).encode())
    for c in sorted(cases, key=lambda c: c.name):
        for p in (c.image, c.label):
            if p is not None:
                st = p.stat()
                h.update(f"{c.name}|{p.resolve()}|{st.st_size}|{st.st_mtime_ns}|{c.annotated}".encode())
    return h.hexdigest()[:16]


def _write_case(folder: Path, case: CaseRecord, stats: Intensity, spacing) -> str:
    data, seg, props = preprocess_case(case, stats, spacing)
    _atomic_npy(folder / f"{case.name}.npy", data)
    if seg is not None:
        _atomic_npy(folder / f"{case.name}_seg.npy", seg)
    with atomic_open(folder / f"{case.name}.json") as handle:  # written last: marks the case complete
        handle.write(json_text(props, indent=None).encode())
    return case.name


def _atomic_npy(path: Path, array: np.ndarray) -> None:
    # A unique temporary name (atomic_open): two runs filling the same cache never write into one file.
    with atomic_open(path) as handle:
        np.save(handle, np.ascontiguousarray(array))


class _InlinePool:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, fn, *iterables):
        return map(fn, *iterables)


def _pool(workers: int):
    return ProcessPoolExecutor(max_workers=workers) if workers > 1 else _InlinePool()


def preprocess_cases(cases: list[CaseRecord], stats: Intensity, spacing_mm_zyx, cache_root: Path, *,
                     workers: int = 1, progress: bool = True) -> Path:
    """Preprocess ``cases`` into ``cache_root/<key>/`` (skipping complete ones); returns that folder."""
    folder = ensure_dir(Path(cache_root) / cache_key(cases, stats, spacing_mm_zyx), "preprocessing cache")
    todo = [c for c in cases if not (folder / f"{c.name}.json").is_file()]
    if todo:
        log.info("preprocessing %d case(s) into %s", len(todo), folder)
        n = len(todo)
        with _pool(workers) as pool:
            for _ in tqdm(pool.map(_write_case, [folder] * n, todo, [stats] * n, [tuple(spacing_mm_zyx)] * n),
                          total=n, desc="preprocess", unit="case", disable=not progress):
                pass
    return folder


@dataclass(frozen=True, eq=False)
class PreprocessedCase:
    """One cached case, opened memory-mapped."""

    name: str
    image: np.ndarray  # float32 (z, y, x), normalised
    seg: np.ndarray | None  # uint8 (z, y, x), FLARE ids
    props: dict[str, Any]


def load_preprocessed(folder: Path, name: str) -> PreprocessedCase:
    props = json.loads((folder / f"{name}.json").read_text())
    image = np.load(folder / f"{name}.npy", mmap_mode="r")
    seg_path = folder / f"{name}_seg.npy"
    seg = np.load(seg_path, mmap_mode="r") if seg_path.is_file() else None
    return PreprocessedCase(name, image, seg, props)
