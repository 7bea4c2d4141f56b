"""pycocotools' COCOeval for boxes, vectorised with numpy: the same numbers, bit for bit.

pycocotools' ``COCOeval.evaluate()`` calls ``computeIoU`` and ``evaluateImg`` once per image and
category (and area range), in Python: at COCO scale (5000 images, 100 detections each) that is
1.6 M calls and most of the evaluation's time, and ``accumulate()`` adds a Python loop per
detection. :class:`FastCOCOeval` computes the same things over all images at once:

- The IoUs are pycocotools' own formula (``maskApi.c``'s ``bbIou``: the same float64 operations
  in the same order, a crowd box's union being the detection's area), so every IoU is the same
  double.
- The greedy matching is COCO's: detections of an image and category in descending score order
  (a stable sort, so tied scores keep the order of the results), each taking the ground-truth box
  of highest IoU >= the threshold that is still free (a crowd box always is), the last one of
  equal IoU, and an ignored box (crowd, or outside the area range) only if no regular one
  qualifies. Only the order of the detections within an image is sequential: one step handles
  the r-th detection of every image/category, area range and IoU threshold together.
- ``accumulate()`` is pycocotools' precision/recall computation with the loops over detections
  replaced by cumulative sums and a reversed running maximum, which give the same values.

``summarize()`` is pycocotools' own. The per-image results that oLRP reads are kept as arrays
(:attr:`FastCOCOeval.fast_matches`, see :meth:`BoxMatches.class_matches`); ``evalImgs`` is
built from them in pycocotools' layout only when read. Anything else (segm, keypoints,
``useCats=0``, NaN IoUs from non-finite boxes, an ``accumulate(p)`` with other parameters) runs
pycocotools' own code, so the results are always pycocotools'.
"""

from __future__ import annotations

import copy
import datetime
import time

import numpy as np
from pycocotools.cocoeval import COCOeval


class FastCOCOeval(COCOeval):
    """``pycocotools.cocoeval.COCOeval`` with vectorised ``evaluate()`` and ``accumulate()`` for
    ``iouType="bbox"`` with ``useCats`` (see the module docstring); ``self.ious`` stays empty on
    that path. Construct and use it as COCOeval."""

    def __init__(self, cocoGt=None, cocoDt=None, iouType="segm"):
        self.fast_matches: BoxMatches | None = None  # set by a vectorised evaluate()
        self._eval_imgs = None
        super().__init__(cocoGt, cocoDt, iouType)

    @property
    def evalImgs(self):
        """pycocotools' per-image results: a list over (category, area range, image) of dicts or
        None, built from :attr:`fast_matches` on first use after a vectorised evaluate()."""
        if self._eval_imgs is None and self.fast_matches is not None:
            self._eval_imgs = self.fast_matches.eval_imgs()
        return self._eval_imgs

    @evalImgs.setter
    def evalImgs(self, value):
        # pycocotools' own evaluate() assigns it: its results replace the vectorised ones.
        self._eval_imgs = value
        self.fast_matches = None

    def evaluate(self):
        """COCOeval.evaluate(): the vectorised matching for boxes, pycocotools' otherwise."""
        p = self.params
        if p.useSegm is not None:
            p.iouType = "segm" if p.useSegm == 1 else "bbox"
        if p.iouType != "bbox" or not p.useCats or len(p.imgIds) == 0 or len(p.catIds) == 0:
            return super().evaluate()
        tic = time.time()
        print("Running per image evaluation (vectorised)...")
        # The same normalisation as COCOeval.evaluate(), so params read the same afterwards.
        p.imgIds = list(np.unique(p.imgIds))
        p.catIds = list(np.unique(p.catIds))
        p.maxDets = sorted(p.maxDets)
        matches = BoxMatches.compute(self.cocoGt, self.cocoDt, p)
        if matches is None:  # NaN IoUs: pycocotools' comparisons with NaN are its own
            print("NaN IoUs (non-finite boxes): running pycocotools' evaluation")
            return super().evaluate()
        self.ious = {}
        self.evalImgs = None  # clears fast_matches: set it after
        self.fast_matches = matches
        self.eval = {}
        self._paramsEval = copy.deepcopy(p)
        print(f"DONE (t={time.time() - tic:0.2f}s).")

    def accumulate(self, p=None):
        """COCOeval.accumulate(), vectorised after a vectorised evaluate() with the same
        parameters (pycocotools' own code on its evalImgs otherwise)."""
        if self.fast_matches is None or not _same_params(p or self.params, self._paramsEval):
            return super().accumulate(p)
        tic = time.time()
        print("Accumulating evaluation results (vectorised)...")
        p = self.params
        precision, recall, scores = self.fast_matches.accumulate()
        T, R, K, A, M = precision.shape
        self.eval = {
            "params": p,
            "counts": [T, R, K, A, M],
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
            "precision": precision,
            "recall": recall,
            "scores": scores,
        }
        print(f"DONE (t={time.time() - tic:0.2f}s).")


