"""The Pocket U-Net: an nnU-Net-style plain 3D U-Net with the same channel count at every scale.

PocketNet (Celaya et al., IEEE TMI 2023) showed that keeping the width constant
across scales, instead of doubling it at each downsampling, loses little
accuracy while cutting parameters and memory by an order of magnitude; the
FLARE 2023 method this package implements uses it for both cascade stages.
``channels_growth=2`` gives the conventional doubling U-Net for comparison.

Structure (as nnU-Net's PlainConvUNet): per encoder stage two
conv-InstanceNorm-LeakyReLU blocks, the first strided for downsampling; per
decoder stage a transposed convolution (kernel = stride), concatenation with
the skip, two conv blocks and a 1x1x1 segmentation head. The heads of every
decoder stage always exist, so one state_dict serves training (deep
supervision), ONNX export and TensorRT; ``deep_supervision`` only selects what
``forward`` returns. Tensors are (N, C, z, y, x).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

Triple = tuple[int, int, int]


@dataclass(frozen=True)
class UNetConfig:
    """Topology of a plain 3D U-Net; kernels and strides are (z, y, x) per stage."""

    in_channels: int
    num_classes: int
    width: int  # channels of the first stage
    kernels: tuple[Triple, ...]
    strides: tuple[Triple, ...]  # first entry is (1, 1, 1): the first stage does not downsample
    channels_growth: int = 1  # 1: Pocket U-Net (constant width); 2: doubling U-Net
    max_channels: int = 320  # nnU-Net's cap for 3D networks
    convs_per_stage: int = 2

    def __post_init__(self) -> None:
        if len(self.kernels) != len(self.strides):
            raise ValueError(f"kernels ({len(self.kernels)}) and strides ({len(self.strides)}) must have one entry per stage")
        if len(self.kernels) < 2:
            raise ValueError("a U-Net needs at least two stages")
        if self.channels_growth not in (1, 2):
            raise ValueError(f"channels_growth must be 1 (Pocket) or 2 (doubling), got {self.channels_growth}")

    @property
    def n_stages(self) -> int:
        return len(self.kernels)

    def stage_channels(self) -> list[int]:
        return [min(self.width * self.channels_growth**s, self.max_channels) for s in range(self.n_stages)]

    def total_stride(self) -> Triple:
        total = [1, 1, 1]
        for stride in self.strides:
            total = [t * s for t, s in zip(total, stride)]
        return tuple(total)  # type: ignore[return-value]


def _padding(kernel: Sequence[int]) -> tuple[int, ...]:
    return tuple(k // 2 for k in kernel)


class ConvBlock(nn.Sequential):
    """Conv3d -> InstanceNorm3d (affine) -> LeakyReLU(0.01), nnU-Net's default block."""

    def __init__(self, cin: int, cout: int, kernel: Sequence[int], stride: Sequence[int] = (1, 1, 1)):
        super().__init__(
            nn.Conv3d(cin, cout, tuple(kernel), tuple(stride), _padding(kernel), bias=True),
            nn.InstanceNorm3d(cout, eps=1e-5, affine=True),
            nn.LeakyReLU(negative_slope=0.01, inplace=True),
        )


class Encoder(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        chans = cfg.stage_channels()
        stages = []
        cin = cfg.in_channels
        for s in range(cfg.n_stages):
            blocks = [ConvBlock(cin, chans[s], cfg.kernels[s], cfg.strides[s])]
            blocks += [ConvBlock(chans[s], chans[s], cfg.kernels[s]) for _ in range(cfg.convs_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = chans[s]
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class Decoder(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        chans = cfg.stage_channels()
        ups, stages, heads = [], [], []
        for s in range(cfg.n_stages - 1, 0, -1):  # from the bottleneck up
            below, here = chans[s], chans[s - 1]
            stride = cfg.strides[s]
            ups.append(nn.ConvTranspose3d(below, here, tuple(stride), tuple(stride), bias=True))
            blocks = [ConvBlock(2 * here, here, cfg.kernels[s - 1])]
            blocks += [ConvBlock(here, here, cfg.kernels[s - 1]) for _ in range(cfg.convs_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            heads.append(nn.Conv3d(here, cfg.num_classes, 1, 1, 0, bias=True))
        self.ups = nn.ModuleList(ups)
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(heads)

    def forward(self, skips: list[torch.Tensor], deep_supervision: bool) -> torch.Tensor | list[torch.Tensor]:
        x = skips[-1]
        outputs = []
        last = len(self.stages) - 1
        for i, (up, stage, head) in enumerate(zip(self.ups, self.stages, self.heads)):
            x = stage(torch.cat((up(x), skips[-(i + 2)]), dim=1))
            if deep_supervision or i == last:
                outputs.append(head(x))
        if not deep_supervision:
            return outputs[-1]
        return outputs[::-1]  # full resolution first, as the loss weights expect


class PocketUNet(nn.Module):
    """Encoder + decoder; ``forward`` returns logits (N, classes, z, y, x), or a list per scale in training."""

    def __init__(self, cfg: UNetConfig, deep_supervision: bool = False):
        super().__init__()
        self.cfg = cfg
        self.deep_supervision = deep_supervision
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.apply(he_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        return self.decoder(self.encoder(x), self.deep_supervision)


def he_init(module: nn.Module, neg_slope: float = 1e-2) -> None:
    """He (Kaiming) normal initialisation for the LeakyReLU network, zero biases (as nnU-Net)."""
    if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=neg_slope)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: PocketUNet, patch_zyx: Sequence[int]) -> int:
    """Floating-point operations (2 x multiply-adds) of the convolutions for one patch, inference mode.

    Counted from output shapes on the meta device, so no memory is allocated.
    """
    total = 0

    def hook(module: nn.Module, inputs, output) -> None:
        nonlocal total
        k = int(torch.tensor(module.kernel_size).prod())
        cin = module.in_channels // module.groups
        if isinstance(module, nn.ConvTranspose3d):  # each input voxel scatters a k-sized block
            total += 2 * inputs[0].numel() // inputs[0].shape[0] * module.out_channels * k
        else:
            total += 2 * output.numel() // output.shape[0] * cin * k

    meta = PocketUNet(model.cfg, deep_supervision=False).to("meta")
    handles = [m.register_forward_hook(hook) for m in meta.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    with torch.no_grad():
        meta(torch.empty((1, model.cfg.in_channels, *patch_zyx), device="meta"))
    for h in handles:
        h.remove()
    return total
