"""The cascade: ROI net -> crop -> detail net -> post-processing, on one device.

For one scan (paper Sec. 2.1, Fig. 1)::

    upload (int16, once) -> the stage's view of the voxels (z, y, x)
    ROI stage:    resample to the ROI spacing (normalising on the way), sliding window,
                  argmax, largest component, its box + margin (mm) on the original grid
    detail stage: crop the original (and to its non-zero voxels where the stage says),
                  resample to the detail spacing, sliding window, labels (or logits,
                  streamed) back to the crop's original grid
    post-process: the package's rules (largest component per organ, tumor specks removed)
    download (uint8 labels in the file's voxel order, once)

A package without a ROI stage (an imported single-stage model) segments the whole
scan with its one stage. The view of the voxels is the package's: the canonical
RAS grid (pocketseg's own packages, nnU-Net's NibabelIOWithReorient), or the file's
own voxel order as nnU-Net's SimpleITK and NiBabel readers see it (``native``),
followed by the plans' ``transpose_forward``.

How tiles are run and blended, and how the result goes back to the original grid,
comes from the package's inference settings unless the caller overrides them: the
paper's (tile step 1, uniform blending, no test-time augmentation, labels back) for
pocketseg's packages; nnU-Net's for imported ones (overlap 0.5, its Gaussian,
mirroring over the allowed axes, the mean over the folds' logits, logits resampled
back linearly, streamed along z). ``fast=True`` takes the paper's settings for any
package.

Everything between the upload and the download stays on the device: NumPy arrays
on the CPU, CuPy arrays on a GPU, through the same code (:mod:`runtime.arrays`).
On a GPU each predictor queues its work on a non-blocking CUDA stream of its own,
shared by its CuPy operations, the host/device copies and TensorRT, so that nothing
runs on (and synchronises the device through) the legacy default stream.
The sliding windows stream their argmax along z; logits at the network's
resolution exist only where the settings ask for logits back. Where z is the thick
axis the resampling works slice chunk by slice chunk; near-isotropic stages
resample in 3D and need a few float32 copies of the region instead.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from pocketseg.errors import InputError, PocketsegError
from pocketseg.geometry import canonical_grid, grow_box, spacing_from_affine
from pocketseg.manifest import BACK_RESAMPLING, Inference, Manifest, Stage, load_package
from pocketseg.runtime.arrays import ArrayModule, array_module, bounding_box
from pocketseg.runtime.engines import Engine, Selection, open_engine, resolve
from pocketseg.runtime.intensity import normalizer
from pocketseg.runtime.memory_limit import check_memory, default_limit_bytes, estimate_memory, parse_size
from pocketseg.runtime.postprocess import clean_components, keep_largest_components
from pocketseg.runtime.resample import (resample_image, resample_labels, resample_logits_to_labels, separate_z_axis,
                                        target_shape)
from pocketseg.runtime.sliding_window import check_overlap, sliding_window_labels, sliding_window_predict
from pocketseg.signing import check_trusted
from pocketseg.volume import Volume

__all__ = ["AIR_HU", "CascadePredictor", "FAST", "Prediction", "StageNetworks", "VoxelView", "check_ct_intensities"]

log = logging.getLogger(__name__)

#: A CT of the abdomen always holds air (outside the body, in the lungs or the bowel) near -1000 HU;
#: an image without any voxel at or below this value is not in Hounsfield units.
AIR_HU = -500.0
#: The paper's settings (``fast=True``): tile step 1, uniform blending, no mirroring, labels resampled back.
FAST = Inference(overlap=0.0, gaussian=False, mirroring=False, back_resampling="labels", nnunet_numerics=False)


class OutOfMemoryRetry(PocketsegError, MemoryError):
    """The device ran out of memory even with one tile per batch."""


@dataclass
class Prediction:
    """The label map of one scan, in the volume's voxel order (i, j, k), with what happened on the way."""

    labels: np.ndarray  # uint8 (i, j, k)
    # upload, roi, detail, postprocess, total; and the profile inside them: roi.resample, roi.net, roi.box,
    # detail.resample, detail.net, detail.back (labels back to the scan's grid), postprocess.components.
    timings_s: dict[str, float]
    roi_box_zyx: tuple[tuple[int, int], ...]  # [start, stop) on the stage's (z, y, x) view (the canonical grid)
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


