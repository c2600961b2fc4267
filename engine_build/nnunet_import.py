"""Import a trained nnU-Net v2 model: a results folder in, a model package out (``pocketseg import-nnunet``).

A results folder is ``.../DatasetXXX_Name/Trainer__Plans__Configuration/`` with
``dataset.json``, ``plans.json`` and ``fold_*/checkpoint_*.pth`` (``fold_all``
included). The import reads the plans (both layouts: ``architecture`` with
``network_class_name``/``arch_kwargs``, and the older ``UNet_class_name`` keys;
``inherits_from`` resolved), rebuilds the network with pocketseg's own
definition (:mod:`pocketseg.runtime.network`: nnU-Net's PlainConvUNet and
ResidualEncoderUNet, any number of stages, per-stage channels and conv counts),
maps the checkpoint's weights onto it (loaded without executing pickled code),
and writes a package through the one package writer
(:func:`pocketseg.engine_build.export.write_package`): ONNX, fp16 ONNX and
weights of every fold, checked, with a format-2 manifest that records what the
runtime needs to reproduce ``nnUNetPredictor``: the label set, the
normalisation, the voxel order of nnU-Net's reader and the plans' transposes,
the crop to non-zero, the allowed mirroring axes, the folds, and nnU-Net's
inference settings (overlap 0.5, Gaussian, mirroring, logits back), plus a
source record with the SHA-256 of the files it came from.

What nnU-Net can do and this runtime cannot is refused with one line: 2D
configurations, nnU-Net's own lowres-to-fullres cascade, region-based labels,
more than one input channel, other network classes, and trainers that build a
network other than the plans' (STU-Net, MedNeXt, ...).

When nnU-Net itself is installed, the converted network is checked against
nnU-Net's own network built from the same plans and weights (logits on a random
input), and the difference is recorded in ``export_report.json``.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pocketseg import labels as L
from pocketseg.atomic import read_json
from pocketseg.engine_build.export import OPSET, ExportCheckError, StageExport, check_opset, write_package
from pocketseg.errors import InputError
from pocketseg.geometry import ROI_MARGIN_MM
from pocketseg.manifest import Inference, Intensity, Network, Normalization, PostProcess, sha256_file
from pocketseg.runtime.network import PocketUNet, UNetConfig
from pocketseg.signing import check_signing_key

__all__ = ["ResultsFolder", "convert_state_dict", "import_nnunet", "load_nnunet_checkpoint", "map_labels", "open_results",
           "resolve_configuration", "unet_config"]

log = logging.getLogger(__name__)

#: nnU-Net's network classes this import rebuilds -> the encoder kind of :class:`UNetConfig`.
NETWORK_CLASSES = {"PlainConvUNet": "plain", "ResidualEncoderUNet": "residual"}
#: nnU-Net's normalisation classes -> the package's scheme names.
NORMALIZATIONS = {"CTNormalization": "ct", "ZScoreNormalization": "zscore",
                  "RescaleTo01Normalization": "rescale_to_0_1", "NoNormalization": "none"}
#: Readers whose voxel order the runtime reproduces: the file's own order, or the nearest RAS grid.
READER_VOXEL_ORDERS = {"SimpleITKIO": "native", "NibabelIO": "native", "NibabelIOWithReorient": "RAS"}
#: Trainers known to build a network of their own rather than the plans' (refused before their weights are read).
FOREIGN_TRAINERS = ("STUNet", "MedNeXt", "SwinUNETR", "UNETR", "UMamba", "Primus", "SegResNet", "nnFormer", "CoTr",
                    "LightMUNet", "UXNet")
RESAMPLING_FN = "resample_data_or_seg_to_shape"
FOLD_PATTERN = re.compile(r"fold_(\d+|all)$")
#: nnU-Net's imports of the network's ops, as the plans name them; anything else is refused.
EXPECTED_OPS = {"conv_op": "Conv3d", "norm_op": "InstanceNorm3d", "nonlin": "LeakyReLU"}


# ------------------------------------------------------------------------------------------------- the results folder

@dataclass(frozen=True)
class ResultsFolder:
    """What an nnU-Net v2 results folder holds, read and checked."""

    path: Path
    dataset: dict[str, Any]
    plans: dict[str, Any]
    trainer: str
    plans_name: str
    configuration: str
    config: dict[str, Any]  # the configuration with inherits_from resolved
    checkpoints: tuple[tuple[str, Path], ...]  # (fold folder name, checkpoint file)
    states: tuple[dict[str, Any], ...] = field(default=(), repr=False)  # the loaded checkpoints, in that order


def resolve_configuration(plans: dict[str, Any], name: str, source: Path | None = None) -> dict[str, Any]:
    """The configuration ``name`` of ``plans`` with its ``inherits_from`` chain merged (nearest wins)."""
    configs = plans.get("configurations")
    if not isinstance(configs, dict) or name not in configs:
        known = ", ".join(configs) if isinstance(configs, dict) else "none"
        raise InputError(source, f"plans have no configuration {name!r} (configurations: {known})")
    chain, current = [], name
    while current is not None:
        if current in chain:
            raise InputError(source, f"configuration {name!r}: inherits_from loops ({' -> '.join(chain + [current])})")
        if current not in configs:
            raise InputError(source, f"configuration {chain[-1]!r} inherits from {current!r}, which the plans lack")
        chain.append(current)
        current = configs[current].get("inherits_from")
    merged: dict[str, Any] = {}
    for part in reversed(chain):
        merged.update({k: v for k, v in configs[part].items() if k != "inherits_from"})
    return merged


def _fold_folders(path: Path, folds: Any) -> list[Path]:
    found = {m.group(1): p for p in sorted(path.iterdir()) if p.is_dir() and (m := FOLD_PATTERN.match(p.name))}
    if folds is None:  # nnU-Net's own choice: the numbered folds; fold_all where there are none
        numbered = sorted((k for k in found if k != "all"), key=int)
        chosen = numbered or (["all"] if "all" in found else [])
        if not chosen:
            raise InputError(path, "holds no fold_* folder: not an nnU-Net v2 results folder, or training has not "
                                   "finished a fold")
        return [found[k] for k in chosen]
    wanted = [str(f) for f in ([folds] if isinstance(folds, (str, int)) else folds)]
    if not wanted:
        raise InputError(None, "folds must name at least one fold (e.g. all, or 0 1 2 3 4)")
    missing = [f for f in wanted if f not in found]
    if missing:
        raise InputError(path, f"has no fold_{missing[0]} (folds here: {', '.join(sorted(found)) or 'none'})")
    return [found[f] for f in dict.fromkeys(wanted)]


def open_results(path: str | os.PathLike, *, folds: Any = None, checkpoint: str = "checkpoint_final.pth",
                 load: bool = True) -> ResultsFolder:
    """Read a results folder: dataset.json, plans.json, the configuration, the folds' checkpoints.

    ``folds``: None picks what nnU-Net's predictor picks (fold_0 .. fold_4 that exist, else fold_all);
    ``"all"`` is fold_all; numbers pick those folds. Every refusal is one :class:`InputError` naming the file.
    """
    root = Path(path)
    if not root.is_dir():
        raise InputError(root, "does not exist" if not root.exists() else "is not a folder")
    parts = root.name.split("__")
    if len(parts) != 3 or not all(parts):
        raise InputError(root, "is not an nnU-Net v2 results folder (its name is Trainer__Plans__Configuration, "
                               "e.g. nnUNetTrainer__nnUNetPlans__3d_fullres)")
    trainer, plans_name, configuration = parts
    for name in ("dataset.json", "plans.json"):
        if not (root / name).is_file():
            raise InputError(root, f"has no {name}: not a complete nnU-Net v2 results folder")
    dataset = read_json(root / "dataset.json")
    plans = read_json(root / "plans.json")
    config = resolve_configuration(plans, configuration, root / "plans.json")
    checkpoints = []
    for fold in _fold_folders(root, folds):
        file = fold / checkpoint
        if not file.is_file():
            present = ", ".join(sorted(p.name for p in fold.glob("checkpoint*.pth"))) or "no checkpoint"
            raise InputError(file, f"does not exist ({fold.name} holds {present}); pick one with --checkpoint")
        checkpoints.append((fold.name, file))
    results = ResultsFolder(root, dataset, plans, trainer, plans_name, configuration, config, tuple(checkpoints))
    check_supported(results)
    if not load:
        return results
    states = tuple(load_nnunet_checkpoint(file) for _, file in checkpoints)
    return ResultsFolder(root, dataset, plans, trainer, plans_name, configuration, config, tuple(checkpoints), states)


def _op_name(value: Any) -> str:
    return str(value).rsplit(".", 1)[-1] if value is not None else "None"


def check_supported(results: ResultsFolder) -> None:
    """Refuse, with one clear line each, what the runtime cannot reproduce."""
    root, config, dataset = results.path, results.config, results.dataset
    plans_file = root / "plans.json"
    if any(pattern.lower() in results.trainer.lower() for pattern in FOREIGN_TRAINERS):
        raise InputError(root, f"trainer {results.trainer} builds its own network, not the plans' U-Net; pocketseg "
                               "imports PlainConvUNet and ResidualEncoderUNet models")
    patch = config.get("patch_size", [])
    if len(patch) == 2:
        raise InputError(plans_file, f"configuration {results.configuration} is 2D; pocketseg runs 3D models "
                                     "(import a 3d_fullres or 3d_lowres configuration)")
    if len(patch) != 3:
        raise InputError(plans_file, f"configuration {results.configuration} has no 3D patch_size ({patch!r})")
    if config.get("previous_stage"):
        raise InputError(plans_file, f"configuration {results.configuration} is the second stage of nnU-Net's own "
                                     f"cascade (after {config['previous_stage']}); import a single-stage configuration "
                                     "(3d_fullres), and a ROI model with --roi if a cascade is wanted")
    labels = dataset.get("labels", {})
    if not isinstance(labels, dict) or not labels:
        raise InputError(root / "dataset.json", "has no labels")
    if "regions_class_order" in dataset or any(isinstance(v, (list, tuple)) for v in labels.values()):
        raise InputError(root / "dataset.json", "has region-based labels (several classes per label); pocketseg "
                                                "imports models with one class per label")
    ids = sorted(int(v) for v in labels.values())
    if ids != list(range(len(ids))) or labels.get("background") != 0:
        raise InputError(root / "dataset.json", f"labels must be 0..N-1 with background 0, got {ids}")
    channels = dataset.get("channel_names", dataset.get("modality", {}))
    if len(channels) != 1:
        raise InputError(root / "dataset.json", f"the model takes {len(channels)} input channels "
                                                f"({', '.join(map(str, channels.values()))}); pocketseg runs "
                                                "single-channel models")
    schemes = config.get("normalization_schemes", [])
    if len(schemes) != 1 or schemes[0] not in NORMALIZATIONS:
        raise InputError(plans_file, f"normalization {schemes} is not one pocketseg reproduces "
                                     f"({', '.join(NORMALIZATIONS)})")
    for key in ("resampling_fn_data", "resampling_fn_probabilities"):
        if config.get(key, RESAMPLING_FN) != RESAMPLING_FN:
            raise InputError(plans_file, f"{key} is {config[key]}; pocketseg reproduces nnU-Net's default "
                                         f"{RESAMPLING_FN}")
    for key, order in (("resampling_fn_data_kwargs", 3), ("resampling_fn_probabilities_kwargs", 1)):
        kwargs = config.get(key, {})
        if kwargs.get("force_separate_z") is not None or kwargs.get("order", order) != order \
                or kwargs.get("order_z", 0) != 0:
            raise InputError(plans_file, f"{key} {kwargs} differs from nnU-Net's defaults (order {order}, order_z 0, "
                                         "force_separate_z None), which pocketseg reproduces")
    _network_class(results)
    reader = _reader(results)
    if reader not in READER_VOXEL_ORDERS:
        raise InputError(plans_file, f"image reader {reader} is not a NIfTI/DICOM-volume reader pocketseg reproduces "
                                     f"({', '.join(READER_VOXEL_ORDERS)})")


def _reader(results: ResultsFolder) -> str:
    return str(results.dataset.get("overwrite_image_reader_writer") or results.plans.get("image_reader_writer",
                                                                                         "SimpleITKIO"))


def _network_class(results: ResultsFolder) -> str:
    config, plans_file = results.config, results.path / "plans.json"
    arch = config.get("architecture")
    name = arch.get("network_class_name") if isinstance(arch, dict) else config.get("UNet_class_name")
    short = _op_name(name)
    if short not in NETWORK_CLASSES:
        raise InputError(plans_file, f"network class {name} is not one pocketseg rebuilds "
                                     f"({', '.join(NETWORK_CLASSES)})")
    if isinstance(arch, dict):
        kw = arch.get("arch_kwargs", {})
        for key, expected in EXPECTED_OPS.items():
            if _op_name(kw.get(key)) != expected:
                raise InputError(plans_file, f"{key} is {kw.get(key)}; pocketseg's networks use {expected}")
        if kw.get("dropout_op") is not None:
            raise InputError(plans_file, "networks with dropout are not imported (nnU-Net's defaults use none)")
        norm = kw.get("norm_op_kwargs") or {}
        if float(norm.get("eps", 1e-5)) != 1e-5 or not norm.get("affine", True):
            raise InputError(plans_file, f"norm_op_kwargs {norm} differ from InstanceNorm3d(eps=1e-5, affine=True)")
        slope = (kw.get("nonlin_kwargs") or {}).get("negative_slope", 0.01)
        if float(slope) != 0.01:
            raise InputError(plans_file, f"LeakyReLU negative_slope {slope} differs from nnU-Net's 0.01")
    return NETWORK_CLASSES[short]


# ------------------------------------------------------------------------------------------------------ the network

def unet_config(results: ResultsFolder) -> UNetConfig:
    """The :class:`UNetConfig` of the configuration's network (either plans layout)."""
    config = results.config
    num_classes = len(results.dataset["labels"])
    encoder = _network_class(results)
    arch = config.get("architecture")
    if isinstance(arch, dict):
        kw = arch["arch_kwargs"]
        kernels = [tuple(int(v) for v in k) for k in kw["kernel_sizes"]]
        strides = [tuple(int(v) for v in s) for s in kw["strides"]]
        features = tuple(int(f) for f in kw["features_per_stage"])
        enc = kw.get("n_blocks_per_stage") if encoder == "residual" else kw.get("n_conv_per_stage")
        dec = kw["n_conv_per_stage_decoder"]
        bias = bool(kw.get("conv_bias", True))
    else:  # nnU-Net v2 before 2.4: the network in separate keys
        kernels = [tuple(int(v) for v in k) for k in config["conv_kernel_sizes"]]
        strides = [tuple(int(v) for v in s) for s in config["pool_op_kernel_sizes"]]
        base, cap = int(config["UNet_base_num_features"]), int(config["unet_max_num_features"])
        features = tuple(min(base * 2**s, cap) for s in range(len(kernels)))
        enc = config["n_conv_per_stage_encoder"]
        dec = config["n_conv_per_stage_decoder"]
        bias = True
    if len(kernels) != len(strides) or len(features) != len(kernels):
        raise InputError(results.path / "plans.json", "kernel sizes, strides and features disagree in length")
    return UNetConfig(in_channels=1, num_classes=num_classes, width=features[0], kernels=tuple(kernels),  # type: ignore[arg-type]
                      strides=tuple(strides), features=features, encoder=encoder,  # type: ignore[arg-type]
                      encoder_convs=tuple(int(v) for v in enc), decoder_convs=tuple(int(v) for v in dec),
                      conv_bias=bias)


