"""DINO's contrastive denoising (CDN): noised copies of the ground truth as extra decoder queries.

In training, every target box enters the decoder 2G times, in G groups. Each group holds, for each
image, its targets' positive copies (slots 0..T-1) and negative copies (slots M..M+T-1), where M
is the most targets of any image in the batch; group g occupies query slots [2Mg, 2M(g+1)), and
the P = 2MG denoising queries come before the matching queries.

* Labels: with probability `label_noise_ratio / 2` a copy's label is replaced by a random class.
  A copy's content query is the label's embedding.
* Boxes: each corner (x0, y0, x1, y1) moves by s * u * (w/2, h/2, w/2, h/2) * box_noise_scale
  with a random sign s; u ~ U[0, 1) for positives (they stay near their target and learn to
  reconstruct it) and u ~ U[1, 2) for negatives (they learn to be rejected as background).
  The noised boxes are clamped to [0, 1] and enter as inverse-sigmoid reference boxes.
* Attention: matching queries never see denoising queries (that would leak the targets); a
  denoising group sees itself and the matching queries, not the other groups.

G = max(1, dn_number // M), so about 2 * dn_number denoising queries are made (DINO's rule).
Slots of images with fewer than M targets are padding: zero content, box logits 0 (box 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rankdetr.layers.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from rankdetr.layers.dtypes import at_least_float32
from rankdetr.layers.mlp import inverse_sigmoid

__all__ = ["ContrastiveDenoising", "DenoisingQueries", "denoising_attention_mask"]


@dataclass
class DenoisingQueries:
    """The denoising queries of one batch.

    Attributes:
        label_queries: (N, P, C) content queries (label embeddings, zero at padding).
        box_logits: (N, P, 4) inverse-sigmoid reference boxes (cx, cy, w, h).
        attn_mask: (P + Q, P + Q) bool over denoising then matching queries, True where query i
            may not attend to query j.
        num_groups: G.
        group_size: 2M, slots per group (M positive, then M negative).
    """

    label_queries: torch.Tensor
    box_logits: torch.Tensor
    attn_mask: torch.Tensor
    num_groups: int
    group_size: int

    @property
    def num_queries(self) -> int:
        """P = num_groups * group_size."""
        return self.label_queries.shape[1]

    def matches(self, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The fixed assignment of the positive copies: per image (query slots, target indices),
        int64 on the CPU; target t of every group g is reconstructed by slot g * 2M + t."""
        matches = []
        for target in targets:
            count = len(target["labels"])
            index = torch.arange(count, dtype=torch.int64)
            starts = torch.arange(self.num_groups, dtype=torch.int64) * self.group_size
            slots = (starts[:, None] + index[None, :]).flatten()
            matches.append((slots, index.repeat(self.num_groups)))
        return matches


def denoising_attention_mask(
    num_groups: int, group_size: int, num_matching: int, device=None
) -> torch.Tensor:
    """(P + Q, P + Q) bool, True = may not attend; P = num_groups * group_size denoising queries
    first, then Q = num_matching matching queries."""
    num_denoising = num_groups * group_size
    size = num_denoising + num_matching
    mask = torch.zeros(size, size, dtype=torch.bool, device=device)
    mask[num_denoising:, :num_denoising] = True  # matching queries must not see the targets
    for group in range(num_groups):
        start, end = group * group_size, (group + 1) * group_size
        mask[start:end, :start] = True
        mask[start:end, end:num_denoising] = True
    return mask


