"""Backbone adapters: each returns its feature maps as a list, finest first, and lists their
channels in `out_channels` and strides in `strides`.

* :class:`ResNetBackbone`: detectron2's ResNet (depth 18/34/50/101, FrozenBN, stem frozen), with
  detectron2's parameter names (those of the original release's checkpoints).
* :class:`TimmBackbone`: any timm model with `features_only` (Swin-T / Swin-L for Rank-DETR),
  built without downloading weights; load them from a local file instead.
"""

from __future__ import annotations

import torch
from detectron2.modeling.backbone import BasicStem, ResNet
from detectron2.modeling.backbone.resnet import BasicBlock, BottleneckBlock
from torch import nn

__all__ = ["ResNetBackbone", "TimmBackbone"]


class ResNetBackbone(ResNet):
    """detectron2's ResNet returning `out_features` as a list."""

    def __init__(
        self,
        *,
        depth: int = 50,
        out_features: tuple[str, ...] = ("res3", "res4", "res5"),
        freeze_at: int = 1,
        norm: str = "FrozenBN",
        stride_in_1x1: bool = False,
        width: int = 64,
    ):
        """
        Args:
            depth: 18, 34, 50 or 101.
            out_features: stages to return, finest first.
            freeze_at: 1 freezes the stem, k > 1 also stages res2..res{k}; 0 freezes nothing.
            norm: detectron2 norm name ("FrozenBN", "BN", "SyncBN", "GN", ...).
            stride_in_1x1: stride in the 1x1 conv of bottlenecks (MSRA weights) rather than the
                3x3 (torchvision weights, the default here as in the release).
            width: channels of the stem; every stage's channels scale with it (64: the standard
                ResNet; 32 quarters the convolution cost, for small models trained from scratch).
        """
        if depth not in (18, 34, 50, 101, 152):
            raise ValueError(f"ResNet depth must be one of 18, 34, 50, 101, 152, got {depth}")
        block_kwargs = {"norm": norm}
        if depth >= 50:
            block_kwargs["stride_in_1x1"] = stride_in_1x1
        stages = _resnet_stages(depth, width, block_kwargs)
        stem = BasicStem(in_channels=3, out_channels=width, norm=norm)
        super().__init__(stem, stages, out_features=list(out_features), freeze_at=freeze_at)
        self.out_channels = [self._out_feature_channels[name] for name in out_features]
        self.strides = [self._out_feature_strides[name] for name in out_features]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        """(N, 3, H, W) normalised images -> maps (N, C_i, H / s_i, W / s_i), finest first."""
        features = super().forward(images)
        return [features[name] for name in self._out_features]


def _resnet_stages(depth: int, width: int, block_kwargs: dict) -> list[list[nn.Module]]:
    """detectron2's default stages for `depth`, with every channel count scaled by width / 64."""
    if width == 64:
        return ResNet.make_default_stages(depth, **block_kwargs)
    if width <= 0 or width % 8:
        raise ValueError(f"ResNet width must be a positive multiple of 8, got {width}")
    blocks = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3],
              152: [3, 8, 36, 3]}[depth]  # fmt: skip
    expansion = 1 if depth < 50 else 4
    out_channels = [width * expansion * 2**i for i in range(4)]
    in_channels = [width] + out_channels[:-1]
    block_class = BasicBlock if depth < 50 else BottleneckBlock
    stages = []
    for num_blocks, stride, c_in, c_out in zip(blocks, [1, 2, 2, 2], in_channels, out_channels):
        if depth >= 50:
            block_kwargs = {**block_kwargs, "bottleneck_channels": c_out // 4}
        stages.append(ResNet.make_stage(block_class=block_class, num_blocks=num_blocks,
                                        stride_per_block=[stride] + [1] * (num_blocks - 1),
                                        in_channels=c_in, out_channels=c_out,
                                        **block_kwargs))  # fmt: skip
    return stages


class TimmBackbone(nn.Module):
    """A timm model's intermediate features (`features_only`), as channels-first maps."""

    def __init__(
        self,
        *,
        model_name: str = "swin_tiny_patch4_window7_224",
        out_indices: tuple[int, ...] = (1, 2, 3),
        drop_path_rate: float = 0.2,
        **timm_kwargs,
    ):
        """
        Args:
            model_name: timm architecture, e.g. "swin_tiny_patch4_window7_224",
                "swin_large_patch4_window12_384".
            out_indices: feature levels to return (Swin: 1, 2, 3 are strides 8, 16, 32).
            drop_path_rate: stochastic depth.
            timm_kwargs: passed to `timm.create_model`.
        """
        super().__init__()
        import timm

        if model_name.startswith("swin"):
            # Detection inputs vary in size: let Swin pad to whole windows instead of refusing.
            timm_kwargs.setdefault("strict_img_size", False)
        self.body = timm.create_model(
            model_name,
            pretrained=False,  # never download: load local weights with the checkpoint tools
            features_only=True,
            out_indices=out_indices,
            drop_path_rate=drop_path_rate,
            **timm_kwargs,
        )
        self.out_channels = list(self.body.feature_info.channels())
        self.strides = list(self.body.feature_info.reduction())
        self.channels_last_output = model_name.startswith("swin")

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(N, 3, H, W) -> maps (N, C_i, h_i, w_i), finest first."""
        features = self.body(images)
        if self.channels_last_output:  # timm's Swin returns (N, h, w, C)
            features = [f.permute(0, 3, 1, 2).contiguous() for f in features]
        return features
