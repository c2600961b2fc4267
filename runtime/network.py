"""The networks: the Pocket U-Net, and nnU-Net's plain and residual-encoder U-Nets, with one definition.

PocketNet (Celaya et al., IEEE TMI 2023) showed that keeping the width constant
across scales, instead of doubling it at each downsampling, loses little
accuracy while cutting parameters and memory by an order of magnitude; the
FLARE 2023 method this package implements uses it for both cascade stages.
``channels_growth=2`` gives the conventional doubling U-Net for comparison.

Structure (as nnU-Net's PlainConvUNet): per encoder stage conv-InstanceNorm-
LeakyReLU blocks, the first strided for downsampling; per decoder stage a
transposed convolution (kernel = stride), concatenation with the skip, conv
blocks and a 1x1x1 segmentation head. The heads of every decoder stage always
exist, so one state_dict serves training (deep supervision), ONNX export and
TensorRT; ``deep_supervision`` only selects what ``forward`` returns.

Imported nnU-Net models give every stage's channels (``features``) and conv
counts, and ``encoder="residual"`` builds the encoder of nnU-Net's
ResidualEncoderUNet (the ResEnc presets): a stem block, then per stage residual
blocks of two convolutions (the first strided, the second without activation)
whose shortcut average-pools by the stride and projects with a 1x1x1
convolution and a norm where the shape changes, the activation after the sum.
:func:`pocketseg.engine_build.nnunet_import` maps nnU-Net's state_dict onto
these modules. Tensors are (N, C, z, y, x).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Triple = tuple[int, int, int]
ENCODERS = ("plain", "residual")


@dataclass(frozen=True)
class UNetConfig:
    """Topology of a 3D U-Net; kernels and strides are (z, y, x) per stage.

    Channels: ``features`` when given, else ``width * channels_growth**stage`` capped at
    ``max_channels``. Convs per stage: ``encoder_convs`` (plain: conv blocks; residual: residual
    blocks) and ``decoder_convs`` (from the deepest decoder stage up) when given, else
    ``convs_per_stage`` everywhere.
    """

    in_channels: int
    num_classes: int
    width: int  # channels of the first stage
    kernels: tuple[Triple, ...]
    strides: tuple[Triple, ...]  # first entry is (1, 1, 1): the first stage does not downsample
    channels_growth: int = 1  # 1: Pocket U-Net (constant width); 2: doubling U-Net
    max_channels: int = 320  # nnU-Net's cap for 3D networks
    convs_per_stage: int = 2
    features: tuple[int, ...] | None = None
    encoder: str = "plain"
    encoder_convs: tuple[int, ...] | None = None
    decoder_convs: tuple[int, ...] | None = None
    conv_bias: bool = True

    def __post_init__(self) -> None:
        if len(self.kernels) != len(self.strides):
            raise ValueError(f"kernels ({len(self.kernels)}) and strides ({len(self.strides)}) must have one entry per stage")
        if len(self.kernels) < 2:
            raise ValueError("a U-Net needs at least two stages")
        if self.channels_growth not in (1, 2):
            raise ValueError(f"channels_growth must be 1 (Pocket) or 2 (doubling), got {self.channels_growth}")
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {self.encoder!r}")
        for name, values, n in (("features", self.features, self.n_stages),
                                ("encoder_convs", self.encoder_convs, self.n_stages),
                                ("decoder_convs", self.decoder_convs, self.n_stages - 1)):
            if values is not None and (len(values) != n or min(values) < 1):
                raise ValueError(f"{name} must hold {n} positive numbers, got {values}")

    @property
    def n_stages(self) -> int:
        return len(self.kernels)

    def stage_channels(self) -> list[int]:
        if self.features is not None:
            return list(self.features)
        return [min(self.width * self.channels_growth**s, self.max_channels) for s in range(self.n_stages)]

    def encoder_depths(self) -> list[int]:
        return list(self.encoder_convs) if self.encoder_convs is not None else [self.convs_per_stage] * self.n_stages

    def decoder_depths(self) -> list[int]:
        """Conv blocks of each decoder stage, from the deepest up."""
        if self.decoder_convs is not None:
            return list(self.decoder_convs)
        return [self.convs_per_stage] * (self.n_stages - 1)

    def total_stride(self) -> Triple:
        total = [1, 1, 1]
        for stride in self.strides:
            total = [t * s for t, s in zip(total, stride)]
        return tuple(total)  # type: ignore[return-value]


def _padding(kernel: Sequence[int]) -> tuple[int, ...]:
    return tuple(k // 2 for k in kernel)


class ConvBlock(nn.Sequential):
    """Conv3d -> InstanceNorm3d (affine) -> LeakyReLU(0.01), nnU-Net's default block (``activation=False``: no ReLU)."""

    def __init__(self, cin: int, cout: int, kernel: Sequence[int], stride: Sequence[int] = (1, 1, 1),
                 bias: bool = True, activation: bool = True):
        layers: list[nn.Module] = [nn.Conv3d(cin, cout, tuple(kernel), tuple(stride), _padding(kernel), bias=bias),
                                   nn.InstanceNorm3d(cout, eps=1e-5, affine=True)]
        if activation:
            layers.append(nn.LeakyReLU(negative_slope=0.01, inplace=True))
        super().__init__(*layers)


