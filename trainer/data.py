"""Training patches: stage-specific targets, foreground oversampling, ROI-like crops, augmentation.

Stage data as the cascade needs it:

* ROI stage: every organ and tumor label merged into 1 (fully labelled cases).
* Detail stage: each sample sees its case cropped to the foreground bounding box
  plus a margin, with random jitter of every side (and, with ``crop_widen_mm``, a
  random widening) — what the ROI crop gives the detail net at inference,
  including its errors. Voxels outside the crop are zero in the image and
  ignored by the loss.

Every sample is a pure function of (seed, rank, global sample index): the index
encodes the epoch, so data order and augmentation are reproducible, identical
with any number of loader workers, and a resumed run continues exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pocketseg import labels as L
from pocketseg.geometry import ROI_MARGIN_MM, grow_box
from pocketseg.trainer.augment import initial_patch_size, training_transforms
from pocketseg.trainer.loss import IGNORE_INDEX, deep_supervision_scales, downsample_target, partial_label_target
from pocketseg.trainer.preprocess import PreprocessedCase, load_preprocessed

#: nnU-Net's default share of patches forced to contain foreground.
FOREGROUND_FRACTION = 0.33
#: Jitter (mm) of each side of the ROI-like crop in training, around the runtime's margin (geometry.ROI_MARGIN_MM).
ROI_JITTER_MM = 15.0


@dataclass(frozen=True)
class SamplingConfig:
    stage: str
    patch_zyx: tuple[int, int, int]
    spacing_mm_zyx: tuple[float, float, float]
    strides: tuple[tuple[int, int, int], ...]
    num_classes: int
    augment: bool = True
    foreground_fraction: float = FOREGROUND_FRACTION
    roi_margin_mm: float = ROI_MARGIN_MM
    roi_jitter_mm: float = ROI_JITTER_MM
    crop_widen_mm: float = 0.0
    mirror_axes: tuple[int, ...] = (0, 1, 2)


def sample_seed(seed: int, rank: int, index: int) -> np.random.SeedSequence:
    return np.random.SeedSequence(entropy=int(seed), spawn_key=(int(rank), int(index)))


def stage_target(seg: np.ndarray, stage: str) -> np.ndarray:
    """Labels as the stage learns them: ROI merges every foreground class into 1."""
    if stage == "roi":
        out = (seg > 0).astype(np.uint8)
        out[seg == IGNORE_INDEX] = IGNORE_INDEX
        return out
    return np.asarray(seg, dtype=np.uint8)


def detail_crop(props: dict[str, Any], shape, spacing_mm_zyx, margin_mm: float, jitter_mm: float,
                rng: np.random.Generator | None, widen_mm: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Crop box [lo, hi) of the foreground bbox plus margin, each side jittered by up to ``jitter_mm`` and
    widened by up to ``widen_mm`` (an ROI net that also marks neighbouring tissue gives such wider boxes)."""
    shape = np.asarray(shape)
    box = props.get("fg_bbox_zyx")
    if box is None:
        return np.zeros(3, dtype=int), shape.copy()
    margin = np.full((3, 2), float(margin_mm))
    if rng is not None and jitter_mm > 0:
        margin = margin + rng.uniform(-jitter_mm, jitter_mm, size=(3, 2))
    if rng is not None and widen_mm > 0:
        margin = margin + rng.uniform(0.0, widen_mm, size=(3, 2))
    grown = grow_box(tuple(slice(int(a), int(b)) for a, b in box), spacing_mm_zyx, margin, shape)
    return np.array([sl.start for sl in grown]), np.array([sl.stop for sl in grown])


def extract(array: np.ndarray, lo: np.ndarray, size, fill) -> np.ndarray:
    """array[lo : lo + size] with ``fill`` wherever the window leaves the array."""
    size = np.asarray(size)
    out = np.full(tuple(size), fill, dtype=array.dtype)
    src_lo = np.maximum(lo, 0)
    src_hi = np.minimum(lo + size, array.shape)
    if np.any(src_hi <= src_lo):
        return out
    dst_lo = src_lo - lo
    dst_hi = dst_lo + (src_hi - src_lo)
    out[tuple(slice(a, b) for a, b in zip(dst_lo, dst_hi))] = array[tuple(slice(a, b) for a, b in zip(src_lo, src_hi))]
    return out


