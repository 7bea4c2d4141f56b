"""The deformable transformer encoder (Deformable DETR), post-norm."""

from __future__ import annotations

import torch
from torch import nn

from rankdetr.layers.multi_scale_deform_attn import MultiScaleDeformableAttention
from rankdetr.modeling.checkpointing import run_layer
from rankdetr.modeling.init import init_like_release_transformer

__all__ = ["FeedForward", "DeformableEncoderLayer", "DeformableEncoder", "encoder_reference_points"]


class FeedForward(nn.Module):
    """Linear -> ReLU -> dropout -> Linear -> dropout."""

    def __init__(self, embed_dim: int = 256, hidden_dim: int = 2048, dropout: float = 0.0):
        super().__init__()
        self.linear1 = nn.Linear(embed_dim, hidden_dim)
        self.linear2 = nn.Linear(hidden_dim, embed_dim)
        self.activation = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (..., C).

        Runs on the 2-D (rows, C) input: linear1's output of a 3-D input is a view of its 2-D
        product, and the in-place ReLU on a view makes autograd rebuild the whole base in
        backward (a zero fill and two full copies of the (rows, hidden) tensor per layer).
        """
        hidden = self.dropout(self.activation(self.linear1(x.reshape(-1, x.shape[-1]))))
        return self.dropout(self.linear2(hidden)).view(x.shape)


class DeformableEncoderLayer(nn.Module):
    """Deformable self-attention over all levels, then a feed-forward block, each post-norm."""

    def __init__(
        self,
        *,
        embed_dim: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        ffn_dim: int = 2048,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(
            embed_dim=embed_dim, num_heads=num_heads, num_levels=num_levels, num_points=num_points
        )
        self.dropout = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(embed_dim)
        self.ffn = FeedForward(embed_dim, ffn_dim, dropout)
        self.norm2 = nn.LayerNorm(embed_dim)

    def forward(
        self,
        src: torch.Tensor,
        pos: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        padding_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """
        Args:
            src: (N, S, C) flattened features of all levels.
            pos: (N, S, C) position + level embeddings.
            reference_points: (N, S, L, 2) normalised pixel centres, per level.
            spatial_shapes: (L, 2) int64; level_start_index: (L,) int64.
            padding_mask: (N, S) bool, True at padding, or None.

        Returns:
            (N, S, C).
        """
        attended = self.self_attn(
            src + pos, src, reference_points, spatial_shapes, level_start_index, padding_mask
        )
        src = self.norm1(src + self.dropout(attended))
        return self.norm2(src + self.ffn(src))


class DeformableEncoder(nn.Module):
    """A stack of :class:`DeformableEncoderLayer`, initialised as the release's transformer
    (xavier_uniform_ on every matrix, then the deformable attentions' own initialisation)."""

    def __init__(
        self, *, num_layers: int = 6, activation_checkpointing: bool = False, **layer_kwargs
    ):
        """
        Args:
            num_layers: encoder layers.
            activation_checkpointing: recompute each layer's activations in backward instead of
                storing them (less memory, one more forward per layer).
            layer_kwargs: sizes of :class:`DeformableEncoderLayer`.
        """
        super().__init__()
        self.activation_checkpointing = activation_checkpointing
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(**layer_kwargs) for _ in range(num_layers)
        )
        init_like_release_transformer(self.layers)

    def forward(
        self,
        src: torch.Tensor,
        pos: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        valid_ratios: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            src, pos: (N, S, C).
            spatial_shapes: (L, 2) int64 (h, w); level_start_index: (L,) int64.
            valid_ratios: (N, L, 2), unpadded fraction (w, h) of each level.
            padding_mask: (N, S) bool or None.

        Returns:
            memory (N, S, C).
        """
        reference_points = encoder_reference_points(spatial_shapes, valid_ratios)
        for layer in self.layers:
            inputs = (src, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
            src = run_layer(layer, *inputs, activation_checkpointing=self.activation_checkpointing)
        return src


def encoder_reference_points(
    spatial_shapes: torch.Tensor,
    valid_ratios: torch.Tensor,
    level_shapes: list[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """Pixel centres of every level as reference points for every level.

    Each pixel centre is normalised by the unpadded extent of its own level, then mapped into
    every level's coordinates by that level's valid ratio (images in a batch are padded). The
    points take the valid ratios' dtype: float32 as in the release, float64 in a float64 run.

    Args:
        spatial_shapes: (L, 2) int64 (h, w).
        valid_ratios: (N, L, 2) as (w, h).
        level_shapes: the (h, w) of each level as Python (or symbolic) ints from the feature
            maps' shapes, instead of reading `spatial_shapes` on the host (the ONNX export
            passes them so that its graph follows the input size).

    Returns:
        (N, S, L, 2) normalised (x, y).
    """
    points = []
    if level_shapes is None:
        level_shapes = spatial_shapes.tolist()
    for level, (h, w) in enumerate(level_shapes):
        ys, xs = torch.meshgrid(
            torch.arange(h, dtype=valid_ratios.dtype, device=valid_ratios.device) + 0.5,
            torch.arange(w, dtype=valid_ratios.dtype, device=valid_ratios.device) + 0.5,
            indexing="ij",
        )
        ys = ys.reshape(1, -1) / (valid_ratios[:, None, level, 1] * h)
        xs = xs.reshape(1, -1) / (valid_ratios[:, None, level, 0] * w)
        points.append(torch.stack([xs, ys], dim=-1))
    return torch.cat(points, dim=1)[:, :, None] * valid_ratios[:, None]
