"""V-Net of NVIDIA's TensorFlow V-Net recipe (DeepLearningExamples, 2019), ported to PyTorch.

Milletari et al., "V-Net: Fully Convolutional Neural Networks for Volumetric Medical Image Segmentation", 3DV 2016.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["VNet"]

_NORMS = ("batch", "instance", "none")
_ACTS = ("relu", "prelu")
_POOLINGS = ("conv_pool", "max_pool", "avg_pool")
_UPSAMPLINGS = ("transposed_conv", "trilinear")


def _check_choice(name: str, value: object, choices: Sequence[object]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}.")


class _ConvNormAct(nn.Sequential):
    """Convolution (or transposed convolution) followed by normalization and activation."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel_size: int, stride: int, norm: str, act: str, transposed: bool = False
    ) -> None:
        if transposed:
            conv: nn.Module = nn.ConvTranspose3d(in_ch, out_ch, kernel_size, stride=stride)
        else:
            conv = nn.Conv3d(in_ch, out_ch, kernel_size, stride=stride, padding=(kernel_size - 1) // 2)
        if norm == "batch":
            norm_layer: nn.Module = nn.BatchNorm3d(out_ch)
        elif norm == "instance":
            norm_layer = nn.InstanceNorm3d(out_ch, affine=True)
        else:
            norm_layer = nn.Identity()
        act_layer: nn.Module = nn.ReLU(inplace=True) if act == "relu" else nn.PReLU()
        super().__init__(conv, norm_layer, act_layer)


class _ResidualBlock(nn.Module):
    """`depth` channel-preserving conv-norm-act layers whose input is added to their output."""

    def __init__(self, channels: int, depth: int, kernel_size: int, norm: str, act: str) -> None:
        super().__init__()
        self.convs = nn.Sequential(*[_ConvNormAct(channels, channels, kernel_size, 1, norm, act) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x) + x


def _downsample(in_ch: int, kernel_size: int, pooling: str, norm: str, act: str) -> nn.Module:
    """Halve the spatial size and double the channels."""
    if pooling == "conv_pool":
        return _ConvNormAct(in_ch, 2 * in_ch, 2, 2, norm, act)
    pool: nn.Module = nn.MaxPool3d(2) if pooling == "max_pool" else nn.AvgPool3d(2)
    return nn.Sequential(pool, _ConvNormAct(in_ch, 2 * in_ch, kernel_size, 1, norm, act))


def _upsample(in_ch: int, out_ch: int, kernel_size: int, upsampling: str, norm: str, act: str) -> nn.Module:
    """Double the spatial size and map the channels to `out_ch`."""
    if upsampling == "transposed_conv":
        return _ConvNormAct(in_ch, out_ch, 2, 2, norm, act, transposed=True)
    return nn.Sequential(
        nn.Upsample(scale_factor=2.0, mode="trilinear", align_corners=False),
        _ConvNormAct(in_ch, out_ch, kernel_size, 1, norm, act),
    )


class _UpLevel(nn.Module):
    """Upsample to the skip's channels, concatenate the skip, then a residual block."""

    def __init__(self, in_ch: int, skip_ch: int, depth: int, kernel_size: int, upsampling: str, norm: str, act: str):
        super().__init__()
        self.up = _upsample(in_ch, skip_ch, kernel_size, upsampling, norm, act)
        self.residual = _ResidualBlock(2 * skip_ch, depth, kernel_size, norm, act)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.residual(torch.cat([self.up(x), skip], dim=1))


class VNet(nn.Module):
    """V-Net as in NVIDIA's TensorFlow recipe; returns logits (no softmax).

    Args:
        in_channels: number of input channels.
        out_channels: number of output classes (logit channels).
        init_filters: channels after the input block; every down level doubles them.
        downscale_blocks: residual depth of each down level; its length is the number of levels.
        upscale_blocks: residual depth of each up level; must have one entry fewer than `downscale_blocks`
            (the last up level is the output block).
        kernel_size: convolution kernel size, 3 or 5.
        act: activation, ``"relu"`` or ``"prelu"``.
        norm: normalization, ``"batch"``, ``"instance"`` or ``"none"``.
        pooling: ``"conv_pool"`` (stride-2 conv, as the recipe), ``"max_pool"`` or ``"avg_pool"``
            (pooling followed by a conv that doubles the channels).
        upsampling: ``"transposed_conv"`` (as the recipe) or ``"trilinear"`` (interpolation then conv).
        full_res_skip: concatenate the input block's features before the output convolution; the recipe
            ignores this full-resolution skip.
        deep_supervision: in training mode, also predict from every up level (1x1x1 convolutions) and return
            all predictions upsampled to the input size and stacked along dim 1, full resolution first, as
            MONAI's DynUNet does (see `scripts.networks.losses.StackedDeepSupervisionLoss`). Eval mode returns the
            full-resolution logits only.

    Spatial sizes must be divisible by ``2 ** len(downscale_blocks)``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 3,
        init_filters: int = 16,
        downscale_blocks: Sequence[int] = (3, 3, 3),
        upscale_blocks: Sequence[int] = (3, 3),
        kernel_size: int = 3,
        act: str = "relu",
        norm: str = "batch",
        pooling: str = "conv_pool",
        upsampling: str = "transposed_conv",
        full_res_skip: bool = False,
        deep_supervision: bool = False,
    ) -> None:
        super().__init__()
        _check_choice("kernel_size", kernel_size, (3, 5))
        _check_choice("act", act, _ACTS)
        _check_choice("norm", norm, _NORMS)
        _check_choice("pooling", pooling, _POOLINGS)
        _check_choice("upsampling", upsampling, _UPSAMPLINGS)
        if len(downscale_blocks) < 1 or len(upscale_blocks) != len(downscale_blocks) - 1:
            raise ValueError(
                "upscale_blocks needs one entry fewer than downscale_blocks, got "
                f"{list(upscale_blocks)} and {list(downscale_blocks)}."
            )
        self.divisor = 2 ** len(downscale_blocks)
        self.full_res_skip = full_res_skip
        self.deep_supervision = deep_supervision

        self.input_conv = _ConvNormAct(in_channels, init_filters, kernel_size, 1, norm, act)
        # the recipe broadcast-adds its single-channel input; other channel counts are projected by a 1x1x1 conv
        self.input_proj: nn.Module = (
            nn.Identity() if in_channels in (1, init_filters) else nn.Conv3d(in_channels, init_filters, 1)
        )

        channels = [init_filters * 2**i for i in range(len(downscale_blocks) + 1)]
        self.down_levels = nn.ModuleList(
            nn.Sequential(
                _downsample(channels[i], kernel_size, pooling, norm, act),
                _ResidualBlock(channels[i + 1], depth, kernel_size, norm, act),
            )
            for i, depth in enumerate(downscale_blocks)
        )
        self.up_levels = nn.ModuleList()
        self.aux_heads = nn.ModuleList()  # parameter-free without deep supervision
        in_ch = channels[-1]
        for i, depth in enumerate(upscale_blocks):
            skip_ch = channels[-2 - i]
            self.up_levels.append(_UpLevel(in_ch, skip_ch, depth, kernel_size, upsampling, norm, act))
            in_ch = 2 * skip_ch
            self.aux_heads.append(nn.Conv3d(in_ch, out_channels, 1) if deep_supervision else nn.Identity())
        self.output_up = _upsample(in_ch, init_filters, kernel_size, upsampling, norm, act)
        out_in_ch = 2 * init_filters if full_res_skip else init_filters
        self.output_conv = nn.Conv3d(out_in_ch, out_channels, kernel_size, padding=(kernel_size - 1) // 2)

        for module in self.modules():
            if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
                nn.init.xavier_uniform_(module.weight)  # the recipe's glorot_uniform
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = x.shape[2:]
        for size in spatial:
            if size % self.divisor != 0:
                raise ValueError(
                    f"VNet input spatial size {list(spatial)} is not supported: every spatial size must be "
                    f"divisible by {self.divisor} (e.g. 32, 48, 64)."
                )
        x = self.input_conv(x) + self.input_proj(x)
        skips: list[torch.Tensor] = [x]
        for level in self.down_levels:
            x = level(x)
            skips.append(x)
        supervise = self.deep_supervision and self.training
        aux: list[torch.Tensor] = []
        for i, (level, head) in enumerate(zip(self.up_levels, self.aux_heads)):
            x = level(x, skips[-2 - i])
            if supervise:
                aux.insert(0, head(x))
        x = self.output_up(x)
        if self.full_res_skip:
            x = torch.cat([x, skips[0]], dim=1)
        out = self.output_conv(x)
        if not supervise:
            return out
        upsampled = [F.interpolate(a, size=spatial, mode="trilinear", align_corners=False) for a in aux]
        return torch.stack([out] + upsampled, dim=1)
