"""Run a Rank-DETR model over mapped dataset dicts and keep, per image and per decoder layer, what
the analysis figures need: the one-to-one queries' scores and boxes, the ground truth, and the
Hungarian matching of each layer (done with the model's own matcher, as in training).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from rankdetr.analysis.stats import class_scores, max_iou_with_gt, split_by_match
from rankdetr.layers.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh

__all__ = [
    "ImageLayerOutputs",
    "collect_layer_outputs",
    "matched_and_unmatched_scores",
    "normalised_targets",
    "unmatched_max_ious",
]


@dataclass
class ImageLayerOutputs:
    """One image's one-to-one query outputs for all L decoder layers (on the CPU).

    Attributes:
        image_id, file_name: from the dataset dict.
        height, width: the original image size (where the absolute boxes live).
        scores: (L, Q) classification score of each query (max sigmoid over classes).
        labels: (L, Q) int64 class of that score.
        boxes: (L, Q, 4) predicted (cx, cy, w, h), normalised by the image size.
        gt_boxes: (T, 4) ground-truth (cx, cy, w, h), normalised the same way.
        gt_classes: (T,) int64.
        matches: L pairs (query_indices (M,), gt_indices (M,)) from the matcher, M = min(Q, T).
        logits: (L, Q, K) when collected with keep_logits=True, else None.
    """

    image_id: object
    file_name: str
    height: int
    width: int
    scores: torch.Tensor
    labels: torch.Tensor
    boxes: torch.Tensor
    gt_boxes: torch.Tensor
    gt_classes: torch.Tensor
    matches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    logits: torch.Tensor | None = None

    @property
    def num_layers(self) -> int:
        return self.scores.shape[0]

    def _scale(self) -> torch.Tensor:
        return torch.tensor([self.width, self.height, self.width, self.height], dtype=torch.float32)

    def boxes_xyxy(self, layer: int) -> torch.Tensor:
        """(Q, 4) layer `layer`'s boxes as absolute (x0, y0, x1, y1) in the original image."""
        return box_cxcywh_to_xyxy(self.boxes[layer]) * self._scale()

    def gt_xyxy(self) -> torch.Tensor:
        """(T, 4) ground-truth boxes as absolute (x0, y0, x1, y1) in the original image."""
        return box_cxcywh_to_xyxy(self.gt_boxes) * self._scale()


def normalised_targets(batched_inputs: list[dict], image_sizes: list[tuple[int, int]]):
    """Mapped inputs' Instances (gt_boxes xyxy in input pixels) -> matcher targets: a list of
    {"labels" (T,) int64, "boxes" (T, 4) cxcywh normalised by the (h, w) in image_sizes}."""
    targets = []
    for x, (h, w) in zip(batched_inputs, image_sizes):
        if "instances" not in x:
            raise KeyError(
                f"input {x.get('file_name', '?')} has no 'instances': the test mapper must keep "
                "the annotations (rankdetr.data.DetrDatasetMapper does)"
            )
        instances = x["instances"]
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        boxes = box_xyxy_to_cxcywh(instances.gt_boxes.tensor.float().cpu() / scale)
        targets.append({"labels": instances.gt_classes.cpu().long(), "boxes": boxes})
    return targets


@torch.no_grad()
def collect_layer_outputs(
    model: torch.nn.Module,
    inputs: Iterable[dict],
    matcher=None,
    keep_logits: bool = False,
    total: int | None = None,
    description: str = "collect",
) -> list[ImageLayerOutputs]:
    """Run `model.forward_layers` on each mapped input (one image at a time) and match every
    decoder layer's one-to-one queries to the ground truth.

    Args:
        model: a RankDETR (anything with `forward_layers` and, without `matcher`,
            `criterion.matcher`), already in eval mode.
        inputs: mapped dataset dicts (image, instances, height, width, image_id, file_name).
        matcher: called as matcher(logits (1, Q, K), boxes (1, Q, 4), targets); default the
            model's own.
        keep_logits: also keep the (L, Q, K) logits (memory: L*Q*K floats per image).
        total, description: for the progress bar.

    Returns:
        One :class:`ImageLayerOutputs` per input, in order.
    """
    matcher = matcher if matcher is not None else model.criterion.matcher
    records = []
    for x in tqdm(inputs, total=total, desc=description, unit="img"):
        outputs = model.forward_layers([x])
        logits = torch.stack([layer[0] for layer in outputs["logits"]]).cpu()  # (L, Q, K)
        boxes = torch.stack([layer[0] for layer in outputs["boxes"]]).cpu()  # (L, Q, 4)
        target = normalised_targets([x], outputs["image_sizes"])[0]
        matches = [matcher(layer_logits[None], layer_boxes[None], [target])[0]
                   for layer_logits, layer_boxes in zip(logits, boxes)]  # fmt: skip
        h, w = outputs["image_sizes"][0]
        records.append(
            ImageLayerOutputs(
                image_id=x.get("image_id"),
                file_name=x.get("file_name", ""),
                height=int(x.get("height", h)),
                width=int(x.get("width", w)),
                scores=class_scores(logits),
                labels=logits.argmax(dim=-1),  # the sigmoid keeps the order
                boxes=boxes,
                gt_boxes=target["boxes"],
                gt_classes=target["labels"],
                matches=matches,
                logits=logits if keep_logits else None,
            )
        )
    return records


def matched_and_unmatched_scores(records: list[ImageLayerOutputs], layer: int = -1):
    """Scores of layer `layer`'s matched and unmatched queries over all images: two float64
    arrays (paper Fig. 3b and 3c)."""
    positives, negatives = [], []
    for record in records:
        matched, unmatched = split_by_match(record.scores[layer], record.matches[layer][0])
        positives.append(matched)
        negatives.append(unmatched)
    return _concat(positives), _concat(negatives)


def unmatched_max_ious(records: list[ImageLayerOutputs], layer: int) -> np.ndarray:
    """Max IoU with the image's ground truth of layer `layer`'s unmatched queries, over all
    images (paper Fig. 4); float64 array."""
    values = []
    for record in records:
        ious = max_iou_with_gt(record.boxes_xyxy(layer), record.gt_xyxy())
        values.append(split_by_match(ious, record.matches[layer][0])[1])
    return _concat(values)


def _concat(tensors: list[torch.Tensor]) -> np.ndarray:
    if not tensors:
        return np.zeros(0)
    return torch.cat(tensors).double().numpy()
