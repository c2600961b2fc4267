"""The export targets of a model package, in one table.

Argument checks, the package writer and the benchmark loop all select targets
by name from :data:`EXPORT_TARGETS`, never by position.
"""

from __future__ import annotations

from dataclasses import dataclass

from pocketseg.errors import InputError


@dataclass(frozen=True)
class ExportTarget:
    name: str
    suffix: str  # file name after the stage name, e.g. "roi" + "_fp16.onnx"
    precision: str
    backend: str  # runtime backend that executes it
    devices: tuple[str, ...]
    description: str


EXPORT_TARGETS: tuple[ExportTarget, ...] = (
    ExportTarget("torch", ".safetensors", "fp32", "torch", ("cpu", "cuda"), "weights for the PyTorch backend"),
    ExportTarget("onnx-fp32", ".onnx", "fp32", "onnxruntime", ("cpu", "cuda"), "fp32 ONNX, fixed patch, dynamic batch"),
    ExportTarget("onnx-fp16", "_fp16.onnx", "fp16", "tensorrt", ("cuda",),
                 "mixed precision ONNX (InstanceNormalization in fp32) for strongly typed TensorRT"),
)
BY_NAME = {t.name: t for t in EXPORT_TARGETS}


def target(name: str) -> ExportTarget:
    try:
        return BY_NAME[name]
    except KeyError:
        raise InputError(None, f"unknown export target {name!r}; known: {', '.join(BY_NAME)}") from None


def file_name(stage: str, name: str) -> str:
    return stage + target(name).suffix
