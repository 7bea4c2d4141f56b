"""The neck: backbone levels -> a pyramid of equal-width levels for the deformable encoder."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ChannelMapper"]


class ConvNorm(nn.Sequential):
    """Conv2d followed by GroupNorm (no activation), named `conv` / `norm` as in the release."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int, groups: int
    ):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2
        )
        self.norm = nn.GroupNorm(groups, out_channels)


class ChannelMapper(nn.Module):
    """1x1 conv + GroupNorm per input level, plus extra 3x3 stride-2 levels on the last input.

    With ResNet's res3/res4/res5 and one extra level this gives Deformable DETR's 4 levels at
    strides 8, 16, 32, 64.
    """

    def __init__(
        self,
        *,
        in_channels: list[int],
        out_channels: int = 256,
        num_extra_levels: int = 1,
        norm_groups: int = 32,
    ):
        """
        Args:
            in_channels: channels of each backbone level, finest first.
            out_channels: channels C of every output level.
            num_extra_levels: stride-2 levels appended after the last input (the first reads the
                last backbone level, the next ones the previous extra level).
            norm_groups: GroupNorm groups.
        """
        super().__init__()
        self.convs = nn.ModuleList(
            ConvNorm(c, out_channels, 1, 1, norm_groups) for c in in_channels
        )
        extra_inputs = [in_channels[-1]] + [out_channels] * (num_extra_levels - 1)
        self.extra_convs = nn.ModuleList(
            ConvNorm(c, out_channels, 3, 2, norm_groups) for c in extra_inputs[:num_extra_levels]
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def num_levels(self) -> int:
        return len(self.convs) + len(self.extra_convs)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """len(in_channels) maps (B, C_i, H_i, W_i), finest first -> num_levels (B, C, h, w)."""
        if len(features) != len(self.convs):
            raise ValueError(f"ChannelMapper expects {len(self.convs)} levels, got {len(features)}")
        outputs = [conv(x) for conv, x in zip(self.convs, features)]
        previous = features[-1]
        for conv in self.extra_convs:
            previous = conv(previous)
            outputs.append(previous)
        return outputs
