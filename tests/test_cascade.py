"""The cascade runtime against a plain reference pipeline, and its edge cases.

The reference is written here the straightforward way — nibabel reorientation,
normalise then resample the whole volume, torch nets on every tile with the full
logits volume, scipy labelling — so it shares only the resampling functions (which
have their own tests against nnU-Net's numerics) with the runtime under test.
"""

from __future__ import annotations

import logging
import math
import tracemalloc

import fake_cupy
import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndi

from pocketseg import labels as L
from pocketseg.errors import InputError
from pocketseg.geometry import spacing_from_affine
from pocketseg.manifest import load_package
from pocketseg.runtime import cascade
from pocketseg.runtime.arrays import cpu_module
from pocketseg.runtime.cascade import CascadePredictor, StageNetworks, check_ct_intensities
from pocketseg.runtime.engines import Engine, Selection
from pocketseg.runtime.resample import resample_image, resample_labels, separate_z_axis, target_shape
from pocketseg.runtime.sliding_window import sliding_window_predict
from pocketseg.synth.phantom import make_phantom
from pocketseg.volume import Volume

torch = pytest.importorskip("torch", reason="the reference pipeline runs the nets in torch (extra 'train')")


# ------------------------------------------------------------------------------------------- reference pipeline

def _torch_net(package, stage):
    from safetensors.torch import load_file

    from pocketseg.runtime.network import PocketUNet, UNetConfig

    n = stage.network
    net = PocketUNet(UNetConfig(1, stage.num_classes, n.width, n.kernels, n.strides, n.channels_growth))
    net.load_state_dict(load_file(str(package / stage.files["torch"])))
    net.eval()

    def infer(batch):
        with torch.inference_mode():
            return net(torch.from_numpy(np.ascontiguousarray(batch))).numpy()

    return infer


def _largest(mask):
    lab, n = ndi.label(mask, structure=np.ones((3, 3, 3)))
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == np.argmax(sizes)


def _stage_labels(package, stage, image, spacing):
    it = stage.intensity
    norm = (np.clip(image.astype(np.float32), it.percentile_00_5, it.percentile_99_5) - it.mean) / max(it.std, 1e-8)
    shape = target_shape(image.shape, spacing, stage.spacing_mm_zyx)
    net_in = resample_image(norm.astype(np.float32), shape, order=3, separate_z=separate_z_axis(spacing, stage.spacing_mm_zyx))
    logits = sliding_window_predict(net_in, stage.patch_zyx, _torch_net(package, stage), stage.num_classes)
    return np.argmax(logits, axis=0).astype(np.uint8)


def reference_pipeline(package, volume: Volume) -> np.ndarray:
    manifest = load_package(package)
    ornt = nib.orientations.io_orientation(volume.affine)
    ras = nib.orientations.apply_orientation(volume.data, ornt)
    canon = ras.transpose(2, 1, 0)
    sp_ijk = spacing_from_affine(volume.affine)
    sp_ras = [0.0] * 3
    for src, (dst, _) in enumerate(ornt):
        sp_ras[int(dst)] = sp_ijk[src]
    spacing = (sp_ras[2], sp_ras[1], sp_ras[0])

    roi = _stage_labels(package, manifest.roi, canon, spacing)
    fg = _largest(roi > 0)
    box = []
    if fg.any():
        for axis in range(3):
            idx = np.nonzero(fg.any(axis=tuple(a for a in range(3) if a != axis)))[0]
            n_roi, n_in = roi.shape[axis], canon.shape[axis]
            margin = math.ceil(manifest.roi_margin_mm / spacing[axis])
            lo = max(math.floor(idx[0] * n_in / n_roi) - margin, 0)
            hi = min(math.ceil((idx[-1] + 1) * n_in / n_roi) + margin, n_in)
            box.append(slice(lo, hi))
    else:
        box = [slice(0, s) for s in canon.shape]
    crop = canon[tuple(box)]
    detail = _stage_labels(package, manifest.detail, crop, spacing)
    back = resample_labels(detail, crop.shape, separate_z=separate_z_axis(manifest.detail.spacing_mm_zyx, spacing))
    for organ in manifest.postprocess.largest_component_labels:
        mask = back == organ
        if mask.any():
            back[mask & ~_largest(mask)] = 0
    tumor = back == L.TUMOR
    lab, n = ndi.label(tumor, structure=np.ones((3, 3, 3)))
    min_vox = math.ceil(manifest.postprocess.tumor_min_volume_mm3 / float(np.prod(spacing)))
    for c in range(1, n + 1):
        if (lab == c).sum() < min_vox:
            back[lab == c] = 0
    full = np.zeros(canon.shape, np.uint8)
    full[tuple(box)] = back
    inverse = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), ornt)
    return nib.orientations.apply_orientation(full.transpose(2, 1, 0), inverse)


