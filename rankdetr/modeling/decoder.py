"""The rank-oriented decoder: H-DETR's decoder with query rank layers (QRL) and rank-adaptive
classification heads (RCH).

Per layer l (0-based here; the paper counts from 1):
  * before layers 1..L-1, when RCH or QRL is on, queries are sorted within each group (one-to-one,
    one-to-many) by the previous layer's best class-head logit, descending: MLP_cls(Q) alone as
    in Eq. 2 and the original release, without the RCH bias (a bias in the key would reward a
    query for the slot it already holds); content queries, positional queries and reference
    boxes move together (Eq. 3);
  * with QRL, the sorted content queries are fused with a learned per-rank embedding C^l:
    q = Linear_fuse([q ; Linear(C^l)]) (Eq. 2);
  * the layer runs (grouped self-attention, deformable cross-attention, FFN);
  * the box head refines the reference boxes (iterative refinement, look-forward-twice);
  * the class head gives logits, plus a learned per-rank bias s^l with RCH (Eq. 1).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rankdetr.layers.mlp import MLP, inverse_sigmoid
from rankdetr.modeling.checkpointing import run_layer
from rankdetr.modeling.decoder_layer import DeformableDecoderLayer
from rankdetr.modeling.init import init_like_release_transformer

__all__ = [
    "RankDecoder",
    "add_rank_parts",
    "descending_order",
    "gather_queries",
    "sort_within_groups",
]


def descending_order(scores: torch.Tensor) -> torch.Tensor:
    """(N, Q) ranking scores -> (N, Q) indices from the best, ties by the lower index (a stable
    sort). One function for every query sort of the decoders, so that the ONNX check can replay
    another runtime's order where scores tie (rankdetr/export/onnx.py)."""
    return scores.argsort(dim=1, descending=True, stable=True)


def sort_within_groups(scores: torch.Tensor, group_sizes: list[int]) -> torch.Tensor:
    """Indices that sort each group of consecutive queries by score, descending.

    Args:
        scores: (N, Q) ranking scores.
        group_sizes: sizes summing to Q.

    Returns:
        (N, Q) int64 indices into Q; each group's indices stay inside the group.
    """
    orders, start = [], 0
    for size in group_sizes:
        orders.append(descending_order(scores[:, start : start + size]) + start)
        start += size
    return torch.cat(orders, dim=1)