class PatchDataset(torch.utils.data.Dataset):
    """Map-style dataset of random training patches; item ``i`` is sample ``i`` of the whole run."""

    def __init__(self, folder: Path, names: list[str], cfg: SamplingConfig, *, seed: int, rank: int = 0,
                 length: int = 1 << 62):
        self.folder = Path(folder)
        self.names = list(names)
        self.cfg = cfg
        self.seed = seed
        self.rank = rank
        self.length = length
        self._cases: dict[str, PreprocessedCase] = {}
        self._transforms = None
        self._ds_scales = deep_supervision_scales(cfg.strides)

    def __len__(self) -> int:
        return self.length

    def case(self, name: str) -> PreprocessedCase:
        if name not in self._cases:  # opened lazily so each loader worker maps its own view
            self._cases[name] = load_preprocessed(self.folder, name)
        return self._cases[name]

    def __getitem__(self, index: int) -> dict[str, Any]:
        ss = sample_seed(self.seed, self.rank, index)
        rng = np.random.default_rng(ss)
        # batchgeneratorsv2 draws from the global generators: seed them from the same sequence.
        np.random.seed(ss.generate_state(1)[0])
        torch.manual_seed(int(ss.generate_state(2, dtype=np.uint64)[1] % (2**63)))
        c = self.case(self.names[int(rng.integers(len(self.names)))])
        image, seg = self.sample_patch(c, rng)
        seg_t, class_mask = self.known_classes(c, torch.from_numpy(seg[None]))
        if self.cfg.augment:
            if self._transforms is None:
                self._transforms = training_transforms(self.cfg.patch_zyx, mirror_axes=self.cfg.mirror_axes)
            out = self._transforms(image=torch.from_numpy(image[None]), segmentation=seg_t.to(torch.int16))
            image_t, seg_t = out["image"], out["segmentation"].long()
        else:
            image_t, seg_t = torch.from_numpy(image[None]), seg_t.long()
        targets = downsample_target(seg_t[None], self._ds_scales)
        return {"image": image_t.float(), "targets": [t[0] for t in targets], "class_mask": class_mask}

    def known_classes(self, c: PreprocessedCase, seg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Target with unknown voxels set to IGNORE_INDEX, and the classes the case annotates.

        ROI: every case used is fully labelled. Detail: a partially labelled case's background may hide
        unannotated organs (see :func:`pocketseg.trainer.loss.partial_label_target`).
        """
        if self.cfg.stage == "roi":
            return seg, torch.ones(self.cfg.num_classes, dtype=torch.bool)
        return partial_label_target(seg, c.props.get("annotated", L.FOREGROUND_IDS), num_classes=self.cfg.num_classes)

    def sample_patch(self, c: PreprocessedCase, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        cfg = self.cfg
        shape = np.asarray(c.image.shape)
        patch = np.asarray(cfg.patch_zyx)
        big = np.asarray(initial_patch_size(cfg.patch_zyx, augment=cfg.augment))
        if cfg.stage == "detail":
            lo, hi = detail_crop(c.props, shape, cfg.spacing_mm_zyx, cfg.roi_margin_mm, cfg.roi_jitter_mm, rng,
                                 cfg.crop_widen_mm)
        else:
            lo, hi = np.zeros(3, dtype=int), shape.copy()
        # Patch centre: a foreground voxel (oversampling) or uniform; the patch then stays inside the crop
        # where the crop is large enough, as sliding-window tiles do at inference.
        locations = c.props.get("class_locations") or {}
        inside = {k: np.asarray(v) for k, v in locations.items()}
        inside = {k: v[np.all((v >= lo) & (v < hi), axis=1)] for k, v in inside.items() if len(v)}
        inside = {k: v for k, v in inside.items() if len(v)}
        if rng.random() < cfg.foreground_fraction and inside:
            keys = sorted(inside)
            pts = inside[keys[int(rng.integers(len(keys)))]]
            centre = pts[int(rng.integers(len(pts)))]
        else:
            centre = np.array([rng.integers(a, b) for a, b in zip(lo, hi)])
        start = centre - patch // 2
        room = hi - lo - patch
        start = np.where(room >= 0, np.clip(start, lo, lo + np.maximum(room, 0)), lo + room // 2)
        big_start = start - (big - patch) // 2
        image = extract(np.asarray(c.image), big_start, big, np.float32(0))
        if c.seg is None:
            seg = np.zeros(tuple(big), dtype=np.uint8)
        else:
            seg = stage_target(extract(np.asarray(c.seg), big_start, big, np.uint8(0)), cfg.stage)
        if cfg.stage == "detail":  # hide everything outside the ROI-like crop
            grid = np.indices(tuple(big), sparse=True)
            outside = np.zeros(tuple(big), dtype=bool)
            for axis, g in enumerate(grid):
                pos = g + big_start[axis]
                outside |= (pos < lo[axis]) | (pos >= hi[axis])
            image[outside] = 0
            seg[outside] = IGNORE_INDEX
        return image.astype(np.float32), seg


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "targets": [torch.stack([s["targets"][i] for s in samples]) for i in range(len(samples[0]["targets"]))],
        "class_mask": torch.stack([s["class_mask"] for s in samples]),
    }


class RunSampler(torch.utils.data.Sampler):
    """Yields the global sample indices of one epoch: epoch * per_epoch + i."""

    def __init__(self, per_epoch: int):
        self.per_epoch = per_epoch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        base = self.epoch * self.per_epoch
        return iter(range(base, base + self.per_epoch))

    def __len__(self) -> int:
        return self.per_epoch
