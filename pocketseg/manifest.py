"""The model package manifest: the one door between training and deployment.

A model package is a folder (format 2; format 1 packages load unchanged)::

    manifest.json            this file's contents (format version, labels, stages, checksums)
    roi.onnx, detail.onnx    fp32 ONNX, fixed patch size, dynamic batch
    roi_fp16.onnx, ...       mixed-precision ONNX for TensorRT's strongly typed networks
    roi.safetensors, ...     weights for the torch backend (loaded without pickle)
    *.engine                 optional TensorRT engines, recorded with TensorRT version and GPU

engine_build and the runtime read it only through :class:`Manifest` (frozen
dataclasses), never through raw dictionary keys. :func:`load_package` checks
the SHA-256 of every listed file and refuses a tampered or incomplete package;
the manifest carries the SHA-256 of its own content (``content_sha256``, over its
canonical JSON without that field), so an edit of the manifest itself is refused
too (manifests written before that field existed load without it).
Sizes and spacings are (z, y, x).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from pocketseg import labels as L
from pocketseg.atomic import json_text, read_json
from pocketseg.errors import InputError
from pocketseg.geometry import ROI_MARGIN_MM
from pocketseg.version import __version__

FORMAT_VERSION = 2
#: Formats this pocketseg reads: 1 (the FLARE 2023 cascade of pocketseg's own training) and 2 (any label set,
#: one or two stages, per-stage normalisation and voxel order, fold ensembles, inference settings, a source).
KNOWN_FORMATS = (1, 2)
MANIFEST_NAME = "manifest.json"
#: Tensor names of every network in a package (ONNX graphs and TensorRT engines): (B, 1, z, y, x) -> (B, C, z, y, x).
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
#: How a stage normalises its input: nnU-Net's CTNormalization (clip to the foreground percentiles, z-score with
#: the foreground statistics), ZScoreNormalization (per image; within the non-zero mask with ``use_mask``),
#: RescaleTo01Normalization (min-max per image), NoNormalization (float32 as is).
NORMALIZATION_SCHEMES = ("ct", "zscore", "rescale_to_0_1", "none")
#: ``native``: the file's voxel order as nnU-Net's SimpleITK and NiBabel readers see it; ``RAS``: the nearest
#: RAS grid (nnU-Net's NibabelIOWithReorient, TotalSegmentator, and every format-1 package).
VOXEL_ORDERS = ("RAS", "native")
BACK_RESAMPLING = ("labels", "logits")
#: Lowest share of voxels whose argmax a reduced-precision run must keep for the package to call it verified
#: (fp16 ONNX at export; bf16 on the CPU, see :attr:`Stage.bf16_agreement`).
AGREEMENT_MIN = 0.999


@dataclass(frozen=True)
class Intensity:
    """CT normalisation of a stage: clip to the percentiles, then z-score."""

    mean: float
    std: float
    percentile_00_5: float
    percentile_99_5: float


@dataclass(frozen=True)
class Normalization:
    """How a stage normalises its input (:data:`NORMALIZATION_SCHEMES`); ``ct`` uses the stage's :class:`Intensity`."""

    scheme: str = "ct"
    use_mask: bool = False  # zscore over the non-zero mask only (nnU-Net's use_mask_for_norm)


@dataclass(frozen=True)
class Network:
    """What rebuilds the network in torch (:class:`pocketseg.runtime.network.UNetConfig`).

    Format 1 packages give ``width`` and ``channels_growth`` (Pocket U-Nets); imported nets give the
    channels of every stage (``features``), the encoder kind (``plain`` conv blocks as nnU-Net's
    PlainConvUNet, ``residual`` blocks as its ResidualEncoderUNet) and the convs or blocks per stage.
    """

    width: int
    kernels: tuple[tuple[int, int, int], ...]
    strides: tuple[tuple[int, int, int], ...]
    channels_growth: int = 1
    features: tuple[int, ...] = ()
    encoder: str = "plain"
    convs_per_stage: tuple[int, ...] = ()
    convs_per_stage_decoder: tuple[int, ...] = ()
    conv_bias: bool = True


@dataclass(frozen=True)
class EngineRecord:
    """A TensorRT engine built for one GPU and TensorRT version."""

    file: str
    precision: str
    tensorrt_version: str
    compute_capability: str  # e.g. "8.7" (Jetson Orin), "9.0" (H100)
    gpu_name: str
    max_batch: int
    member: int = 0  # 0: the stage's ``files``; k: its ``ensemble[k - 1]``


