"""COCO evaluation with the paper's full metric set: AP, AR and oLRP (Table 4 of the paper)."""

from __future__ import annotations

import math

from detectron2.evaluation import COCOEvaluator
from detectron2.utils.logger import create_small_table

from .olrp import olrp_from_coco_eval

# COCOeval.stats[6:12] for bbox: recall at 1/10/100 detections, then small/medium/large at 100.
AR_METRICS = ("AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
OLRP_METRICS = ("oLRP", "oLRP_Loc", "oLRP_FP", "oLRP_FN")


class RankDETRCOCOEvaluator(COCOEvaluator):
    """detectron2's COCOEvaluator whose "bbox" results also hold AR1, AR10, AR100, ARs, ARm, ARl
    and oLRP, oLRP_Loc, oLRP_FP, oLRP_FN (all in percent; see rankdetr.evaluation.olrp).

    oLRP reads pycocotools' per-image matches, which only the official Python COCOeval keeps, so
    ``use_fast_impl`` defaults to False and True is refused.
    """

    def __init__(self, dataset_name, tasks=None, distributed=True, output_dir=None, *,
                 use_fast_impl=False, **kwargs):  # fmt: skip
        if use_fast_impl:
            raise ValueError(
                "RankDETRCOCOEvaluator needs use_fast_impl=False: oLRP is computed from the "
                "per-image matches of pycocotools' COCOeval, which the fast implementation lacks"
            )
        super().__init__(dataset_name, tasks, distributed, output_dir,
                         use_fast_impl=False, **kwargs)  # fmt: skip

    def _derive_coco_results(self, coco_eval, iou_type, class_names=None):
        results = super()._derive_coco_results(coco_eval, iou_type, class_names=class_names)
        if iou_type != "bbox":
            return results
        extra = ranking_metrics(coco_eval)
        self._logger.info("Recall and oLRP for bbox: \n" + create_small_table(extra))
        # Keep AP..APl first and the per-class APs last, as the paper's tables order them.
        per_class = {k: v for k, v in results.items() if k.startswith("AP-")}
        summary = {k: v for k, v in results.items() if not k.startswith("AP-")}
        return {**summary, **extra, **per_class}


def ranking_metrics(coco_eval) -> dict[str, float]:
    """AR1..ARl and oLRP with its components, in percent, from a summarized COCOeval (None when
    the model predicted nothing: every metric is NaN)."""
    if coco_eval is None:
        return {name: float("nan") for name in AR_METRICS + OLRP_METRICS}
    # COCOeval writes -1 for a recall it cannot compute (e.g. no ground truth in an area range).
    results = {
        name: float(value * 100) if value >= 0 else float("nan")
        for name, value in zip(AR_METRICS, coco_eval.stats[6:12])
    }
    olrp = olrp_from_coco_eval(coco_eval, tau=0.5)
    values = (olrp.olrp, olrp.loc, olrp.fp, olrp.fn)
    results.update(
        {name: value * 100 if not math.isnan(value) else value
         for name, value in zip(OLRP_METRICS, values)}
    )  # fmt: skip
    return results
