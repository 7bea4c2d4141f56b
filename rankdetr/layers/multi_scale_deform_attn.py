"""The multi-scale deformable attention module of Deformable DETR.

Its parameter names (``value_proj``, ``sampling_offsets``, ``attention_weights``,
``output_proj``) are those of the original Rank-DETR release, so its checkpoints load directly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rankdetr.layers.ms_deform_attn_op import ms_deform_attn

__all__ = ["MultiScaleDeformableAttention"]


class MultiScaleDeformableAttention(nn.Module):
    """Each query attends to ``num_points`` sampled points per level around its reference.

    The sampling offsets and attention weights are predicted from the query; the values are
    bilinearly sampled from every level of the flattened feature pyramid.
    """

    def __init__(
        self,
        *,
        embed_dim: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
    ):
        """
        Args:
            embed_dim: channels C of queries and values; a multiple of num_heads.
            num_heads: attention heads H (each sees C / H channels).
            num_levels: feature levels L.
            num_points: sampling points P per head and level.
        """
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})"
            )
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's initialisation: each head starts looking in its own direction.

        Head h's points lie along the direction at angle 2*pi*h/H (scaled so that its larger
        coordinate is 1), point p at distance p + 1; attention starts uniform.
        """
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float64) * (
            2.0 * math.pi / self.num_heads
        )
        directions = torch.stack([angles.cos(), angles.sin()], dim=-1)  # (H, 2)
        directions = directions / directions.abs().max(dim=-1, keepdim=True).values
        distances = torch.arange(1, self.num_points + 1, dtype=torch.float64)
        grid = directions[:, None, None, :] * distances[None, None, :, None]  # (H, 1, P, 2)
        grid = grid.expand(self.num_heads, self.num_levels, self.num_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        value: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        value_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            query: (N, Lq, C), with its positional embedding already added.
            value: (N, S, C), the flattened levels, S = sum_l h_l * w_l.
            reference_points: (N, Lq, L, 2) normalised (x, y) points, or (N, Lq, L, 4)
                normalised (cx, cy, w, h) boxes, per level.
            spatial_shapes: (L, 2) int64, (h_l, w_l) per level.
            level_start_index: (L,) int64, start of each level inside S.
            value_padding_mask: (N, S) bool, True at padded positions (they read as zeros).

        Returns:
            (N, Lq, C), before any residual connection or dropout (the caller's layer adds them).
        """
        n, num_keys, _ = value.shape
        value = self.value_proj(value)
        if value_padding_mask is not None:
            value = value.masked_fill(value_padding_mask[..., None], 0.0)
        value = value.view(n, num_keys, self.num_heads, self.embed_dim // self.num_heads)
        locations = self.sampling_locations(query, reference_points, spatial_shapes)
        weights = self.attention_probabilities(query)
        out = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)
        return self.output_proj(out)

    def attention_probabilities(self, query: torch.Tensor) -> torch.Tensor:
        """(N, Lq, C) -> (N, Lq, H, L, P): a softmax over each head's L * P points."""
        n, lq, _ = query.shape
        logits = self.attention_weights(query).view(n, lq, self.num_heads, -1)
        shape = (n, lq, self.num_heads, self.num_levels, self.num_points)
        return logits.softmax(dim=-1).view(shape)

    def sampling_locations(
        self, query: torch.Tensor, reference_points: torch.Tensor, spatial_shapes: torch.Tensor
    ) -> torch.Tensor:
        """Normalised sampling points (N, Lq, H, L, P, 2) around the references.

        Offsets are in pixels of each level for point references, and in units of half the box
        size divided by P for box references (so P points span the box, as in Deformable DETR's
        box refinement).
        """
        n, lq, _ = query.shape
        offsets = self.sampling_offsets(query).view(
            n, lq, self.num_heads, self.num_levels, self.num_points, 2
        )
        if reference_points.shape[-1] == 2:
            # (L, 2) as (w, h): offsets in pixels -> normalised units of each level.
            level_size = spatial_shapes.flip(-1).to(offsets.dtype)
            centres = reference_points[:, :, None, :, None, :]
            return centres + offsets / level_size[None, None, None, :, None, :]
        if reference_points.shape[-1] == 4:
            centres = reference_points[:, :, None, :, None, :2]
            sizes = reference_points[:, :, None, :, None, 2:]
            return centres + offsets / self.num_points * sizes * 0.5
        raise ValueError(
            "reference_points must end in 2 (x, y) or 4 (cx, cy, w, h), got shape "
            f"{tuple(reference_points.shape)}"
        )