@dataclass(frozen=True)
class Stage:
    name: str  # "roi" or "detail"
    preset: str
    network: Network
    num_classes: int
    spacing_mm_zyx: tuple[float, float, float]
    patch_zyx: tuple[int, int, int]
    intensity: Intensity | None  # the "ct" scheme's statistics
    files: dict[str, str]  # export target name -> file in the package
    engines: tuple[EngineRecord, ...] = ()
    normalization: Normalization = field(default_factory=Normalization)
    voxel_order: str = "RAS"
    transpose_forward: tuple[int, int, int] = (0, 1, 2)  # nnU-Net's: native axes -> network axes
    crop_to_nonzero: bool = False  # nnU-Net's crop to the box of the non-zero voxels (holes filled)
    mirror_axes: tuple[int, ...] = ()  # network axes test-time mirroring may flip
    ensemble: tuple[dict[str, str], ...] = ()  # more networks (folds) whose logits are averaged with ``files``'s
    #: Share of voxels whose argmax bf16 inference (OpenVINO on a CPU with native bf16) kept against fp32 on the
    #: export's parity patch, the lowest over the stage's networks; None: not measured (no OpenVINO or no native
    #: bf16 where the package was written, or a package older than the check).
    bf16_agreement: float | None = None

    @property
    def bf16_verified(self) -> bool:
        """Whether a measured bf16 agreement reaches :data:`AGREEMENT_MIN`."""
        return self.bf16_agreement is not None and self.bf16_agreement >= AGREEMENT_MIN

    @property
    def members(self) -> tuple[dict[str, str], ...]:
        """The files of every network of the stage: ``files``, then the ensemble's."""
        return (self.files,) + tuple(self.ensemble)


@dataclass(frozen=True)
class PostProcess:
    """Post-processing rules of the cascade (paper: largest connected component per organ)."""

    largest_component_labels: tuple[int, ...] = L.ORGAN_IDS
    tumor_min_volume_mm3: float = 50.0
    tumor_label: int | None = L.TUMOR  # the label whose small components are removed; None: no such rule


@dataclass(frozen=True)
class Inference:
    """How the package is run unless the caller says otherwise.

    Format 1 and pocketseg's own packages: the paper's settings (tile step 1, uniform blending, no
    test-time augmentation, labels resampled back). Imported nnU-Net models: nnU-Net's own (overlap 0.5,
    Gaussian blending, mirroring over the stage's ``mirror_axes``, logits resampled back).
    """

    overlap: float = 0.0
    gaussian: bool = False
    mirroring: bool = False
    back_resampling: str = "labels"
    #: nnU-Net's own numerics: tiles blended in float16 (its Gaussian scaled to 10), each fold's logits summed in
    #: float16, the resampled logits rounded to float16 before the argmax; so that labels match nnU-Net's.
    nnunet_numerics: bool = False


#: The manifest's digest of its own content.
CONTENT_DIGEST = "content_sha256"


