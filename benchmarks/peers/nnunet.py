"""nnU-Net v2's predictor running the cascade of a pocketseg model package: the benchmarks' peer.

The paper compares its runtime with "nnU-Net v2's predictor running the same
networks with the same weights (tile step 1, no TTA)". :class:`NnUNetCascade`
does that the way an nnU-Net user would script a two-stage cascade: for each
stage it writes nnU-Net plans (spacing, patch, CTNormalization with the stage's
intensity statistics, nnU-Net's default resampling functions), rebuilds the
stage's Pocket U-Net from the manifest with the package's safetensors weights,
hands both to ``nnUNetPredictor.manual_initialization`` and calls
``predict_single_npy_array``. Everything between the two predictor calls (ROI
box, crop, paste, post-processing) is plain NumPy/SciPy written here once::

    peer = NnUNetCascade("model/", device="cpu")
    labels = peer.predict(load_volume("ct.nii.gz"))   # uint8, the volume's (i, j, k) order
    peer.last_timings                                 # seconds per step

Axis order: the volume is reoriented to the canonical RAS grid and transposed
to (z, y, x), exactly as nnU-Net's ``NibabelIOWithReorient`` reader does and as
pocketseg's package spacings are ordered, so the plans use ``transpose_forward
= [0, 1, 2]`` and ``properties['spacing']`` is (z, y, x).

What nnU-Net does differently from pocketseg's runtime (see the module
:mod:`pocketseg.runtime.resample`; the benchmark report should say so):

* it crops each stage's input to the bounding box of its non-zero voxels
  (holes filled) before anything else and pastes background outside it;
* image resampling is skimage ``resize`` (cubic, float64, edge mode) whose
  output is clipped to the input's value range (per slice when the thick axis
  is resampled separately); pocketseg's float32 splines are not clipped;
* tiles' logits are accumulated in float16 (also on the CPU);
* logits, not labels, are resampled back to the stage's input grid, linearly
  (nearest along a thick axis) and stored as float16, then argmaxed;
* on CUDA the network runs under ``torch.autocast`` (fp16 mixed precision);
* it sets torch's thread count to ``min(8, current)`` for the tiles and to 8
  (``nnUNet_def_n_proc``) while exporting, restoring it afterwards.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from safetensors.torch import load_file
from scipy import ndimage as ndi

from pocketseg import labels as L
from pocketseg.errors import InputError, MissingDependencyError
from pocketseg.geometry import grow_box
from pocketseg.manifest import Manifest, PostProcess, Stage, load_package
from pocketseg.runtime.network import PocketUNet, stage_config
from pocketseg.types import Affine, ArrayZYX, LabelMap, Spacing3
from pocketseg.volume import Volume, canonical_zyx

__all__ = [
    "CONFIGURATION",
    "NnUNetCascade",
    "build_network",
    "from_canonical_zyx",
    "postprocess",
    "roi_box",
    "stage_dataset_json",
    "stage_plans",
]

log = logging.getLogger(__name__)

#: The nnU-Net configuration name each stage's plans hold.
CONFIGURATION = "3d_fullres"
#: nnU-Net trainer name recorded with the predictor (informative only with manual initialisation).
TRAINER_NAME = "nnUNetTrainer"
#: Labels of the ROI stage: every FLARE class merged into one foreground (see trainer.data.stage_target).
ROI_LABELS = {"background": L.BACKGROUND, "foreground": 1}
#: Full 26-connectivity for every connected-component step.
CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)

# nnU-Net's default resampling, as ExperimentPlanner.determine_resampling and
# determine_segmentation_softmax_export_fn write it into plans.json.
_RESAMPLING_FN = "resample_data_or_seg_to_shape"
RESAMPLING_DATA_KWARGS = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
RESAMPLING_SEG_KWARGS = {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None}
RESAMPLING_PROBABILITIES_KWARGS = {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None}


def _require_nnunet():
    try:  # optional (peers extra): a missing nnU-Net is named with its extra
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    except ImportError:
        raise MissingDependencyError("nnunetv2", "The nnU-Net v2 peer pipeline", "peers") from None
    return nnUNetPredictor, PlansManager


# --------------------------------------------------------------------------- plans


def stage_dataset_json(stage: Stage) -> dict[str, Any]:
    """The nnU-Net ``dataset.json`` of one stage: one CT channel and the stage's labels."""
    labels = dict(ROI_LABELS) if stage.name == "roi" else L.dataset_json_labels()
    if len(labels) != stage.num_classes:
        raise InputError(None, f"stage {stage.name!r} has {stage.num_classes} classes, but its nnU-Net labels are "
                               f"{sorted(labels, key=labels.get)}")
    return {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 0, "file_ending": ".nii.gz"}


