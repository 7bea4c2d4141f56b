"""Independent float64 references in plain Python (no torch ops under test), shared by tests."""

import math


def xyxy(box):
    cx, cy, w, h = box
    return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


def area(b):
    return max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)


# The original release (detrex's box_iou / generalized_box_iou) adds 1e-6 to the union and hull
# areas in its losses and matching costs.
RELEASE_IOU_EPS = 1e-6


def _ratio(numerator, denominator, eps):
    if eps:
        return numerator / (denominator + eps)
    return numerator / denominator if denominator > 0 else 0.0


def iou(a, b, eps=0.0):
    """IoU of two (x0, y0, x1, y1) boxes, inter / (union + eps)."""
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = iw * ih
    union = area(a) + area(b) - inter
    return _ratio(inter, union, eps)


def giou(a, b, eps=0.0):
    """Generalised IoU of two (x0, y0, x1, y1) boxes, eps added to union and hull areas."""
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = iw * ih
    union = area(a) + area(b) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return _ratio(inter, union, eps) - _ratio(hull - union, hull, eps)


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def bce(p, t):
    return -(t * math.log(p) + (1 - t) * math.log(1 - p))
