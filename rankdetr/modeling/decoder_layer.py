"""One decoder layer of H-DETR: grouped self-attention, deformable cross-attention, FFN."""

from __future__ import annotations

import torch
from torch import nn

from rankdetr.layers.attention_backend import working_attention_kernel
from rankdetr.layers.multi_scale_deform_attn import MultiScaleDeformableAttention
from rankdetr.modeling.encoder import FeedForward

__all__ = ["DeformableDecoderLayer", "grouped_self_attention"]


def grouped_self_attention(
    attn: nn.MultiheadAttention, query: torch.Tensor, value: torch.Tensor, group_sizes: list[int]
) -> torch.Tensor:
    """Self-attention within each group of consecutive queries, never across groups.

    H-DETR keeps its one-to-one and one-to-many queries apart with a block-diagonal mask over all
    queries; attending group by group gives the same result without the masked-out products.

    Args:
        attn: batch-first multi-head attention.
        query: (N, Q, C) queries and keys (content + position).
        value: (N, Q, C).
        group_sizes: sizes summing to Q.

    Returns:
        (N, Q, C).
    """
    with working_attention_kernel(query):
        if len(group_sizes) == 1:
            return attn(query, query, value, need_weights=False)[0]
        outputs = [
            attn(q, q, v, need_weights=False)[0]
            for q, v in zip(query.split(group_sizes, dim=1), value.split(group_sizes, dim=1))
        ]
    return torch.cat(outputs, dim=1)


class SelfAttention(nn.Module):
    """Holds the attention as `attn`, the layout of the original release's checkpoints."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.attn = nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout, batch_first=True)

    def forward(
        self,
        query: torch.Tensor,
        value: torch.Tensor,
        group_sizes: list[int],
        attn_mask: torch.Tensor | None = None,
    ):
        """query (N, Q, C) with positions, value (N, Q, C) -> (N, Q, C). `attn_mask` (Q, Q) bool,
        True where a query may not attend (DINO's denoising groups), replaces `group_sizes`."""
        if attn_mask is not None:
            with working_attention_kernel(query):
                return self.attn(query, query, value, attn_mask=attn_mask, need_weights=False)[0]
        return grouped_self_attention(self.attn, query, value, group_sizes)


class DeformableDecoderLayer(nn.Module):
    """Post-norm: self-attention -> norm1 -> deformable cross-attention -> norm2 -> FFN -> norm3."""

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
        self.self_attn = SelfAttention(embed_dim, num_heads, dropout)
        self.norm1 = nn.LayerNorm(embed_dim)
        self.cross_attn = MultiScaleDeformableAttention(
            embed_dim=embed_dim, num_heads=num_heads, num_levels=num_levels, num_points=num_points
        )
        self.norm2 = nn.LayerNorm(embed_dim)
        self.ffn = FeedForward(embed_dim, ffn_dim, dropout)
        self.norm3 = nn.LayerNorm(embed_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        query: torch.Tensor,
        query_pos: torch.Tensor,
        reference_boxes: torch.Tensor,
        memory: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        memory_padding_mask: torch.Tensor | None,
        group_sizes: list[int],
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            query: (N, Q, C) content queries.
            query_pos: (N, Q, C) positional queries.
            reference_boxes: (N, Q, L, 4) normalised (cx, cy, w, h) per level.
            memory: (N, S, C) encoder output.
            spatial_shapes: (L, 2) int64; level_start_index: (L,) int64.
            memory_padding_mask: (N, S) bool or None.
            group_sizes: query groups that must not attend to each other (sum Q).
            attn_mask: (Q, Q) bool, True where query i may not attend to query j; when given,
                it decides instead of `group_sizes` (DINO's denoising groups).

        Returns:
            (N, Q, C).
        """
        attended = self.self_attn(query + query_pos, query, group_sizes, attn_mask)
        query = self.norm1(query + self.dropout(attended))
        attended = self.cross_attn(
            query + query_pos,
            memory,
            reference_boxes,
            spatial_shapes,
            level_start_index,
            memory_padding_mask,
        )
        query = self.norm2(query + self.dropout(attended))
        return self.norm3(query + self.ffn(query))