def _same_params(p, evaluated) -> bool:
    """Whether accumulate(p) reads exactly what evaluate() computed (pycocotools also handles a
    subset of the categories, images, areas or maxDets: its own code does that)."""

    def same(a, b):
        return np.array_equal(np.asarray(a), np.asarray(b))

    return (
        bool(p.useCats)
        and same(p.catIds, evaluated.catIds)
        and same(p.imgIds, evaluated.imgIds)
        and same(p.areaRng, evaluated.areaRng)
        and list(p.maxDets) == list(evaluated.maxDets)
        and np.array_equal(p.iouThrs, evaluated.iouThrs)
        and np.array_equal(p.recThrs, evaluated.recThrs)
    )


def coco_box_iou(dt_boxes, gt_boxes, gt_crowd):
    """IoU of x, y, w, h boxes as pycocotools computes it (``maskApi.c`` ``bbIou``), broadcast:
    dt_boxes (..., 4), gt_boxes (..., 4), gt_crowd (...) bool -> (...) float64. A crowd box's
    union is the detection's area; no overlap (w or h <= 0) gives 0."""
    dx, dy, dw, dh = np.moveaxis(np.asarray(dt_boxes, dtype=np.float64), -1, 0)
    gx, gy, gw, gh = np.moveaxis(np.asarray(gt_boxes, dtype=np.float64), -1, 0)
    # The C code's operations in its order (fmin/fmax ignore a NaN operand, as C's do).
    det_area, gt_area = dw * dh, gw * gh
    w = np.fmin(dw + dx, gw + gx) - np.fmax(dx, gx)
    h = np.fmin(dh + dy, gh + gy) - np.fmax(dy, gy)
    inter = w * h
    union = np.where(gt_crowd, det_area, det_area + gt_area - inter)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / union
    return np.where((w <= 0) | (h <= 0), 0.0, iou)


def _annotations(coco, img_ids, cat_ids) -> list[dict]:
    """The annotations COCOeval._prepare reads, in its order: COCO.loadAnns(getAnnIds(imgIds,
    catIds)), i.e. per image in img_ids order, in the file's order, of the categories given
    (looked up by id again, as loadAnns does)."""
    cats = set(cat_ids)
    to_anns = coco.imgToAnns
    return [
        coco.anns[ann["id"]]
        for img in img_ids
        if img in to_anns
        for ann in to_anns[img]
        if ann["category_id"] in cats
    ]