# ---------------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def predictor(tiny_package):
    return CascadePredictor(tiny_package, device="cpu", backend="onnxruntime")


def _volume(seed, slices=32, orientation="RAS"):
    ph = make_phantom(seed, small=True, slices=slices, orientation=orientation)
    return Volume(ph.image, ph.affine)


# ------------------------------------------------------------------------------------------------------ tests

@pytest.mark.parametrize("seed,orientation", [(0, "RAS"), (2, "LPI")])  # LPS: see the orientation test
def test_runtime_equals_reference_pipeline(tiny_package, predictor, seed, orientation):
    volume = _volume(seed, orientation=orientation)
    ours = predictor.predict(volume)
    ref = reference_pipeline(tiny_package, volume)
    assert ours.labels.shape == volume.shape and ours.labels.dtype == np.uint8
    assert (ref > 0).sum() > 100, "the reference segmented nothing: the comparison would be empty"
    agreement = float((ours.labels == ref).mean())
    assert agreement >= 0.999, f"voxel agreement {agreement:.5f}"
    assert set(np.unique(ours.labels)) <= set(range(L.NUM_CLASSES))
    t = ours.timings_s
    assert set(t) >= {"roi", "detail", "postprocess", "total", "roi.resample", "roi.net", "roi.box",
                      "detail.resample", "detail.net", "detail.back", "postprocess.components"}
    # The profile's parts lie inside their stage.
    for stage, parts in (("roi", ("resample", "net", "box")), ("detail", ("resample", "net", "back")),
                         ("postprocess", ("components",))):
        assert 0 < sum(t[f"{stage}.{p}"] for p in parts) <= t[stage]


def test_orientation_does_not_change_the_result(predictor):
    ras = _volume(3, orientation="RAS")
    lps = _volume(3, orientation="LPS")
    a, b = predictor.predict(ras), predictor.predict(lps)
    # Same anatomy stored in another voxel order: the same labels after reorientation.
    to_ras = nib.orientations.ornt_transform(nib.orientations.io_orientation(lps.affine),
                                             nib.orientations.axcodes2ornt("RAS"))
    assert np.array_equal(nib.orientations.apply_orientation(b.labels, to_ras), a.labels)


def test_labels_come_back_in_the_memory_layout_of_the_input(predictor):
    """A NIfTI volume is first-index-fastest (F order); its labels are too, so no writer transposes them."""
    c_order = _volume(5, slices=16)
    c_order = Volume(np.ascontiguousarray(c_order.data), c_order.affine)
    f_order = Volume(np.asfortranarray(c_order.data), c_order.affine)
    a, b = predictor.predict(c_order), predictor.predict(f_order)
    assert a.labels.flags.c_contiguous and b.labels.flags.f_contiguous and not b.labels.flags.c_contiguous
    assert np.array_equal(a.labels, b.labels) and (a.labels > 0).any()


def test_torch_backend_agrees_with_onnxruntime(tiny_package, predictor):
    volume = _volume(4, slices=16)
    ort = predictor.predict(volume).labels
    tch = CascadePredictor(tiny_package, device="cpu", backend="torch").predict(volume).labels
    assert float((ort == tch).mean()) >= 0.999