class _BlasThreads:
    """NumPy/SciPy's BLAS held to a thread count while scans run (the CPU resampling is matrix products).

    Left alone, OpenBLAS starts a thread per core of the machine, not per core a job was given (a cluster
    job with ``--threads 4`` on a 64-core node would run 64). The limit is process-wide library state, so
    it is counted: the first scan in flight sets it, the last one out restores what was there.
    """

    _lock = threading.Lock()
    _depth = 0
    _limiter: Any = None

    @classmethod
    @contextmanager
    def limited(cls, threads: int | None) -> Iterator[None]:
        if not threads:
            yield
            return
        with cls._lock:
            if cls._depth == 0:
                cls._limiter = threadpool_limits(limits=int(threads), user_api="blas")
            cls._depth += 1
        try:
            yield
        finally:
            with cls._lock:
                cls._depth -= 1
                if cls._depth == 0:
                    cls._limiter.restore_original_limits()
                    cls._limiter = None


@dataclass(frozen=True)
class VoxelView:
    """How a stage sees a volume's voxels: (z, y, x) views of (i, j, k) arrays, and the spacing in that order.

    ``RAS``: flips and a permutation onto the nearest RAS grid (:func:`pocketseg.geometry.canonical_grid`);
    ``native``: the file's own voxel order as nnU-Net's SimpleITK and NiBabel readers return it, (k, j, i).
    Then the stage's ``transpose_forward`` (nnU-Net's plans). Every step is a view, so writing through
    :meth:`forward` of an (i, j, k) array fills it in the file's voxel order.
    """

    forward: Callable[[Any], Any]
    spacing_zyx: tuple[float, float, float]

    @staticmethod
    def of(volume: Volume, stage: Stage) -> VoxelView:
        order = tuple(int(a) for a in stage.transpose_forward)
        if stage.voxel_order == "native":
            base = spacing_from_affine(volume.affine)[::-1]

            def to_base(array: Any) -> Any:
                return array.transpose(2, 1, 0)
        else:
            grid = canonical_grid(volume.affine, volume.shape)
            base, to_base = grid.spacing_zyx(volume.affine), grid.to_zyx
        spacing = tuple(float(base[a]) for a in order)

        def forward(array: Any) -> Any:
            return to_base(array).transpose(order)

        return VoxelView(forward, spacing)  # type: ignore[arg-type]


def _transient(engine: Any) -> Callable[[Any], Any]:
    """An :class:`Engine`'s :meth:`Engine.transient`; any other tile function (a wrapper of an engine that
    overrides its call, a stand-in) is called as it is."""
    return engine.transient if isinstance(engine, Engine) else engine


