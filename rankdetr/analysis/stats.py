"""Pure functions behind the analysis figures (paper Fig. 3-5): the matched / unmatched split of
the queries, their classification scores, the max IoU of each query with the ground truth,
empirical CDFs, and the precision-recall curves of a COCOeval run.

Nothing here runs a model: inputs are tensors or arrays, outputs are new tensors or arrays.
"""

from __future__ import annotations

import numpy as np
import torch

from rankdetr.layers.box_ops import pairwise_box_iou

__all__ = [
    "COCO_IOU_THRESHOLDS",
    "COCO_RECALL_THRESHOLDS",
    "average_precision",
    "class_scores",
    "empirical_cdf",
    "fraction_at_most",
    "max_iou_with_gt",
    "positive_mask",
    "pr_curves",
    "split_by_match",
]

# COCOeval's defaults: IoU 0.50:0.05:0.95 and recall 0:0.01:1 (the rows and columns of its
# eval["precision"]).
COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
COCO_RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)


def class_scores(logits: torch.Tensor) -> torch.Tensor:
    """(..., K) logits -> (...) classification score of each query: the max sigmoid over classes."""
    return logits.sigmoid().amax(dim=-1)


def positive_mask(num_queries: int, query_indices: torch.Tensor) -> torch.Tensor:
    """(Q,) bool, True at the queries the matcher assigned to a ground-truth box.

    Args:
        num_queries: Q.
        query_indices: (M,) int64 matched query indices (the first element of a matcher pair).
    """
    query_indices = torch.as_tensor(query_indices, dtype=torch.int64)
    if query_indices.numel() and (query_indices.min() < 0 or query_indices.max() >= num_queries):
        raise ValueError(f"matched query indices {query_indices.tolist()} exceed Q={num_queries}")
    mask = torch.zeros(num_queries, dtype=torch.bool)
    mask[query_indices] = True
    return mask


def split_by_match(values: torch.Tensor, query_indices: torch.Tensor):
    """Per-query values (Q, ...) -> (values of matched queries, values of unmatched queries)."""
    mask = positive_mask(values.shape[0], query_indices).to(values.device)
    return values[mask], values[~mask]


def max_iou_with_gt(boxes: torch.Tensor, gt_boxes: torch.Tensor) -> torch.Tensor:
    """(Q, 4) predicted and (T, 4) ground-truth boxes, both xyxy in the same units -> (Q,) the
    largest IoU of each prediction with any ground-truth box (0 when the image has none)."""
    if gt_boxes.shape[0] == 0:
        return boxes.new_zeros(boxes.shape[0])
    return pairwise_box_iou(boxes, gt_boxes.to(boxes)).amax(dim=1)


def empirical_cdf(values) -> tuple[np.ndarray, np.ndarray]:
    """The empirical CDF as steps: (sorted values (n,), fraction of values <= each (n,)).

    With ties, the fraction at a repeated value is only complete at its last occurrence, which
    is what a step plot (`where="post"`) draws.
    """
    values = np.sort(np.asarray(values, dtype=np.float64).ravel())
    return values, np.arange(1, values.size + 1, dtype=np.float64) / max(values.size, 1)


def fraction_at_most(values, thresholds) -> np.ndarray:
    """F(t) = fraction of `values` <= t for each threshold t; (len(thresholds),) float64."""
    values = np.sort(np.asarray(values, dtype=np.float64).ravel())
    counts = np.searchsorted(values, np.asarray(thresholds, dtype=np.float64), side="right")
    return counts / max(values.size, 1)


def pr_curves(precision: np.ndarray, area_index: int = 0, max_dets_index: int = -1) -> np.ndarray:
    """COCOeval's eval["precision"] (T, R, K, A, M) -> (T, R) precision averaged over classes.

    Classes without ground truth (COCOeval's -1 entries) are left out of the average, as COCO's
    AP does; a (threshold, recall) where no class is valid gives NaN.

    Args:
        precision: (T IoU thresholds, R recall thresholds, K classes, A areas, M maxDets).
        area_index: 0 is area "all" in COCOeval's default parameters.
        max_dets_index: -1 is the largest maxDets (100 by default).
    """
    if precision.ndim != 5:
        raise ValueError(
            f"expected COCOeval precision of shape (T, R, K, A, M), got {precision.shape}"
        )
    per_class = precision[:, :, :, area_index, max_dets_index].astype(np.float64)
    valid = per_class > -1
    total = np.where(valid, per_class, 0.0).sum(axis=2)
    count = valid.sum(axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def average_precision(precision: np.ndarray, area_index: int = 0, max_dets_index: int = -1):
    """COCO AP (0..1) from eval["precision"]: the mean of its valid entries (NaN if none)."""
    per_class = precision[:, :, :, area_index, max_dets_index]
    valid = per_class[per_class > -1]
    return float(valid.mean()) if valid.size else float("nan")
