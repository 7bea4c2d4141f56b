"""COCO evaluation with the paper's metrics: AP, AR and optimal LRP."""

from .coco_evaluator import AR_METRICS, OLRP_METRICS, RankDETRCOCOEvaluator, ranking_metrics
from .fast_cocoeval import FastCOCOeval
from .olrp import ClassOLRP, OLRPSummary, class_olrp, olrp_from_coco_eval

__all__ = [
    "AR_METRICS",
    "OLRP_METRICS",
    "ClassOLRP",
    "FastCOCOeval",
    "OLRPSummary",
    "RankDETRCOCOEvaluator",
    "class_olrp",
    "olrp_from_coco_eval",
    "ranking_metrics",
]