class _Constant:
    """An engine stand-in whose logits favour one class everywhere, or inside a box."""

    def __init__(self, engine, cls, box=None):
        self.engine, self.cls, self.box = engine, cls, box
        self.max_batch = None
        self.precision = "fp32"
        self.calls = 0
        self.am, self.num_classes, self.patch_zyx = engine.am, engine.num_classes, engine.patch_zyx

    def close(self):
        pass

    def free_cached_memory(self):
        pass

    def __call__(self, batch):
        self.calls += 1
        out = np.zeros((batch.shape[0], self.engine.num_classes) + batch.shape[2:], np.float32)
        out[:, self.cls] = 1.0
        return out


def test_roi_net_finding_nothing_warns_and_uses_the_whole_volume(tiny_package, caplog):
    p = CascadePredictor(tiny_package, device="cpu", backend="onnxruntime")
    p.networks["roi"] = StageNetworks([_Constant(p.engines["roi"], 0)])
    volume = _volume(5)
    with caplog.at_level(logging.WARNING):
        result = p.predict(volume)
    assert result.warnings and "found no abdomen" in result.warnings[0]
    assert "found no abdomen" in caplog.text
    assert result.roi_box_zyx == tuple((0, s) for s in reversed(volume.shape))  # RAS: (z, y, x) = (k, j, i)


def test_roi_box_at_the_border_is_clipped(tiny_package):
    p = CascadePredictor(tiny_package, device="cpu", backend="onnxruntime")
    p.networks["roi"] = StageNetworks([_Constant(p.engines["roi"], 1)])  # everything is abdomen: the whole volume
    volume = _volume(6, slices=24)
    result = p.predict(volume)
    assert result.roi_box_zyx == tuple((0, s) for s in reversed(volume.shape))


@pytest.mark.parametrize("slices", [1, 4, 10])
def test_very_thin_scans_equal_the_reference_pipeline(tiny_package, predictor, slices):
    volume = _volume(7, slices=slices)
    result = predictor.predict(volume)
    assert result.labels.shape == volume.shape and result.labels.dtype == np.uint8
    ref = reference_pipeline(tiny_package, volume)
    assert float((result.labels == ref).mean()) >= 0.999


def _traced_peak_bytes(predictor, volume) -> int:
    predictor.predict(volume)  # warm: first calls allocate ONNX Runtime's arena and caches
    tracemalloc.start()
    try:
        predictor.predict(volume)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.slow
@pytest.mark.parametrize("slice_mm", [5.0, 1.5], ids=["thick-slices", "near-isotropic"])
def test_long_scans_cost_a_fixed_number_of_bytes_per_voxel(predictor, slice_mm):
    """What docs/inference.md states: on the CPU the runtime's own NumPy allocations (tracemalloc; the input not
    counted) stay under 12 bytes per input voxel at any length: the label maps of the crop and of the scan, and
    the int32 component ids of the post-processing. The sliding window and the resampling add only patch- and
    chunk-sized buffers and the stages' grids: thick slices are resampled in-plane slice by slice, near-isotropic
    scans in 3D one axis after the other, chunk by chunk."""
    rng = np.random.default_rng(0)
    per_voxel = {}
    for slices in (275, 1100):
        data = rng.normal(40, 30, size=(64, 64, slices)).astype(np.int16)
        data[:, :6] = -1000  # air
        volume = Volume(data, np.diag([1.5, 1.5, slice_mm, 1.0]))
        result = predictor.predict(volume)
        assert result.labels.shape == data.shape
        per_voxel[slices] = _traced_peak_bytes(predictor, volume) / data.size
    assert per_voxel[1100] < 12.0, per_voxel
    assert per_voxel[1100] < 1.1 * per_voxel[275], per_voxel  # linear in the slices, nothing worse


def test_non_ct_intensities_are_refused(predictor):
    volume = _volume(8, slices=10)
    with pytest.raises(InputError, match="constant"):
        predictor.predict(Volume(np.zeros((16, 16, 8), np.int16), volume.affine))
    mr_like = Volume(np.random.default_rng(0).integers(0, 1200, (32, 32, 8)).astype(np.int16), volume.affine)
    with pytest.raises(InputError, match="not CT Hounsfield units"):
        predictor.predict(mr_like)
    assert predictor.predict(mr_like, check_intensities=False).labels.shape == mr_like.shape
    with pytest.raises(InputError, match="not CT Hounsfield units"):
        check_ct_intensities(0.0, 4095.0, "scan.nii.gz")


