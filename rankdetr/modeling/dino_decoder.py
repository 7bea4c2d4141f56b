"""DINO's decoder, with Rank-DETR's query rank layers (QRL) and rank-adaptive heads (RCH).

Per layer l (0-based), for the Q matching queries after the P denoising queries:
  * with RCH or QRL, before layers 1..L-1 the matching queries are sorted by the previous layer's
    best class-head logit (without the RCH bias, as in H-DETR); content queries, reference boxes
    and the look-forward-twice boxes move together. Denoising queries are tied to their targets
    and keep their slots;
  * with QRL, the sorted matching content queries are fused with a learned per-rank embedding
    (Eq. 2);
  * positional queries are re-made from the (sorted) reference boxes by a sine embedding and a
    small MLP (DINO's `ref_point_head`), which is Eq. 4: PE(Sort(B^{l-1}));
  * the layer runs (self-attention under the denoising mask, deformable cross-attention, FFN);
  * the box head on the layer's raw output refines the reference boxes for the next layer; the
    heads on the normalised output (the shared final norm) give this layer's predictions, the
    boxes relative to the undetached reference (look-forward-twice);
  * with RCH, a learned per-rank bias is added to the matching queries' logits (Eq. 1).
This ordering of norm and refinement is DINO's own, kept so that its weights load and agree.
"""

from __future__ import annotations

import torch
from torch import nn

from rankdetr.layers.mlp import MLP, inverse_sigmoid
from rankdetr.layers.position_encoding import sine_embedding_of_boxes
from rankdetr.modeling.checkpointing import run_layer
from rankdetr.modeling.decoder import add_rank_parts, descending_order, gather_queries
from rankdetr.modeling.decoder_layer import DeformableDecoderLayer
from rankdetr.modeling.init import init_like_release_transformer

__all__ = ["DINODecoder"]


