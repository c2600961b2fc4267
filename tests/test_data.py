"""Training patches: stage targets, ROI-like crops, foreground oversampling, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pocketseg.synth.dataset import synthesize_dataset
from pocketseg.trainer.data import PatchDataset, SamplingConfig, collate, detail_crop, extract, stage_target
from pocketseg.trainer.dataset import open_dataset
from pocketseg.trainer.loss import IGNORE_INDEX
from pocketseg.manifest import Intensity
from pocketseg.trainer.preprocess import compute_fingerprint, preprocess_cases
from pocketseg.trainer.presets import get_preset


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("d") / "ds"
    synthesize_dataset(root, full=2, seed=9, small=True, slices=40, progress=False)
    cases = open_dataset(root).labelled(full_only=True)
    stats = Intensity(**compute_fingerprint(cases, progress=False)["intensity"])
    return preprocess_cases(cases, stats, get_preset("detail-tiny").spacing_mm_zyx, tmp_path_factory.mktemp("c"),
                            progress=False)


def config(stage, augment=True, **kw):
    p = get_preset(f"{stage}-tiny")
    return SamplingConfig(stage=stage, patch_zyx=p.patch_zyx, spacing_mm_zyx=p.spacing_mm_zyx, strides=p.strides,
                          num_classes=p.num_classes, augment=augment, **kw)


def test_roi_targets_are_binary_and_detail_targets_keep_classes(folder):
    roi = PatchDataset(folder, ["FLARESyn_0001"], config("roi"), seed=1)
    values = set()
    for i in range(6):
        item = roi[i]
        assert item["image"].shape == (1, 16, 32, 32)
        assert [tuple(t.shape) for t in item["targets"]] == [(1, 16, 32, 32), (1, 16, 16, 16)]
        values |= set(torch.unique(item["targets"][0]).tolist())
    assert values <= {0, 1}
    detail = PatchDataset(folder, ["FLARESyn_0001"], config("detail", foreground_fraction=1.0), seed=1)
    seen = set()
    for i in range(8):
        seen |= set(torch.unique(detail[i]["targets"][0]).tolist())
    assert len(seen - {0, IGNORE_INDEX}) >= 2  # several organ classes


def test_samples_are_reproducible_by_index(folder):
    a = PatchDataset(folder, ["FLARESyn_0001", "FLARESyn_0002"], config("detail"), seed=3)
    b = PatchDataset(folder, ["FLARESyn_0001", "FLARESyn_0002"], config("detail"), seed=3)
    torch.manual_seed(123)  # global state must not matter
    for i in (0, 5, 17):
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["targets"][0], y["targets"][0])
    assert not torch.equal(a[1]["image"], a[2]["image"])
    assert not torch.equal(a[1]["image"], PatchDataset(folder, ["FLARESyn_0001", "FLARESyn_0002"], config("detail"),
                                                       seed=4)[1]["image"])
    batch = collate([a[0], a[1]])
    assert batch["image"].shape == (2, 1, 16, 32, 32) and batch["class_mask"].shape == (2, 15)


def test_foreground_oversampling_rate(folder):
    def fg_rate(fraction):
        ds = PatchDataset(folder, ["FLARESyn_0001"], config("roi", augment=False, foreground_fraction=fraction), seed=2)
        return np.mean([int(ds[i]["targets"][0][0, 8, 16, 16]) == 1 for i in range(150)])  # centre voxel

    low, third, high = fg_rate(0.0), fg_rate(0.33), fg_rate(1.0)
    # Near the volume border the patch is shifted inside, so a forced centre is not always foreground.
    assert high > 0.8 and low < high - 0.2 and low < third < high


def test_detail_crop_hides_everything_outside_the_roi(folder):
    ds = PatchDataset(folder, ["FLARESyn_0001"], config("detail", augment=False, roi_margin_mm=0.0, roi_jitter_mm=0.0),
                      seed=0)
    case = ds.case("FLARESyn_0001")
    lo, hi = detail_crop(case.props, case.image.shape, (5.0, 4.0, 4.0), 0.0, 0.0, None)
    assert np.array_equal(lo, np.asarray(case.props["fg_bbox_zyx"])[:, 0])
    for i in range(10):
        item = ds[i]
        target = item["targets"][0][0].numpy()
        image = item["image"][0].numpy()
        assert np.all(image[target == IGNORE_INDEX] == 0)
    rng = np.random.default_rng(0)
    jittered = [detail_crop(case.props, case.image.shape, (5.0, 4.0, 4.0), 20.0, 15.0, rng) for _ in range(5)]
    assert len({tuple(np.concatenate(j)) for j in jittered}) > 1


def test_extract_pads_outside_and_stage_target():
    arr = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
    out = extract(arr, np.array([-1, 0, 1]), (3, 3, 3), -5.0)
    assert out[0].min() == -5.0 and out[1, 0, 0] == arr[0, 0, 1] and out[1, 0, 2] == -5.0
    seg = np.array([0, 3, 14, IGNORE_INDEX], dtype=np.uint8)
    assert stage_target(seg, "roi").tolist() == [0, 1, 1, IGNORE_INDEX]
    assert stage_target(seg, "detail").tolist() == seg.tolist()


def test_partial_case_background_is_unknown(folder):
    ds = PatchDataset(folder, ["FLARESyn_0001"], config("detail", augment=False, roi_jitter_mm=0.0), seed=0)
    case = ds.case("FLARESyn_0001")
    seg = torch.from_numpy(np.asarray(case.seg)[None].copy())
    kept = torch.where(torch.isin(seg, torch.tensor([1, 14])), seg, torch.zeros_like(seg))
    partial = type(case)(case.name, case.image, kept.numpy()[0], {**case.props, "annotated": [1, 14]})
    target, mask = ds.known_classes(partial, kept)
    assert set(torch.unique(target).tolist()) <= {1, 14, IGNORE_INDEX}
    assert mask.tolist() == [c in (1, 14) for c in range(15)]
    full_target, full_mask = ds.known_classes(case, seg)
    assert torch.equal(full_target, seg) and bool(full_mask.all())