class BoxMatches:
    """COCO's matching of every detection, as flat arrays.

    Detections (N kept: at most maxDets[-1] per image and category, the highest scores) are
    ordered by (image, category) pair, then by descending score (stable); ground-truth boxes
    (G) by pair, in the file's order. With A area ranges and T IoU thresholds:

    - ``gt_index`` (A, T, N) int32: the ground-truth box (index into the G arrays) a detection
      matched, -1 if none;
    - ``gt_ignore`` (A, G) bool: crowd, or area outside the range (COCOeval's ``_ignore``);
    - ``dt_ignore`` (A, T, N) bool: COCOeval's ``dtIgnore`` (matched an ignored box, or
      unmatched and outside the area range).
    """

    def __init__(self, params, img_ids, cat_ids, dt: dict, gt: dict, gt_index):
        self.params = params
        self.img_ids, self.cat_ids = img_ids, cat_ids
        self.dt, self.gt = dt, gt  # dicts of (N,) / (G,) arrays, see compute()
        self.gt_index = gt_index
        areas = np.asarray(params.areaRng, dtype=np.float64).reshape(-1, 2)  # (A, 2)
        self.gt_ignore = gt["ignore"][None] | _outside(gt["area"], areas)
        matched = gt_index >= 0
        if len(gt["id"]):
            safe = np.where(matched, gt_index, 0)
            # COCOeval stores the matched box's id in dtMatches and tests it for zero: a box with
            # id 0 counts as unmatched there, so the same here.
            self.dt_match_nonzero = matched & (gt["id"][safe] != 0)
            matched_ignored = matched & self.gt_ignore[np.arange(len(areas))[:, None, None], safe]
        else:  # no ground truth: nothing matched
            self.dt_match_nonzero = matched_ignored = matched
        outside = _outside(dt["area"], areas)[:, None, :]  # (A, 1, N)
        self.dt_ignore = matched_ignored | (~self.dt_match_nonzero & outside)

    @classmethod
    def compute(cls, coco_gt, coco_dt, params) -> BoxMatches | None:
        """Match the detections of coco_dt to coco_gt under params (normalised as COCOeval does:
        sorted unique imgIds and catIds, sorted maxDets); None if an IoU is NaN."""
        img_ids, cat_ids = params.imgIds, params.catIds
        img_index = {img: i for i, img in enumerate(img_ids)}
        cat_index = {cat: k for k, cat in enumerate(cat_ids)}
        gts = _annotations(coco_gt, img_ids, cat_ids)
        dts = _annotations(coco_dt, img_ids, cat_ids)
        num_cats = len(cat_ids)

        def pair_key(anns):
            images = np.array([img_index[a["image_id"]] for a in anns], dtype=np.int64)
            cats = np.array([cat_index[a["category_id"]] for a in anns], dtype=np.int64)
            return images, cats, images * num_cats + cats

        def boxes(anns):
            return np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)

        # Ground truth, grouped by pair in the file's order (a stable sort).
        g_img, g_cat, g_key = pair_key(gts)
        order = np.argsort(g_key, kind="stable")
        gt = {
            "image": g_img[order],
            "category": g_cat[order],
            "key": g_key[order],
            "box": boxes(gts)[order],
            "area": np.array([a["area"] for a in gts], dtype=np.float64)[order],
            # COCOeval: ignore = truthy iscrowd; the IoU's crowd flag = int(iscrowd).
            "ignore": np.array([bool(a["iscrowd"]) for a in gts], dtype=bool)[order],
            "crowd": np.array([int(a["iscrowd"]) != 0 for a in gts], dtype=bool)[order],
            "id": np.array([a["id"] for a in gts])[order] if gts else np.zeros(0, np.int64),
        }
        # Detections: by pair, then by descending score, stable (COCOeval's mergesort).
        d_img, d_cat, d_key = pair_key(dts)
        score = np.array([a["score"] for a in dts], dtype=np.float64)
        order = _by_key_and_score(d_key, score)
        d_key = d_key[order]
        first = np.searchsorted(d_key, d_key, side="left")
        rank = np.arange(len(d_key)) - first  # position in its pair's score order
        keep = order[rank < params.maxDets[-1]]
        dt = {
            "image": d_img[keep],
            "category": d_cat[keep],
            "key": d_key[rank < params.maxDets[-1]],
            "rank": rank[rank < params.maxDets[-1]],
            "box": boxes(dts)[keep],
            "area": np.array([a["area"] for a in dts], dtype=np.float64)[keep],
            "score": score[keep],
            "id": np.array([a["id"] for a in dts])[keep] if dts else np.zeros(0, np.int64),
        }
        gt_index = _match_all(dt, gt, params)
        if gt_index is None:
            return None
        # A copy: COCOeval.params may be changed after evaluate(), these results may not.
        params = copy.deepcopy(params)
        return cls(params, params.imgIds, params.catIds, dt, gt, gt_index)

    # ---- accumulate ----------------------------------------------------------------------------

    def accumulate(self):
        """pycocotools' accumulate(): precision (T, R, K, A, M), recall (T, K, A, M) and the
        scores at the precision points (T, R, K, A, M), -1 where undefined."""
        p = self.params
        T, R, K = len(p.iouThrs), len(p.recThrs), len(self.cat_ids)
        A, M = len(p.areaRng), len(p.maxDets)
        precision = -np.ones((T, R, K, A, M))
        recall = -np.ones((T, K, A, M))
        scores = -np.ones((T, R, K, A, M))
        rec_thrs = np.asarray(p.recThrs)
        num_regular = self.num_regular_gt()  # (K, A)
        # A category is skipped only without any ground truth and detections (COCOeval's E empty).
        present = (np.bincount(self.gt["category"], minlength=K) > 0) | (
            np.bincount(self.dt["category"], minlength=K) > 0
        )
        # Per category, the detections over all images by descending score, ties in image then
        # score order: what COCOeval's stable sort of the images' concatenation gives. Sorted
        # once, so that a category's detections are a contiguous slice.
        order = self.by_category_and_score()
        category, rank, score = (self.dt[name][order] for name in ("category", "rank", "score"))
        counted_all = ~self.dt_ignore[:, :, order]  # (A, T, N): neither TP nor FP if ignored
        tp_all = self.dt_match_nonzero[:, :, order] & counted_all
        bounds = np.searchsorted(category, np.arange(K + 1))
        for k in np.flatnonzero(present):
            areas = np.flatnonzero(num_regular[k] > 0)
            if len(areas) == 0:
                continue
            npig = num_regular[k, areas][:, None, None]  # (A', 1, 1)
            lo, hi = bounds[k], bounds[k + 1]
            category_tp, category_counted = tp_all[areas, :, lo:hi], counted_all[areas, :, lo:hi]
            for m, max_det in enumerate(p.maxDets):
                local = np.flatnonzero(rank[lo:hi] < max_det)  # the top max_det of each image
                chosen, nd = lo + local, len(local)
                tp = np.cumsum(category_tp[:, :, local], axis=2)  # (A', T, nd) integers
                fp = np.cumsum(category_counted[:, :, local], axis=2) - tp
                tp_sum, fp_sum = tp.astype(float), fp.astype(float)
                rc = tp_sum / npig
                pr = tp_sum / (fp_sum + tp_sum + np.spacing(1))
                recall[:, k, areas, m] = rc[:, :, -1].T if nd else 0
                # COCOeval's backward loop pr[i-1] = max(pr[i-1], pr[i]): a running maximum.
                pr = np.maximum.accumulate(pr[:, :, ::-1], axis=2)[:, :, ::-1]
                for j, a in enumerate(areas):
                    for t in range(T):
                        inds = np.searchsorted(rc[j, t], rec_thrs, side="left")
                        # COCOeval stops at the first index past the end, leaving 0 after it.
                        valid = inds < nd
                        q, ss = np.zeros(R), np.zeros(R)
                        q[valid] = pr[j, t, inds[valid]]
                        ss[valid] = score[chosen[inds[valid]]]
                        precision[t, :, k, a, m] = q
                        scores[t, :, k, a, m] = ss
        return precision, recall, scores

    def num_regular_gt(self) -> np.ndarray:
        """(K, A) number of non-ignored ground-truth boxes per category and area range."""
        K = len(self.cat_ids)
        return np.stack(
            [np.bincount(self.gt["category"][~ig], minlength=K) for ig in self.gt_ignore], axis=1
        ).reshape(K, len(self.gt_ignore))

    def by_category_and_score(self) -> np.ndarray:
        """Indices of the detections by category, then descending score, then their current
        (image, score-rank) order."""
        return _by_key_and_score(self.dt["category"], self.dt["score"])

    # ---- oLRP ----------------------------------------------------------------------------------

    def class_matches(self, t: int, area_indices) -> dict[int, dict]:
        """What rankdetr.evaluation.olrp.collect_matches reads from evalImgs: per category id,
        the scores (N,) and TP IoUs (N,; NaN for FPs) of its detections not ignored at IoU
        threshold index t over the area ranges area_indices (in evalImgs' order: area, image,
        score rank), and its number of non-ignored ground-truth boxes."""
        num_regular = self.num_regular_gt()
        gt_index = self.gt_index[:, t]  # (A, N)
        if len(self.gt["id"]):
            safe = np.where(gt_index >= 0, gt_index, 0)
            # collect_matches takes a detection as TP when its dtMatches id is > 0.
            is_tp = (gt_index >= 0) & (self.gt["id"][safe] > 0)
            iou = coco_box_iou(self.dt["box"][None], self.gt["box"][safe], self.gt["crowd"][safe])
            tp_iou = np.where(is_tp, iou, np.nan)  # (A, N): the IoU the matching used
        else:
            tp_iou = np.full(gt_index.shape, np.nan)
        out = {}
        for k, cat in enumerate(self.cat_ids):
            scores, tp_ious = [], []
            for a in area_indices:
                kept = (self.dt["category"] == k) & ~self.dt_ignore[a, t]
                scores.append(self.dt["score"][kept])
                tp_ious.append(tp_iou[a, kept])
            out[int(cat)] = {
                "scores": np.concatenate(scores),
                "tp_ious": np.concatenate(tp_ious),
                "num_gt": int(sum(num_regular[k, a] for a in area_indices)),
            }
        return out

    # ---- pycocotools' layout -------------------------------------------------------------------

    def eval_imgs(self) -> list:
        """COCOeval.evalImgs: for each (category, area range, image), a dict of dtIds, gtIds
        (ignored boxes last), dtMatches, gtMatches (T, D)/(T, G), dtScores, gtIgnore, dtIgnore,
        or None where the image has neither ground truth nor detections of the category."""
        p = self.params
        K, A, I = len(self.cat_ids), len(p.areaRng), len(self.img_ids)  # noqa: E741
        T = len(p.iouThrs)
        out = [None] * (K * A * I)
        d_keys, d_start, d_count = np.unique(self.dt["key"], return_index=True, return_counts=True)
        g_keys, g_start, g_count = np.unique(self.gt["key"], return_index=True, return_counts=True)
        spans = {}
        for key, start, count in zip(d_keys, d_start, d_count):
            spans[int(key)] = [(start, start + count), (0, 0)]
        for key, start, count in zip(g_keys, g_start, g_count):
            spans.setdefault(int(key), [(0, 0), (0, 0)])[1] = (start, start + count)
        dt_id, gt_id = self.dt["id"], self.gt["id"]
        for key, ((d0, d1), (g0, g1)) in spans.items():
            i, k = divmod(key, K)
            for a in range(A):
                ignore = self.gt_ignore[a, g0:g1]
                gt_order = np.argsort(ignore.astype(np.int64), kind="mergesort") + g0
                index = self.gt_index[a, :, d0:d1]  # (T, D)
                dt_matches = np.where(index >= 0, gt_id[np.maximum(index, 0)] if g1 > g0 else 0,
                                      0).astype(float)  # fmt: skip
                gt_matches = np.zeros((T, g1 - g0))
                position = {g: j for j, g in enumerate(gt_order)}
                for t, d in zip(*np.nonzero(index >= 0)):  # later detections overwrite
                    gt_matches[t, position[index[t, d]]] = dt_id[d0 + d]
                out[k * A * I + a * I + i] = {
                    "image_id": self.img_ids[i],
                    "category_id": self.cat_ids[k],
                    "aRng": p.areaRng[a],
                    "maxDet": p.maxDets[-1],
                    "dtIds": [dt_id[d].item() for d in range(d0, d1)],
                    "gtIds": [gt_id[g].item() for g in gt_order],
                    "dtMatches": dt_matches,
                    "gtMatches": gt_matches,
                    "dtScores": self.dt["score"][d0:d1].tolist(),
                    "gtIgnore": ignore[gt_order - g0].astype(np.int64),
                    "dtIgnore": self.dt_ignore[a, :, d0:d1],
                }
        return out


