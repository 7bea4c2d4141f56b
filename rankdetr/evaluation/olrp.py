"""Optimal Localisation-Recall-Precision (oLRP) error of Oksuz et al. (ECCV 2018, TPAMI 2021).

oLRP is computed from a finished pycocotools ``COCOeval`` (``evaluate()`` has run), so it uses the
same detections and the same matching as the COCO AP/AR numbers: COCO's greedy, score-ordered
matching at IoU threshold tau = 0.5, area range "all", the last ``maxDets`` (100) detections per
image and class, crowd and ignored ground truth handled as COCO does (a detection matched to an
ignored box counts neither as a TP nor as a FP; an ignored box is not a FN).

Per class, with G ground-truth boxes and the detections kept at a score threshold s (score >= s):

    LRP(s) = (sum over TPs of (1 - IoU) / (1 - tau) + N_FP + N_FN) / (N_TP + N_FP + N_FN)

where N_TP + N_FN = G. oLRP is the minimum of LRP(s) over every distinct detection score s and the
threshold above all scores (nothing kept, LRP = 1). Since each TP term is at most 1, LRP <= 1.
When several thresholds reach the minimum, the highest one (fewest detections) is taken. At that
optimal threshold the components are

    Loc = mean over TPs of (1 - IoU),  FP = N_FP / (N_TP + N_FP),  FN = N_FN / G.

Edge cases:
- A class without (non-ignored) ground truth is skipped: no oLRP, and it is left out of every mean.
- A class with ground truth but no TP at any threshold (no detections, or only false positives)
  has oLRP = 1 and FN = 1, reached by keeping nothing; its Loc and FP are undefined (NaN) and are
  left out of the Loc and FP means, which therefore average over the classes with a TP.

The summary (moLRP and its components) averages over the classes with ground truth; all values
are fractions in [0, 1] (the evaluator multiplies them by 100, as the paper reports them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ClassOLRP:
    """oLRP of one class and its components at the optimal threshold (NaN where undefined)."""

    olrp: float
    loc: float
    fp: float
    fn: float
    threshold: float  # lowest kept score; inf when keeping nothing is optimal


@dataclass(frozen=True)
class OLRPSummary:
    """moLRP and the means of its components over classes (fractions); per-class results."""

    olrp: float
    loc: float
    fp: float
    fn: float
    per_class: dict[int, ClassOLRP] = field(default_factory=dict)


def class_olrp(scores, tp_ious, num_gt: int, tau: float = 0.5) -> ClassOLRP:
    """oLRP of one class from its matched detections.

    Args:
        scores: (N,) detection scores of the class (ignored detections already removed).
        tp_ious: (N,) IoU with the matched ground truth for TPs, NaN for FPs.
        num_gt: G > 0, the number of non-ignored ground-truth boxes of the class.
        tau: the IoU threshold of the matching (TP IoUs must be >= tau).
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    tp_ious = np.asarray(tp_ious, dtype=np.float64).reshape(-1)
    if scores.shape != tp_ious.shape:
        raise ValueError(f"scores {scores.shape} and tp_ious {tp_ious.shape} differ in shape")
    if num_gt <= 0:
        raise ValueError(f"num_gt must be positive, got {num_gt} (skip classes without GT)")
    is_tp = ~np.isnan(tp_ious)
    if np.any(tp_ious[is_tp] < tau - 1e-12) or np.any(tp_ious[is_tp] > 1 + 1e-12):
        raise ValueError(f"TP IoUs must lie in [tau={tau}, 1]")

    order = np.argsort(-scores, kind="mergesort")
    scores, is_tp, tp_ious = scores[order], is_tp[order], tp_ious[order]
    # Cumulative counts after keeping the first k detections, k = 0..N (k = 0: nothing kept).
    num_tp = np.concatenate([[0], np.cumsum(is_tp)])
    num_fp = np.concatenate([[0], np.cumsum(~is_tp)])
    loc_sum = np.concatenate([[0.0], np.cumsum(np.where(is_tp, 1.0 - tp_ious, 0.0))])
    cuts = _threshold_cuts(scores)
    lrp = _lrp(num_tp[cuts], num_fp[cuts], loc_sum[cuts], num_gt, tau)
    best = cuts[int(np.argmin(lrp))]  # argmin takes the first minimum: the highest threshold

    tp, fp = int(num_tp[best]), int(num_fp[best])
    return ClassOLRP(
        olrp=float(lrp.min()),
        loc=float(loc_sum[best] / tp) if tp > 0 else float("nan"),
        fp=float(fp / (tp + fp)) if tp > 0 else float("nan"),
        fn=float((num_gt - tp) / num_gt),
        threshold=float(scores[best - 1]) if best > 0 else float("inf"),
    )


