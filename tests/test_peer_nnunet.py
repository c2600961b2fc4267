"""The nnU-Net v2 peer: nnU-Net's predictor running a package's cascade (pocketseg.benchmarks.peers.nnunet).

A tiny exported package (roi-tiny / detail-tiny, He-initialised weights) and a
cropped synthetic CT keep the whole file to a few seconds. Torch runs on one
thread here: on a shared 2-core machine more threads only contend.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from pocketseg import labels as L
from pocketseg.benchmarks.peers.nnunet import (
    CONFIGURATION,
    RESAMPLING_DATA_KWARGS,
    RESAMPLING_PROBABILITIES_KWARGS,
    RESAMPLING_SEG_KWARGS,
    NnUNetCascade,
    build_network,
    from_canonical_zyx,
    postprocess,
    roi_box,
    stage_plans,
)
from pocketseg.trainer.package import export_package
from pocketseg.errors import InputError
from pocketseg.manifest import PostProcess
from pocketseg.synth.phantom import make_phantom
from pocketseg.manifest import Intensity
from pocketseg.runtime.intensity import ct_normalize
from pocketseg.volume import canonical_zyx
from pocketseg.volume import Volume

pytest.importorskip("nnunetv2", reason="nnU-Net v2 (extra 'peers') is not installed")
pytest.importorskip("safetensors", reason="safetensors (extra 'train') is not installed")
pytest.importorskip("onnx_graphsurgeon", reason="the package export needs the extra 'export'")

from conftest import INTENSITY, make_run  # noqa: E402  (the tiny runs shared with the other tests)


def _make_run(folder: Path, stage: str, preset_name: str, seed: int) -> Path:
    return make_run(folder, stage, preset_name, seed=seed)


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("peer")
    roi = _make_run(root / "roi", "roi", "roi-tiny", seed=0)
    detail = _make_run(root / "detail", "detail", "detail-tiny", seed=1)
    return export_package(roi, detail, root / "pkg", fp16=False, check=False)


@pytest.fixture(scope="module")
def peer(package, one_thread) -> NnUNetCascade:
    return NnUNetCascade(package, device="cpu")


def _crop(volume: Volume, lo, hi) -> Volume:
    """A sub-volume in voxel order (i, j, k) with the affine that keeps it in place."""
    lo = np.asarray(lo)
    affine = volume.affine.copy()
    affine[:3, 3] = volume.affine[:3, :3] @ lo + volume.affine[:3, 3]
    return Volume(np.ascontiguousarray(volume.data[tuple(slice(a, b) for a, b in zip(lo, hi))]), affine)


def _reoriented(volume: Volume, codes: str) -> Volume:
    """The same image stored with axis codes ``codes`` (e.g. 'LPS'): flipped/permuted data, matching affine."""
    ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(volume.affine),
                                           nib.orientations.axcodes2ornt(codes))
    data = nib.orientations.apply_orientation(volume.data, ornt)
    affine = volume.affine @ nib.orientations.inv_ornt_aff(ornt, volume.data.shape)
    return Volume(np.ascontiguousarray(data), affine)


@pytest.fixture(scope="module")
def small_ct() -> Volume:
    """The abdomen of a small phantom (80 x 80 x 24 voxels, 3.8 x 3.8 x 5 mm) stored RAS."""
    ph = make_phantom(seed=0, small=True, slices=40)
    ras = _reoriented(Volume(ph.image, ph.affine), "RAS")
    return _crop(ras, (24, 24, 8), (104, 104, 32))


# --------------------------------------------------------------------------- plans and wiring


def test_plans_use_nnunet_defaults_and_the_stage(package, peer):
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import (
        ExperimentPlanner,
    )

    # The planner's own defaults (its methods do not read self).
    data_fn, data_kw, seg_fn, seg_kw = ExperimentPlanner.determine_resampling(None)
    prob_fn, prob_kw = ExperimentPlanner.determine_segmentation_softmax_export_fn(None)
    assert data_kw == RESAMPLING_DATA_KWARGS and seg_kw == RESAMPLING_SEG_KWARGS
    assert prob_kw == RESAMPLING_PROBABILITIES_KWARGS
    for name, stage in peer.manifest.stages.items():
        predictor = peer.predictors[name]
        cm = predictor.configuration_manager
        assert cm.spacing == list(stage.spacing_mm_zyx) and cm.patch_size == list(stage.patch_zyx)
        assert cm.normalization_schemes == ["CTNormalization"] and cm.use_mask_for_norm == [False]
        assert cm.resampling_fn_data.func is data_fn and cm.resampling_fn_seg.func is seg_fn
        assert cm.resampling_fn_probabilities.func is prob_fn
        assert predictor.plans_manager.transpose_forward == [0, 1, 2]
        assert predictor.plans_manager.foreground_intensity_properties_per_channel == {"0": INTENSITY}
        assert predictor.label_manager.num_segmentation_heads == stage.num_classes
        assert predictor.tile_step_size == 1.0 and not predictor.use_gaussian and not predictor.use_mirroring
        assert predictor.allowed_mirroring_axes is None and not predictor.network.deep_supervision
        assert not predictor.network.training
    assert stage_plans(peer.manifest.detail)["configurations"][CONFIGURATION]["spacing"] == [5.0, 4.0, 4.0]
    assert peer.predictors["detail"].label_manager.all_labels == list(range(L.NUM_CLASSES))


def test_roi_tile_matches_our_network_on_nnunet_normalised_input(peer, small_ct, package):
    """One volume exactly the ROI patch at the ROI spacing: no resampling, one tile, one network call."""
    stage = peer.manifest.roi
    predictor = peer.predictors["roi"]
    image, _ = canonical_zyx(small_ct)
    pz, py, px = stage.patch_zyx
    x = np.ascontiguousarray(image[:pz, 20:20 + py, 20:20 + px])
    assert x.shape == stage.patch_zyx
    spacing = {"spacing": list(stage.spacing_mm_zyx)}

    pm, cm = predictor.plans_manager, predictor.configuration_manager
    data, _, props = cm.preprocessor_class(verbose=False).run_case_npy(x[None], None, dict(spacing), pm, cm,
                                                                        predictor.dataset_json)
    assert props["bbox_used_for_cropping"] == [[0, pz], [0, py], [0, px]]  # CT has no zero border: no crop
    lo, hi = INTENSITY["percentile_00_5"], INTENSITY["percentile_99_5"]
    expected = (np.clip(x.astype(np.float32), lo, hi) - np.float32(INTENSITY["mean"])) / np.float32(INTENSITY["std"])
    assert data.shape == (1, *stage.patch_zyx) and data.dtype == np.float32
    np.testing.assert_array_equal(data[0], expected)
    np.testing.assert_array_equal(data[0], ct_normalize(x, Intensity(**INTENSITY)))  # pocketseg's own

    got = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data))
    assert got.dtype == torch.float16  # nnU-Net accumulates tiles in fp16, on the CPU too
    got = got.float().numpy()
    net, _ = build_network(package, stage)
    with torch.no_grad():
        ref = net(torch.from_numpy(expected[None, None]))[0].numpy()
    assert got.shape == ref.shape == (2, *stage.patch_zyx)
    # fp16 rounding only: half an ulp is 2^-11 of the value.
    assert np.all(np.abs(got - ref) <= 2.0**-11 * np.abs(ref) + 1e-6)

    seg = peer.predict_stage("roi", x, stage.spacing_mm_zyx)
    assert seg.shape == x.shape and seg.dtype == np.uint8
    np.testing.assert_array_equal(seg, got.argmax(0))
    assert (seg == ref.argmax(0)).mean() >= 0.999  # near-ties may flip in fp16


def test_nnunet_resampling_is_ours_clipped_to_the_input_range(peer, small_ct):
    """nnU-Net's image resampling (skimage) is pocketseg's cubic spline clipped to the input's value range."""
    from pocketseg.runtime.resample import resample_image, separate_z_axis, target_shape

    stage = peer.manifest.roi
    predictor = peer.predictors["roi"]
    image, spacing = canonical_zyx(small_ct)
    pm, cm = predictor.plans_manager, predictor.configuration_manager
    data, _, _ = cm.preprocessor_class(verbose=False).run_case_npy(image[None], None, {"spacing": list(spacing)}, pm,
                                                                    cm, predictor.dataset_json)
    norm = ct_normalize(image, Intensity(**INTENSITY))
    ours = resample_image(norm, target_shape(image.shape, spacing, stage.spacing_mm_zyx), order=3,
                          separate_z=separate_z_axis(spacing, stage.spacing_mm_zyx))
    assert data.shape[1:] == ours.shape
    np.testing.assert_allclose(data[0], np.clip(ours, norm.min(), norm.max()), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- the cascade


def test_predict_shape_dtype_labels_and_orientation(peer, small_ct):
    labels = peer.predict(small_ct)
    assert labels.shape == small_ct.shape and labels.dtype == np.uint8
    assert set(np.unique(labels).tolist()) <= set(range(L.NUM_CLASSES))
    assert set(peer.last_timings) == {"reorient", "roi", "detail", "postprocess", "total"}
    assert all(v >= 0 for v in peer.last_timings.values())

    lps = _reoriented(small_ct, "LPS")
    assert nib.orientations.aff2axcodes(lps.affine) == ("L", "P", "S")
    got = peer.predict(lps)
    assert got.shape == lps.shape and got.dtype == np.uint8
    np.testing.assert_array_equal(got, _reoriented(Volume(labels, small_ct.affine), "LPS").data)


def test_detail_stage_sees_the_roi_box_and_is_pasted_back_in_place(peer, small_ct, monkeypatch):
    image, spacing = canonical_zyx(small_ct)
    seen = {}

    def fake_stage(name, image_zyx, spacing_mm_zyx):
        seen[name] = image_zyx.copy()
        if name == "roi":
            roi = np.zeros(image_zyx.shape, dtype=np.uint8)
            roi[10:14, 30:40, 20:50] = 1
            roi[0, 0, 0] = 1  # a speck: not the largest component
            return roi
        return np.full(image_zyx.shape, 3, dtype=np.uint8)  # spleen everywhere in the crop

    monkeypatch.setattr(peer, "predict_stage", fake_stage)
    labels = peer.predict(_reoriented(small_ct, "LPS"))
    margin = peer.manifest.roi_margin_mm / np.asarray(spacing)
    lo = np.maximum(np.floor(np.array([10, 30, 20]) - margin), 0).astype(int)
    hi = np.minimum(np.ceil(np.array([14, 40, 50]) + margin), image.shape).astype(int)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    np.testing.assert_array_equal(seen["roi"], image)
    np.testing.assert_array_equal(seen["detail"], image[box])
    expected = np.zeros(image.shape, dtype=np.uint8)
    expected[box] = 3
    np.testing.assert_array_equal(labels, _reoriented(Volume(from_canonical_zyx(expected, small_ct.affine),
                                                             small_ct.affine), "LPS").data)


@pytest.mark.parametrize("codes", ["RAS", "LPS", "LPI", "SPL", "AIR"])
def test_from_canonical_zyx_inverts_canonical_zyx(codes):
    rng = np.random.default_rng(0)
    ras = Volume(rng.integers(0, 100, (5, 6, 7)).astype(np.int16), np.diag([0.8, 0.9, 2.5, 1.0]))
    vol = _reoriented(ras, codes)
    zyx, spacing = canonical_zyx(vol)
    assert zyx.shape == (7, 6, 5) and spacing == pytest.approx((2.5, 0.9, 0.8))
    np.testing.assert_array_equal(from_canonical_zyx(zyx, vol.affine), vol.data)


def test_roi_box_keeps_the_largest_component_plus_margin():
    mask = np.zeros((20, 30, 30), dtype=bool)
    mask[8:12, 10:20, 10:16] = True  # largest
    mask[0:2, 0:2, 0:2] = True  # a speck, ignored
    mask[11, 19, 16] = True  # touches the largest by a corner only: 26-connected, so part of it
    box = roi_box(mask, (5.0, 2.0, 2.0), margin_mm=10.0)
    assert box == (slice(6, 14), slice(5, 25), slice(5, 22))
    assert roi_box(np.zeros((4, 5, 6), dtype=bool), (1.0, 1.0, 1.0), 20.0) == (slice(0, 4), slice(0, 5), slice(0, 6))
    assert roi_box(mask, (5.0, 2.0, 2.0), margin_mm=1000.0) == (slice(0, 20), slice(0, 30), slice(0, 30))


def test_postprocess_largest_organ_component_and_small_tumors():
    labels = np.zeros((10, 20, 20), dtype=np.uint8)
    labels[1:5, 1:8, 1:8] = 1  # liver, largest part
    labels[7:9, 15:17, 15:17] = 1  # liver fragment: removed
    labels[1:3, 12:14, 1:3] = 3  # spleen, one part: kept
    labels[6:9, 1:6, 10:15] = L.TUMOR  # 75 voxels = 75 mm3: kept
    labels[1, 18, 18] = L.TUMOR  # 1 mm3: removed
    out = postprocess(labels.copy(), (1.0, 1.0, 1.0), PostProcess(largest_component_labels=(1, 3),
                                                                  tumor_min_volume_mm3=50.0))
    assert (out == 1).sum() == 4 * 7 * 7 and out[7:9, 15:17, 15:17].max() == 0
    assert (out == 3).sum() == 8 and (out == L.TUMOR).sum() == 75 and out[1, 18, 18] == 0
    assert set(np.unique(out).tolist()) == {0, 1, 3, L.TUMOR}


def test_bad_arguments(package):
    with pytest.raises(InputError, match="device"):
        NnUNetCascade(package, device="tpu")
    with pytest.raises(InputError, match="tile_step_size"):
        NnUNetCascade(package, tile_step_size=0)
    with pytest.raises(InputError, match="not a pocketseg model package"):
        NnUNetCascade(package.parent)