def _by_key_and_score(key, score) -> np.ndarray:
    """Indices ordering (N,) key ascending, then (N,) score descending, ties in index order:
    COCOeval's np.argsort(-scores, kind="mergesort") (stable), per key."""
    order = np.argsort(-score, kind="stable")
    return order[np.argsort(key[order], kind="stable")]


def _outside(area, area_ranges) -> np.ndarray:
    """(A, N) bool: area (N,) < lo or > hi of each (A, 2) range, as COCOeval tests it."""
    return (area[None] < area_ranges[:, :1]) | (area[None] > area_ranges[:, 1:])


def _match_all(dt: dict, gt: dict, params) -> np.ndarray | None:
    """COCO's greedy matching of every detection: (A, T, N) index of the matched ground-truth
    box, -1 if none; None if an IoU is NaN.

    Images/categories with both detections and ground truth are grouped by their number of boxes
    (padded to a power of two, so few groups); in a group, step r matches the r-th detection of
    every image/category at once, for all area ranges and thresholds."""
    num_areas, num_thrs = len(params.areaRng), len(params.iouThrs)
    gt_index = np.full((num_areas, num_thrs, len(dt["key"])), -1, dtype=np.int32)
    d_keys, d_start, d_count = np.unique(dt["key"], return_index=True, return_counts=True)
    g_keys, g_start, g_count = np.unique(gt["key"], return_index=True, return_counts=True)
    _, in_d, in_g = np.intersect1d(d_keys, g_keys, assume_unique=True, return_indices=True)
    if len(in_d) == 0:
        return gt_index
    d_start, d_count = d_start[in_d], d_count[in_d]
    g_start, g_count = g_start[in_g], g_count[in_g]
    areas = np.asarray(params.areaRng, dtype=np.float64).reshape(-1, 2)
    gt_ignore = gt["ignore"][None] | _outside(gt["area"], areas)  # (A, G)
    # COCOeval's starting IoU: min(t, 1 - 1e-10); a box qualifies with IoU >= it.
    thresholds = np.minimum(np.asarray(params.iouThrs, dtype=np.float64), 1 - 1e-10)
    # A box matched by a detection with id <= 0 stays free in COCOeval (gtm > 0 is "taken").
    positive_id = dt["id"] > 0
    width = 2 ** np.ceil(np.log2(g_count)).astype(np.int64)
    for group_width in np.unique(width):
        pairs = np.flatnonzero(width == group_width)
        pairs = pairs[np.argsort(-d_count[pairs], kind="stable")]  # most detections first
        ok = _match_group(dt, gt, gt_ignore, thresholds, positive_id, d_start[pairs],
                          d_count[pairs], g_start[pairs], g_count[pairs], int(group_width),
                          gt_index)  # fmt: skip
        if not ok:
            return None
    return gt_index


