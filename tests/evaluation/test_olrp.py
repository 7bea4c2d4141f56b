"""Optimal LRP: hand-computed cases through pycocotools' matching, and a brute-force float64
re-implementation (its own IoU, greedy matching and threshold enumeration) on random detections."""

import contextlib
import io
import math

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from rankdetr.evaluation import class_olrp, olrp_from_coco_eval

nan = float("nan")


def evaluate(gts, dets, num_images=None, num_classes=2):
    """COCOeval.evaluate() on in-memory data. gts: (image, class, xywh[, iscrowd]) tuples;
    dets: (image, class, xywh, score) tuples. Images are 1000 x 1000."""
    num_images = num_images or 1 + max(t[0] for t in [*gts, *dets])
    annotations = [
        {"id": i + 1, "image_id": g[0], "category_id": g[1], "bbox": list(g[2]),
         "area": g[2][2] * g[2][3], "iscrowd": g[3] if len(g) > 3 else 0}
        for i, g in enumerate(gts)
    ]  # fmt: skip
    gt = COCO()
    gt.dataset = {
        "images": [{"id": i, "width": 1000, "height": 1000} for i in range(num_images)],
        "categories": [{"id": c, "name": f"c{c}"} for c in range(num_classes)],
        "annotations": annotations,
    }
    results = [
        {"image_id": d[0], "category_id": d[1], "bbox": list(d[2]), "score": d[3]} for d in dets
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        coco_eval = COCOeval(gt, gt.loadRes(results), "bbox")
        coco_eval.evaluate()
    return coco_eval


def assert_result(result, olrp, loc, fp, fn):
    for name, expected in zip(("olrp", "loc", "fp", "fn"), (olrp, loc, fp, fn)):
        value = getattr(result, name)
        if math.isnan(expected):
            assert math.isnan(value), f"{name}={value}, expected undefined"
        else:
            assert value == pytest.approx(expected, abs=1e-9), name


def test_perfect_detections_have_zero_error():
    boxes = [(0, 0, (10, 10, 50, 40)), (0, 1, (200, 200, 30, 30)), (1, 0, (5, 5, 100, 80))]
    summary = olrp_from_coco_eval(evaluate(boxes, [(*b, 0.9) for b in boxes]))
    assert_result(summary, 0.0, 0.0, 0.0, 0.0)


def test_only_false_positives():
    gts = [(0, 0, (0, 0, 50, 50)), (1, 0, (0, 0, 50, 50))]
    dets = [(0, 0, (500, 500, 50, 50), 0.9), (1, 0, (600, 600, 20, 20), 0.3)]
    summary = olrp_from_coco_eval(evaluate(gts, dets))
    # Every threshold gives (0 + N_FP + 2) / (N_FP + 2) = 1; keeping nothing is optimal.
    assert_result(summary, 1.0, nan, nan, 1.0)
    assert summary.per_class[0].threshold == math.inf and 1 not in summary.per_class


def test_missed_class_counts_in_olrp_and_fn_but_not_in_loc_and_fp():
    found, missed = (0, 0, (10, 10, 50, 50)), (0, 1, (300, 300, 40, 40))
    summary = olrp_from_coco_eval(evaluate([found, missed], [(*found, 0.8)]))
    assert_result(summary.per_class[1], 1.0, nan, nan, 1.0)
    # Means over the 2 classes with GT for oLRP and FN, over class 0 alone for Loc and FP.
    assert_result(summary, 0.5, 0.0, 0.0, 0.5)


def test_localisation_errors_with_known_ious():
    # Widths 80 and 60 inside a 100 x 100 box: IoU 0.8 and 0.6.
    gts = [(0, 0, (0, 0, 100, 100)), (1, 0, (0, 0, 100, 100))]
    dets = [(0, 0, (0, 0, 80, 100), 0.9), (1, 0, (0, 0, 60, 100), 0.8)]
    summary = olrp_from_coco_eval(evaluate(gts, dets))
    # Keep 1: (0.2/0.5 + 0 + 1) / 2 = 0.7; keep both: (0.2/0.5 + 0.4/0.5) / 2 = 0.6.
    assert_result(summary, 0.6, (0.2 + 0.4) / 2, 0.0, 0.0)
    assert summary.per_class[0].threshold == pytest.approx(0.8)


def test_optimal_threshold_is_not_the_lowest_score():
    # Class 0, 3 GTs in 3 images; detections by score: TP (IoU 0.8), FP, TP (IoU 1), FP, FP,
    # TP (IoU 0.6). LRP after keeping k: k=1: (0.4+2)/3 = 0.8, k=2: (0.4+1+2)/4 = 0.85,
    # k=3: (0.4+1+1)/4 = 0.6, k=4: 3.4/5 = 0.68, k=5: 4.4/6, k=6: (0.4+0.8+3)/6 = 0.7.
    gt = (100, 100, 100, 100)
    gts = [(i, 0, gt) for i in range(3)]
    far = (700, 700, 50, 50)
    dets = [(0, 0, (100, 100, 80, 100), 0.9), (0, 0, far, 0.8), (1, 0, gt, 0.7),
            (1, 0, far, 0.6), (2, 0, far, 0.5), (2, 0, (100, 100, 60, 100), 0.4)]  # fmt: skip
    result = olrp_from_coco_eval(evaluate(gts, dets)).per_class[0]
    assert_result(result, 0.6, 0.2 / 2, 1 / 3, 1 / 3)
    assert result.threshold == pytest.approx(0.7)
    # The same from the scores and IoUs directly, in shuffled order.
    direct = class_olrp([0.5, 0.9, 0.4, 0.8, 0.7, 0.6], [nan, 0.8, 0.6, nan, 1.0, nan], 3)
    assert_result(direct, 0.6, 0.1, 1 / 3, 1 / 3)


def test_detections_on_crowd_boxes_are_neither_tp_nor_fp():
    gts = [(0, 0, (0, 0, 100, 100)), (0, 0, (400, 400, 200, 200), 1)]
    dets = [(0, 0, (0, 0, 100, 100), 0.9), (0, 0, (450, 450, 50, 50), 0.95)]
    assert_result(olrp_from_coco_eval(evaluate(gts, dets)), 0.0, 0.0, 0.0, 0.0)


def test_tied_scores_are_kept_or_dropped_together():
    # With a threshold between the two 0.5 scores, oLRP would be 0; a threshold keeps both.
    result = class_olrp([0.9, 0.5, 0.5], [1.0, 1.0, nan], num_gt=2)
    assert_result(result, 1 / 3, 0.0, 1 / 3, 0.0)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="evaluate"):
        olrp_from_coco_eval(COCOeval(iouType="bbox"))
    with pytest.raises(ValueError, match="num_gt"):
        class_olrp([0.5], [nan], num_gt=0)
    with pytest.raises(ValueError, match="tau"):
        class_olrp([0.5], [0.3], num_gt=1)


