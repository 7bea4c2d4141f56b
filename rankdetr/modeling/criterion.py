"""The training losses: classification (focal / GCL / varifocal), L1 and GIoU box losses, on the
last decoder layer, every auxiliary layer and the encoder proposals, for one-to-one queries and,
with hybrid matching, for one-to-many queries against k-fold repeated targets.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from rankdetr.layers.box_ops import (
    LOSS_IOU_EPS,
    box_cxcywh_to_xyxy,
    elementwise_box_iou,
    elementwise_generalized_box_iou,
)
from rankdetr.modeling.losses import giou_aware_focal_loss, sigmoid_focal_loss, varifocal_loss
from rankdetr.modeling.matcher import HungarianMatcher

__all__ = ["SetCriterion", "build_criterion", "repeat_targets"]

CLASSIFICATION_LOSSES = ("focal", "gcl", "varifocal")
QUALITY_TARGETS = ("giou", "iou")


def repeat_targets(targets: list[dict], times: int) -> list[dict]:
    """Each image's targets repeated `times` times (H-DETR's one-to-many branch)."""
    return [
        {"labels": t["labels"].repeat(times), "boxes": t["boxes"].repeat(times, 1)} for t in targets
    ]


class SetCriterion(nn.Module):
    """Matches predictions to targets and returns the weighted losses of every output."""

    def __init__(
        self,
        *,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_class: float = 2.0,
        weight_bbox: float = 5.0,
        weight_giou: float = 2.0,
        weight_one2many: float = 1.0,
        classification_loss: str = "gcl",
        quality_target: str = "giou",
        quality_power: float = 1.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        encoder_class_agnostic: bool = True,
    ):
        """
        Args:
            num_classes: K.
            matcher: assigns predictions to targets (its cost may switch to HMC during training).
            weight_class, weight_bbox, weight_giou: loss weights (2, 5, 2).
            weight_one2many: lambda of the one-to-many branch.
            classification_loss: "focal", "gcl" (Eq. 6, decoder outputs) or "varifocal" (Eq. 7).
                Encoder proposals always use the focal loss.
            quality_target: GCL / varifocal target t: "giou" ((GIoU + 1) / 2) or "iou" (IoU),
                raised to `quality_power` (Table 5a).
            focal_alpha, focal_gamma: of the focal and GCL losses.
            encoder_class_agnostic: the encoder proposals are scored for objectness (every
                target counts as class 0; H-DETR) or per class (DINO).
        """
        super().__init__()
        if classification_loss not in CLASSIFICATION_LOSSES:
            raise ValueError(f"classification_loss must be one of {CLASSIFICATION_LOSSES}")
        if quality_target not in QUALITY_TARGETS:
            raise ValueError(f"quality_target must be one of {QUALITY_TARGETS}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weights = {"class": weight_class, "bbox": weight_bbox, "giou": weight_giou}
        self.weight_one2many = weight_one2many
        self.classification_loss = classification_loss
        self.quality_target = quality_target
        self.quality_power = quality_power
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.encoder_class_agnostic = encoder_class_agnostic

    def set_training_progress(self, progress: float) -> None:
        """Forwarded to the matcher (the HMC switch)."""
        self.matcher.set_training_progress(progress)

    def forward(
        self,
        outputs: dict,
        targets: list[dict],
        outputs_one2many: dict | None = None,
        one2many_repeats: int = 6,
    ) -> dict[str, torch.Tensor]:
        """
        Args:
            outputs: one-to-one predictions, "logits" and "boxes": lists over decoder layers of
                (N, Q, K) and (N, Q, 4) normalised cxcywh; optionally "enc_logits" (N, S, K) and
                "enc_boxes" (N, S, 4) for the encoder proposals.
            targets: N dicts with "labels" (T,) int64 and "boxes" (T, 4) normalised cxcywh.
            outputs_one2many: the one-to-many predictions ("logits", "boxes" lists), or None.
            one2many_repeats: k, how often targets repeat for the one-to-many branch.

        Returns:
            Weighted losses: "loss_class", "loss_bbox", "loss_giou" for the last layer, with
            suffix "_{i}" for auxiliary layer i, "_enc" for the proposals, and prefix "o2m_"
            for the one-to-many branch.
        """
        num_boxes = _average_box_count(targets, outputs["logits"][-1].device)
        losses = self._decoder_losses(outputs, targets, num_boxes, prefix="")
        if "enc_logits" in outputs:
            enc_targets = targets
            if self.encoder_class_agnostic:  # every target counts as class 0 (objectness)
                enc_targets = [
                    {"labels": torch.zeros_like(t["labels"]), "boxes": t["boxes"]} for t in targets
                ]
            enc = self._output_losses(
                outputs["enc_logits"][None], outputs["enc_boxes"][None], enc_targets, num_boxes,
                "focal",
            )  # fmt: skip
            losses.update({f"{name}_enc": value[0] for name, value in enc.items()})
        if outputs_one2many is not None:
            repeated = repeat_targets(targets, one2many_repeats)
            one2many = self._decoder_losses(
                outputs_one2many, repeated, num_boxes * one2many_repeats, prefix="o2m_"
            )
            losses.update({k: v * self.weight_one2many for k, v in one2many.items()})
        return losses

    def denoising_losses(
        self,
        outputs: dict | None,
        targets: list[dict],
        matches: list[tuple[torch.Tensor, torch.Tensor]],
        num_groups: int,
        num_layers: int,
    ) -> dict[str, torch.Tensor]:
        """DINO's denoising losses: each positive copy reconstructs its own target (no matching).

        Args:
            outputs: the denoising queries' "logits" and "boxes" (lists over decoder layers of
                (N, P, K) and (N, P, 4)), or None when the batch had no denoising queries.
            targets: as :meth:`forward`.
            matches: per image (query slots, target indices) of the positive copies.
            num_groups: G; the losses are normalised by G times the box count.
            num_layers: decoder layers, for the names of the zero losses without outputs.

        Returns:
            "loss_class_dn", "loss_bbox_dn", "loss_giou_dn" for the last layer and with suffix
            "_{i}" for auxiliary layer i; zeros (DINO's convention, so that every iteration logs
            the same terms) when `outputs` is None. Negative copies and padding slots count as
            background in the classification loss, with the classification loss of the decoder
            outputs (GCL when it is on: a positive's target is its localisation quality).
        """
        if outputs is None:
            device = targets[0]["boxes"].device if targets else None
            zero = torch.zeros((), device=device)
            names = ("loss_class", "loss_bbox", "loss_giou")
            suffixes = [f"_{i}" for i in range(num_layers - 1)] + [""]
            return {f"{name}_dn{suffix}": zero for suffix in suffixes for name in names}
        num_boxes = _average_box_count(targets, outputs["logits"][-1].device) * num_groups
        logits, boxes = torch.stack(outputs["logits"]), torch.stack(outputs["boxes"])
        per_layer = self._matched_losses(
            logits, boxes, targets, [matches] * len(logits), num_boxes, self.classification_loss
        )
        return _name_layers(per_layer, "", "_dn")

    def _decoder_losses(
        self, outputs: dict, targets: list[dict], num_boxes: float, prefix: str
    ) -> dict[str, torch.Tensor]:
        """Every decoder layer's losses, matched and computed for all layers at once."""
        logits, boxes = torch.stack(outputs["logits"]), torch.stack(outputs["boxes"])
        per_layer = self._output_losses(logits, boxes, targets, num_boxes, self.classification_loss)
        return _name_layers(per_layer, prefix, "")

    def _output_losses(
        self,
        logits: torch.Tensor,
        boxes: torch.Tensor,
        targets: list[dict],
        num_boxes: float,
        loss_kind: str,
    ) -> dict[str, torch.Tensor]:
        """Losses of L sets of predictions of the same images, logits (L, N, Q, K) and boxes
        (L, N, Q, 4), each set matched on its own -> {name: (L,)}."""
        matches = self.matcher.match_layers(logits.detach(), boxes.detach(), targets)
        return self._matched_losses(logits, boxes, targets, matches, num_boxes, loss_kind)

    def _matched_losses(
        self,
        logits: torch.Tensor,
        boxes: torch.Tensor,
        targets: list[dict],
        matches: list[list[tuple[torch.Tensor, torch.Tensor]]],
        num_boxes: float,
        loss_kind: str,
    ) -> dict[str, torch.Tensor]:
        """Losses of L sets of predictions, logits (L, N, Q, K) and boxes (L, N, Q, 4), under the
        given matches (per set, per image: query indices, target indices); unmatched queries
        are background. Returns {name: (L,)}, each set's weighted sums over its images.

        All sets go through one computation (the decoder layers' losses in one pass instead of
        one per layer: a third of the operations for three layers), summed per set at the end.
        """
        device = logits.device
        indices, set_sizes = _match_indices(matches, targets)
        layer_index, batch_index, query_index, target_index = indices
        layer_index, batch_index = layer_index.to(device), batch_index.to(device)
        query_index = query_index.to(device)
        matched_boxes = boxes[layer_index, batch_index, query_index]
        all_boxes = torch.cat([t["boxes"] for t in targets])
        all_labels = torch.cat([t["labels"] for t in targets])
        target_index = target_index.to(all_boxes.device)
        # float32 data; float64 for a float64 model
        target_boxes = all_boxes[target_index].to(boxes.dtype)
        labels = all_labels[target_index].to(device)
        pred_xyxy, gt_xyxy = box_cxcywh_to_xyxy(matched_boxes), box_cxcywh_to_xyxy(target_boxes)
        giou = elementwise_generalized_box_iou(pred_xyxy, gt_xyxy, LOSS_IOU_EPS)
        positive = torch.zeros_like(logits, dtype=torch.bool)
        positive[layer_index, batch_index, query_index, labels] = True
        if loss_kind == "focal":
            classification = sigmoid_focal_loss(
                logits, positive.to(logits.dtype), self.focal_alpha, self.focal_gamma
            )
        else:
            quality = torch.zeros_like(logits)
            quality[layer_index, batch_index, query_index] = self._quality(
                giou, pred_xyxy, gt_xyxy
            )[:, None]
            classification = self._quality_aware_loss(logits, positive, quality, loss_kind)
        # (M, 2): each pair's L1 distance and 1 - GIoU. The pairs come set by set, so each set's
        # sum is that of its own run of rows (deterministic on a GPU too, unlike index_add).
        box_terms = torch.stack([(matched_boxes - target_boxes).abs().sum(-1), 1 - giou], -1)
        per_set = torch.stack([rows.sum(0) for rows in box_terms.split(set_sizes)])
        return {
            "loss_class": self.weights["class"] * classification.flatten(1).sum(1) / num_boxes,
            "loss_bbox": self.weights["bbox"] * per_set[:, 0] / num_boxes,
            "loss_giou": self.weights["giou"] * per_set[:, 1] / num_boxes,
        }

    def _quality(self, giou, pred_xyxy, gt_xyxy) -> torch.Tensor:
        """(M,) detached target t of the matched pairs: ((GIoU + 1) / 2)^k or IoU^k."""
        if self.quality_target == "giou":
            t = (giou.detach() + 1) / 2
        else:
            t = elementwise_box_iou(pred_xyxy.detach(), gt_xyxy, LOSS_IOU_EPS)
        return t.clamp(0, 1).pow(self.quality_power)

    def _quality_aware_loss(self, logits, positive, quality, loss_kind) -> torch.Tensor:
        if loss_kind == "gcl":
            return giou_aware_focal_loss(
                logits, positive, quality, self.focal_alpha, self.focal_gamma
            )
        return varifocal_loss(logits, positive, quality, gamma=self.focal_gamma)


def _name_layers(per_layer: dict[str, torch.Tensor], prefix: str, tag: str) -> dict:
    """{name: (L,)} -> {prefix + name + tag + suffix: ()}: no suffix for the last layer, "_{i}"
    for auxiliary layer i."""
    last = len(next(iter(per_layer.values()))) - 1
    return {
        f"{prefix}{name}{tag}{'' if layer == last else f'_{layer}'}": values[layer]
        for layer in range(last + 1)
        for name, values in per_layer.items()
    }


def _match_indices(
    matches: list[list[tuple[torch.Tensor, torch.Tensor]]], targets: list[dict]
) -> tuple[tuple[torch.Tensor, ...], list[int]]:
    """Per set, per image (query indices, target indices) -> ((set, image, query, target), the
    number of pairs of each set): (M,) int64 CPU tensors of every matched pair, set by set, the
    target as an index into the images' targets concatenated. Built in NumPy: a few dozen tiny
    index arrays cost microseconds there, and an ATen operation each as tensors."""
    offsets = np.cumsum([0] + [len(t["labels"]) for t in targets])
    pairs = [
        (layer, image, query.numpy(), target.numpy() + offsets[image])
        for layer, per_image in enumerate(matches)
        for image, (query, target) in enumerate(per_image)
    ]
    counts = [len(query) for _, _, query, _ in pairs]
    columns = (
        np.repeat([layer for layer, _, _, _ in pairs], counts),
        np.repeat([image for _, image, _, _ in pairs], counts),
        np.concatenate([query for _, _, query, _ in pairs]),
        np.concatenate([target for _, _, _, target in pairs]),
    )
    set_sizes = np.bincount(columns[0], minlength=len(matches)).tolist()
    return tuple(torch.from_numpy(column.astype(np.int64)) for column in columns), set_sizes


def _average_box_count(targets: list[dict], device: torch.device) -> float:
    """Target boxes per process, averaged over processes (at least 1): the loss normaliser."""
    count = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return max(count.item(), 1.0)


def build_criterion(
    *,
    num_classes: int,
    rank,
    loss_weights: dict,
    matching_costs: dict,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    **criterion_kwargs,
) -> SetCriterion:
    """The criterion and its Hungarian matcher as a meta-architecture's `rank` node asks: HMC
    switches the matcher, GCL / varifocal the classification loss.

    Args:
        num_classes: K.
        rank: :class:`~rankdetr.modeling.rank_options.RankOptions`.
        loss_weights, matching_costs: {"class", "bbox", "giou"} each.
        focal_alpha, focal_gamma: of the losses and the matching cost.
        criterion_kwargs: further :class:`SetCriterion` arguments (e.g. `weight_one2many`).
    """
    matcher = HungarianMatcher(
        cost_class=matching_costs["class"],
        cost_bbox=matching_costs["bbox"],
        cost_giou=matching_costs["giou"],
        focal_alpha=focal_alpha,
        focal_gamma=focal_gamma,
        high_order_start=rank.hmc_start if rank.hmc else None,
        high_order_power=rank.hmc_power,
        high_order_quality=rank.hmc_quality,
    )
    return SetCriterion(
        num_classes=num_classes,
        matcher=matcher,
        weight_class=loss_weights["class"],
        weight_bbox=loss_weights["bbox"],
        weight_giou=loss_weights["giou"],
        classification_loss=rank.classification_loss,
        quality_target=rank.gcl_target,
        quality_power=rank.gcl_power,
        focal_alpha=focal_alpha,
        focal_gamma=focal_gamma,
        **criterion_kwargs,
    )