def test_gpu_out_of_memory_retries_with_one_tile_then_the_cpu(tiny_package, caplog):
    p = CascadePredictor(tiny_package, device="cpu", backend="onnxruntime", batch_size=4)
    calls = []

    class OutOfMemoryError(Exception):
        pass

    def always_oom(volume, batch, check, box=None):
        calls.append(batch)
        raise OutOfMemoryError("out of memory allocating 2 GB")

    # Pretend the predictor runs on a GPU whose every attempt runs out of memory.
    p.selection = Selection("onnxruntime", "cuda", "fp16", "test")
    p._predict = always_oom
    with caplog.at_level(logging.WARNING):
        result = p.predict(_volume(9, slices=12))
    assert calls == [4, 1]
    assert result.device == "cpu" and "GPU out of memory: predicted on the CPU" in result.warnings
    assert "retrying with 1" in caplog.text and "on the CPU" in caplog.text


def test_bad_arguments(tiny_package, tmp_path):
    with pytest.raises(InputError, match="overlap"):
        CascadePredictor(tiny_package, device="cpu", overlap=1.0)
    with pytest.raises(InputError, match="batch_size"):
        CascadePredictor(tiny_package, device="cpu", batch_size=0)
    with pytest.raises(InputError, match="not a pocketseg model package"):
        CascadePredictor(tmp_path, device="cpu")


def test_given_roi_box_skips_the_roi_stage(tiny_package):
    p = CascadePredictor(tiny_package, device="cpu", backend="onnxruntime")
    roi = _Constant(p.engines["roi"], 1)
    p.networks["roi"] = StageNetworks([roi])
    volume = _volume(10, slices=20)
    z, y, x = reversed(volume.shape)
    result = p.predict(volume, roi_box_zyx=((2, z - 2), (10, y - 10), (5, x - 5)))
    assert roi.calls == 0 and result.roi_box_zyx == ((2, z - 2), (10, y - 10), (5, x - 5))
    assert (result.labels[:, :, :2] == 0).all()  # outside the box: background (RAS: k is z)
    with pytest.raises(InputError, match="does not fit"):
        p.predict(volume, roi_box_zyx=((0, z + 1), (0, y), (0, x)))


def test_a_gpu_predictor_queues_all_its_work_on_its_own_non_blocking_stream(tiny_package, monkeypatch):
    """With a stand-in for CuPy (NumPy arrays, CuPy's stream API): every engine call, the syncs of the
    timings and the cache release happen on the predictor's stream, none on the legacy default stream."""
    gpu = fake_cupy.fake_gpu_module()
    monkeypatch.setattr(cascade, "array_module", lambda device: gpu)
    p = CascadePredictor(tiny_package, device="cpu", backend="onnxruntime")
    cuda = gpu.xp.cuda
    assert p.stream is cuda.made[0] and p.stream.non_blocking and p.stream.ptr != 0
    seen, freed = [], []

    class Spy:
        """An engine that notes the stream current at each call."""

        def __init__(self, engine):
            self.engine = engine

        def __getattr__(self, name):
            return getattr(self.engine, name)

        def __call__(self, batch):
            seen.append(cuda.get_current_stream())
            return self.engine(batch)

        def free_cached_memory(self):
            freed.append(cuda.get_current_stream())

    for nets in p.networks.values():
        nets.engines = [Spy(e) for e in nets.engines]
    volume = _volume(3, slices=12)
    labels = p.predict(volume).labels
    np.testing.assert_array_equal(labels, CascadePredictor(tiny_package, device="cpu", backend="onnxruntime")
                                  .predict(volume).labels)  # the same result as the CPU module's
    assert seen and all(s is p.stream for s in seen)
    # The timings wait on it: upload; ROI resample, net, box and the stage; detail resample, net, back and the
    # stage; components. Nothing waits on the null stream.
    assert p.stream.synchronized == 10 and cuda.null.synchronized == 0
    assert cuda.get_current_stream() is cuda.null  # restored after predict
    p.free_cached_memory()
    assert freed == [p.stream, p.stream] and gpu.xp.pool.freed == 1  # every engine, then CuPy's pool


