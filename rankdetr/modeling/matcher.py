"""Hungarian matching of predictions to ground truth, with Rank-DETR's high-order cost (HMC).

Before the switch the cost is Deformable DETR's weighted sum (Eq. 5):
    cost_class * focal_cost + cost_bbox * L1(cxcywh) + cost_giou * (-GIoU).
After it, the high-order cost of Eq. 8:
    -(p[c] * IoU^power)        (quality="iou", the paper's choice, power 4), or
    -(p[c] * ((GIoU + 1) / 2)^power)   (quality="giou", Table 5b).
The switch is a function of training progress only (`set_training_progress`), so every DDP rank
that sees the same iteration makes the same choice, and nothing outside reaches into the matcher.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from rankdetr.layers.box_ops import (
    LOSS_IOU_EPS,
    box_cxcywh_to_xyxy,
    pairwise_box_iou,
    pairwise_generalized_box_iou,
)
from rankdetr.layers.dtypes import lift_to_float32

__all__ = ["HungarianMatcher"]

# Costs stand in for NaN/inf so that the assignment still runs; the loss then reports the problem.
_LARGE_COST = 1e8


class HungarianMatcher:
    """One-to-one assignment of queries to target boxes, per image."""

    def __init__(
        self,
        *,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        high_order_start: float | None = None,
        high_order_power: float = 4.0,
        high_order_quality: str = "iou",
    ):
        """
        Args:
            cost_class, cost_bbox, cost_giou: weights of the standard cost (Eq. 5).
            focal_alpha, focal_gamma: of the focal classification cost.
            high_order_start: fraction of training (0..1) from which the high-order cost (HMC,
                Eq. 8) replaces the standard one; None never switches.
            high_order_power: the exponent alpha of Eq. 8.
            high_order_quality: "iou" (Eq. 8) or "giou" for ((GIoU + 1) / 2), Table 5b.
        """
        if high_order_quality not in ("iou", "giou"):
            raise ValueError(
                f"high_order_quality must be 'iou' or 'giou', got {high_order_quality!r}"
            )
        if high_order_start is not None and not 0.0 <= high_order_start <= 1.0:
            raise ValueError(f"high_order_start must be in [0, 1] or None, got {high_order_start}")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.high_order_start = high_order_start
        self.high_order_power = high_order_power
        self.high_order_quality = high_order_quality
        self.use_high_order = high_order_start == 0.0

    def set_training_progress(self, progress: float) -> None:
        """Use the high-order cost once `progress` (iteration / max_iter) reaches its start."""
        self.use_high_order = (
            self.high_order_start is not None and progress >= self.high_order_start
        )

    def standard_cost(
        self, prob: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, gt_boxes: torch.Tensor
    ) -> torch.Tensor:
        """Eq. 5. prob (..., Q, K) sigmoid scores, boxes (..., Q, 4) cxcywh, labels (T,), gt_boxes
        (T, 4) cxcywh -> (..., Q, T); leading dimensions (decoder layers) share the targets."""
        alpha, gamma = self.focal_alpha, self.focal_gamma
        p = prob[..., labels]
        positive_cost = alpha * (1 - p).pow(gamma) * -(p + 1e-8).log()
        negative_cost = (1 - alpha) * p.pow(gamma) * -(1 - p + 1e-8).log()
        class_cost = positive_cost - negative_cost
        l1_cost = torch.cdist(boxes, gt_boxes, p=1)
        giou = pairwise_generalized_box_iou(
            box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(gt_boxes), LOSS_IOU_EPS
        )
        return self.cost_class * class_cost + self.cost_bbox * l1_cost - self.cost_giou * giou

    def high_order_cost(
        self, prob: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, gt_boxes: torch.Tensor
    ) -> torch.Tensor:
        """Eq. 8, -(p[c] * quality^power); arguments as :meth:`standard_cost`."""
        pred_xyxy, gt_xyxy = box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(gt_boxes)
        if self.high_order_quality == "iou":
            quality = pairwise_box_iou(pred_xyxy, gt_xyxy, LOSS_IOU_EPS)
        else:
            quality = (pairwise_generalized_box_iou(pred_xyxy, gt_xyxy, LOSS_IOU_EPS) + 1) / 2
        return -(prob[..., labels] * quality.pow(self.high_order_power))

    def cost_matrix(
        self,
        logits: torch.Tensor,
        boxes: torch.Tensor,
        labels: torch.Tensor,
        gt_boxes: torch.Tensor,
    ) -> torch.Tensor:
        """The cost now in use. logits (..., Q, K), boxes (..., Q, 4) cxcywh, labels (T,), gt_boxes
        (T, 4) cxcywh -> (..., Q, T), in float32 even under autocast (float64 inputs stay
        float64)."""
        prob = lift_to_float32(logits).sigmoid()
        boxes = lift_to_float32(boxes)
        gt_boxes = gt_boxes.to(boxes.dtype)
        if self.use_high_order:
            return self.high_order_cost(prob, boxes, labels, gt_boxes)
        return self.standard_cost(prob, boxes, labels, gt_boxes)

    def __call__(
        self, pred_logits: torch.Tensor, pred_boxes: torch.Tensor, targets: list[dict]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """
        Args:
            pred_logits: (B, Q, K) classification logits.
            pred_boxes: (B, Q, 4) normalised (cx, cy, w, h).
            targets: B dicts with "labels" (T_b,) int64 and "boxes" (T_b, 4) normalised cxcywh.

        Returns:
            B pairs (query_indices, target_indices), int64 on the CPU, each of length
            min(Q, T_b): query query_indices[i] is matched to target target_indices[i].
        """
        (matches,) = self.match_layers(pred_logits[None], pred_boxes[None], targets)
        return matches

    @torch.no_grad()
    def match_layers(
        self, pred_logits: torch.Tensor, pred_boxes: torch.Tensor, targets: list[dict]
    ) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Every decoder layer's predictions matched to the same targets, each layer on its own.

        Args:
            pred_logits: (L, B, Q, K) classification logits of L layers.
            pred_boxes: (L, B, Q, 4) normalised (cx, cy, w, h).
            targets: B dicts, as :meth:`__call__`.

        Returns:
            L lists of what :meth:`__call__` returns for that layer.

        The costs come from one (L, B * Q, sum T_b) tensor, of which layer l and image b keep
        their own (Q, T_b) block: every entry is computed from one query and one target alone,
        so the blocks hold the per-layer, per-image costs (DETR's matcher batches the images
        the same way), in a few dozen operations per call instead of a few dozen per layer and
        image: the criterion matches all decoder layers in one call.
        """
        sizes = [len(target["labels"]) for target in targets]
        layers, batch, num_queries = pred_logits.shape[:3]
        empty = torch.empty(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [[(empty, empty) for _ in targets] for _ in range(layers)]
        labels = torch.cat([target["labels"] for target in targets])
        gt_boxes = torch.cat([target["boxes"] for target in targets])
        cost = self.cost_matrix(
            pred_logits.flatten(1, 2), pred_boxes.flatten(1, 2), labels, gt_boxes
        )
        cost = torch.nan_to_num(cost, nan=_LARGE_COST, posinf=_LARGE_COST, neginf=-_LARGE_COST)
        blocks = cost.view(layers, batch, num_queries, -1).cpu().numpy()
        bounds = np.cumsum([0, *sizes])
        return [
            [
                _assign(blocks[layer, image, :, bounds[image] : bounds[image + 1]])
                for image in range(batch)
            ]
            for layer in range(layers)
        ]


def _assign(cost: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, T) costs -> (query indices, target indices), int64 tensors, of the cheapest
    one-to-one assignment (none for T = 0)."""
    if cost.shape[1] == 0:
        empty = torch.empty(0, dtype=torch.int64)
        return empty, empty
    rows, cols = linear_sum_assignment(cost)
    return torch.from_numpy(rows.astype(np.int64)), torch.from_numpy(cols.astype(np.int64))