class ResidualBlock(nn.Module):
    """conv-norm-ReLU, conv-norm, plus the shortcut, then ReLU (ResNet-D: the shortcut pools, then projects)."""

    def __init__(self, cin: int, cout: int, kernel: Sequence[int], stride: Sequence[int], bias: bool):
        super().__init__()
        self.conv1 = ConvBlock(cin, cout, kernel, stride, bias)
        self.conv2 = ConvBlock(cout, cout, kernel, (1, 1, 1), bias, activation=False)
        shortcut: list[nn.Module] = []
        if any(s != 1 for s in stride):
            shortcut.append(nn.AvgPool3d(tuple(stride), tuple(stride)))
        if cin != cout:
            shortcut.append(ConvBlock(cin, cout, (1, 1, 1), (1, 1, 1), bias=False, activation=False))
        self.shortcut = nn.Sequential(*shortcut)  # empty: the identity
        self.activation = nn.LeakyReLU(negative_slope=0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.conv2(self.conv1(x)) + self.shortcut(x))


class Encoder(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        chans, depths = cfg.stage_channels(), cfg.encoder_depths()
        stages = []
        cin = cfg.in_channels
        if cfg.encoder == "residual":
            self.stem = ConvBlock(cin, chans[0], cfg.kernels[0], bias=cfg.conv_bias)
            cin = chans[0]
        for s in range(cfg.n_stages):
            if cfg.encoder == "residual":
                blocks: list[nn.Module] = [ResidualBlock(cin, chans[s], cfg.kernels[s], cfg.strides[s], cfg.conv_bias)]
                blocks += [ResidualBlock(chans[s], chans[s], cfg.kernels[s], (1, 1, 1), cfg.conv_bias)
                           for _ in range(depths[s] - 1)]
            else:
                blocks = [ConvBlock(cin, chans[s], cfg.kernels[s], cfg.strides[s], cfg.conv_bias)]
                blocks += [ConvBlock(chans[s], chans[s], cfg.kernels[s], bias=cfg.conv_bias) for _ in range(depths[s] - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = chans[s]
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if hasattr(self, "stem"):
            x = self.stem(x)
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class Decoder(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        chans, depths = cfg.stage_channels(), cfg.decoder_depths()
        ups, stages, heads = [], [], []
        for i, s in enumerate(range(cfg.n_stages - 1, 0, -1)):  # from the bottleneck up
            below, here = chans[s], chans[s - 1]
            stride = cfg.strides[s]
            ups.append(nn.ConvTranspose3d(below, here, tuple(stride), tuple(stride), bias=cfg.conv_bias))
            blocks = [ConvBlock(2 * here, here, cfg.kernels[s - 1], bias=cfg.conv_bias)]
            blocks += [ConvBlock(here, here, cfg.kernels[s - 1], bias=cfg.conv_bias) for _ in range(depths[i] - 1)]
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


def stage_config(stage: Any) -> UNetConfig:
    """The :class:`UNetConfig` of a model package's stage (a :class:`pocketseg.manifest.Stage`)."""
    net = stage.network
    return UNetConfig(in_channels=1, num_classes=stage.num_classes, width=net.width, kernels=net.kernels,
                      strides=net.strides, channels_growth=net.channels_growth,
                      features=tuple(net.features) or None, encoder=net.encoder,
                      encoder_convs=tuple(net.convs_per_stage) or None,
                      decoder_convs=tuple(net.convs_per_stage_decoder) or None, conv_bias=net.conv_bias)