def content_digest(data: dict[str, Any]) -> str:
    """SHA-256 of a manifest's content: its JSON without :data:`CONTENT_DIGEST`, keys sorted, no whitespace."""
    body = {k: v for k, v in data.items() if k != CONTENT_DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Manifest:
    stages: dict[str, Stage]
    labels: dict[str, int] = field(default_factory=L.dataset_json_labels)
    roi_margin_mm: float = ROI_MARGIN_MM
    postprocess: PostProcess = field(default_factory=PostProcess)
    axis_order: str = "zyx"
    format_version: int = FORMAT_VERSION
    pocketseg_version: str = __version__
    checksums: dict[str, str] = field(default_factory=dict)  # file -> sha256
    inference: Inference = field(default_factory=Inference)
    modality: str = "CT"  # the CT-intensity check applies to CT packages only
    source: dict[str, Any] | None = None  # where the networks came from (trainer, plans, files and their SHA-256)
    #: The detail stage's class c is written as label ``output_labels[c]`` (empty: as c). An imported model's
    #: classes mapped onto another label set (``import-nnunet --labels``); classes mapped to 0 are dropped.
    output_labels: tuple[int, ...] = ()

    @property
    def roi(self) -> Stage | None:
        """The ROI stage, or None for a single-stage package."""
        return self.stages.get("roi")

    @property
    def detail(self) -> Stage:
        """The stage whose labels are the package's output."""
        return self.stages["detail"]

    @property
    def is_ct(self) -> bool:
        return self.modality.upper() == "CT"

    def files(self) -> list[str]:
        names = []
        for stage in self.stages.values():
            for member in stage.members:
                names += list(member.values())
            names += [e.file for e in stage.engines]
        return names

    def with_checksums(self, folder: Path) -> Manifest:
        return replace(self, checksums={name: sha256_file(Path(folder) / name) for name in sorted(self.files())})

    def to_json(self) -> str:
        """The manifest file's text, with the digest of its own content (:func:`content_digest`)."""
        data = json.loads(json_text(asdict(self)))
        return json_text({**data, CONTENT_DIGEST: content_digest(data)}, indent=2)

    @staticmethod
    def from_dict(data: dict[str, Any], source: Path | None = None) -> Manifest:
        if not isinstance(data, dict):
            raise InputError(source, f"manifest is malformed: a JSON object is expected, got {type(data).__name__}")
        recorded = data.get(CONTENT_DIGEST) if isinstance(data, dict) else None
        if recorded is not None and recorded != content_digest(data):
            raise InputError(source, "manifest refused: its content does not match its content_sha256 (edited "
                                     "after it was written); export or import the package again")
        try:
            version = data["format_version"]
            if isinstance(version, bool) or not isinstance(version, int):
                raise InputError(source, f"manifest format_version must be an integer, got {version!r}")
            if version > FORMAT_VERSION:
                raise InputError(source, f"manifest format {version} is newer than this pocketseg understands "
                                         f"({FORMAT_VERSION}); upgrade pocketseg")
            if version not in KNOWN_FORMATS:
                raise InputError(source, f"manifest format {version} is not one of {KNOWN_FORMATS}")
            stages = {name: _stage(s) for name, s in _object(data["stages"], "stages").items()}
            post = _object(data["postprocess"], "postprocess")
            manifest = Manifest(
                stages=stages, labels={str(k): _int(v) for k, v in _object(data["labels"], "labels").items()},
                roi_margin_mm=_float(data["roi_margin_mm"], "roi_margin_mm"),
                postprocess=PostProcess(_ints(_list(post["largest_component_labels"], "largest_component_labels")),
                                        _float(post["tumor_min_volume_mm3"], "tumor_min_volume_mm3"),
                                        _int_or_none(post.get("tumor_label", L.TUMOR))),
                axis_order=_str(data["axis_order"], "axis_order"), format_version=version,
                pocketseg_version=_str(data["pocketseg_version"], "pocketseg_version"),
                checksums=_names(data.get("checksums", {}), "checksums"),
                inference=_record(Inference, data.get("inference", {}), "inference"),
                modality=_str(data.get("modality", "CT"), "modality"),
                source=None if data.get("source") is None else _object(data["source"], "source"),
                output_labels=_ints(_list(data.get("output_labels", ()), "output_labels")))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, InputError):
                raise
            raise InputError(source, f"manifest is malformed ({type(exc).__name__}: {exc})") from None
        problems = manifest.problems()
        if problems:
            raise InputError(source, "manifest refused: " + "; ".join(problems))
        return manifest

    def problems(self) -> list[str]:
        """What makes this manifest unusable (empty when it is sound): values out of range, labels that do not fit."""
        out = []
        if "detail" not in self.stages or not set(self.stages) <= {"roi", "detail"}:
            out.append(f"stages must be 'detail' and optionally 'roi', found {sorted(self.stages)}")
        if self.axis_order != "zyx":
            out.append(f"axis_order must be 'zyx', got {self.axis_order!r}")
        if not (math.isfinite(self.roi_margin_mm) and self.roi_margin_mm > 0):
            out.append(f"roi_margin_mm must be a positive number of mm, got {self.roi_margin_mm!r}")
        ids = list(self.labels.values())
        if self.labels.get("background") != 0:
            out.append("labels must map 'background' to 0")
        if len(set(ids)) != len(ids) or any(i < 0 or i > 255 for i in ids):
            out.append(f"label ids must be distinct and in 0..255, got {sorted(ids)}")
        if self.output_labels:
            if "detail" in self.stages and len(self.output_labels) != self.detail.num_classes:
                out.append(f"output_labels must give one label per class of the detail stage "
                           f"({self.detail.num_classes}), got {len(self.output_labels)}")
            if self.output_labels[0] != 0 or not set(self.output_labels) <= set(ids):
                out.append(f"output_labels must map class 0 to 0 and every class to a label, got {self.output_labels}")
        elif "detail" in self.stages and any(i >= self.detail.num_classes for i in ids):
            out.append(f"label ids {sorted(i for i in ids if i >= self.detail.num_classes)} do not fit the "
                       f"detail stage's {self.detail.num_classes} classes")
        if self.postprocess.tumor_label is not None and self.postprocess.tumor_label not in ids:
            out.append(f"postprocess tumor_label {self.postprocess.tumor_label} is not a label")
        if not set(self.postprocess.largest_component_labels) <= set(ids) - {0}:
            out.append("postprocess largest_component_labels must be labels other than background")
        if not (math.isfinite(self.postprocess.tumor_min_volume_mm3) and self.postprocess.tumor_min_volume_mm3 >= 0):
            out.append("postprocess tumor_min_volume_mm3 must be >= 0")
        inf = self.inference
        if not (0.0 <= inf.overlap < 1.0) or inf.back_resampling not in BACK_RESAMPLING:
            out.append(f"inference settings out of range: {inf}")
        for stage in self.stages.values():
            out += [f"stage {stage.name}: {p}" for p in _stage_problems(stage)]
        return out


