"""The model package manifest: the one door between training and deployment.

A model package is a folder::

    manifest.json            this file's contents (format version, labels, stages, checksums)
    roi.onnx, detail.onnx    fp32 ONNX, fixed patch size, dynamic batch
    roi_fp16.onnx, ...       mixed-precision ONNX for TensorRT's strongly typed networks
    roi.safetensors, ...     weights for the torch backend (loaded without pickle)
    *.engine                 optional TensorRT engines, recorded with TensorRT version and GPU

engine_build and the runtime read it only through :class:`Manifest` (frozen
dataclasses), never through raw dictionary keys. :func:`load_package` checks
the SHA-256 of every listed file and refuses a tampered or incomplete package.
Sizes and spacings are (z, y, x).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from pocketseg import labels as L
from pocketseg.atomic import json_text, read_json
from pocketseg.errors import InputError
from pocketseg.geometry import ROI_MARGIN_MM
from pocketseg.version import __version__

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
#: Tensor names of every network in a package (ONNX graphs and TensorRT engines): (B, 1, z, y, x) -> (B, C, z, y, x).
INPUT_NAME = "image"
OUTPUT_NAME = "logits"


@dataclass(frozen=True)
class Intensity:
    """CT normalisation of a stage: clip to the percentiles, then z-score."""

    mean: float
    std: float
    percentile_00_5: float
    percentile_99_5: float


@dataclass(frozen=True)
class Network:
    """What rebuilds the network in torch (UNetConfig fields)."""

    width: int
    kernels: tuple[tuple[int, int, int], ...]
    strides: tuple[tuple[int, int, int], ...]
    channels_growth: int = 1


@dataclass(frozen=True)
class EngineRecord:
    """A TensorRT engine built for one GPU and TensorRT version."""

    file: str
    precision: str
    tensorrt_version: str
    compute_capability: str  # e.g. "8.7" (Jetson Orin), "9.0" (H100)
    gpu_name: str
    max_batch: int


@dataclass(frozen=True)
class Stage:
    name: str  # "roi" or "detail"
    preset: str
    network: Network
    num_classes: int
    spacing_mm_zyx: tuple[float, float, float]
    patch_zyx: tuple[int, int, int]
    intensity: Intensity
    files: dict[str, str]  # export target name -> file in the package
    engines: tuple[EngineRecord, ...] = ()


@dataclass(frozen=True)
class PostProcess:
    """Post-processing rules of the cascade (paper: largest connected component per organ)."""

    largest_component_labels: tuple[int, ...] = L.ORGAN_IDS
    tumor_min_volume_mm3: float = 50.0


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

    @property
    def roi(self) -> Stage:
        return self.stages["roi"]

    @property
    def detail(self) -> Stage:
        return self.stages["detail"]

    def files(self) -> list[str]:
        names = []
        for stage in self.stages.values():
            names += list(stage.files.values()) + [e.file for e in stage.engines]
        return names

    def with_checksums(self, folder: Path) -> Manifest:
        return replace(self, checksums={name: sha256_file(Path(folder) / name) for name in sorted(self.files())})

    def to_json(self) -> str:
        return json_text(asdict(self), indent=2)

    @staticmethod
    def from_dict(data: dict[str, Any], source: Path | None = None) -> Manifest:
        try:
            version = int(data["format_version"])
            if version > FORMAT_VERSION:
                raise InputError(source, f"manifest format {version} is newer than this pocketseg understands "
                                         f"({FORMAT_VERSION}); upgrade pocketseg")
            stages = {name: _stage(s) for name, s in data["stages"].items()}
            return Manifest(stages=stages, labels={k: int(v) for k, v in data["labels"].items()},
                            roi_margin_mm=float(data["roi_margin_mm"]),
                            postprocess=PostProcess(tuple(data["postprocess"]["largest_component_labels"]),
                                                    float(data["postprocess"]["tumor_min_volume_mm3"])),
                            axis_order=data["axis_order"], format_version=version,
                            pocketseg_version=data["pocketseg_version"], checksums=dict(data.get("checksums", {})))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, InputError):
                raise
            raise InputError(source, f"manifest is malformed ({type(exc).__name__}: {exc})") from None


def _triples(values) -> tuple[tuple[int, int, int], ...]:
    return tuple(tuple(int(v) for v in t) for t in values)  # type: ignore[misc]


def _stage(s: dict[str, Any]) -> Stage:
    return Stage(
        name=s["name"], preset=s["preset"],
        network=Network(int(s["network"]["width"]), _triples(s["network"]["kernels"]), _triples(s["network"]["strides"]),
                        int(s["network"].get("channels_growth", 1))),
        num_classes=int(s["num_classes"]), spacing_mm_zyx=tuple(float(v) for v in s["spacing_mm_zyx"]),  # type: ignore[arg-type]
        patch_zyx=tuple(int(v) for v in s["patch_zyx"]), intensity=Intensity(**s["intensity"]),  # type: ignore[arg-type]
        files=dict(s["files"]), engines=tuple(EngineRecord(**e) for e in s.get("engines", ())),
    )


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
    if set(manifest.stages) != {"roi", "detail"}:
        raise InputError(folder, f"package must hold the roi and detail stages, found {sorted(manifest.stages)}")
    problems = []
    for name in manifest.files():
        expected = manifest.checksums.get(name)
        path = folder / name
        if expected is None:
            problems.append(f"{name} has no checksum in the manifest")
        elif not path.is_file():
            problems.append(f"{name} is missing")
        elif sha256_file(path) != expected:
            problems.append(f"{name} does not match its SHA-256 (modified or corrupt)")
    if problems:
        raise InputError(folder, "model package refused: " + "; ".join(problems))
    return manifest