class ContrastiveDenoising:
    """Builds :class:`DenoisingQueries` from a batch's targets.

    Every random draw comes from `self.generator` (a `torch.Generator`; None: torch's global
    generator), so a test can fix or replace them.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        dn_number: int = 100,
        label_noise_ratio: float = 0.5,
        box_noise_scale: float = 1.0,
        generator: torch.Generator | None = None,
    ):
        """
        Args:
            num_classes: K, the range of replacement labels.
            dn_number: about half the denoising queries per batch (DINO's `dn_number`); 0 turns
                denoising off.
            label_noise_ratio: twice the probability that a copy's label is replaced.
            box_noise_scale: scale of the corner noise, in half box sizes.
            generator: source of the random draws (None: torch's global generator).
        """
        if dn_number < 0:
            raise ValueError(f"dn_number must be >= 0, got {dn_number}")
        self.num_classes = num_classes
        self.dn_number = dn_number
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale
        self.generator = generator

    def __call__(
        self, targets: list[dict], label_embedding: nn.Embedding, num_matching: int
    ) -> DenoisingQueries | None:
        """
        Args:
            targets: N dicts with "labels" (T_b,) int64 and "boxes" (T_b, 4) normalised cxcywh.
            label_embedding: K rows of C channels, the content of a copy of label k.
            num_matching: Q, matching queries after the denoising ones (for the mask).

        Returns:
            The queries, or None when denoising is off or the batch has no target.
        """
        most = max((len(t["labels"]) for t in targets), default=0)
        if self.dn_number == 0 or most == 0:
            return None
        num_groups = max(1, self.dn_number // most)
        labels = torch.cat([t["labels"] for t in targets])
        weight = label_embedding.weight
        # The targets are float32 (detectron2's Boxes); the noise and the box logits are computed
        # in the model's dtype: float32 as in DINO (also under autocast, whose parameters stay
        # float32), float64 in a float64 run, where a float32 `log` would differ between CPUs.
        boxes = torch.cat([t["boxes"] for t in targets]).to(at_least_float32(weight.dtype))
        copies = 2 * num_groups  # blocks of all targets: positive, negative, positive, ...
        noisy_labels = self.noised_labels(labels.repeat(copies))
        negative = torch.arange(copies, device=boxes.device).repeat_interleave(len(boxes)) % 2 == 1
        noisy_boxes = self.noised_boxes(boxes.repeat(copies, 1), negative)

        batch_index = torch.cat(
            [torch.full((len(t["labels"]),), b, dtype=torch.int64) for b, t in enumerate(targets)]
        ).repeat(copies)
        within_image = torch.cat([torch.arange(len(t["labels"])) for t in targets])
        block = torch.arange(copies).repeat_interleave(len(boxes))
        slot = block * most + within_image.repeat(copies)
        batch_index, slot = batch_index.to(boxes.device), slot.to(boxes.device)

        num_denoising = copies * most
        label_queries = weight.new_zeros(len(targets), num_denoising, weight.shape[1])
        box_logits = boxes.new_zeros(len(targets), num_denoising, 4)
        label_queries[batch_index, slot] = label_embedding(noisy_labels)
        box_logits[batch_index, slot] = inverse_sigmoid(noisy_boxes)
        mask = denoising_attention_mask(num_groups, 2 * most, num_matching, boxes.device)
        return DenoisingQueries(label_queries, box_logits, mask, num_groups, 2 * most)

    def noised_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """(M,) labels -> a copy with each label replaced with probability ratio / 2."""
        if self.label_noise_ratio <= 0:
            return labels
        chance = self._rand(labels.shape, labels.device)
        replaced = chance < self.label_noise_ratio * 0.5
        new_labels = self._randint(self.num_classes, (int(replaced.sum()),), labels.device)
        labels = labels.clone()
        labels[replaced] = new_labels
        return labels

    def noised_boxes(self, boxes: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        """(M, 4) cxcywh boxes, (M,) bool negative -> noised cxcywh boxes inside [0, 1]."""
        if self.box_noise_scale <= 0:
            return boxes
        corners = box_cxcywh_to_xyxy(boxes)
        half_size = boxes[:, 2:].repeat(1, 2) / 2
        sign = self._randint(2, boxes.shape, boxes.device).to(boxes.dtype) * 2.0 - 1.0
        magnitude = self._rand(boxes.shape, boxes.device).to(boxes.dtype)
        magnitude[negative] += 1.0
        corners = corners + magnitude * sign * half_size * self.box_noise_scale
        return box_xyxy_to_cxcywh(corners.clamp(0.0, 1.0))

    def _rand(self, shape, device) -> torch.Tensor:
        """Uniform float32 draws in every run (DINO's random stream); a float64 run lifts them
        exactly."""
        if self.generator is None:
            return torch.rand(shape, device=device)
        return torch.rand(shape, generator=self.generator, device=self.generator.device).to(device)

    def _randint(self, high: int, shape, device) -> torch.Tensor:
        if self.generator is None:
            return torch.randint(high, shape, device=device)
        drawn = torch.randint(high, shape, generator=self.generator, device=self.generator.device)
        return drawn.to(device)