# Readers of the manifest's JSON values: each refuses (ValueError, reported as a malformed manifest) a value of
# another type instead of converting it (float("1.5"), bool("no"), str(None) would all succeed silently).

def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object, got {value!r}")
    return value


def _list(value: Any, what: str) -> list[Any] | tuple[Any, ...]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{what} must be a JSON list, got {value!r}")
    return value


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {value!r}")
    return value


def _bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be true or false, got {value!r}")
    return value


def _float(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number, got {value!r}")
    return float(value)


def _names(value: Any, what: str) -> dict[str, str]:
    """A JSON object of strings (a stage's files, the checksums)."""
    return {str(k): _str(v, f"{what}[{k!r}]") for k, v in _object(value, what).items()}


#: Readers of the fields of the flat records, by their annotation.
_FIELD_READERS = {"float": _float, "bool": _bool, "str": _str, "int": lambda v, what: _int(v),
                  "float | None": lambda v, what: None if v is None else _float(v, what)}


def _record(cls: type, value: Any, what: str) -> Any:
    """A flat dataclass (:class:`Intensity`, :class:`Inference`, ...) from a JSON object, every field read by
    its annotation; unknown or missing fields are refused by the constructor (TypeError)."""
    kinds = {f.name: f.type for f in fields(cls)}
    values = _object(value, what)
    return cls(**{k: _FIELD_READERS[kinds[k]](v, f"{what}.{k}") if k in kinds else v for k, v in values.items()})


def _int(value: Any) -> int:
    # is_integer() before int(): int() of an infinite float raises OverflowError, not ValueError
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float)
                                                                          and not value.is_integer()):
        raise ValueError(f"expected an integer, got {value!r}")
    return int(value)


def _int_or_none(value: Any) -> int | None:
    return None if value is None else _int(value)


def _stage_problems(stage: Stage) -> list[str]:
    out = []
    if stage.num_classes < 2:
        out.append(f"num_classes must be >= 2, got {stage.num_classes}")
    if len(stage.spacing_mm_zyx) != 3 or not all(math.isfinite(v) and v > 0 for v in stage.spacing_mm_zyx):
        out.append(f"spacing_mm_zyx must be three positive spacings, got {stage.spacing_mm_zyx}")
    if len(stage.patch_zyx) != 3 or not all(v >= 1 for v in stage.patch_zyx):
        out.append(f"patch_zyx must be three positive sizes, got {stage.patch_zyx}")
    if stage.normalization.scheme not in NORMALIZATION_SCHEMES:
        out.append(f"normalization {stage.normalization.scheme!r} is not one of {NORMALIZATION_SCHEMES}")
    if stage.normalization.scheme == "ct":
        i = stage.intensity
        if i is None:
            out.append("CT normalisation needs intensity statistics")
        elif not (all(math.isfinite(v) for v in (i.mean, i.std, i.percentile_00_5, i.percentile_99_5))
                  and i.std > 0 and i.percentile_00_5 <= i.percentile_99_5):
            out.append(f"intensity statistics out of range: {i}")
    if stage.voxel_order not in VOXEL_ORDERS:
        out.append(f"voxel_order must be one of {VOXEL_ORDERS}, got {stage.voxel_order!r}")
    if sorted(stage.transpose_forward) != [0, 1, 2]:
        out.append(f"transpose_forward must be a permutation of (0, 1, 2), got {stage.transpose_forward}")
    if not set(stage.mirror_axes) <= {0, 1, 2}:
        out.append(f"mirror_axes must be network axes 0-2, got {stage.mirror_axes}")
    if not stage.files:
        out.append("no files")
    net = stage.network
    if net.width < 1 or not net.kernels or len(net.kernels) != len(net.strides) or not all(
            len(t) == 3 and min(t) >= 1 for t in net.kernels + net.strides):
        out.append(f"network must have a positive width and one kernel and stride triple of positive sizes per "
                   f"level, got width {net.width}, kernels {net.kernels}, strides {net.strides}")
    names = [name for member in stage.members for name in member.values()] + [e.file for e in stage.engines]
    outside = [name for name in names if not name or Path(name).is_absolute() or ".." in Path(name).parts]
    if outside:
        out.append(f"file names must be paths inside the package, got {outside}")
    if stage.bf16_agreement is not None and not (math.isfinite(stage.bf16_agreement)
                                                 and 0.0 <= stage.bf16_agreement <= 1.0):
        out.append(f"bf16_agreement must be a fraction in 0..1, got {stage.bf16_agreement!r}")
    return out


