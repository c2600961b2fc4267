"""The cascade: ROI net -> crop -> detail net -> post-processing, on one device.

For one scan (paper Sec. 2.1, Fig. 1)::

    upload (int16, once) -> canonical (z, y, x) view
    ROI stage:    resample to the ROI spacing (normalising on the way), sliding window,
                  argmax, largest component, its box + margin (mm) on the original grid
    detail stage: crop the original, resample to the detail spacing, sliding window,
                  argmax, labels back to the crop's original grid
    post-process: largest component per organ, tumor specks removed, paste into zeros
    download (uint8 labels in the file's voxel order, once)

Everything between the upload and the download stays on the device: NumPy arrays
on the CPU, CuPy arrays on a GPU, through the same code (:mod:`runtime.arrays`).
The networks run through one :class:`runtime.engines.Engine` per stage. The
sliding windows stream their argmax along z, and where a stage's spacing makes z
the thick axis (both paper nets: 4.0x1.2x1.2 and 2.5x0.8x0.8 mm) the resampling
works slice chunk by slice chunk, so memory beyond the input, the label map and
the stage's (much smaller) resampled image does not grow with the number of
slices. Near-isotropic stages resample in 3D and need a few float32 copies of
the region instead.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pocketseg import labels as L
from pocketseg.errors import InputError, PocketsegError
from pocketseg.geometry import canonical_grid, grow_box
from pocketseg.manifest import Intensity, Stage, load_package
from pocketseg.runtime.arrays import ArrayModule, array_module, bounding_box
from pocketseg.runtime.engines import Engine, Selection, open_engine, resolve
from pocketseg.runtime.intensity import ct_normalize
from pocketseg.runtime.postprocess import clean_components, keep_largest_components
from pocketseg.runtime.resample import resample_image, resample_labels, separate_z_axis, target_shape
from pocketseg.runtime.sliding_window import check_overlap, sliding_window_labels
from pocketseg.volume import Volume

__all__ = ["AIR_HU", "CascadePredictor", "Prediction", "check_ct_intensities"]

log = logging.getLogger(__name__)

#: A CT of the abdomen always holds air (outside the body, in the lungs or the bowel) near -1000 HU;
#: an image without any voxel at or below this value is not in Hounsfield units.
AIR_HU = -500.0


class OutOfMemoryRetry(PocketsegError, MemoryError):
    """The device ran out of memory even with one tile per batch."""


@dataclass
class Prediction:
    """The label map of one scan, in the volume's voxel order (i, j, k), with what happened on the way."""

    labels: np.ndarray  # uint8 (i, j, k)
    timings_s: dict[str, float]
    roi_box_zyx: tuple[tuple[int, int], ...]  # [start, stop) on the canonical (z, y, x) grid
    device: str
    backend: str
    warnings: list[str] = field(default_factory=list)


def check_ct_intensities(minimum: float, maximum: float, source: Any = None) -> None:
    """Refuse images that are not CT in Hounsfield units (all constant, or no air at all).

    The networks are trained on HU-normalised CT; an MR image, or a CT whose rescale
    slope/intercept was not applied (values 0..4095), gives a confident wrong answer,
    so these are refused rather than warned about.
    """
    if not (math.isfinite(minimum) and math.isfinite(maximum)):
        raise InputError(source, "image holds NaN or infinite values")
    if minimum == maximum:
        raise InputError(source, f"image is constant (every voxel is {minimum:g}): not a CT scan")
    if minimum > AIR_HU:
        raise InputError(source, f"intensities {minimum:g}..{maximum:g} are not CT Hounsfield units (no voxel at or "
                                 f"below {AIR_HU:g} HU, where air is): MR images and CT without rescale slope/intercept "
                                 "are refused; check_intensities=False (--no-intensity-check) runs anyway")


def _normalizer(intensity: Intensity, am: ArrayModule):
    """The stage's CT normalisation as a one-argument function (for ``resample_image(prepare=...)``)."""

    def normalize(raw: Any) -> Any:
        return ct_normalize(raw, intensity, am=am)

    return normalize


def _is_out_of_memory(exc: BaseException) -> bool:
    name = type(exc).__name__
    text = str(exc).lower()
    return (name in ("OutOfMemoryError", "MemoryError") or "out of memory" in text or "failed to allocate" in text
            or "alloc_failed" in text)


def _given_box(box: Any, shape: tuple[int, ...], source: Any) -> tuple[slice, slice, slice]:
    try:
        pairs = [(int(a), int(b)) for a, b in box]
    except (TypeError, ValueError):
        raise InputError(source, f"roi_box_zyx must be three (start, stop) pairs, got {box!r}") from None
    if len(pairs) != 3 or any(not 0 <= a < b <= n for (a, b), n in zip(pairs, shape)):
        raise InputError(source, f"roi_box_zyx {box!r} does not fit the canonical (z, y, x) shape {tuple(shape)}")
    return tuple(slice(a, b) for a, b in pairs)  # type: ignore[return-value]