def _numpy_globals() -> list[Any]:
    """The numpy types nnU-Net's checkpoints pickle (a numpy scalar for the EMA, its dtype): the allow-list.

    Checkpoints written under numpy 1 name the scalar ``numpy.core.multiarray.scalar``; under numpy 2 it is
    ``numpy._core.multiarray.scalar``. Both names are allowed for the one function.
    """
    try:
        scalar = importlib.import_module("numpy._core.multiarray").scalar
    except (ImportError, AttributeError):  # numpy 1
        scalar = importlib.import_module("numpy.core.multiarray").scalar
    names: list[Any] = [scalar, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"),
                        np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        names += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return names


def load_nnunet_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """An nnU-Net checkpoint, loaded with ``weights_only=True`` (no pickled code runs) and a numpy allow-list."""
    file = Path(path)
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for damaged or foreign files
        raise InputError(file, f"is not a checkpoint pocketseg can read without running pickled code "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or not isinstance(state.get("network_weights"), dict):
        raise InputError(file, "is not an nnU-Net v2 checkpoint (no network_weights)")
    return state


_RULES = (  # nnU-Net's parameter names -> pocketseg's (canonical names only; aliases are skipped)
    (re.compile(r"encoder\.stem\.convs\.0\.(conv|norm)\.(.+)"), lambda m: f"encoder.stem.{_CN[m[1]]}.{m[2]}"),
    (re.compile(r"encoder\.stages\.(\d+)\.0\.convs\.(\d+)\.(conv|norm)\.(.+)"),
     lambda m: f"encoder.stages.{m[1]}.{m[2]}.{_CN[m[3]]}.{m[4]}"),
    (re.compile(r"encoder\.stages\.(\d+)\.blocks\.(\d+)\.(conv1|conv2)\.(conv|norm)\.(.+)"),
     lambda m: f"encoder.stages.{m[1]}.{m[2]}.{m[3]}.{_CN[m[4]]}.{m[5]}"),
    (re.compile(r"encoder\.stages\.(\d+)\.blocks\.(\d+)\.skip\.(\d+)\.(conv|norm)\.(.+)"),
     lambda m: f"encoder.stages.{m[1]}.{m[2]}.shortcut.{m[3]}.{_CN[m[4]]}.{m[5]}"),
    (re.compile(r"encoder\.stages\.(\d+)\.blocks\.(\d+)\.skip\.(conv|norm)\.(.+)"),
     lambda m: f"encoder.stages.{m[1]}.{m[2]}.shortcut.0.{_CN[m[3]]}.{m[4]}"),
    (re.compile(r"decoder\.stages\.(\d+)\.convs\.(\d+)\.(conv|norm)\.(.+)"),
     lambda m: f"decoder.stages.{m[1]}.{m[2]}.{_CN[m[3]]}.{m[4]}"),
    (re.compile(r"decoder\.transpconvs\.(\d+)\.(.+)"), lambda m: f"decoder.ups.{m[1]}.{m[2]}"),
    (re.compile(r"decoder\.seg_layers\.(\d+)\.(.+)"), lambda m: f"decoder.heads.{m[1]}.{m[2]}"),
)
_CN = {"conv": "0", "norm": "1"}
#: Parameter names nnU-Net stores twice (the same tensors under a second module path).
_ALIASES = (re.compile(r"\.all_modules\."), re.compile(r"^decoder\.encoder\."))


def convert_state_dict(state: dict[str, torch.Tensor], cfg: UNetConfig, source: Path | None = None
                       ) -> dict[str, torch.Tensor]:
    """nnU-Net's state_dict mapped onto :class:`PocketUNet` of ``cfg``, fp32; an :class:`InputError` if it does not fit."""
    converted: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if any(alias.search(key) for alias in _ALIASES):
            continue
        for pattern, target in _RULES:
            match = pattern.fullmatch(key)
            if match:
                converted[target(match)] = value.detach().to(torch.float32).contiguous()
                break
        else:
            unknown.append(key)
    expected = PocketUNet(cfg, deep_supervision=False).state_dict()
    missing = sorted(set(expected) - set(converted))
    shapes = [k for k in expected if k in converted and tuple(expected[k].shape) != tuple(converted[k].shape)]
    if unknown or missing or shapes:
        detail = "; ".join(part for part in (
            f"{len(unknown)} unexpected weights (e.g. {unknown[0]})" if unknown else "",
            f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
            f"{len(shapes)} of another shape (e.g. {shapes[0]})" if shapes else "") if part)
        raise InputError(source, "the checkpoint's network is not the plans' network (a trainer with a network of "
                                 f"its own?): {detail}")
    return {k: converted[k] for k in expected}


def build_network(cfg: UNetConfig, weights: dict[str, torch.Tensor]) -> PocketUNet:
    net = PocketUNet(cfg, deep_supervision=False)
    net.load_state_dict(weights)
    return net.eval()


def compare_with_nnunet(results: ResultsFolder, cfg: UNetConfig, net: PocketUNet, state: dict[str, Any],
                        seed: int = 0) -> dict[str, float] | None:
    """Max |Δlogit| between the converted network and nnU-Net's own network of the plans, when nnU-Net is installed.

    The input is random, of the smallest size every stage can pool (twice the total stride), so the check is cheap
    whatever the patch.
    """
    try:  # optional (peers extra): without nnU-Net there is nothing to compare with
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    except ImportError:
        return None
    try:
        manager = PlansManager(results.plans)
        configuration = manager.get_configuration(results.configuration)
        reference = get_network_from_plans(configuration.network_arch_class_name,
                                           configuration.network_arch_init_kwargs,
                                           configuration.network_arch_init_kwargs_req_import, 1, cfg.num_classes,
                                           allow_init=True, deep_supervision=False)
    except Exception as exc:  # noqa: BLE001 - nnU-Net may fail to build its own network here (a missing timm, ...)
        log.warning("%s: nnU-Net could not build its network for the comparison (%s: %s); not compared",
                    results.path, type(exc).__name__, exc)
        return {"nnunet_not_compared": f"{type(exc).__name__}: {exc}"}
    reference.load_state_dict(state["network_weights"])
    reference.eval()
    size = [2 * s for s in cfg.total_stride()]
    x = torch.from_numpy(np.random.default_rng(seed).normal(size=(1, 1, *size)).astype(np.float32))
    with torch.no_grad():
        ours, theirs = net(x), reference(x)
    if isinstance(theirs, (list, tuple)):
        theirs = theirs[0]
    diff = float((ours - theirs).abs().max())
    return {"nnunet_max_abs_logit_diff": diff, "nnunet_max_abs_logit": float(theirs.abs().max()),
            "nnunet_check_input_zyx": size}


# ------------------------------------------------------------------------------------------------------ the package

def _intensity(results: ResultsFolder) -> Intensity | None:
    if results.config["normalization_schemes"][0] != "CTNormalization":
        return None
    props = results.plans.get("foreground_intensity_properties_per_channel", {}).get("0")
    if not props:
        raise InputError(results.path / "plans.json", "CTNormalization without foreground_intensity_properties")
    return Intensity(mean=float(props["mean"]), std=float(props["std"]),
                     percentile_00_5=float(props["percentile_00_5"]), percentile_99_5=float(props["percentile_99_5"]))


def _mirror_axes(results: ResultsFolder) -> tuple[int, ...]:
    axes = [tuple(int(a) for a in (s.get("inference_allowed_mirroring_axes") or ())) for s in results.states]
    # nnU-Net's predictor takes the first checkpoint's axes; folds of one training agree.
    return axes[0] if axes else ()


def _sha256(results: ResultsFolder) -> dict[str, str]:
    files = [results.path / "dataset.json", results.path / "plans.json"] + [f for _, f in results.checkpoints]
    return {str(f.relative_to(results.path)): sha256_file(f) for f in files}


def _stage(results: ResultsFolder, name: str, voxel_order: str, report: dict[str, Any], check: bool
           ) -> StageExport:
    cfg = unet_config(results)
    members = []
    for (fold, file), state in zip(results.checkpoints, results.states):
        weights = convert_state_dict(state["network_weights"], cfg, file)
        net = build_network(cfg, weights)
        if check:
            compared = compare_with_nnunet(results, cfg, net, state)
            if compared is not None:
                report[f"{name}_{fold}_nnunet_network"] = compared
            if compared is not None and "nnunet_max_abs_logit_diff" in compared:
                tolerance = 1e-4 * max(1.0, compared["nnunet_max_abs_logit"])
                if compared["nnunet_max_abs_logit_diff"] > tolerance:
                    raise ExportCheckError(f"{file}: the converted network differs from nnU-Net's by "
                                           f"{compared['nnunet_max_abs_logit_diff']:.3g} (max |Δlogit|)")
        members.append((fold, net, weights))
    config = results.config
    scheme = NORMALIZATIONS[config["normalization_schemes"][0]]
    use_mask = bool((config.get("use_mask_for_norm") or [False])[0])
    fields = {"normalization": Normalization(scheme, use_mask), "voxel_order": voxel_order,
              "transpose_forward": tuple(int(a) for a in results.plans.get("transpose_forward", (0, 1, 2))),
              "crop_to_nonzero": True, "mirror_axes": _mirror_axes(results)}
    first, rest = members[0], tuple(members[1:])
    network = Network(width=cfg.stage_channels()[0], kernels=cfg.kernels, strides=cfg.strides,
                      features=tuple(cfg.stage_channels()), encoder=cfg.encoder,
                      convs_per_stage=tuple(cfg.encoder_depths()), convs_per_stage_decoder=tuple(cfg.decoder_depths()),
                      conv_bias=cfg.conv_bias)
    return StageExport(name=name, preset=f"nnunet:{results.trainer}__{results.plans_name}__{results.configuration}",
                       net=first[1], weights=first[2], network=network, num_classes=cfg.num_classes,
                       spacing_mm_zyx=tuple(float(v) for v in config["spacing"]),  # type: ignore[arg-type]
                       patch_zyx=tuple(int(v) for v in config["patch_size"]),  # type: ignore[arg-type]
                       intensity=_intensity(results), stage_fields=fields,
                       member_name=first[0].replace("fold_", "fold") if rest else "",
                       ensemble=tuple((f.replace("fold_", "fold"), n, w) for f, n, w in rest))


def _source(results: ResultsFolder, reader: str) -> dict[str, Any]:
    return {"kind": "nnunet", "results_folder": str(results.path.resolve()),
            "dataset": results.plans.get("dataset_name"), "trainer": results.trainer, "plans": results.plans_name,
            "configuration": results.configuration, "folds": [f for f, _ in results.checkpoints],
            "checkpoint": results.checkpoints[0][1].name, "reader": reader, "sha256": _sha256(results)}


def map_labels(source: dict[str, int], mapping: Any, file: Path | None = None
               ) -> tuple[dict[str, int], tuple[int, ...], list[str]]:
    """A model's labels mapped onto FLARE 2023's names: the package labels, the class -> label table, the dropped.

    ``mapping`` (``--labels MAP.json``) is ``{source: target}``: a source is a name of the model's
    ``dataset.json`` labels or its id (as a string), a target a FLARE 2023 label name (which gives
    its FLARE id) or null (dropped, written as background). Classes the mapping does not name are
    dropped too; the import lists them. Several classes may map to one label.
    """
    if not isinstance(mapping, dict) or not mapping:
        raise InputError(file, "must be a JSON object {model label name or id: FLARE label name or null}")
    by_id = {v: k for k, v in source.items()}
    table = [0] * len(source)
    named: set[int] = set()
    for key, target in mapping.items():
        cls = source.get(key, int(key) if str(key).isdigit() and int(key) in by_id else None)
        if cls is None:
            raise InputError(file, f"names {key!r}, which is not a label of the model "
                                   f"(its labels: {', '.join(list(source)[:30])}{' ...' if len(source) > 30 else ''})")
        if cls == 0:
            raise InputError(file, "maps the background; background is always 0")
        if cls in named:
            raise InputError(file, f"names the model's class {by_id[cls]} ({cls}) twice")
        named.add(cls)
        if target is None:
            continue
        if not isinstance(target, str) or target not in L.BY_NAME or target == "background":
            raise InputError(file, f"maps {key!r} to {target!r}, which is not a FLARE 2023 label name "
                                   f"({', '.join(n for n in L.BY_NAME if n != 'background')}) or null")
        table[cls] = L.BY_NAME[target].id
    labels = {"background": 0, **{lab.name: lab.id for lab in L.LABELS if lab.id in set(table) - {0}}}
    dropped = [f"{by_id[c]} ({c})" for c in sorted(by_id) if c != 0 and table[c] == 0]
    return labels, tuple(table), dropped


def import_nnunet(results: str | os.PathLike, out: str | os.PathLike, *, folds: Any = None,
                  checkpoint: str = "checkpoint_final.pth", orientation: str | None = None, tta: bool = True,
                  overlap: float = 0.5, roi: str | os.PathLike | None = None, roi_folds: Any = None,
                  fp16: bool = True, check: bool = True, strict: bool = False, overwrite: bool = False,
                  opset: int = OPSET, labels: str | os.PathLike | dict[str, Any] | None = None,
                  sign_key: str | os.PathLike | None = None) -> Path:
    """Turn a trained nnU-Net v2 model into a model package (``pocketseg import-nnunet``); returns its folder.

    Args:
        results: the results folder, ``.../DatasetXXX/Trainer__Plans__Configuration/``.
        out: the package folder to create.
        folds: None: as nnU-Net's predictor (fold_0..fold_4 that exist, else fold_all); ``"all"``: fold_all;
            numbers: those folds. Several folds are an ensemble whose logits are averaged, as nnU-Net does.
        checkpoint: the checkpoint file of each fold (``checkpoint_final.pth``, or ``checkpoint_best.pth``).
        orientation: the voxel order the model was trained in: ``native`` (the file's own, as nnU-Net's
            SimpleITKIO and NibabelIO read it) or ``RAS`` (NibabelIOWithReorient; TotalSegmentator's models).
            None: from the plans' reader.
        tta: test-time mirroring over the axes the checkpoint allows (nnU-Net's default).
        overlap: tile overlap of the sliding window (nnU-Net's tile step 0.5 is overlap 0.5).
        roi: another results folder to run first as the ROI stage (any of its labels is the region of
            interest); the model then segments the ROI box plus the ROI margin, as the paper's cascade does.
        roi_folds: the ROI model's folds, as ``folds``.
        fp16: also write mixed-precision fp16 ONNX (for TensorRT).
        check: check ONNX against torch, fp16 against fp32, and the converted network against nnU-Net's own
            (when nnU-Net is installed).
        strict: refuse when fp16, or bf16 where OpenVINO runs it natively, agrees with fp32 on fewer than 99.9 % of
            voxels.
        overwrite: replace an existing package folder.
        opset: ONNX opset, 17..20.
        labels: a label mapping (``MAP.json`` or its dictionary, see :func:`map_labels`): the package then
            writes FLARE 2023 label ids and names, so that statistics, previews and evaluation speak FLARE.
        sign_key: an Ed25519 private key file (``pocketseg keygen``): the package gets its signature,
            ``signature.json`` (docs/model-package.md, "Signatures").
    """
    check_opset(opset)
    if sign_key is not None:
        check_signing_key(sign_key)  # before the conversion's minutes, not after
    main = open_results(results, folds=folds, checkpoint=checkpoint)
    reader = _reader(main)
    if orientation is None:
        orientation = READER_VOXEL_ORDERS[reader]
    if orientation not in ("native", "RAS"):
        raise InputError(None, f"orientation must be native or RAS, got {orientation!r}")
    if not 0.0 <= overlap < 1.0:
        raise InputError(None, f"overlap must be a fraction in [0, 1), got {overlap!r}")
    report: dict[str, Any] = {}
    stages = [_stage(main, "detail", orientation, report, check)]
    source = _source(main, reader)
    if roi is not None:
        roi_results = open_results(roi, folds=roi_folds, checkpoint=checkpoint)
        roi_stage = _stage(roi_results, "roi", orientation, report, check)
        if roi_stage.stage_fields["transpose_forward"] != stages[0].stage_fields["transpose_forward"]:
            raise InputError(roi, "the ROI model's plans transpose the axes unlike the main model's; "
                                  "the cascade needs one voxel order")
        stages.insert(0, roi_stage)
        source["roi"] = _source(roi_results, _reader(roi_results))
    model_labels = {str(k): int(v) for k, v in main.dataset["labels"].items()}
    package_labels, output_labels = model_labels, ()
    if labels is not None:
        map_file = None if isinstance(labels, dict) else Path(labels)
        mapping = labels if isinstance(labels, dict) else read_json(map_file)
        package_labels, output_labels, dropped = map_labels(model_labels, mapping, map_file)
        source["label_map"] = {"file": str(map_file) if map_file else None,
                               "sha256": sha256_file(map_file) if map_file else None,
                               "model_labels": model_labels, "dropped": dropped}
        if dropped:
            log.warning("the label mapping drops %d of the model's classes (written as background): %s",
                        len(dropped), ", ".join(dropped[:20]) + (" ..." if len(dropped) > 20 else ""))
    modality = "CT" if main.config["normalization_schemes"][0] == "CTNormalization" else \
        str(next(iter(main.dataset.get("channel_names", {"0": "other"}).values())))
    manifest_fields = {"labels": package_labels, "output_labels": output_labels, "modality": modality,
                       "source": source,
                       "inference": Inference(overlap=float(overlap), gaussian=True, mirroring=bool(tta),
                                              back_resampling="logits", nnunet_numerics=True)}
    log.info("importing %s (%s, %d fold(s), %s voxel order) -> %s", main.path, main.configuration,
             len(main.checkpoints), orientation, out)
    return write_package(stages, out, roi_margin_mm=ROI_MARGIN_MM,
                         postprocess=PostProcess(largest_component_labels=(), tumor_min_volume_mm3=0.0,
                                                 tumor_label=None),
                         overwrite=overwrite, fp16=fp16, check=check, strict=strict, opset=opset,
                         manifest_fields=manifest_fields, extra_report=report, sign_key=sign_key)
