"""Sine position embeddings: of feature-map pixels (encoder) and of boxes (query positions)."""

from __future__ import annotations

import math

import torch
from torch import nn

from rankdetr.layers.dtypes import at_least_float32, lift_to_float32

__all__ = ["PositionEmbeddingSine", "sine_embedding_of_boxes"]


class PositionEmbeddingSine(nn.Module):
    """DETR's sine embedding of pixel positions, counted over the unpadded part of each image.

    For channel pair i, position x gets (sin(x / T^(2i/F)), cos(x / T^(2i/F))); with `normalize`,
    positions are ((index + 1) + offset) / (valid extent + eps) * scale.

    Precision: the table is computed in the dtype it is asked for, float32 by default (as in
    Deformable DETR and the original release, for float32, bf16 and fp16 runs alike) and float64
    in float64 runs. A float32 table differs between CPUs in its last bit (float32 sin, cos and
    pow go through MKL's vector math, whose code path is chosen per CPU), which would move a
    float64 run's outputs by ~1e-8; in float64 they agree to float64 rounding on every CPU.
    """

    def __init__(
        self,
        *,
        num_pos_feats: int = 128,
        temperature: float = 10000.0,
        normalize: bool = True,
        scale: float = 2 * math.pi,
        offset: float = -0.5,
        eps: float = 1e-6,
    ):
        """
        Args:
            num_pos_feats: channels F per axis; the embedding has 2 * F channels (y then x).
            temperature: T, the base of the wavelengths.
            normalize: scale positions to [0, scale] by the valid height / width.
            scale, offset, eps: of the normalisation (offset -0.5 centres on pixel centres).
        """
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.offset = offset
        self.eps = eps

    def forward(
        self, padding_mask: torch.Tensor, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """(B, H, W) bool, True at padding -> (B, 2 * F, H, W) in `dtype` lifted to at least
        float32 (pass the features' dtype: a float64 run gets a float64 table)."""
        valid = (~padding_mask).to(at_least_float32(dtype))
        y = valid.cumsum(1)
        x = valid.cumsum(2)
        if self.normalize:
            y = (y + self.offset) / (y[:, -1:, :] + self.eps) * self.scale
            x = (x + self.offset) / (x[:, :, -1:] + self.eps) * self.scale
        pos_y = _interleaved_sin_cos(y, self.num_pos_feats, self.temperature)
        pos_x = _interleaved_sin_cos(x, self.num_pos_feats, self.temperature)
        return torch.cat([pos_y, pos_x], dim=-1).permute(0, 3, 1, 2)


def _interleaved_sin_cos(
    positions: torch.Tensor, channels: int, temperature: float
) -> torch.Tensor:
    """(...) -> (..., channels): sin at even channels, cos at odd, wavelength per pair.

    The wavelengths take the positions' dtype lifted to at least float32: a float32 table for
    float32 positions, as in Deformable DETR and the original release, and a float64 one for
    float64 positions (a float32 table's last bit depends on the CPU's vector math).
    """
    dtype = at_least_float32(positions.dtype)
    pair = torch.arange(channels, dtype=dtype, device=positions.device) // 2
    wavelengths = temperature ** (2 * pair / channels)
    angles = positions[..., None] / wavelengths
    return torch.stack([angles[..., 0::2].sin(), angles[..., 1::2].cos()], dim=-1).flatten(-2)


def sine_embedding_of_boxes(
    boxes: torch.Tensor,
    num_pos_feats: int = 128,
    temperature: float = 10000.0,
    exchange_xy: bool = False,
) -> torch.Tensor:
    """(..., 4) normalised (cx, cy, w, h) -> (..., 4 * F): each coordinate * 2 pi, sine-embedded.

    This is the two-stage proposal embedding of Deformable DETR (its input to `pos_trans`), in
    the order (cx, cy, w, h). DINO's query positions embed the same way in the order
    (cy, cx, w, h) (`exchange_xy`), as its released weights expect.
    Half-precision boxes are embedded in float32, float64 boxes in float64 (frequency table
    included).
    """
    scaled = lift_to_float32(boxes) * (2 * math.pi)
    parts = [_interleaved_sin_cos(scaled[..., i], num_pos_feats, temperature) for i in range(4)]
    if exchange_xy:
        parts[0], parts[1] = parts[1], parts[0]
    return torch.cat(parts, dim=-1)