def gather_queries(tensor: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """tensor (N, Q, ...) reordered along Q by order (N, Q)."""
    index = order.view(*order.shape, *([1] * (tensor.dim() - 2))).expand_as(tensor)
    return tensor.gather(1, index)


def add_rank_parts(
    decoder: nn.Module,
    *,
    num_layers: int,
    num_rows: int,
    num_classes: int,
    embed_dim: int,
    rank_adaptive_head: bool,
    query_rank_layer: bool,
) -> None:
    """Give a decoder its per-rank parameters (None where the component is off):
    `rank_class_bias` (RCH, Eq. 1): per layer an (num_rows, K) table;
    `rank_content_query`, `rank_query_proj`, `rank_query_fuse` (QRL, Eq. 2): per layer after the
    first an (num_rows, C) embedding C^l, a Linear on it and the Linear fusing [q ; f(C^l)]."""
    decoder.rank_class_bias = None
    if rank_adaptive_head:
        decoder.rank_class_bias = nn.ModuleList(
            nn.Embedding(num_rows, num_classes) for _ in range(num_layers)
        )
    decoder.rank_content_query = decoder.rank_query_proj = decoder.rank_query_fuse = None
    if query_rank_layer:
        decoder.rank_content_query = nn.ModuleList(
            nn.Embedding(num_rows, embed_dim) for _ in range(num_layers - 1)
        )
        decoder.rank_query_proj = nn.ModuleList(
            nn.Linear(embed_dim, embed_dim) for _ in range(num_layers - 1)
        )
        decoder.rank_query_fuse = nn.ModuleList(
            nn.Linear(2 * embed_dim, embed_dim) for _ in range(num_layers - 1)
        )


class RankDecoder(nn.Module):
    """Decoder layers plus their per-layer class and box heads and the rank-oriented parts."""

    def __init__(
        self,
        *,
        num_classes: int,
        max_queries: int,
        num_layers: int = 6,
        embed_dim: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        ffn_dim: int = 2048,
        dropout: float = 0.0,
        rank_adaptive_head: bool = True,
        query_rank_layer: bool = True,
        look_forward_twice: bool = True,
        activation_checkpointing: bool = False,
    ):
        """
        Args:
            num_classes: K, classes of the class heads.
            max_queries: rows of the per-rank tables (RCH biases, QRL embeddings): all queries
                of all groups in training (e.g. 300 + 1500).
            num_layers .. dropout: sizes of the decoder layers.
            rank_adaptive_head: RCH, Eq. 1.
            query_rank_layer: QRL, Eq. 2-3.
            look_forward_twice: box losses also reach the previous layer's refinement.
            activation_checkpointing: recompute each layer's activations in backward instead of
                storing them.
        """
        super().__init__()
        self.activation_checkpointing = activation_checkpointing
        self.num_layers = num_layers
        self.look_forward_twice = look_forward_twice
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
        self.class_heads = nn.ModuleList(
            nn.Linear(embed_dim, num_classes) for _ in range(num_layers)
        )
        self.box_heads = nn.ModuleList(MLP(embed_dim, embed_dim, 4, 3) for _ in range(num_layers))
        add_rank_parts(
            self,
            num_layers=num_layers,
            num_rows=max_queries,
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
        """The release's scheme, module by module.

        * Decoder layers and the QRL parts (rank embeddings C^l, their projection and the fusion),
          which sit inside the release's transformer: xavier_uniform_ on every matrix, then the
          deformable attentions' own initialisation. C^l is thus random, as the paper says
          ("randomly initialized"); the release's zeroing of it is overwritten by that xavier pass.
        * Class heads: PyTorch's default weights, bias at the focal-loss prior (scores 0.01).
        * Box heads: last layer zero (the first refinement keeps the proposals).
        * RCH biases s^l: zero.
        """
        qrl_parts = (self.rank_content_query, self.rank_query_proj, self.rank_query_fuse)
        init_like_release_transformer(self.layers, *(part for part in qrl_parts if part))
        prior_logit = -math.log((1 - 0.01) / 0.01)  # initial scores of 0.01 (focal-loss prior)
        for head in self.class_heads:
            nn.init.constant_(head.bias, prior_logit)
        for head in self.box_heads:
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)
        for table in self.rank_class_bias or []:
            nn.init.zeros_(table.weight)

    def forward(
        self,
        query: torch.Tensor,
        query_pos: torch.Tensor,
        reference_boxes: torch.Tensor,
        memory: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        valid_ratios: torch.Tensor,
        memory_padding_mask: torch.Tensor | None,
        group_sizes: list[int],
    ) -> dict[str, list[torch.Tensor]]:
        """
        Args:
            query: (N, Q, C) initial content queries.
            query_pos: (N, Q, C) positional queries.
            reference_boxes: (N, Q, 4) initial normalised (cx, cy, w, h), detached.
            memory: (N, S, C) encoder output.
            spatial_shapes: (L, 2) int64; level_start_index: (L,) int64.
            valid_ratios: (N, L, 2) unpadded fraction (w, h) of each level.
            memory_padding_mask: (N, S) bool or None.
            group_sizes: the query groups (e.g. [300, 1500] in training, [300] at inference);
                they neither attend to each other nor mix when sorted.

        Returns:
            dict with, per layer (lists of num_layers tensors):
              "logits": (N, Q, K) class logits (RCH bias included),
              "boxes": (N, Q, 4) normalised (cx, cy, w, h) predictions,
              "order": (N, Q) int64, for each query slot of that layer, the index of the initial
                query it descends from (identity when queries are not sorted).
        """
        n, num_queries, _ = query.shape
        if sum(group_sizes) != num_queries:
            raise ValueError(f"group_sizes {group_sizes} do not sum to the {num_queries} queries")
        ratio_boxes = torch.cat([valid_ratios, valid_ratios], dim=-1)[:, None]  # (N, 1, L, 4)
        boxes = reference_boxes  # detached input of the current layer
        previous_boxes = reference_boxes  # undetached, for look-forward-twice
        order = torch.arange(num_queries, device=query.device).expand(n, num_queries)
        outputs = {"logits": [], "boxes": [], "order": []}
        ranking_scores = None  # (N, Q): the previous layer's best class-head logit per query
        for layer_index, layer in enumerate(self.layers):
            if ranking_scores is not None and self.sorts_queries:
                ranking = sort_within_groups(ranking_scores, group_sizes)
                query, query_pos, boxes, previous_boxes, order = (
                    gather_queries(t, ranking)
                    for t in (query, query_pos, boxes, previous_boxes, order)
                )
                query = self._fuse_rank_content(query, layer_index, group_sizes)
            query = run_layer(
                layer,
                query,
                query_pos,
                boxes[:, :, None] * ratio_boxes,
                memory,
                spatial_shapes,
                level_start_index,
                memory_padding_mask,
                group_sizes,
                activation_checkpointing=self.activation_checkpointing,
            )
            delta = self.box_heads[layer_index](query)
            refined = (delta + inverse_sigmoid(boxes)).sigmoid()
            if self.look_forward_twice:
                predicted = (delta + inverse_sigmoid(previous_boxes)).sigmoid()
            else:
                predicted = refined
            class_logits = self.class_heads[layer_index](query)
            outputs["boxes"].append(predicted)
            outputs["logits"].append(self._add_rank_bias(class_logits, layer_index, group_sizes))
            outputs["order"].append(order)
            ranking_scores = class_logits.detach().amax(-1)
            previous_boxes, boxes = refined, refined.detach()
        return outputs

    def _rank_rows(self, group_sizes: list[int], device: torch.device) -> torch.Tensor:
        """Row of the per-rank tables for each query slot: ranks restart in every group, and
        group g uses its own block of rows (so one-to-one ranks share rows with inference)."""
        rows, offset = [], 0
        for size in group_sizes:
            rows.append(torch.arange(offset, offset + size, device=device))
            offset += size
        return torch.cat(rows)

    def _add_rank_bias(self, logits: torch.Tensor, layer_index: int, group_sizes: list[int]):
        """(N, Q, K) class-head logits t -> Eq. 1's t + s^l (s^l, the RCH bias of each rank
        slot, only with RCH)."""
        if self.rank_class_bias is None:
            return logits
        rows = self._rank_rows(group_sizes, logits.device)
        return logits + self.rank_class_bias[layer_index](rows)[None]

    def _fuse_rank_content(self, query: torch.Tensor, layer_index: int, group_sizes: list[int]):
        """Eq. 2: (N, Q, C) sorted content queries -> Linear([q ; Linear(C^l)]) (QRL only)."""
        if self.rank_content_query is None:
            return query
        rows = self._rank_rows(group_sizes, query.device)
        rank_embedding = self.rank_content_query[layer_index - 1](rows)
        rank_embedding = self.rank_query_proj[layer_index - 1](rank_embedding)
        rank_embedding = rank_embedding[None].expand_as(query)
        return self.rank_query_fuse[layer_index - 1](torch.cat([query, rank_embedding], dim=-1))