def test_free_cached_memory_reaches_every_engine_of_the_ensemble(tiny_package):
    p = CascadePredictor(tiny_package, device="cpu", backend="onnxruntime")
    freed = []
    for name, nets in p.networks.items():
        for engine in nets.engines:
            engine.free_cached_memory = lambda name=name: freed.append(name)
    p.free_cached_memory()
    assert sorted(freed) == sorted(p.networks)
    p.close()
    assert all(e.session is None for nets in p.networks.values() for e in nets.engines)  # sessions dropped


def test_threads_hold_numpys_blas_while_a_scan_runs_and_restore_it_after(tiny_package, monkeypatch):
    """--threads caps the CPU resampling's BLAS too (OpenBLAS alone takes every core of the machine)."""
    from threadpoolctl import threadpool_info

    import pocketseg.runtime.cascade as cascade

    def blas_threads():
        return sorted({lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"})

    before = blas_threads()
    if not before:
        pytest.skip("NumPy here links no BLAS that threadpoolctl can see")
    seen = []
    original = cascade.resample_image

    def recording(*args, **kwargs):
        seen.append(blas_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(cascade, "resample_image", recording)
    volume = _volume(6, slices=16)
    CascadePredictor(tiny_package, device="cpu", backend="onnxruntime", threads=1).predict(volume)
    assert seen and all(s == [1] for s in seen)
    assert blas_threads() == before
    seen.clear()
    CascadePredictor(tiny_package, device="cpu", backend="onnxruntime").predict(volume)
    assert seen and all(s == before for s in seen)


class _ReusingEngine(Engine):
    """An engine whose ``transient`` hands out one buffer, overwritten by every call (as OpenVINO's shared
    output tensor is); calling it returns a fresh array."""

    precision, num_classes, patch_zyx = "fp32", 3, (4, 8, 8)

    def __init__(self, max_batch=None):  # no package behind it: Engine.__init__ is not called
        self.am = cpu_module()
        self.max_batch = max_batch
        self.buffer = None

    @staticmethod
    def logits(batch):
        return np.concatenate([np.sin(batch * (c + 1)) for c in range(3)], axis=1).astype(np.float32)

    def __call__(self, batch):
        return self.logits(batch)

    def transient(self, batch):
        out = self.logits(batch)
        if self.buffer is None or self.buffer.shape != out.shape:
            self.buffer = np.empty_like(out)
        self.buffer[...] = out
        return self.buffer


def test_stage_networks_use_an_engines_reused_buffer_only_where_it_is_read_before_the_next_call():
    rng = np.random.default_rng(3)
    batch = rng.standard_normal((2, 1, 4, 8, 8)).astype(np.float32)
    expected = _ReusingEngine.logits(batch)
    plain = StageNetworks([_ReusingEngine()])
    got = plain(batch)
    assert got is plain.engines[0].buffer and np.array_equal(got, expected)  # no copy on the plain path
    # Mirroring with an engine that takes one tile at a time: the variants run in several calls, each kept.
    for engines in ([_ReusingEngine(max_batch=1)], [_ReusingEngine(max_batch=1), _ReusingEngine()]):
        mirrored = StageNetworks(engines, mirror_axes=(1, 2))
        np.testing.assert_allclose(mirrored(batch), expected, rtol=1e-6, atol=1e-6)
    # The sliding window reads each tile before asking for the next: the same labels as from fresh arrays.
    image = rng.standard_normal((11, 19, 13)).astype(np.float32)
    reused = sliding_window_predict(image, (4, 8, 8), StageNetworks([_ReusingEngine()]), 3, overlap=0.5)
    fresh = sliding_window_predict(image, (4, 8, 8), _ReusingEngine(), 3, overlap=0.5)
    np.testing.assert_array_equal(reused, fresh)