def _match_group(dt, gt, gt_ignore, thresholds, positive_id, d_start, d_count, g_start, g_count,
                 width: int, gt_index) -> bool:  # fmt: skip
    """Match P images/categories with at most `width` ground-truth boxes each, d_count (P,)
    descending; write the matches into gt_index (A, T, N). False if an IoU is NaN."""
    num_pairs = len(d_start)
    # Rows of detections ordered by (score rank r, pair): the pairs with an r-th detection are
    # a prefix (d_count is descending), so step r reads rows offset[r] : offset[r] + active[r].
    active = np.array([np.count_nonzero(d_count > r) for r in range(d_count[0])])
    offset = np.concatenate([[0], np.cumsum(active)[:-1]])
    pair = np.repeat(np.arange(num_pairs), d_count)
    rank = np.arange(len(pair)) - np.repeat(np.cumsum(d_count) - d_count, d_count)
    rows = offset[rank] + pair
    row_det = np.empty(len(pair), dtype=np.int64)
    row_det[rows] = d_start[pair] + rank  # detection index of each row
    row_pair = np.empty(len(pair), dtype=np.int64)
    row_pair[rows] = pair

    slots = np.arange(width)
    valid = slots[None] < g_count[:, None]  # (P, W): real boxes, the rest is padding
    box_index = np.where(valid, g_start[:, None] + slots[None], g_start[:, None])  # (P, W)
    crowd = gt["crowd"][box_index] & valid
    ignore = gt_ignore[:, box_index]  # (A, P, W)
    ious = coco_box_iou(
        dt["box"][row_det][:, None, :], gt["box"][box_index[row_pair]], crowd[row_pair]
    )  # (rows, W) fmt: skip
    if np.isnan(ious[valid[row_pair]]).any():
        return False

    num_areas, num_thrs = gt_ignore.shape[0], len(thresholds)
    taken = np.zeros((num_areas, num_thrs, num_pairs, width), dtype=bool)
    local = np.empty((num_areas, num_thrs, len(pair)), dtype=np.int64)  # matched slot per row
    for r in range(len(active)):
        n, start = active[r], offset[r]
        iou = ious[start : start + n]  # (n, W)
        free = ~taken[:, :, :n] | crowd[None, None, :n]  # (A, T, n, W)
        qualifies = (iou[None] >= thresholds[:, None, None]) & valid[None, :n]  # (T, n, W)
        candidate = free & qualifies[None]
        ignored = ignore[:, None, :n]  # (A, 1, n, W)
        # A regular box first; an ignored one only when no regular box qualifies.
        slot = _last_best(iou, candidate & ~ignored)
        slot = np.where(slot >= 0, slot, _last_best(iou, candidate & ignored))  # (A, T, n)
        local[:, :, start : start + n] = slot
        hit = (slot >= 0) & positive_id[row_det[start : start + n]][None, None]
        a, t, j = np.nonzero(hit)
        taken[a, t, j, slot[a, t, j]] = True
    matched = local >= 0
    gt_index[:, :, row_det] = np.where(matched, box_index[row_pair, np.maximum(local, 0)], -1)
    return True


def _last_best(iou, mask) -> np.ndarray:
    """(A, T, n) slot of the highest iou (n, W) where mask (A, T, n, W), the last of equal ones
    (COCOeval replaces its best on >=), -1 where mask is all False."""
    values = np.where(mask, iou, -np.inf)[..., ::-1]
    slot = values.shape[-1] - 1 - np.argmax(values, axis=-1)
    return np.where(mask.any(axis=-1), slot, -1)
