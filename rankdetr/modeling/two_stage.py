"""Two-stage query selection (Deformable DETR / H-DETR, with mixed query selection).

Every encoder position proposes a box: centred on its pixel, of size 0.05 * 2^level. An extra
class head scores the proposals and an extra box head refines them; the top-k refined boxes become
the decoder's initial reference boxes and, through a sine embedding, its positional queries. The
content queries are learned (mixed query selection), held by the meta-architecture.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rankdetr.layers.dtypes import at_least_float32
from rankdetr.layers.mlp import MLP
from rankdetr.layers.position_encoding import sine_embedding_of_boxes
from rankdetr.modeling.init import init_like_release_transformer

__all__ = ["TwoStageProposals", "grid_proposals", "top_proposal_indices"]


def grid_proposals(
    padding_mask: torch.Tensor,
    spatial_shapes: torch.Tensor,
    base_size: float = 0.05,
    dtype: torch.dtype = torch.float32,
    level_shapes: list[tuple[int, int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One box per encoder position, normalised by the unpadded size of its image.

    Args:
        padding_mask: (N, S) bool, True at padding.
        spatial_shapes: (L, 2) int64 (h, w).
        base_size: width and height of level-0 boxes; level l uses base_size * 2^l.
        dtype: of the grid and its logits, lifted to at least float32. Pass the encoder
            memory's dtype: float32, bf16 and fp16 runs get the release's float32 grid, float64
            runs a float64 one (float32 `log` differs between CPUs in its last bit).
        level_shapes: the (h, w) of each level as Python (or symbolic) ints from the feature
            maps' shapes, instead of reading `spatial_shapes` on the host (the ONNX export
            passes them so that its graph follows the input size).

    Returns:
        proposals (N, S, 4) as logits of (cx, cy, w, h) (+inf where invalid), and
        valid (N, S) bool: not padding and all coordinates inside (0.01, 0.99).
    """
    n = padding_mask.shape[0]
    dtype = at_least_float32(dtype)
    boxes, start = [], 0
    if level_shapes is None:
        level_shapes = spatial_shapes.tolist()
    for level, (h, w) in enumerate(level_shapes):
        mask = padding_mask[:, start : start + h * w].view(n, h, w)
        valid_h = (~mask[:, :, 0]).sum(1).clamp(min=1).to(dtype)
        valid_w = (~mask[:, 0, :]).sum(1).clamp(min=1).to(dtype)
        ys, xs = torch.meshgrid(
            torch.arange(h, dtype=dtype, device=padding_mask.device) + 0.5,
            torch.arange(w, dtype=dtype, device=padding_mask.device) + 0.5,
            indexing="ij",
        )
        cx = xs.reshape(1, -1) / valid_w[:, None]
        cy = ys.reshape(1, -1) / valid_h[:, None]
        size = torch.full_like(cx, base_size * 2.0**level)
        boxes.append(torch.stack([cx, cy, size, size], dim=-1))
        start += h * w
    proposals = torch.cat(boxes, dim=1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1) & ~padding_mask
    logits = torch.log(proposals / (1 - proposals))
    return logits.masked_fill(~valid[..., None], float("inf")), valid


class TwoStageProposals(nn.Module):
    """Scores and refines the grid proposals; selects the decoder's initial boxes and positions."""

    def __init__(self, *, num_classes: int, embed_dim: int = 256):
        super().__init__()
        self.embed_dim = embed_dim
        self.memory_proj = nn.Linear(embed_dim, embed_dim)
        self.memory_norm = nn.LayerNorm(embed_dim)
        self.class_head = nn.Linear(embed_dim, num_classes)
        self.box_head = MLP(embed_dim, embed_dim, 4, 3)
        self.pos_proj = nn.Linear(2 * embed_dim, 2 * embed_dim)
        self.pos_norm = nn.LayerNorm(2 * embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """As the release: the projections (its `enc_output`, `pos_trans`, inside its transformer)
        xavier-uniform; the heads (outside it) PyTorch's default with the focal-loss prior bias
        and a zero last box layer."""
        init_like_release_transformer(self.memory_proj, self.pos_proj)
        nn.init.constant_(self.class_head.bias, -math.log((1 - 0.01) / 0.01))
        nn.init.zeros_(self.box_head.layers[-1].weight)
        nn.init.zeros_(self.box_head.layers[-1].bias)

    def forward(
        self,
        memory: torch.Tensor,
        padding_mask: torch.Tensor,
        spatial_shapes: torch.Tensor,
        num_queries: int,
    ) -> dict[str, torch.Tensor]:
        """
        Args:
            memory: (N, S, C) encoder output.
            padding_mask: (N, S) bool, True at padding.
            spatial_shapes: (L, 2) int64.
            num_queries: Q, proposals to select (all groups together).

        Returns:
            dict with
              "enc_logits": (N, S, K) proposal logits (the encoder loss treats every target as
                class 0, so logit 0 is an objectness score),
              "enc_boxes": (N, S, 4) refined proposals, normalised cxcywh,
              "reference_boxes": (N, Q, 4) the top-Q refined proposals, detached,
              "query_pos": (N, Q, C) their positional queries.
        """
        proposals, valid = grid_proposals(padding_mask, spatial_shapes, dtype=memory.dtype)
        features = memory.masked_fill(~valid[..., None], 0.0)
        features = self.memory_norm(self.memory_proj(features))
        enc_logits = self.class_head(features)
        enc_box_logits = self.box_head(features) + proposals
        scores = enc_logits[..., 0].masked_fill(~valid, float("-inf"))
        index = top_proposal_indices(scores, num_queries)
        top_box_logits = enc_box_logits.gather(1, index[..., None].expand(-1, -1, 4)).detach()
        reference_boxes = top_box_logits.sigmoid()
        embedded = sine_embedding_of_boxes(reference_boxes, num_pos_feats=self.embed_dim // 2)
        positions = self.pos_norm(self.pos_proj(embedded))
        return {
            "enc_logits": enc_logits,
            "enc_boxes": enc_box_logits.sigmoid(),
            "reference_boxes": reference_boxes,
            # a copy, not a view (see RankDETR.predict: one compiled decoder layer for all)
            "query_pos": positions[..., : self.embed_dim].contiguous(),
        }


def top_proposal_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(N, S) -> (N, k) indices of the k best scores, best first.

    Images with fewer than k positions (tiny inputs) repeat their ranking cyclically, so the
    decoder always receives k queries.
    """
    num_positions = scores.shape[1]
    if k <= num_positions:
        return scores.topk(k, dim=1).indices
    order = scores.argsort(dim=1, descending=True)
    cycle = torch.arange(k, device=scores.device) % num_positions
    return order[:, cycle]