def _threshold_cuts(sorted_scores: np.ndarray) -> np.ndarray:
    """How many of the (N,) descending scores each threshold keeps: 0 (nothing), then the end of
    each group of tied scores, since a score threshold keeps or drops a tie group whole."""
    group_ends = np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1]) + 1
    ends = [group_ends, [len(sorted_scores)]] if len(sorted_scores) else []
    return np.concatenate([[0], *ends]).astype(np.int64)


def _lrp(num_tp, num_fp, loc_sum, num_gt: int, tau: float) -> np.ndarray:
    """LRP at each cut; (K,) arrays in, (K,) out. N_TP + N_FP + N_FN = N_FP + G."""
    num_fn = num_gt - num_tp
    return (loc_sum / (1.0 - tau) + num_fp + num_fn) / (num_fp + num_gt)


def olrp_from_coco_eval(coco_eval, tau: float = 0.5) -> OLRPSummary:
    """moLRP and its components from a pycocotools COCOeval on which evaluate() has run."""
    per_class_matches = collect_matches(coco_eval, tau)
    per_class = {
        cat: class_olrp(m["scores"], m["tp_ious"], m["num_gt"], tau)
        for cat, m in per_class_matches.items()
        if m["num_gt"] > 0
    }
    return OLRPSummary(
        olrp=_mean([c.olrp for c in per_class.values()]),
        loc=_mean([c.loc for c in per_class.values()]),
        fp=_mean([c.fp for c in per_class.values()]),
        fn=_mean([c.fn for c in per_class.values()]),
        per_class=per_class,
    )


def _mean(values: list[float]) -> float:
    """Mean over the defined (non-NaN) values; NaN when there are none."""
    values = [v for v in values if v == v]
    return float(np.mean(values)) if values else float("nan")


def collect_matches(coco_eval, tau: float = 0.5) -> dict[int, dict]:
    """Per category id: the scores (N,), TP IoUs (N,; NaN for FPs) of its non-ignored detections
    and its number of non-ignored ground-truth boxes, read from COCOeval's matching at IoU tau,
    area "all" and the last maxDets. A FastCOCOeval's matches are read from its arrays (the same
    values, in the same order), without building evalImgs."""
    params = coco_eval.params
    fast = getattr(coco_eval, "fast_matches", None)  # see rankdetr.evaluation.fast_cocoeval
    if fast is None and not getattr(coco_eval, "evalImgs", None):
        raise ValueError("COCOeval has no per-image results: call evaluate() before oLRP")
    if not params.useCats:
        raise ValueError("oLRP is per class: COCOeval.params.useCats must be 1")
    thresholds = np.flatnonzero(np.isclose(params.iouThrs, tau))
    if len(thresholds) == 0:
        raise ValueError(f"IoU threshold {tau} is not in COCOeval.params.iouThrs {params.iouThrs}")
    t = int(thresholds[0])
    all_range = list(params.areaRng[params.areaRngLbl.index("all")])
    if fast is not None:
        areas = [a for a, area in enumerate(fast.params.areaRng) if list(area) == all_range]
        return fast.class_matches(t, areas)

    matches = {int(cat): {"scores": [], "tp_ious": [], "num_gt": 0} for cat in params.catIds}
    for image in coco_eval.evalImgs:
        if image is None or list(image["aRng"]) != all_range:
            continue
        class_matches = matches[int(image["category_id"])]
        class_matches["num_gt"] += int(np.sum(np.asarray(image["gtIgnore"]) == 0))
        scores, tp_ious = _image_matches(coco_eval, image, t)
        class_matches["scores"].extend(scores)
        class_matches["tp_ious"].extend(tp_ious)
    return matches


def _image_matches(coco_eval, image: dict, t: int) -> tuple[list[float], list[float]]:
    """Scores and TP IoUs (NaN for FPs) of one image/class's non-ignored detections."""
    matched_gt = np.asarray(image["dtMatches"])[t]  # (D,) matched ground-truth id, 0 if none
    ignored = np.asarray(image["dtIgnore"], dtype=bool)[t]  # (D,)
    ious = _iou_lookup(coco_eval, image)
    scores, tp_ious = [], []
    for d, (score, gt_id, skip) in enumerate(zip(image["dtScores"], matched_gt, ignored)):
        if skip:
            continue
        scores.append(float(score))
        tp_ious.append(ious(d, int(gt_id)) if gt_id > 0 else float("nan"))
    return scores, tp_ious


def _iou_lookup(coco_eval, image: dict):
    """(detection index in image["dtIds"], ground-truth id) -> the IoU COCOeval matched with.

    COCOeval.ious[img, cat] is (D, G): rows are the detections in the score order of dtIds (the
    same stable sort), columns the ground truth in COCOeval's own per-image order (_gts), which
    differs from gtIds (sorted with ignored boxes last)."""
    key = (image["image_id"], image["category_id"])
    matrix = coco_eval.ious[key]
    columns = {g["id"]: i for i, g in enumerate(coco_eval._gts[key])}

    def lookup(d: int, gt_id: int) -> float:
        return float(matrix[d, columns[gt_id]])

    return lookup