class StageNetworks:
    """The networks of a stage as one tile function: test-time mirroring and the mean over an ensemble (folds).

    ``batch`` (B, 1, z, y, x) -> logits (B, C, z, y, x), float32 when anything is averaged. With mirroring,
    every combination of flips of ``mirror_axes`` (network axes) is run in the same batch, flipped back and
    averaged with the unflipped prediction (nnU-Net's test-time augmentation); with several networks, their
    results are averaged too (nnU-Net's fold ensemble: the blend of the mean is the mean of the blends).
    """

    def __init__(self, engines: Sequence[Engine], mirror_axes: Sequence[int] = (), am: ArrayModule | None = None):
        self.engines = list(engines)
        self.am = am or self.engines[0].am
        self.mirror_axes = tuple(int(a) for a in mirror_axes)
        axes = [int(a) + 2 for a in mirror_axes]
        self.flips = [combo for n in range(1, len(axes) + 1) for combo in itertools.combinations(axes, n)]
        first = self.engines[0]
        self.num_classes, self.patch_zyx, self.precision = first.num_classes, first.patch_zyx, first.precision
        limits = [e.max_batch for e in self.engines if e.max_batch]
        # One tile with all its flips has to fit an engine's profile: the tile batch shrinks to fit.
        self.max_batch = max(1, min(limits) // (1 + len(self.flips))) if limits else None

    @property
    def plain(self) -> bool:
        """One network, no mirroring: the engine's own output, untouched."""
        return len(self.engines) == 1 and not self.flips

    def __call__(self, batch: Any) -> Any:
        """The tile function; its result is valid until the next call (it may be an engine's own buffer)."""
        if self.plain:
            return _transient(self.engines[0])(batch)
        xp = self.am.xp
        n = batch.shape[0]
        variants = xp.concatenate([batch] + [xp.flip(batch, axis=axes) for axes in self.flips], axis=0)
        total = None
        for engine in self.engines:
            out = self._run(engine, variants).astype(xp.float32, copy=False)
            summed = out[:n].copy()
            for k, axes in enumerate(self.flips, start=1):
                summed += xp.flip(out[k * n : (k + 1) * n], axis=axes)
            total = summed if total is None else total + summed
        return total / float((1 + len(self.flips)) * len(self.engines))

    @staticmethod
    def _run(engine: Engine, batch: Any) -> Any:
        if engine.max_batch is None or batch.shape[0] <= engine.max_batch:
            return _transient(engine)(batch)  # read before this engine runs again
        xp = engine.am.xp
        return xp.concatenate([engine(batch[i : i + engine.max_batch])
                               for i in range(0, batch.shape[0], engine.max_batch)], axis=0)

    def close(self) -> None:
        for engine in self.engines:
            engine.close()

    def free_cached_memory(self) -> None:
        for engine in self.engines:
            engine.free_cached_memory()


def nonzero_box(region: Any, am: ArrayModule) -> tuple[slice, slice, slice]:
    """nnU-Net's crop to non-zero: the box of the voxels that are not 0 (holes inside are filled there, which
    cannot widen the box); the whole region when every voxel is 0."""
    box = bounding_box(region != 0, am)
    return box if box is not None else tuple(slice(0, s) for s in region.shape)  # type: ignore[return-value]


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
            None: the package's setting (0 for pocketseg's packages, 0.5 for imported nnU-Net models).
        gaussian: blend overlapping tiles with nnU-Net's Gaussian weights (None: the package's setting).
        mirroring: test-time mirroring over the stage's allowed axes (None: the package's setting).
        back_resampling: ``labels`` or ``logits`` back to the original grid (None: the package's setting).
        fast: the paper's settings whatever the package says (tile step 1, uniform, no mirroring, labels back);
            ``overlap``, ``gaussian``, ``mirroring`` and ``back_resampling`` given explicitly still win.
        batch_size: tiles per engine call.
        threads: CPU threads of the engine (ONNX Runtime, OpenVINO) and of NumPy's BLAS, which does the
            CPU resampling (default: all cores).
        progress: show a progress bar of the tiles.
        fallback_to_cpu: after a GPU out-of-memory error with one tile per batch, run the scan on the CPU.
        max_memory: the most memory a scan's resampled grids and label buffers may need, in bytes or as a size
            (``8GiB``); a scan estimated above it is refused before anything is allocated
            (:mod:`pocketseg.runtime.memory_limit`). None: 75 % of the machine's physical memory.
        trusted_keys: a folder of trusted Ed25519 public keys (None: ``$POCKETSEG_TRUSTED_KEYS`` when set); the
            package must then be signed by one of them (:func:`pocketseg.signing.check_trusted`).

    Raises:
        InputError: a bad argument or a package that does not load.
        EngineUnavailableError, DeviceUnavailableError: the asked backend or device cannot run here.
    """

    def __init__(self, model: str | Path, *, device: str = "auto", backend: str = "auto", precision: str = "auto",
                 overlap: float | None = None, gaussian: bool | None = None, mirroring: bool | None = None,
                 back_resampling: str | None = None, fast: bool = False, batch_size: int = 1,
                 threads: int | None = None, progress: bool = False, fallback_to_cpu: bool = True,
                 max_memory: str | int | None = None, trusted_keys: str | Path | None = None):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(None, f"batch_size must be a positive integer, got {batch_size!r}")
        self.max_memory = parse_size(max_memory)
        self.package_dir = Path(model)
        self.manifest: Manifest = load_package(self.package_dir)
        # With trusted keys (the argument or $POCKETSEG_TRUSTED_KEYS) only a package signed by one of them runs.
        self.trusted_keys = trusted_keys
        self.signature = check_trusted(self.package_dir, trusted_keys)
        self.settings = _settings(self.manifest.inference, fast=fast, overlap=overlap, gaussian=gaussian,
                                  mirroring=mirroring, back_resampling=back_resampling)
        self.selection: Selection = resolve(backend, device, self.manifest, precision,
                                           exact=self.settings.nnunet_numerics)
        self.am: ArrayModule = array_module(self.selection.device)
        self.batch_size = batch_size
        self.threads = threads
        self.progress = progress
        self.fallback_to_cpu = fallback_to_cpu
        self._cpu: CascadePredictor | None = None
        #: The CUDA stream of this predictor's work (None on the CPU).
        self.stream = self.am.new_stream()
        t0 = time.perf_counter()
        self.networks: dict[str, StageNetworks] = {}
        with self.am.stream_scope(self.stream):
            for name, stage in self.manifest.stages.items():
                engines = [open_engine(self.package_dir, stage, self.selection, threads=threads, member=m)
                           for m in range(len(stage.members))]
                self.networks[name] = StageNetworks(engines, stage.mirror_axes if self.settings.mirroring else (),
                                                    self.am)
        self.load_time_s = time.perf_counter() - t0
        log.info("model %s on %s with %s (%s): %s; %s", self.package_dir, self.selection.device,
                 self.selection.backend, self.selection.precision, self.selection.reason, self.settings)

    # ------------------------------------------------------------------------------------------------ public

    @property
    def device(self) -> str:
        return self.selection.device

    @property
    def backend(self) -> str:
        return self.selection.backend

    @property
    def engines(self) -> dict[str, Engine]:
        """The first network of each stage (every network: :attr:`networks`)."""
        return {name: nets.engines[0] for name, nets in self.networks.items()}

    @property
    def overlap(self) -> float:
        return self.settings.overlap

    @property
    def gaussian(self) -> bool:
        return self.settings.gaussian

    def close(self) -> None:
        with self.am.stream_scope(self.stream):
            for nets in self.networks.values():
                nets.close()
            self.free_cached_memory()

    def free_cached_memory(self) -> None:
        """Return what the engines and CuPy's pool cache to the device; the predictor stays loaded.

        After a GPU out-of-memory error (before the retry), and between the benchmark's cases so
        that each starts from the same idle baseline whatever the backend.
        """
        with self.am.stream_scope(self.stream):
            for nets in self.networks.values():
                nets.free_cached_memory()
            self.am.free_cached_memory()

    def predict(self, volume: Volume, *, check_intensities: bool = True,
                roi_box_zyx: tuple[tuple[int, int], ...] | None = None) -> Prediction:
        """Segment one scan. GPU out of memory: retried with one tile per batch, then on the CPU (logged).

        ``roi_box_zyx`` ([start, stop) per axis of the stage's (z, y, x) view) replaces the ROI
        stage: for timing nets without trained weights on a known abdomen, or for ablations.
        ``check_intensities`` refuses images that are not CT in Hounsfield units (CT packages only).
        """
        if volume.data.ndim != 3:
            raise InputError(volume.source, f"expected a 3D image, got shape {volume.data.shape}")
        self.check_memory(volume)
        blas_threads = self.threads if self.am.name == "numpy" else None
        with self.am.stream_scope(self.stream), _BlasThreads.limited(blas_threads):
            return self._predict_retrying(volume, check_intensities, roi_box_zyx)

    def check_memory(self, volume: Volume) -> None:
        """Refuse a scan whose resampled grids would need more than the memory limit (before allocating them)."""
        view = VoxelView.of(volume, self.manifest.detail)
        # The shape of the stage's view, from a view of one byte: nothing the size of the scan is allocated.
        shape_zyx = view.forward(np.broadcast_to(np.zeros((), np.uint8), volume.shape)).shape
        estimate = estimate_memory(shape_zyx, view.spacing_zyx, self.manifest, self.settings)
        limit = self.max_memory if self.max_memory is not None else default_limit_bytes()
        log.debug("%s: estimated peak memory %.2f GiB %s (limit %s)", volume.source or "image", estimate.total / 2**30,
                  estimate.parts, limit)
        check_memory(estimate, limit, volume.source, view.spacing_zyx, given=self.max_memory is not None)

    def _predict_retrying(self, volume: Volume, check_intensities: bool,
                          roi_box_zyx: tuple[tuple[int, int], ...] | None) -> Prediction:
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
            self.free_cached_memory()
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

    # ------------------------------------------------------------------------------------------------ stages

    def _cpu_predictor(self) -> CascadePredictor:
        if self._cpu is None:
            s = self.settings
            self._cpu = CascadePredictor(self.package_dir, device="cpu", backend="auto", overlap=s.overlap,
                                         gaussian=s.gaussian, mirroring=s.mirroring,
                                         back_resampling=s.back_resampling, batch_size=1, threads=self.threads,
                                         progress=self.progress, max_memory=self.max_memory,
                                         trusted_keys=self.trusted_keys)
        return self._cpu

    def _sync_time(self, start: float) -> float:
        self.am.synchronize()
        return time.perf_counter() - start

    @contextmanager
    def _timed(self, timings: dict[str, float], key: str) -> Iterator[None]:
        """Add the (synchronised) time of the block to ``timings[key]``: the per-stage profile."""
        start = time.perf_counter()
        yield
        timings[key] = timings.get(key, 0.0) + self._sync_time(start)

    def _network_input(self, stage: Stage, region: Any, spacing_zyx) -> Any:
        """The stage's normalised input on its own grid, from a raw (z, y, x) region."""
        new_shape = target_shape(region.shape, spacing_zyx, stage.spacing_mm_zyx)
        axis = separate_z_axis(spacing_zyx, stage.spacing_mm_zyx)
        image, prepare = normalizer(stage, region, am=self.am)
        return resample_image(image, new_shape, order=3, separate_z=axis, prepare=prepare, am=self.am)

    def _stage_labels(self, stage: Stage, net_input: Any, batch: int, back: str) -> Any:
        """The sliding window over the stage's grid: uint8 labels, or (back == "logits") the blended logits."""
        am, s = self.am, self.settings
        nets = self.networks[stage.name]
        step_batch = min(batch, nets.max_batch or batch)
        if back == "logits":
            window = dict(overlap=s.overlap, gaussian=s.gaussian, am=am, progress=self.progress,
                          nnunet_half=s.nnunet_numerics)
            if not (s.nnunet_numerics and len(nets.engines) > 1):
                return sliding_window_predict(net_input, stage.patch_zyx, nets, stage.num_classes,
                                              batch_size=step_batch, **window)
            # nnU-Net blends every fold on its own in float16 and sums the folds' logits in float16.
            total = None
            for engine in nets.engines:
                one = StageNetworks([engine], nets.mirror_axes, am)
                logits = sliding_window_predict(net_input, stage.patch_zyx, one, stage.num_classes,
                                                batch_size=min(batch, one.max_batch or batch), **window)
                total = logits if total is None else total.__iadd__(logits)
            total /= am.xp.float16(len(nets.engines))
            return total
        # float16 accumulation halves the largest buffer where the network itself runs in fp16; not with
        # Gaussian weights, whose products at the tile borders (~1e-7) underflow in float16.
        acc = am.xp.float16 if nets.plain and nets.precision == "fp16" and not s.gaussian else am.xp.float32
        return sliding_window_labels(net_input, stage.patch_zyx, nets, stage.num_classes, overlap=s.overlap,
                                     gaussian=s.gaussian, batch_size=step_batch, am=am, progress=self.progress,
                                     accumulate_dtype=acc)

    def _segment_region(self, stage: Stage, region: Any, spacing_zyx, batch: int, back: str,
                        timings: dict[str, float]) -> Any:
        """uint8 labels of ``stage`` on the grid of a raw (z, y, x) region (crop to non-zero where the stage does)."""
        am = self.am
        with self._timed(timings, f"{stage.name}.resample"):
            inner = nonzero_box(region, am) if stage.crop_to_nonzero else tuple(slice(0, n) for n in region.shape)
            sub = region[inner]
            net_input = self._network_input(stage, sub, spacing_zyx)
        with self._timed(timings, f"{stage.name}.net"):
            result = self._stage_labels(stage, net_input, batch, back)
        del net_input
        back_axis = separate_z_axis(stage.spacing_mm_zyx, spacing_zyx)
        with self._timed(timings, f"{stage.name}.back"):
            if back == "logits":
                labels = resample_logits_to_labels(result, sub.shape, separate_z=back_axis, am=am,
                                                   round_to=am.xp.float16 if self.settings.nnunet_numerics else None)
            else:
                labels = resample_labels(result, sub.shape, separate_z=back_axis, am=am)
        del result
        if stage.crop_to_nonzero and tuple(labels.shape) != tuple(region.shape):
            # nnU-Net: everything outside the non-zero box is background.
            full = am.xp.zeros(region.shape, dtype=am.xp.uint8)
            full[inner] = labels
            return full
        return labels

    def _roi_box(self, image: Any, spacing_zyx, batch: int, warnings: list[str], name: str,
                 timings: dict[str, float]) -> tuple[slice, slice, slice]:
        """The abdomen box on the stage's view: ROI net, largest component, box + margin (mm)."""
        am = self.am
        roi = self.manifest.roi
        with self._timed(timings, "roi.resample"):
            net_input = self._network_input(roi, image, spacing_zyx)
        with self._timed(timings, "roi.net"):
            roi_labels = self._stage_labels(roi, net_input, batch, "labels")
        del net_input
        with self._timed(timings, "roi.box"):
            roi_labels = keep_largest_components((roi_labels > 0).astype(am.xp.uint8), (1,), am)
            box = bounding_box(roi_labels > 0, am)
        shape = image.shape
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
        small = {}
        if rules.tumor_label is not None and rules.tumor_min_volume_mm3 > 0:
            small[rules.tumor_label] = math.ceil(rules.tumor_min_volume_mm3 / float(np.prod(spacing_zyx)))
        return clean_components(labels, rules.largest_component_labels, small, self.am)

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
        if check_intensities and self.manifest.is_ct:
            check_ct_intensities(float(device_data.min()), float(device_data.max()), volume.source)
        detail = self.manifest.detail
        view = VoxelView.of(volume, detail)
        image = view.forward(device_data)
        spacing = view.spacing_zyx
        timings["upload"] = self._sync_time(start)

        t = time.perf_counter()
        if roi_box_zyx is not None:
            box = _given_box(roi_box_zyx, image.shape, volume.source)
            warnings.append("ROI stage skipped: the ROI box was given")
        elif self.manifest.roi is not None:
            box = self._roi_box(image, spacing, batch, warnings, name, timings)
        else:
            box = tuple(slice(0, n) for n in image.shape)
        timings["roi"] = self._sync_time(t)

        t = time.perf_counter()
        crop_labels = self._segment_region(detail, image[box], spacing, batch, self.settings.back_resampling,
                                           timings)
        if self.manifest.output_labels:  # the model's classes -> the package's labels
            crop_labels = xp.asarray(np.asarray(self.manifest.output_labels, dtype=np.uint8))[crop_labels]
        timings["detail"] = self._sync_time(t)

        t = time.perf_counter()
        with self._timed(timings, "postprocess.components"):
            self._postprocess(crop_labels, spacing)
        # The output is allocated in the file's voxel order and memory layout (NIfTI: first index fastest)
        # and filled through the stage's view, so neither the download nor the writer transposes it
        # (a transposing copy of a 512x512x215 label map alone takes 0.4 s).
        layout = "F" if volume.data.flags.f_contiguous and not volume.data.flags.c_contiguous else "C"
        full = xp.zeros(volume.shape, dtype=xp.uint8, order=layout)
        view.forward(full)[box] = crop_labels
        del crop_labels, image, device_data
        labels = am.to_host(full)
        del full
        timings["postprocess"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - start
        return Prediction(labels, timings, tuple((s.start, s.stop) for s in box), self.device, self.backend, warnings)


def _settings(package: Inference, *, fast: bool, overlap: float | None, gaussian: bool | None,
              mirroring: bool | None, back_resampling: str | None) -> Inference:
    """The package's inference settings (or the paper's with ``fast``), with the caller's explicit choices."""
    base = FAST if fast else package
    chosen = replace(base, **{k: v for k, v in (("overlap", overlap), ("gaussian", gaussian), ("mirroring", mirroring),
                                                 ("back_resampling", back_resampling)) if v is not None})
    try:
        overlap_value = check_overlap(chosen.overlap)
    except ValueError as exc:
        raise InputError(None, str(exc)) from None
    if chosen.back_resampling not in BACK_RESAMPLING:
        raise InputError(None, f"back_resampling must be one of {', '.join(BACK_RESAMPLING)}, "
                               f"got {chosen.back_resampling!r}")
    return replace(chosen, overlap=overlap_value, gaussian=bool(chosen.gaussian), mirroring=bool(chosen.mirroring))
