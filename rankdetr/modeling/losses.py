"""Classification losses of Rank-DETR: focal loss, the GIoU-aware loss (GCL, Eq. 6), varifocal.

Each returns the loss of every (query, class) entry, shaped like the logits, so that the
criterion decides how to normalise (by the number of target boxes, as in Deformable DETR).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["sigmoid_focal_loss", "giou_aware_focal_loss", "varifocal_loss"]


def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Focal loss (Lin et al.) on independent sigmoids.

    Args:
        logits: (..., K) classification logits.
        targets: (..., K) binary targets (1 at the matched class of a positive query).
        alpha: weight of the positives; negatives get 1 - alpha.
        gamma: focusing exponent.

    Returns:
        (..., K) loss per entry.
    """
    prob = logits.sigmoid()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    prob_of_truth = prob * targets + (1 - prob) * (1 - targets)
    alpha_weight = alpha * targets + (1 - alpha) * (1 - targets)
    return alpha_weight * (1 - prob_of_truth).pow(gamma) * bce


def giou_aware_focal_loss(
    logits: torch.Tensor,
    positive: torch.Tensor,
    quality: torch.Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> torch.Tensor:
    """GIoU-aware classification loss, Eq. 6 of the paper.

    At a positive entry the BCE target is the localisation quality t (e.g. (GIoU + 1) / 2 of
    the matched box, detached by the caller) and the modulating factor is |t - p|^gamma; every
    other entry is a focal-loss negative, p^gamma * BCE(p, 0). With t = 1 this is the focal loss.

    Args:
        logits: (..., K) classification logits.
        positive: (..., K) bool, True at the matched class of each positive query.
        quality: (..., K) target t in [0, 1] (read only where `positive`).
        alpha: weight of the positives; negatives get 1 - alpha.
        gamma: focusing exponent.

    Returns:
        (..., K) loss per entry.
    """
    prob = logits.sigmoid()
    target = torch.where(positive, quality.to(logits.dtype), torch.zeros_like(logits))
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    modulation = torch.where(positive, (target - prob).abs().pow(gamma), prob.pow(gamma))
    # The weights in the logits' dtype: Python scalars would make a float32 table, which would
    # round alpha to float32 in a float64 run.
    weight = torch.where(positive, logits.new_tensor(alpha), logits.new_tensor(1 - alpha))
    return weight * modulation * bce


def varifocal_loss(
    logits: torch.Tensor,
    positive: torch.Tensor,
    quality: torch.Tensor,
    alpha: float = 0.75,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Varifocal loss (Zhang et al.), Eq. 7 of the paper, for the comparison of Sec. 4.3.

    Positives: t * BCE(p, t), with no focusing; negatives: alpha * p^gamma * BCE(p, 0).

    Args and returns as :func:`giou_aware_focal_loss` (alpha weighs the negatives here).
    """
    prob = logits.sigmoid()
    target = torch.where(positive, quality.to(logits.dtype), torch.zeros_like(logits))
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    weight = torch.where(positive, target, alpha * prob.pow(gamma))
    return weight * bce