class CascadePredictor:
    """A loaded model package on one device: ``predict(volume) -> Prediction``; load once, predict many scans.

    Args:
        model: a model package folder (verified on loading: checksums, manifest).
        device: ``auto`` (a CUDA GPU when one is usable), ``cpu`` or ``cuda``.
        backend: ``auto``, ``tensorrt``, ``onnxruntime`` or ``torch``.
        precision: ``auto`` (fp16 on a GPU, fp32 on the CPU), ``fp32`` or ``fp16``.
        overlap: fraction of a tile shared with its neighbour, in [0, 1); 0 is the paper's tile step 1.0.
        gaussian: blend overlapping tiles with nnU-Net's Gaussian weights.
        batch_size: tiles per engine call.
        threads: CPU threads of ONNX Runtime (default: all cores).
        progress: show a progress bar of the tiles.
        fallback_to_cpu: after a GPU out-of-memory error with one tile per batch, run the scan on the CPU.

    Raises:
        InputError: a bad argument or a package that does not load.
        EngineUnavailableError, DeviceUnavailableError: the asked backend or device cannot run here.
    """

    def __init__(self, model: str | Path, *, device: str = "auto", backend: str = "auto", precision: str = "auto",
                 overlap: float = 0.0, gaussian: bool = False, batch_size: int = 1, threads: int | None = None,
                 progress: bool = False, fallback_to_cpu: bool = True):
        try:
            overlap = check_overlap(overlap)
        except ValueError as exc:
            raise InputError(None, str(exc)) from None
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(None, f"batch_size must be a positive integer, got {batch_size!r}")
        self.package_dir = Path(model)
        self.manifest = load_package(self.package_dir)
        self.selection: Selection = resolve(backend, device, self.manifest, precision)
        self.am: ArrayModule = array_module(self.selection.device)
        self.overlap = overlap
        self.gaussian = bool(gaussian)
        self.batch_size = batch_size
        self.threads = threads
        self.progress = progress
        self.fallback_to_cpu = fallback_to_cpu
        self._cpu: CascadePredictor | None = None
        t0 = time.perf_counter()
        self.engines: dict[str, Engine] = {name: open_engine(self.package_dir, self.manifest.stages[name],
                                                             self.selection, threads=threads)
                                           for name in ("roi", "detail")}
        self.load_time_s = time.perf_counter() - t0
        log.info("model %s on %s with %s (%s): %s", self.package_dir, self.selection.device, self.selection.backend,
                 self.selection.precision, self.selection.reason)

    # ------------------------------------------------------------------------------------------------ public

    @property
    def device(self) -> str:
        return self.selection.device

    @property
    def backend(self) -> str:
        return self.selection.backend

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()
        self._free_device_memory()

    def predict(self, volume: Volume, *, check_intensities: bool = True,
                roi_box_zyx: tuple[tuple[int, int], ...] | None = None) -> Prediction:
        """Segment one scan. GPU out of memory: retried with one tile per batch, then on the CPU (logged).

        ``roi_box_zyx`` ([start, stop) per axis of the canonical (z, y, x) grid) replaces the ROI
        stage: for timing nets without trained weights on a known abdomen, or for ablations.
        """
        if volume.data.ndim != 3:
            raise InputError(volume.source, f"expected a 3D image, got shape {volume.data.shape}")
        batch = self.batch_size
        while True:
            failure = None
            try:
                return self._predict(volume, batch, check_intensities, roi_box_zyx)
            except Exception as exc:  # only a GPU out of memory is retried; anything else is the caller's
                if self.device != "cuda" or not _is_out_of_memory(exc):
                    raise
                failure = f"{type(exc).__name__}: {exc}"
            # Outside the handler: the failed attempt's device arrays (held by the traceback) are gone now,
            # so the cached blocks can really be returned before the retry.
            self._free_device_memory()
            if batch > 1:
                log.warning("%s: GPU out of memory with %d tiles per batch; retrying with 1", volume.source or "image",
                            batch)
                batch = 1
                continue
            if not self.fallback_to_cpu:
                raise OutOfMemoryRetry(f"{volume.source or 'image'}: GPU out of memory with one tile per batch "
                                       f"({failure})")
            log.warning("%s: GPU out of memory with one tile per batch; running this scan on the CPU",
                        volume.source or "image")
            result = self._cpu_predictor().predict(volume, check_intensities=check_intensities,
                                                   roi_box_zyx=roi_box_zyx)
            result.warnings.append("GPU out of memory: predicted on the CPU")
            return result

    def _free_device_memory(self) -> None:
        for engine in self.engines.values():
            engine.free_cached_memory()
        self.am.free_cached_memory()

    # ------------------------------------------------------------------------------------------------ stages

    def _cpu_predictor(self) -> CascadePredictor:
        if self._cpu is None:
            self._cpu = CascadePredictor(self.package_dir, device="cpu", backend="auto",
                                         overlap=self.overlap, gaussian=self.gaussian,
                                         batch_size=1, threads=self.threads, progress=self.progress)
        return self._cpu

    def _sync_time(self, start: float) -> float:
        self.am.synchronize()
        return time.perf_counter() - start

    def _segment_stage(self, stage: Stage, image: Any, spacing_zyx, batch: int) -> Any:
        """Labels of ``stage`` on its own grid for a raw (z, y, x) image region: resample, normalise, window."""
        am = self.am
        new_shape = target_shape(image.shape, spacing_zyx, stage.spacing_mm_zyx)
        axis = separate_z_axis(spacing_zyx, stage.spacing_mm_zyx)
        net_input = resample_image(image, new_shape, order=3, separate_z=axis,
                                   prepare=_normalizer(stage.intensity, am), am=am)
        engine = self.engines[stage.name]
        # float16 accumulation halves the largest buffer where the network itself runs in fp16; not with
        # Gaussian weights, whose products at the tile borders (~1e-7) underflow in float16.
        acc = am.xp.float16 if engine.precision == "fp16" and not self.gaussian else am.xp.float32
        return sliding_window_labels(net_input, stage.patch_zyx, engine, stage.num_classes,
                                     overlap=self.overlap, gaussian=self.gaussian,
                                     batch_size=min(batch, engine.max_batch or batch), am=am,
                                     progress=self.progress, accumulate_dtype=acc)

    def _roi_box(self, canonical: Any, spacing_zyx, batch: int, warnings: list[str], name: str
                 ) -> tuple[slice, slice, slice]:
        """The abdomen box on the canonical grid: ROI net, largest component, box + margin (mm)."""
        am = self.am
        roi = self.manifest.roi
        roi_labels = self._segment_stage(roi, canonical, spacing_zyx, batch)
        roi_labels = keep_largest_components((roi_labels > 0).astype(am.xp.uint8), (1,), am)
        box = bounding_box(roi_labels > 0, am)
        shape = canonical.shape
        if box is None:
            message = "the ROI net found no abdomen; the detail net runs on the whole volume"
            log.warning("%s: %s", name, message)
            warnings.append(message)
            return tuple(slice(0, s) for s in shape)  # type: ignore[return-value]
        # ROI voxel o covers [o, o + 1) * n_in / n_roi of the input in voxel-edge coordinates (resampling keeps
        # the outer edges, see runtime.resample): the box on the input grid, rounded outwards, plus the margin.
        on_input = tuple(slice(math.floor(sl.start * n_in / n_roi), math.ceil(sl.stop * n_in / n_roi))
                         for sl, n_roi, n_in in zip(box, roi_labels.shape, shape))
        return grow_box(on_input, spacing_zyx, self.manifest.roi_margin_mm, shape)

    def _postprocess(self, labels: Any, spacing_zyx) -> Any:
        rules = self.manifest.postprocess
        min_voxels = math.ceil(rules.tumor_min_volume_mm3 / float(np.prod(spacing_zyx)))
        return clean_components(labels, rules.largest_component_labels, {L.TUMOR: min_voxels}, self.am)

    def _predict(self, volume: Volume, batch: int, check_intensities: bool,
                 roi_box_zyx: tuple[tuple[int, int], ...] | None = None) -> Prediction:
        am, xp = self.am, self.am.xp
        name = str(volume.source or "image")
        timings: dict[str, float] = {}
        warnings: list[str] = []
        start = time.perf_counter()
        data = volume.data
        if data.dtype == np.float64:  # halve the upload; CT values need no float64
            data = data.astype(np.float32)
        device_data = am.to_device(data)
        if check_intensities:
            check_ct_intensities(float(device_data.min()), float(device_data.max()), volume.source)
        grid = canonical_grid(volume.affine, volume.shape)
        canonical = grid.to_zyx(device_data)
        spacing = grid.spacing_zyx(volume.affine)
        timings["upload"] = self._sync_time(start)

        t = time.perf_counter()
        if roi_box_zyx is None:
            box = self._roi_box(canonical, spacing, batch, warnings, name)
        else:
            box = _given_box(roi_box_zyx, canonical.shape, volume.source)
            warnings.append("ROI stage skipped: the ROI box was given")
        timings["roi"] = self._sync_time(t)

        t = time.perf_counter()
        detail = self.manifest.detail
        crop = canonical[box]
        crop_labels = self._segment_stage(detail, crop, spacing, batch)
        back_axis = separate_z_axis(detail.spacing_mm_zyx, spacing)
        crop_labels = resample_labels(crop_labels, crop.shape, separate_z=back_axis, am=am)
        timings["detail"] = self._sync_time(t)

        t = time.perf_counter()
        self._postprocess(crop_labels, spacing)
        # The output is allocated in the file's voxel order and filled through its canonical view,
        # so the download needs no transposed copy.
        full = xp.zeros(volume.shape, dtype=xp.uint8)
        grid.to_zyx(full)[box] = crop_labels
        del crop_labels, canonical, device_data
        labels = am.to_host(full)
        del full
        timings["postprocess"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - start
        return Prediction(labels, timings, tuple((s.start, s.stop) for s in box), self.device, self.backend, warnings)