def stage_plans(stage: Stage) -> dict[str, Any]:
    """nnU-Net v2 plans for one cascade stage, in the format of ``nnUNetPlans.json``.

    Only what inference reads is meaningful: transpose, spacing, patch, normalisation
    with the stage's intensity statistics, and the resampling functions. The
    ``architecture`` entry records the Pocket U-Net for readers; the predictor is given
    the network itself (manual initialisation) and never builds one from it.
    """
    spacing = [float(s) for s in stage.spacing_mm_zyx]
    patch = [int(p) for p in stage.patch_zyx]
    intensity = {"mean": float(stage.intensity.mean), "std": float(stage.intensity.std),
                 "percentile_00_5": float(stage.intensity.percentile_00_5),
                 "percentile_99_5": float(stage.intensity.percentile_99_5)}
    configuration = {
        "data_identifier": f"pocketseg_{stage.name}_{CONFIGURATION}",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 1,
        "patch_size": patch,
        "median_image_size_in_voxels": patch,
        "spacing": spacing,
        "normalization_schemes": ["CTNormalization"],
        "use_mask_for_norm": [False],
        "resampling_fn_data": _RESAMPLING_FN,
        "resampling_fn_seg": _RESAMPLING_FN,
        "resampling_fn_data_kwargs": dict(RESAMPLING_DATA_KWARGS),
        "resampling_fn_seg_kwargs": dict(RESAMPLING_SEG_KWARGS),
        "resampling_fn_probabilities": _RESAMPLING_FN,
        "resampling_fn_probabilities_kwargs": dict(RESAMPLING_PROBABILITIES_KWARGS),
        "architecture": {
            "network_class_name": "pocketseg.runtime.network.PocketUNet",
            "arch_kwargs": {"width": stage.network.width, "kernels": [list(k) for k in stage.network.kernels],
                            "strides": [list(s) for s in stage.network.strides],
                            "channels_growth": stage.network.channels_growth},
            "_kw_requires_import": [],
        },
        "batch_dice": False,
    }
    return {
        "dataset_name": f"Dataset000_pocketseg_{stage.name}",
        "plans_name": "pocketsegPeerPlans",
        "original_median_spacing_after_transp": spacing,
        "original_median_shape_after_transp": patch,
        # The reader whose axis order (canonical RAS, transposed to z, y, x) the arrays given here follow.
        "image_reader_writer": "NibabelIOWithReorient",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {CONFIGURATION: configuration},
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": intensity},
    }


def build_network(package_dir: str | os.PathLike, stage: Stage):
    """The stage's Pocket U-Net with the package's safetensors weights, eval mode, full-resolution output only.

    Returns (network, state_dict); the predictor reloads the state_dict before each prediction.
    """
    if "torch" not in stage.files:
        raise InputError(package_dir, f"stage {stage.name!r} has no torch weights (safetensors) in the package")
    net = PocketUNet(stage_config(stage), deep_supervision=False)
    path = Path(package_dir) / stage.files["torch"]
    weights = {k: v.to(torch.float32) for k, v in load_file(str(path)).items()}
    try:
        net.load_state_dict(weights)
    except RuntimeError as exc:
        raise InputError(path, f"weights do not fit the manifest's network ({str(exc).splitlines()[0]})") from None
    return net.eval(), weights


# --------------------------------------------------------------------------- geometry and post-processing


def from_canonical_zyx(array_zyx: ArrayZYX, affine: Affine) -> np.ndarray:
    """Inverse of :func:`pocketseg.volume.canonical_zyx`: back to the file's (i, j, k) order.

    The same transform as nnU-Net's ``NibabelIOWithReorient.write_seg``.
    """
    ornt = nib.orientations.io_orientation(affine)
    from_ras = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), ornt)
    return nib.orientations.apply_orientation(np.asarray(array_zyx).transpose(2, 1, 0), from_ras)