# ---- brute force -------------------------------------------------------------------------------


def iou_xywh(a, b):
    """IoU of two [x, y, w, h] boxes, float64."""
    ax2, ay2, bx2, by2 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw = max(0.0, min(ax2, bx2) - max(a[0], b[0]))
    ih = max(0.0, min(ay2, by2) - max(a[1], b[1]))
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def brute_force_olrp(gts, dets, classes, tau=0.5):
    """moLRP, Loc, FP, FN (fractions) without pycocotools: greedy matching per image and class in
    score order (stable for ties), then every distinct score tried as the threshold. No crowd
    boxes. gts: (image, class, xywh); dets: (image, class, xywh, score)."""
    per_class = []
    for c in classes:
        class_gts = [g for g in gts if g[1] == c]
        if not class_gts:
            continue
        matched = []  # (score, IoU or None) of every detection of class c
        for image in sorted({d[0] for d in dets if d[1] == c}):
            image_gts = [g[2] for g in class_gts if g[0] == image]
            taken = [False] * len(image_gts)
            image_dets = [d for d in dets if d[1] == c and d[0] == image]
            for d in sorted(image_dets, key=lambda d: -d[3]):
                ious = [iou_xywh(d[2], g) if not taken[j] else -1 for j, g in enumerate(image_gts)]
                best = int(np.argmax(ious)) if ious else -1
                if best >= 0 and ious[best] >= tau:
                    taken[best] = True
                    matched.append((d[3], ious[best]))
                else:
                    matched.append((d[3], None))
        candidates = [(math.inf, 1.0, nan, nan, 1.0)]
        for s in sorted({m[0] for m in matched}, reverse=True):
            tp_ious = [iou for score, iou in matched if score >= s and iou is not None]
            n_fp = sum(1 for score, iou in matched if score >= s and iou is None)
            n_tp, n_fn = len(tp_ious), len(class_gts) - len(tp_ious)
            loc_error = sum((1 - iou) / (1 - tau) for iou in tp_ious)
            lrp = (loc_error + n_fp + n_fn) / (n_tp + n_fp + n_fn)
            loc = sum(1 - iou for iou in tp_ious) / n_tp if n_tp else nan
            fp = n_fp / (n_tp + n_fp) if n_tp else nan
            candidates.append((s, lrp, loc, fp, n_fn / len(class_gts)))
        best = min(c[1] for c in candidates)
        # The highest threshold reaching the minimum.
        per_class.append(next(c for c in candidates if c[1] <= best + 1e-12)[1:])
    columns = np.array(per_class, dtype=np.float64)
    return [float(np.nanmean(col)) if not np.all(np.isnan(col)) else nan for col in columns.T]


def random_detections(seed, num_images=8, num_classes=3):
    rng = np.random.default_rng(seed)
    gts, dets = [], []
    for image in range(num_images):
        for c in range(num_classes):
            for _ in range(rng.integers(0, 4)):
                box = [*(rng.uniform(0, 800, 2)), *(rng.uniform(20, 200, 2))]
                gts.append((image, c, tuple(box)))
                if rng.random() < 0.8:  # a jittered detection, often a TP, sometimes not
                    jitter = rng.normal(0, 0.15, 4) * [box[2], box[3], box[2], box[3]]
                    det = np.maximum(np.array(box) + jitter, [0, 0, 5, 5])
                    dets.append((image, c, tuple(det), round(float(rng.random()), 1)))
            for _ in range(rng.integers(0, 3)):  # false positives anywhere
                box = (*rng.uniform(0, 800, 2), *rng.uniform(20, 200, 2))
                dets.append((image, c, box, round(float(rng.random()), 1)))
    return gts, dets


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_on_random_detections(seed):
    gts, dets = random_detections(seed)
    summary = olrp_from_coco_eval(evaluate(gts, dets, num_images=8, num_classes=3))
    expected = brute_force_olrp(gts, dets, classes=range(3))
    assert 0 < summary.olrp < 1  # neither trivial case
    assert_result(summary, *expected)
