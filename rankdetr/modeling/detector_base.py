"""What the deformable-DETR meta-architectures (H-DETR-based :class:`RankDETR`, :class:`DINO`)
share: detectron2 inputs to normalised padded images and targets, the flattening of the feature
levels for the encoder, the top-k post-processing back to detectron2's `Instances`, and the
training-progress and compile hooks the trainer calls.

A subclass defines `position_embedding`, `level_embeds`, `encoder`, `decoder` (with `layers`),
`criterion`, `num_queries`, `num_classes`, `num_detections` and the `pixel_mean` / `pixel_std`
buffers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from detectron2.structures import Boxes, ImageList, Instances
from torch import nn

from rankdetr.layers.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from rankdetr.layers.dtypes import at_least_float32, lift_to_float32
from rankdetr.modeling.rank_options import RankOptions

__all__ = ["DeformableDetector", "as_rank_options", "lift_outputs_to_float32"]


class DeformableDetector(nn.Module):
    """Base of the meta-architectures; see the module docstring."""

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def compile_layers(self, **compile_kwargs) -> None:
        """torch.compile every encoder and decoder layer in place (`nn.Module.compile`, so
        parameter names and checkpoints are unchanged). The layers compile with
        `fullgraph=True` (no graph breaks: tests/modeling/test_compile.py); the rest of the
        model (backbone, matching, losses) stays eager. `compile_kwargs` go to torch.compile
        (default: dynamic shapes, as image sizes vary)."""
        options = {"fullgraph": True, "dynamic": True, **compile_kwargs}
        for layer in [*self.encoder.layers, *self.decoder.layers]:
            layer.compile(**options)

    def set_training_progress(self, progress: float) -> None:
        """Called by the trainer with iteration / max_iter: drives the HMC switch."""
        self.criterion.set_training_progress(progress)

    def flatten_levels(self, features: list[torch.Tensor], padding_mask: torch.Tensor):
        """Levels (N, C, h_l, w_l) -> src (N, S, C), pos (N, S, C) with level embeddings,
        mask (N, S), spatial_shapes (L, 2), level_start_index (L,), valid_ratios (N, L, 2).

        The position embeddings and valid ratios are computed in the features' dtype lifted to
        at least float32: float32 for float32, bf16 and fp16 runs (the release's numerics),
        float64 for float64 runs, so that those agree to float64 rounding on every CPU."""
        table_dtype = at_least_float32(features[0].dtype)
        # Nearest resizing of a 0/1 mask is exact in any dtype; the table's avoids a float32
        # copy in float64 runs.
        masks = [
            F.interpolate(padding_mask[None].to(table_dtype), size=f.shape[-2:])[0].bool()
            for f in features
        ]
        src, pos, mask = self.embed_levels(features, masks, table_dtype)
        shapes = [feature.shape[-2:] for feature in features]
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=padding_mask.device)
        valid_ratios = torch.stack([_valid_ratio(m, table_dtype) for m in masks], 1)
        return src, pos, mask, spatial_shapes, level_start_index(spatial_shapes), valid_ratios

    def embed_levels(
        self, features: list[torch.Tensor], masks: list[torch.Tensor], table_dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Levels (N, C, h_l, w_l) and their (N, h_l, w_l) padding masks -> src (N, S, C),
        pos (N, S, C) (sine table in `table_dtype`, plus the level embeddings), mask (N, S)."""
        srcs, poss = [], []
        for level, (feature, mask) in enumerate(zip(features, masks)):
            pos = self.position_embedding(mask, table_dtype).to(feature.dtype)
            srcs.append(feature.flatten(2).transpose(1, 2))
            poss.append(pos.flatten(2).transpose(1, 2) + self.level_embeds[level])
        return torch.cat(srcs, 1), torch.cat(poss, 1), torch.cat([m.flatten(1) for m in masks], 1)

    def preprocess_images(self, batched_inputs: list[dict]) -> tuple[ImageList, torch.Tensor]:
        """Normalise and pad the images; (N, H, W) mask, True on padding."""
        dtype = self.pixel_mean.dtype  # float32, or float64 for a model made .double()
        images = [(x["image"].to(self.device, dtype) - self.pixel_mean) / self.pixel_std
                  for x in batched_inputs]  # fmt: skip
        images = ImageList.from_tensors(images)
        n, _, h, w = images.tensor.shape
        padding_mask = torch.ones(n, h, w, dtype=torch.bool, device=self.device)
        for i, (image_h, image_w) in enumerate(images.image_sizes):
            padding_mask[i, :image_h, :image_w] = False
        return images, padding_mask

    def prepare_targets(self, batched_inputs: list[dict], images: ImageList) -> list[dict]:
        """Instances (absolute xyxy) -> {"labels", "boxes"} with boxes normalised cxcywh."""
        targets = []
        for x, (h, w) in zip(batched_inputs, images.image_sizes):
            instances = x["instances"].to(self.device)
            scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=self.device)
            boxes = box_xyxy_to_cxcywh(instances.gt_boxes.tensor / scale)
            targets.append({"labels": instances.gt_classes, "boxes": boxes})
        return targets

    def postprocess(self, outputs: dict, image_sizes, batched_inputs: list[dict]) -> list[dict]:
        """Top detections over (query, class) of the last layer, in the original image size."""
        logits = outputs["logits"][-1][:, : self.num_queries]
        boxes = outputs["boxes"][-1][:, : self.num_queries]
        results = []
        for image_logits, image_boxes, (h, w), x in zip(logits, boxes, image_sizes, batched_inputs):
            scores, index = (
                image_logits.sigmoid()
                .flatten()
                .topk(min(self.num_detections, image_logits.numel()))
            )
            query, label = index // self.num_classes, index % self.num_classes
            xyxy = box_cxcywh_to_xyxy(image_boxes[query])
            out_h, out_w = x.get("height", h), x.get("width", w)
            xyxy = xyxy * torch.tensor([out_w, out_h, out_w, out_h], device=xyxy.device)
            instances = Instances((out_h, out_w))
            instances.pred_boxes = Boxes(xyxy)
            instances.pred_boxes.clip((out_h, out_w))
            instances.scores = scores
            instances.pred_classes = label
            results.append({"instances": instances})
        return results


def level_start_index(spatial_shapes: torch.Tensor) -> torch.Tensor:
    """(L, 2) level sizes (h, w) -> (L,) where each level starts in the flattened keys."""
    sizes = spatial_shapes.prod(1)
    return torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])


def _valid_ratio(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, h, w) padding mask -> (N, 2) unpadded fraction (w, h) in `dtype`: float32 as in the
    release, float64 in float64 runs (the encoder's reference points and the decoders' valid
    ratios follow this dtype)."""
    _, h, w = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).to(dtype) / h
    valid_w = (~mask[:, 0, :]).sum(1).to(dtype) / w
    return torch.stack([valid_w, valid_h], -1)


def lift_outputs_to_float32(outputs: dict) -> dict:
    """Half-precision tensors (also inside lists) of an outputs dict lifted to float32; float32
    and float64 are kept (autocast's outputs are scored in float32, a float64 model in float64);
    entries that are not tensors (counts) are kept."""

    def convert(x):
        if isinstance(x, list):
            return [convert(v) for v in x]
        return lift_to_float32(x) if isinstance(x, torch.Tensor) else x

    return {k: convert(v) for k, v in outputs.items()}


def as_rank_options(rank) -> RankOptions:
    """None (all on), a :class:`RankOptions` or a dict of its fields -> RankOptions."""
    if rank is None:
        return RankOptions()
    if isinstance(rank, RankOptions):
        return rank
    return RankOptions(**dict(rank))