def _largest_component(mask: np.ndarray) -> np.ndarray | None:
    """The largest 26-connected component of ``mask``, or None when it is empty."""
    lab, n = ndi.label(mask, structure=CONNECTIVITY_26)
    if n == 0:
        return None
    if n == 1:
        return lab > 0
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def roi_box(foreground: np.ndarray, spacing_mm_zyx: Spacing3, margin_mm: float) -> tuple[slice, slice, slice]:
    """Bounding box of the largest 26-connected foreground component plus ``margin_mm``, clipped to the volume.

    The margin is converted to whole voxels per axis, rounding outwards, by the one rule of
    :func:`pocketseg.geometry.grow_box`. No foreground: the whole volume.
    """
    largest = _largest_component(foreground)
    if largest is None:
        return tuple(slice(0, int(s)) for s in foreground.shape)  # type: ignore[return-value]
    box = ndi.find_objects(largest.astype(np.uint8))[0]
    return grow_box(box, spacing_mm_zyx, margin_mm, foreground.shape)


def postprocess(labels: LabelMap, spacing_mm_zyx: Spacing3, rules: PostProcess) -> LabelMap:
    """The cascade's post-processing, in place: largest component per organ, small tumors removed.

    Each label in ``rules.largest_component_labels`` keeps only its largest
    26-connected component; tumor (14) components smaller than
    ``rules.tumor_min_volume_mm3`` are removed. Removed voxels become background.
    """
    boxes = ndi.find_objects(labels)  # per label value, its bounding box (None when absent)
    for c in rules.largest_component_labels:
        if c < 1 or c > len(boxes) or boxes[c - 1] is None:
            continue
        box = boxes[c - 1]
        region = labels[box]
        mask = region == c
        keep = _largest_component(mask)
        region[mask & ~keep] = L.BACKGROUND
    if L.TUMOR <= len(boxes) and boxes[L.TUMOR - 1] is not None:
        box = boxes[L.TUMOR - 1]
        region = labels[box]
        lab, n = ndi.label(region == L.TUMOR, structure=CONNECTIVITY_26)
        voxel_mm3 = float(np.prod(spacing_mm_zyx))
        sizes_mm3 = np.bincount(lab.ravel(), minlength=n + 1) * voxel_mm3
        small = np.flatnonzero(sizes_mm3 < rules.tumor_min_volume_mm3)
        small = small[small > 0]
        if small.size:
            region[np.isin(lab, small)] = L.BACKGROUND
    return labels


# --------------------------------------------------------------------------- the cascade


