"""rankdetr.analysis.stats against float64 brute force, and COCOeval PR curves on a hand case."""

import itertools
import math

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from rankdetr.analysis.pr import coco_precision
from rankdetr.analysis.stats import (
    COCO_RECALL_THRESHOLDS,
    average_precision,
    class_scores,
    empirical_cdf,
    fraction_at_most,
    max_iou_with_gt,
    positive_mask,
    pr_curves,
    split_by_match,
)


def test_class_scores_is_the_max_sigmoid():
    logits = torch.randn(3, 7, 5, generator=torch.Generator().manual_seed(0))
    expected = [
        [max(1 / (1 + math.exp(-float(v))) for v in query) for query in image] for image in logits
    ]
    assert torch.allclose(
        class_scores(logits).double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6
    )


def test_positive_mask_and_split_follow_the_matched_indices():
    values = torch.arange(8.0) * 10
    matched = torch.tensor([5, 1, 6])
    mask = positive_mask(8, matched)
    assert mask.tolist() == [i in (1, 5, 6) for i in range(8)]
    positives, negatives = split_by_match(values, matched)
    assert sorted(positives.tolist()) == [10.0, 50.0, 60.0]
    assert negatives.tolist() == [0.0, 20.0, 30.0, 40.0, 70.0]
    assert positive_mask(4, torch.empty(0, dtype=torch.int64)).sum() == 0
    with pytest.raises(ValueError, match="exceed Q=4"):
        positive_mask(4, torch.tensor([4]))


def _iou_float64(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _random_boxes(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 80
    wh = torch.rand(n, 2, generator=g) * 40 + 1
    return torch.cat([xy, xy + wh], 1)


def test_max_iou_with_gt_matches_float64_loops():
    boxes, gt = _random_boxes(30, 1), _random_boxes(4, 2)
    boxes[0] = gt[2]  # an exact hit: IoU 1
    expected = [max(_iou_float64(p.double().tolist(), t.double().tolist()) for t in gt)
                for p in boxes]  # fmt: skip
    result = max_iou_with_gt(boxes, gt)
    assert result.shape == (30,) and result[0] == pytest.approx(1.0)
    assert torch.allclose(result.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6)
    assert max_iou_with_gt(boxes, torch.zeros(0, 4)).tolist() == [0.0] * 30


def test_empirical_cdf_and_fraction_at_most_count_values():
    values = np.array([0.3, 0.1, 0.3, 0.9, 0.5, 0.3])
    x, p = empirical_cdf(values)
    assert x.tolist() == sorted(values.tolist())
    for i, v in enumerate(x):
        is_last = i == len(x) - 1 or x[i + 1] != v
        if is_last:  # a step's top: all values <= v
            assert p[i] == sum(w <= v for w in values) / len(values)
    thresholds = [-1.0, 0.1, 0.2, 0.3, 0.95]
    expected = [sum(w <= t for w in values) / len(values) for t in thresholds]
    assert fraction_at_most(values, thresholds).tolist() == pytest.approx(expected)
    assert empirical_cdf([])[0].size == 0


def test_pr_curves_average_valid_classes_like_loops():
    rng = np.random.default_rng(0)
    precision = rng.random((10, 101, 4, 4, 3))
    precision[:, :, 1] = -1  # a class without ground truth
    precision[3, 7, :] = -1  # a point where no class is valid
    curves = pr_curves(precision)
    for t, r in itertools.product(range(10), range(101)):
        valid = [precision[t, r, k, 0, 2] for k in range(4) if precision[t, r, k, 0, 2] > -1]
        if valid:
            assert curves[t, r] == pytest.approx(sum(valid) / len(valid))
        else:
            assert math.isnan(curves[t, r])
    entries = [v for v in precision[:, :, :, 0, 2].ravel() if v > -1]
    assert average_precision(precision) == pytest.approx(sum(entries) / len(entries))
    with pytest.raises(ValueError, match="shape"):
        pr_curves(precision[..., 0])


def _coco(annotations: list[dict]) -> COCO:
    coco = COCO()
    coco.dataset = {
        "images": [{"id": 1, "width": 100, "height": 100, "file_name": "a.png"}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "annotations": annotations,
    }
    coco.createIndex()
    return coco


def test_coco_pr_curves_on_a_hand_case():
    # Two ground-truth boxes of class 1, none of class 2 (its precision is -1 and left out).
    gt = _coco([
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [50, 50, 20, 20], "area": 400,
         "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100,
         "iscrowd": 0},
    ])  # fmt: skip
    results = [
        {"image_id": 1, "category_id": 1, "bbox": [50, 50, 20, 20], "score": 0.9},  # IoU 1
        {"image_id": 1, "category_id": 1, "bbox": [80, 0, 10, 10], "score": 0.8},  # IoU 0
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 6.2], "score": 0.7},  # IoU 0.62
        {"image_id": 1, "category_id": 2, "bbox": [0, 0, 10, 10], "score": 0.6},
    ]
    curves = pr_curves(coco_precision(gt, results, [1]))
    # Ranked TP, FP, TP: precision 1 up to recall 0.5, then (interpolated) 2/3 up to recall 1.
    # From IoU 0.65 on the third detection misses: precision 1 up to recall 0.5, then 0.
    low = COCO_RECALL_THRESHOLDS <= 0.5 + 1e-9
    for row, threshold in enumerate(np.linspace(0.5, 0.95, 10)):
        high = 2 / 3 if threshold < 0.62 else 0.0
        assert np.allclose(curves[row, low], 1.0)
        assert np.allclose(curves[row, ~low], high), threshold
