"""Detections of a model on a dataset, evaluated with pycocotools' COCOeval, for PR curves (paper
Fig. 3a): COCOeval's eval["precision"] holds precision at recall 0:0.01:1 for every IoU
threshold, class, area range and maxDets."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.data.datasets.coco import convert_to_coco_dict
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

__all__ = ["coco_ground_truth", "coco_precision", "predict_coco_json"]


@torch.no_grad()
def predict_coco_json(
    model: torch.nn.Module,
    inputs: Iterable[dict],
    dataset_name: str,
    total: int | None = None,
    description: str = "detect",
) -> tuple[list[dict], list]:
    """Run the model (inference mode, one image at a time) and return its detections as COCO
    results (boxes XYWH in original pixels, the dataset's category ids) and the image ids seen."""
    contiguous_to_dataset = _contiguous_to_dataset_ids(dataset_name)
    results, image_ids = [], []
    for x in tqdm(inputs, total=total, desc=description, unit="img"):
        instances = model([x])[0]["instances"].to("cpu")
        image_ids.append(x["image_id"])
        for detection in instances_to_coco_json(instances, x["image_id"]):
            detection["category_id"] = contiguous_to_dataset(detection["category_id"])
            results.append(detection)
    return results, image_ids


def _contiguous_to_dataset_ids(dataset_name: str):
    mapping = MetadataCatalog.get(dataset_name).get("thing_dataset_id_to_contiguous_id")
    if not mapping:
        return lambda label: label
    inverse = {contiguous: dataset_id for dataset_id, contiguous in mapping.items()}
    return inverse.__getitem__


def coco_ground_truth(dataset_name: str) -> COCO:
    """The dataset's ground truth as a pycocotools COCO: its JSON file when the metadata names
    one (as COCOEvaluator does), else converted from the dataset dicts."""
    json_file = MetadataCatalog.get(dataset_name).get("json_file")
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        if json_file:
            return COCO(json_file)
        coco = COCO()
        coco.dataset = convert_to_coco_dict(dataset_name)
        coco.createIndex()
    return coco


def coco_precision(coco_gt: COCO, results: list[dict], image_ids: list) -> np.ndarray:
    """COCOeval (bbox, default parameters) on `image_ids` -> eval["precision"], shape
    (10 IoU thresholds, 101 recall thresholds, K classes, 4 areas, 3 maxDets); -1 where a class
    has no ground truth."""
    if not results:
        raise ValueError("the model gave no detections, so there is no PR curve to draw")
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
    return evaluator.eval["precision"]
