"""Write a synthetic FLARE 2023-like data set in the nnU-Net v2 raw layout.

Layout::

    OUT_DIR/dataset.json                 nnU-Net v2 keys + a "pocketseg" record
    OUT_DIR/imagesTr/CASE_0000.nii.gz    fully and partially labelled images
    OUT_DIR/labelsTr/CASE.nii.gz         their label maps (partial: unannotated classes are 0)
    OUT_DIR/imagesUnlabeled/CASE_0000.nii.gz   unlabelled images (no label file)
    OUT_DIR/previews/CASE.png            with --preview

Unlabelled images live in their own folder so nnU-Net's dataset checks, which
require a label file for every image in imagesTr, still pass. The per-case
annotated classes of the partially labelled subset are in
``dataset.json["pocketseg"]["annotated_classes"]``.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from pocketseg import labels as L
from pocketseg.atomic import atomic_output_dir, write_json
from pocketseg.errors import InputError
from pocketseg.layout import DEFAULT_ENDING, IMAGES_TR, IMAGES_UNLABELED, LABELS_TR, image_name, label_name
from pocketseg.nifti import write_nifti
from pocketseg.preview import write_preview
from pocketseg.synth.phantom import make_phantom
from pocketseg.version import __version__

log = logging.getLogger(__name__)

CASE_PREFIX = "FLARESyn"
SUBSETS = ("full", "partial", "unlabeled")
#: Annotation patterns of FLARE 2023's partially labelled sources (single-organ and
#: organ-plus-tumor data sets, multi-organ subsets), by label name.
PARTIAL_PATTERNS: tuple[tuple[str, ...], ...] = (
    ("liver", "tumor"),
    ("right_kidney", "left_kidney", "tumor"),
    ("pancreas", "tumor"),
    ("spleen",),
    ("liver", "right_kidney", "spleen", "pancreas", "left_kidney"),
    ("liver", "spleen", "stomach", "gallbladder", "aorta", "inferior_vena_cava"),
    ("aorta", "inferior_vena_cava", "esophagus", "stomach", "duodenum"),
)


def case_name(index: int) -> str:
    return f"{CASE_PREFIX}_{index + 1:04d}"


def case_seed(seed: int, index: int) -> np.random.SeedSequence:
    """Seed of case ``index``: independent of how many cases are made or of their subset."""
    return np.random.SeedSequence(entropy=int(seed), spawn_key=(int(index),))


def annotated_classes(seed: int, index: int) -> list[int]:
    """The label ids annotated in partially labelled case ``index`` (a fixed FLARE-like pattern, or a random subset)."""
    rng = np.random.default_rng(np.random.SeedSequence(entropy=int(seed), spawn_key=(int(index), 1)))
    choice = int(rng.integers(len(PARTIAL_PATTERNS) + 1))
    if choice < len(PARTIAL_PATTERNS):
        ids = [L.BY_NAME[name].id for name in PARTIAL_PATTERNS[choice]]
    else:
        ids = sorted(int(v) for v in rng.choice(L.ORGAN_IDS, size=int(rng.integers(2, 8)), replace=False))
    return sorted(ids)


def _write_case(folder: Path, index: int, subset: str, seed: int, slices: int | None, small: bool,
                matrix: int | None, preview: bool) -> tuple[str, str, dict[str, Any], list[int] | None]:
    """Synthesize and write case ``index`` into ``folder``; returns (name, subset, meta, annotated classes)."""
    name = case_name(index)
    ph = make_phantom(case_seed(seed, index), slices=slices, small=small, matrix=matrix)
    image_dir = IMAGES_UNLABELED if subset == "unlabeled" else IMAGES_TR
    write_nifti(ph.image, folder / image_dir / image_name(name), affine=ph.affine, dtype=np.int16)
    labels, keep = ph.labels, None
    if subset == "partial":
        keep = annotated_classes(seed, index)
        labels = np.where(np.isin(labels, keep), labels, 0).astype(np.uint8)
    if subset != "unlabeled":
        write_nifti(labels, folder / LABELS_TR / label_name(name), affine=ph.affine, dtype=np.uint8)
    if preview:
        title = (f"{name} ({subset})  {ph.meta['phase']}  {'x'.join(map(str, ph.meta['shape']))} vox  "
                 f"{' x '.join(f'{s:.2f}' for s in ph.meta['spacing_mm'])} mm  {ph.meta['orientation']}")
        write_preview(folder / "previews" / f"{name}.png", ph.image, ph.affine,
                      None if subset == "unlabeled" else labels, title=title)
    return name, subset, ph.meta, keep


def synthesize_dataset(
    out_dir: str | os.PathLike,
    *,
    full: int = 4,
    partial: int = 0,
    unlabeled: int = 0,
    seed: int = 0,
    slices: int | None = None,
    small: bool = False,
    matrix: int | None = None,
    preview: bool = False,
    overwrite: bool = False,
    workers: int = 1,
    progress: bool = True,
) -> Path:
    """Synthesize ``full`` fully labelled, ``partial`` partially labelled and ``unlabeled`` cases.

    Cases are numbered full first, then partial, then unlabelled; case ``n`` is
    the same for a given ``seed`` whatever the counts and ``workers``. The folder
    appears only when complete; an existing non-empty folder is replaced only
    with ``overwrite``. ``workers`` > 1 synthesizes cases in parallel processes.
    """
    counts = {"full": full, "partial": partial, "unlabeled": unlabeled}
    for name, value in counts.items():
        if int(value) != value or value < 0:
            raise InputError(None, f"{name} must be a non-negative integer, got {value!r}")
    total = full + partial + unlabeled
    if total == 0:
        raise InputError(None, "nothing to synthesize: full, partial and unlabeled are all 0")
    if slices is not None and not 1 <= slices <= 2000:
        raise InputError(None, f"slices must be between 1 and 2000, got {slices}")
    if matrix is not None and not 16 <= matrix <= 2048:
        raise InputError(None, f"matrix must be between 16 and 2048, got {matrix}")
    if workers < 1:
        raise InputError(None, f"workers must be >= 1, got {workers}")

    target = Path(out_dir)
    subsets = ["full"] * full + ["partial"] * partial + ["unlabeled"] * unlabeled
    record: dict[str, Any] = {"generator": f"pocketseg {__version__}", "seed": seed, "small": small,
                              "subsets": {name: [] for name in SUBSETS}, "annotated_classes": {}, "cases": {}}
    with atomic_output_dir(target, overwrite=overwrite) as tmp:
        for folder in (IMAGES_TR, LABELS_TR) + ((IMAGES_UNLABELED,) if unlabeled else ()) + (("previews",) if preview else ()):
            (tmp / folder).mkdir()
        jobs = [(tmp, index, subset, seed, slices, small, matrix, preview) for index, subset in enumerate(subsets)]
        with tqdm(total=total, desc="synth", unit="case", disable=not progress) as bar:
            if workers == 1:
                results = []
                for job in jobs:
                    results.append(_write_case(*job))
                    bar.update(1)
            else:
                with ProcessPoolExecutor(max_workers=min(workers, total)) as pool:
                    futures = [pool.submit(_write_case, *job) for job in jobs]
                    for future in as_completed(futures):
                        future.result()  # surface a failure at once
                        bar.update(1)
                    results = [future.result() for future in futures]
        for name, subset, meta, keep in results:
            record["subsets"][subset].append(name)
            record["cases"][name] = {"subset": subset, **meta}
            if keep is not None:
                record["annotated_classes"][name] = keep
        dataset = {
            "name": "FLARE23Synthetic",
            "description": "Synthetic FLARE 2023-like abdominal CT made by pocketseg synth (not patient data)",
            "channel_names": {"0": "CT"},
            "labels": L.dataset_json_labels(),
            "numTraining": full + partial,
            "file_ending": DEFAULT_ENDING,
            "pocketseg": record,
        }
        write_json(tmp / "dataset.json", dataset, indent=2)
    log.info("wrote %d cases to %s", total, target)
    return target