def _triples(values) -> tuple[tuple[int, int, int], ...]:
    return tuple(tuple(_int(v) for v in _list(t, "a triple")) for t in values)  # type: ignore[misc]


def _ints(values) -> tuple[int, ...]:
    return tuple(_int(v) for v in _list(values, "a list of integers"))


def _network(n: Any) -> Network:
    n = _object(n, "network")
    return Network(_int(n["width"]), _triples(_list(n["kernels"], "kernels")),
                   _triples(_list(n["strides"], "strides")), _int(n.get("channels_growth", 1)),
                   features=_ints(n.get("features", ())), encoder=_str(n.get("encoder", "plain"), "encoder"),
                   convs_per_stage=_ints(n.get("convs_per_stage", ())),
                   convs_per_stage_decoder=_ints(n.get("convs_per_stage_decoder", ())),
                   conv_bias=_bool(n.get("conv_bias", True), "conv_bias"))


def _stage(s: Any) -> Stage:
    s = _object(s, "a stage")
    return Stage(
        name=_str(s["name"], "stage name"), preset=_str(s["preset"], "preset"), network=_network(s["network"]),
        num_classes=_int(s["num_classes"]),
        spacing_mm_zyx=tuple(_float(v, "spacing_mm_zyx") for v in _list(s["spacing_mm_zyx"], "spacing_mm_zyx")),  # type: ignore[arg-type]
        patch_zyx=_ints(s["patch_zyx"]),  # type: ignore[arg-type]
        intensity=None if s.get("intensity") is None else _record(Intensity, s["intensity"], "intensity"),
        files=_names(s["files"], "files"),
        engines=tuple(_record(EngineRecord, e, "engines") for e in _list(s.get("engines", ()), "engines")),
        normalization=_record(Normalization, s.get("normalization", {}), "normalization"),
        voxel_order=_str(s.get("voxel_order", "RAS"), "voxel_order"),
        transpose_forward=_ints(s.get("transpose_forward", (0, 1, 2))),  # type: ignore[arg-type]
        crop_to_nonzero=_bool(s.get("crop_to_nonzero", False), "crop_to_nonzero"),
        mirror_axes=_ints(s.get("mirror_axes", ())),
        ensemble=tuple(_names(m, "ensemble") for m in _list(s.get("ensemble", ()), "ensemble")),
        bf16_agreement=_fraction_or_none(s.get("bf16_agreement")),
    )


def _fraction_or_none(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, got {value!r}")
    return float(value)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(folder: str | os.PathLike) -> Manifest:
    """The manifest of a package folder, without checking files (see :func:`load_package`)."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise InputError(folder, f"is not a pocketseg model package (no {MANIFEST_NAME})")
    return Manifest.from_dict(read_json(path), path)


def load_package(folder: str | os.PathLike) -> Manifest:
    """Read a package's manifest and verify every file's SHA-256; refuse anything that does not match."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    problems = []
    for name in manifest.files():
        expected = manifest.checksums.get(name)
        path = folder / name
        if expected is None:
            problems.append(f"{name} has no checksum in the manifest")
        elif not path.is_file():
            problems.append(f"{name} is missing")
        else:
            try:
                actual = sha256_file(path)
            except OSError as exc:  # permissions, an I/O error
                problems.append(f"{name} cannot be read ({exc.strerror or exc})")
                continue
            if actual != expected:
                problems.append(f"{name} does not match its SHA-256 (modified or corrupt)")
    if problems:
        raise InputError(folder, "model package refused: " + "; ".join(problems))
    return manifest
