"""Box conversions and (generalised) IoU, for boxes as (x0, y0, x1, y1) unless named otherwise.

Pairwise functions take (..., N, 4) and (..., M, 4) (leading dimensions broadcast, e.g. the
predictions of every decoder layer against one set of targets) and return (..., N, M);
elementwise ones take two (N, 4) and return (N,). Degenerate boxes (zero area) give IoU 0 rather
than NaN.

The (G)IoU functions take `eps`, added to the union and hull areas before dividing. 0 (the
default) is the exact formula. The training losses and matching costs use `LOSS_IOU_EPS` (1e-6),
the value of the original release (detrex's `box_iou` / `generalized_box_iou`), so that losses,
GIoU-aware targets and high-order costs equal the release's.
"""

from __future__ import annotations

import torch

__all__ = [
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "box_area",
    "pairwise_box_iou",
    "pairwise_generalized_box_iou",
    "elementwise_box_iou",
    "elementwise_generalized_box_iou",
    "LOSS_IOU_EPS",
]

LOSS_IOU_EPS = 1e-6


def _area_ratio(numerator: torch.Tensor, denominator: torch.Tensor, eps: float) -> torch.Tensor:
    """numerator / (denominator + eps); with eps = 0, 0 / 0 = 0 (empty boxes) and no bias for
    tiny boxes."""
    if eps:
        return numerator / (denominator + eps)
    return numerator / denominator.clamp(min=torch.finfo(denominator.dtype).tiny)


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) (cx, cy, w, h) -> (..., 4) (x0, y0, x1, y1): cx -/+ 0.5 * w, torchvision's
    arithmetic and so the release's values bit for bit, in 6 operations where torchvision's
    `box_convert` (unbind, four coordinates, stack) takes 14; the criterion converts boxes
    a few dozen times per step."""
    center, half_size = boxes[..., :2], 0.5 * boxes[..., 2:]
    return torch.cat([center - half_size, center + half_size], dim=-1)


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) (x0, y0, x1, y1) -> (..., 4) (cx, cy, w, h): ((x0 + x1) / 2, x1 - x0), as
    torchvision computes it."""
    start, end = boxes[..., :2], boxes[..., 2:]
    return torch.cat([(start + end) / 2, end - start], dim=-1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) -> (...), negative extents count as zero."""
    extent = (boxes[..., 2:] - boxes[..., :2]).clamp(min=0)
    return extent[..., 0] * extent[..., 1]


def _iou_and_union(
    a: torch.Tensor, b: torch.Tensor, eps: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """a, b broadcastable (..., 4) -> IoU (...), union (...)."""
    top_left = torch.maximum(a[..., :2], b[..., :2])
    bottom_right = torch.minimum(a[..., 2:], b[..., 2:])
    extent = (bottom_right - top_left).clamp(min=0)
    inter = extent[..., 0] * extent[..., 1]
    union = box_area(a) + box_area(b) - inter
    return _area_ratio(inter, union, eps), union


def _generalized(a: torch.Tensor, b: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    iou, union = _iou_and_union(a, b, eps)
    hull = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])).clamp(
        min=0
    )
    hull_area = hull[..., 0] * hull[..., 1]
    return iou - _area_ratio(hull_area - union, hull_area, eps)


def pairwise_box_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """(..., N, 4), (..., M, 4) -> (..., N, M) IoU, inter / (union + eps)."""
    return _iou_and_union(a[..., :, None, :], b[..., None, :, :], eps)[0]


def pairwise_generalized_box_iou(
    a: torch.Tensor, b: torch.Tensor, eps: float = 0.0
) -> torch.Tensor:
    """(..., N, 4), (..., M, 4) -> (..., N, M) generalised IoU in [-1, 1] (eps as in the module
    docstring)."""
    return _generalized(a[..., :, None, :], b[..., None, :, :], eps)


def elementwise_box_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """(N, 4), (N, 4) -> (N,) IoU of each pair."""
    return _iou_and_union(a, b, eps)[0]


def elementwise_generalized_box_iou(
    a: torch.Tensor, b: torch.Tensor, eps: float = 0.0
) -> torch.Tensor:
    """(N, 4), (N, 4) -> (N,) generalised IoU of each pair."""
    return _generalized(a, b, eps)