def _check_device(device: Any):
    try:
        dev = device if isinstance(device, torch.device) else torch.device(str(device))
    except (RuntimeError, TypeError, ValueError):
        raise InputError(None, f"device must be 'cpu' or 'cuda[:N]', got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise InputError(None, f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(None, f"device {device!r} was asked for, but torch sees no CUDA GPU")
    return dev


def _check_step(tile_step_size: Any) -> float:
    try:
        value = float(tile_step_size)
    except (TypeError, ValueError):
        raise InputError(None, f"tile_step_size must be a number in (0, 1], got {tile_step_size!r}") from None
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise InputError(None, f"tile_step_size must be in (0, 1], got {tile_step_size!r}")
    return value


class NnUNetCascade:
    """The ROI -> detail cascade of a model package, each stage run by ``nnUNetPredictor``.

    The sliding window is the package's own (manifest ``inference``) unless given: tile step ``1 - overlap``
    and its Gaussian blending or not, so the peer does the work pocketseg's runtime does with the same package.
    ``tile_step_size=1.0`` (no tile overlap beyond what covering the volume needs),
    ``use_gaussian=False`` and no mirroring are the paper's peer settings (the package default). ``device``
    is ``"cpu"`` or ``"cuda[:N]"``; on CUDA everything stays on the GPU
    (``perform_everything_on_device``), as nnU-Net's default, and nnU-Net runs the
    network under autocast. After :meth:`predict`, :attr:`last_timings` holds the
    seconds of each step: ``reorient`` (both ways), ``roi`` (predictor + ROI box),
    ``detail``, ``postprocess`` and ``total``.
    """

    def __init__(self, package_dir: str | os.PathLike, *, device: str = "cpu", tile_step_size: float | None = None,
                 use_gaussian: bool | None = None, verbose: bool = False):
        nnUNetPredictor, PlansManager = _require_nnunet()
        self.package_dir = Path(package_dir)
        self.manifest: Manifest = load_package(self.package_dir)
        self.device = _check_device(device)
        inference = self.manifest.inference
        self.tile_step_size = _check_step(1.0 - inference.overlap if tile_step_size is None else tile_step_size)
        self.use_gaussian = bool(inference.gaussian if use_gaussian is None else use_gaussian)
        self.verbose = bool(verbose)
        self.last_timings: dict[str, float] = {}
        self.predictors: dict[str, Any] = {}
        for name, stage in self.manifest.stages.items():
            plans_manager = PlansManager(stage_plans(stage))
            network, weights = build_network(self.package_dir, stage)
            # nnU-Net prints (not logs) a notice on every non-CUDA predictor it builds.
            with contextlib.redirect_stdout(io.StringIO()) as said:
                predictor = nnUNetPredictor(tile_step_size=self.tile_step_size, use_gaussian=self.use_gaussian,
                                            use_mirroring=False,
                                            perform_everything_on_device=self.device.type == "cuda",
                                            device=self.device, verbose=self.verbose,
                                            verbose_preprocessing=self.verbose, allow_tqdm=self.verbose)
            if said.getvalue().strip():
                log.debug("nnU-Net: %s", said.getvalue().strip())
            predictor.manual_initialization(network.to(self.device), plans_manager,
                                            plans_manager.get_configuration(CONFIGURATION), [weights],
                                            stage_dataset_json(stage), TRAINER_NAME,
                                            inference_allowed_mirroring_axes=None)
            self.predictors[name] = predictor
        log.info("nnU-Net peer: package %s, device %s, tile step %g, gaussian %s, torch threads %d",
                 self.package_dir, self.device, self.tile_step_size, self.use_gaussian, torch.get_num_threads())

    def predict_stage(self, name: str, image_zyx: ArrayZYX, spacing_mm_zyx: Spacing3) -> LabelMap:
        """One stage's labels on the grid of ``image_zyx`` (canonical z, y, x), via ``predict_single_npy_array``."""
        predictor = self.predictors[name]
        # A fresh properties dict each call: nnU-Net's preprocessor writes its crop and shapes into it.
        properties = {"spacing": [float(s) for s in spacing_mm_zyx]}
        seg = predictor.predict_single_npy_array(np.asarray(image_zyx)[None], properties, None, None, False)
        return np.asarray(seg, dtype=np.uint8)

    def predict(self, volume: Volume, roi_box_zyx: Sequence[Sequence[int]] | None = None) -> LabelMap:
        """uint8 FLARE 2023 labels of ``volume``, same shape and (i, j, k) voxel order as ``volume.data``.

        ``roi_box_zyx`` ([start, stop) per canonical axis) replaces the ROI stage, as in pocketseg's
        ``CascadePredictor.predict``, so that both pipelines can segment the same crop.
        """
        data = getattr(volume, "data", None)
        if getattr(data, "ndim", None) != 3:
            raise InputError(getattr(volume, "source", None),
                             f"expected a 3D volume, got shape {getattr(data, 'shape', None)}")
        timings: dict[str, float] = {}
        start = time.perf_counter()
        image, spacing = canonical_zyx(volume)
        timings["reorient"] = time.perf_counter() - start

        t = time.perf_counter()
        if roi_box_zyx is None:
            roi = self.predict_stage("roi", image, spacing)
            box = roi_box(roi > 0, spacing, self.manifest.roi_margin_mm)
            del roi
        else:
            box = tuple(slice(int(a), int(b)) for a, b in roi_box_zyx)
        timings["roi"] = time.perf_counter() - t

        t = time.perf_counter()
        detail = self.predict_stage("detail", image[box], spacing)
        timings["detail"] = time.perf_counter() - t

        t = time.perf_counter()
        postprocess(detail, spacing, self.manifest.postprocess)
        labels = np.zeros(image.shape, dtype=np.uint8)
        labels[box] = detail
        timings["postprocess"] = time.perf_counter() - t

        t = time.perf_counter()
        out = np.ascontiguousarray(from_canonical_zyx(labels, volume.affine), dtype=np.uint8)
        timings["reorient"] += time.perf_counter() - t
        timings["total"] = time.perf_counter() - start
        self.last_timings = timings
        log.info("nnU-Net peer: %s; ROI box %s of %s", ", ".join(f"{k} {v:.3f} s" for k, v in timings.items()),
                 [(s.start, s.stop) for s in box], list(image.shape))
        return out
