"""Network presets of the two cascade stages, selected by name.

The paper presets reproduce the FLARE 2023 Pocket U-Nets: the ROI net (5 stages,
target spacing 4.0x1.2x1.2 mm, patch 32x224x224, 2 classes, 5.76 M parameters)
and the detail net (6 stages, 2.5x0.8x0.8 mm, patch 48x224x224, 15 classes,
7.97 M parameters). A constant width of 104 channels gives 5.66 M and 7.96 M
parameters, within 2 % of both. The ROI net's pooling is not given in the paper;
it is the one nnU-Net plans for that spacing and patch ([1,2,2] while the slice
spacing exceeds twice the in-plane spacing, then [2,2,2]), which is also what
its [1,3,3] first kernel implies.

``*-unet`` presets are the same topologies with channels doubling per stage
(capped at 320, as nnU-Net), the conventional U-Net the paper compares against.
``*-cpu`` presets are narrower nets at coarser spacing for CPU-only machines,
``detail-ref`` is the detail net of the shipped reference model (docs/reference-model.md), and ``*-tiny`` presets exist for tests. All sizes are (z, y, x).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pocketseg import labels as L
from pocketseg.errors import InputError
from pocketseg.runtime.network import PocketUNet, Triple, UNetConfig, count_flops, count_parameters

STAGES = ("roi", "detail")

_ROI_KERNELS: tuple[Triple, ...] = ((1, 3, 3),) + ((3, 3, 3),) * 4
_ROI_STRIDES: tuple[Triple, ...] = ((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2))
_DETAIL_KERNELS: tuple[Triple, ...] = ((3, 3, 3),) * 6
_DETAIL_STRIDES: tuple[Triple, ...] = ((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2))


@dataclass(frozen=True)
class Preset:
    name: str
    stage: str  # "roi" or "detail"
    width: int
    kernels: tuple[Triple, ...]
    strides: tuple[Triple, ...]
    spacing_mm_zyx: tuple[float, float, float]
    patch_zyx: Triple
    channels_growth: int = 1
    description: str = ""

    @property
    def num_classes(self) -> int:
        """ROI: background + merged foreground; detail: the 15 FLARE 2023 classes."""
        return 2 if self.stage == "roi" else L.NUM_CLASSES

    def unet_config(self) -> UNetConfig:
        return UNetConfig(in_channels=1, num_classes=self.num_classes, width=self.width, kernels=self.kernels,
                          strides=self.strides, channels_growth=self.channels_growth)

    def to_dict(self) -> dict:
        return asdict(self)


def _p(name, stage, width, kernels, strides, spacing, patch, growth=1, description=""):
    return Preset(name, stage, width, kernels, strides, spacing, patch, growth, description)


PRESETS: dict[str, Preset] = {p.name: p for p in (
    _p("roi", "roi", 104, _ROI_KERNELS, _ROI_STRIDES, (4.0, 1.2, 1.2), (32, 224, 224),
       description="paper ROI Pocket U-Net"),
    _p("detail", "detail", 104, _DETAIL_KERNELS, _DETAIL_STRIDES, (2.5, 0.8, 0.8), (48, 224, 224),
       description="paper detail Pocket U-Net"),
    _p("roi-unet", "roi", 32, _ROI_KERNELS, _ROI_STRIDES, (4.0, 1.2, 1.2), (32, 224, 224), 2,
       description="ROI topology, channels doubling per stage"),
    _p("detail-unet", "detail", 32, _DETAIL_KERNELS, _DETAIL_STRIDES, (2.5, 0.8, 0.8), (48, 224, 224), 2,
       description="detail topology, channels doubling per stage"),
    _p("roi-cpu", "roi", 16, ((1, 3, 3),) + ((3, 3, 3),) * 3, ((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2)),
       (6.0, 3.0, 3.0), (32, 96, 96), description="narrow ROI net for CPU-only machines"),
    _p("detail-cpu", "detail", 16, ((1, 3, 3),) + ((3, 3, 3),) * 4, ((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2)),
       (3.0, 1.5, 1.5), (32, 128, 128), description="narrow detail net for CPU-only machines"),
    _p("detail-ref", "detail", 16, ((3, 3, 3),) * 5, ((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2)),
       (2.5, 1.6, 1.6), (32, 96, 96), description="detail net of the reference model, trainable on 2 CPU cores"),
    _p("roi-tiny", "roi", 8, ((3, 3, 3),) * 3, ((1, 1, 1), (1, 2, 2), (2, 2, 2)), (8.0, 6.0, 6.0), (16, 32, 32),
       description="test-sized ROI net"),
    _p("detail-tiny", "detail", 8, ((3, 3, 3),) * 3, ((1, 1, 1), (1, 2, 2), (2, 2, 2)), (5.0, 4.0, 4.0), (16, 32, 32),
       description="test-sized detail net"),
)}


def get_preset(name: str, stage: str | None = None) -> Preset:
    """The preset called ``name``; with ``stage``, it must belong to that cascade stage."""
    try:
        preset = PRESETS[name]
    except KeyError:
        raise InputError(None, f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
    if stage is not None and preset.stage != stage:
        matching = [p.name for p in PRESETS.values() if p.stage == stage]
        raise InputError(None, f"preset {name!r} is a {preset.stage} net, not {stage}; {stage} presets: {', '.join(matching)}")
    return preset


def model_info(*, flops: bool = True) -> list[dict]:
    """Parameters (and FLOPs per patch) of every preset, as rows for ``pocketseg model-info``."""
    rows = []
    for preset in PRESETS.values():
        model = PocketUNet(preset.unet_config())
        row = {"name": preset.name, "stage": preset.stage, "params": count_parameters(model),
               "width": preset.width, "channels_growth": preset.channels_growth,
               "spacing_mm_zyx": list(preset.spacing_mm_zyx), "patch_zyx": list(preset.patch_zyx),
               "classes": preset.num_classes, "description": preset.description}
        if flops:
            row["gflops_per_patch"] = round(count_flops(model, preset.patch_zyx) / 1e9, 2)
        rows.append(row)
    return rows