class DINODecoder(nn.Module):
    """Decoder layers, the positional-query MLP, the final norm, per-layer heads, rank parts."""

    def __init__(
        self,
        *,
        num_classes: int,
        num_queries: int,
        num_layers: int = 6,
        embed_dim: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        ffn_dim: int = 2048,
        dropout: float = 0.0,
        rank_adaptive_head: bool = False,
        query_rank_layer: bool = False,
        look_forward_twice: bool = True,
        activation_checkpointing: bool = False,
    ):
        """
        Args:
            num_classes: K.
            num_queries: Q matching queries (rows of the per-rank tables).
            num_layers .. dropout: sizes of the decoder layers.
            rank_adaptive_head: RCH, Eq. 1.
            query_rank_layer: QRL, Eq. 2 and 4.
            look_forward_twice: box losses also reach the previous layer's refinement.
            activation_checkpointing: recompute each layer's activations in backward.
        """
        super().__init__()
        self.embed_dim = embed_dim
        self.num_layers = num_layers
        self.look_forward_twice = look_forward_twice
        self.activation_checkpointing = activation_checkpointing
        self.layers = nn.ModuleList(
            DeformableDecoderLayer(
                embed_dim=embed_dim,
                num_heads=num_heads,
                num_levels=num_levels,
                num_points=num_points,
                ffn_dim=ffn_dim,
                dropout=dropout,
            )
            for _ in range(num_layers)
        )
        self.ref_point_head = MLP(2 * embed_dim, embed_dim, embed_dim, 2)
        self.norm = nn.LayerNorm(embed_dim)
        self.class_heads = nn.ModuleList(
            nn.Linear(embed_dim, num_classes) for _ in range(num_layers)
        )
        self.box_heads = nn.ModuleList(MLP(embed_dim, embed_dim, 4, 3) for _ in range(num_layers))
        add_rank_parts(
            self,
            num_layers=num_layers,
            num_rows=num_queries,
            num_classes=num_classes,
            embed_dim=embed_dim,
            rank_adaptive_head=rank_adaptive_head,
            query_rank_layer=query_rank_layer,
        )
        self.reset_parameters()

    @property
    def sorts_queries(self) -> bool:
        """Queries are sorted whenever a per-rank parameter exists (RCH and/or QRL)."""
        return self.rank_class_bias is not None or self.rank_content_query is not None

    def reset_parameters(self) -> None:
        """DINO's scheme: xavier on every matrix of the transformer (layers, `ref_point_head`,
        and the QRL parts beside them), then the deformable attentions' own; RCH biases zero.
        The heads are initialised by the meta-architecture (DINO copies one head to all)."""
        qrl_parts = (self.rank_content_query, self.rank_query_proj, self.rank_query_fuse)
        init_like_release_transformer(
            self.layers, self.ref_point_head, *(part for part in qrl_parts if part)
        )
        for table in self.rank_class_bias or []:
            nn.init.zeros_(table.weight)

    def forward(
        self,
        query: torch.Tensor,
        reference_boxes: torch.Tensor,
        memory: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        valid_ratios: torch.Tensor,
        memory_padding_mask: torch.Tensor | None,
        num_denoising: int = 0,
        attn_mask: torch.Tensor | None = None,
    ) -> dict[str, list[torch.Tensor]]:
        """
        Args:
            query: (N, P + Q, C) content queries, P denoising queries first.
            reference_boxes: (N, P + Q, 4) initial normalised (cx, cy, w, h), detached.
            memory: (N, S, C) encoder output.
            spatial_shapes: (L, 2) int64; level_start_index: (L,) int64.
            valid_ratios: (N, L, 2) unpadded fraction (w, h) of each level.
            memory_padding_mask: (N, S) bool or None.
            num_denoising: P.
            attn_mask: (P + Q, P + Q) bool, True = may not attend; None: all attend.

        Returns:
            Per layer (lists of num_layers tensors): "logits" (N, P + Q, K) (RCH bias on the
            matching queries), "boxes" (N, P + Q, 4) normalised cxcywh, and "order" (N, Q):
            for each matching slot, the index of the initial matching query it descends from.
        """
        n, total, _ = query.shape
        num_matching = total - num_denoising
        ratio_boxes = torch.cat([valid_ratios, valid_ratios], dim=-1)[:, None]  # (N, 1, L, 4)
        boxes = reference_boxes
        previous_boxes = reference_boxes
        order = torch.arange(num_matching, device=query.device).expand(n, num_matching)
        outputs = {"logits": [], "boxes": [], "order": []}
        ranking_scores = None
        for layer_index, layer in enumerate(self.layers):
            if ranking_scores is not None and self.sorts_queries:
                ranking = descending_order(ranking_scores)
                query, boxes, previous_boxes = (
                    _sort_matching(t, ranking, num_denoising)
                    for t in (query, boxes, previous_boxes)
                )
                order = gather_queries(order, ranking)
                query = self._fuse_rank_content(query, layer_index, num_denoising)
            levels_boxes = boxes[:, :, None] * ratio_boxes
            query_pos = self.positional_queries(levels_boxes[:, :, 0])
            query = run_layer(
                layer,
                query,
                query_pos,
                levels_boxes,
                memory,
                spatial_shapes,
                level_start_index,
                memory_padding_mask,
                [total],
                attn_mask,
                activation_checkpointing=self.activation_checkpointing,
            )
            refined = (self.box_heads[layer_index](query) + inverse_sigmoid(boxes)).sigmoid()
            state = self.norm(query)
            base = previous_boxes if self.look_forward_twice else boxes
            predicted = (self.box_heads[layer_index](state) + inverse_sigmoid(base)).sigmoid()
            class_logits = self.class_heads[layer_index](state)
            outputs["boxes"].append(predicted)
            outputs["logits"].append(self._add_rank_bias(class_logits, layer_index, num_denoising))
            outputs["order"].append(order)
            ranking_scores = class_logits[:, num_denoising:].detach().amax(-1)
            previous_boxes, boxes = refined, refined.detach()
        return outputs

    def positional_queries(self, boxes: torch.Tensor) -> torch.Tensor:
        """(N, Q, 4) boxes in level-0 coordinates -> (N, Q, C) positional queries."""
        embedded = sine_embedding_of_boxes(boxes, self.embed_dim // 2, exchange_xy=True)
        return self.ref_point_head(embedded)

    def _add_rank_bias(self, logits: torch.Tensor, layer_index: int, num_denoising: int):
        """Eq. 1 on the matching queries: slot i's logits + s^l_i (RCH only)."""
        if self.rank_class_bias is None:
            return logits
        bias = self.rank_class_bias[layer_index].weight[: logits.shape[1] - num_denoising]
        zeros = bias.new_zeros(num_denoising, bias.shape[1])
        return logits + torch.cat([zeros, bias])[None]

    def _fuse_rank_content(self, query: torch.Tensor, layer_index: int, num_denoising: int):
        """Eq. 2 on the sorted matching content queries (QRL only); denoising queries as they
        are."""
        if self.rank_content_query is None:
            return query
        denoising, matching = query[:, :num_denoising], query[:, num_denoising:]
        rank_embedding = self.rank_content_query[layer_index - 1].weight[: matching.shape[1]]
        rank_embedding = self.rank_query_proj[layer_index - 1](rank_embedding)
        rank_embedding = rank_embedding[None].expand_as(matching)
        fused = self.rank_query_fuse[layer_index - 1](torch.cat([matching, rank_embedding], -1))
        return torch.cat([denoising, fused], dim=1)


def _sort_matching(tensor: torch.Tensor, ranking: torch.Tensor, num_denoising: int):
    """tensor (N, P + Q, ...) with its matching part (after P) reordered by ranking (N, Q)."""
    return torch.cat(
        [tensor[:, :num_denoising], gather_queries(tensor[:, num_denoising:], ranking)], dim=1
    )
