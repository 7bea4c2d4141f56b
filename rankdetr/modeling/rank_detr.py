"""Rank-DETR on the H-DETR base: the meta-architecture.

This is the one module that knows detectron2's structures: it takes detectron2's batched inputs
(dicts with "image", "instances", "height", "width") and returns a dict of losses in training or
`[{"instances": Instances(pred_boxes, scores, pred_classes)}]` at inference. Everything it calls
is plain PyTorch.

Data flow: backbone -> neck (4 levels) -> + sine and level embeddings -> deformable encoder ->
two-stage proposals (top-k boxes, positional queries) + learned content queries -> rank decoder
(one-to-one and, in training, one-to-many queries) -> losses, or top-k detections.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from detectron2.structures import Boxes, ImageList, Instances
from torch import nn

from rankdetr.layers.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from rankdetr.layers.dtypes import lift_to_float32
from rankdetr.layers.position_encoding import PositionEmbeddingSine
from rankdetr.modeling.criterion import SetCriterion
from rankdetr.modeling.decoder import RankDecoder
from rankdetr.modeling.encoder import DeformableEncoder
from rankdetr.modeling.matcher import HungarianMatcher
from rankdetr.modeling.rank_options import RankOptions
from rankdetr.modeling.two_stage import TwoStageProposals

__all__ = ["RankDETR"]


class RankDETR(nn.Module):
    """Rank-DETR (H-DETR base, two-stage, box refinement, hybrid matching)."""

    def __init__(
        self,
        *,
        backbone: nn.Module,
        neck: nn.Module,
        num_classes: int,
        rank: RankOptions | dict | None = None,
        num_queries: int = 300,
        num_queries_one2many: int = 1500,
        one2many_repeats: int = 6,
        embed_dim: int = 256,
        num_heads: int = 8,
        num_points: int = 4,
        ffn_dim: int = 2048,
        dropout: float = 0.0,
        encoder_layers: int = 6,
        decoder_layers: int = 6,
        look_forward_twice: bool = True,
        activation_checkpointing: bool = False,
        loss_weights: dict | None = None,
        weight_one2many: float = 1.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        num_detections: int = 300,
        pixel_mean: tuple[float, float, float] = (123.675, 116.280, 103.530),
        pixel_std: tuple[float, float, float] = (58.395, 57.120, 57.375),
    ):
        """
        Args:
            backbone: returns a list of maps, finest first; has `out_channels`.
            neck: maps them to `num_levels` maps of `embed_dim` channels; has `num_levels`.
            num_classes: K.
            rank: the four rank components (:class:`RankOptions` or a dict of its fields);
                None means all on.
            num_queries: one-to-one queries (also at inference).
            num_queries_one2many: extra one-to-many queries in training (0: no hybrid matching).
            one2many_repeats: k, target repetitions for the one-to-many queries.
            embed_dim .. decoder_layers: transformer sizes.
            look_forward_twice: box losses also reach the previous layer's refinement.
            activation_checkpointing: encoder and decoder layers recompute their activations in
                backward instead of storing them (less memory; the same gradients).
            loss_weights: {"class", "bbox", "giou"} weights (2, 5, 2).
            weight_one2many: lambda of the one-to-many losses.
            focal_alpha, focal_gamma: of the focal / GIoU-aware losses and matching cost.
            num_detections: detections kept per image at inference (top over query x class).
            pixel_mean, pixel_std: RGB normalisation of the input images.
        """
        super().__init__()
        rank = _as_rank_options(rank)
        self.rank = rank
        self.backbone = backbone
        self.neck = neck
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.num_queries_one2many = num_queries_one2many
        self.one2many_repeats = one2many_repeats
        self.num_detections = num_detections
        num_levels = neck.num_levels
        total_queries = num_queries + num_queries_one2many

        self.position_embedding = PositionEmbeddingSine(num_pos_feats=embed_dim // 2)
        self.level_embeds = nn.Parameter(torch.empty(num_levels, embed_dim).normal_())
        sizes = {
            "embed_dim": embed_dim,
            "num_heads": num_heads,
            "num_levels": num_levels,
            "num_points": num_points,
            "ffn_dim": ffn_dim,
            "dropout": dropout,
        }
        self.encoder = DeformableEncoder(
            num_layers=encoder_layers, activation_checkpointing=activation_checkpointing, **sizes
        )
        self.proposals = TwoStageProposals(num_classes=num_classes, embed_dim=embed_dim)
        self.query_embedding = nn.Embedding(total_queries, embed_dim)
        self.decoder = RankDecoder(
            num_classes=num_classes,
            max_queries=total_queries,
            num_layers=decoder_layers,
            rank_adaptive_head=rank.rch,
            query_rank_layer=rank.qrl,
            look_forward_twice=look_forward_twice,
            activation_checkpointing=activation_checkpointing,
            **sizes,
        )
        weights = {"class": 2.0, "bbox": 5.0, "giou": 2.0, **(loss_weights or {})}
        matcher = HungarianMatcher(
            cost_class=weights["class"],
            cost_bbox=weights["bbox"],
            cost_giou=weights["giou"],
            focal_alpha=focal_alpha,
            focal_gamma=focal_gamma,
            high_order_start=rank.hmc_start if rank.hmc else None,
            high_order_power=rank.hmc_power,
            high_order_quality=rank.hmc_quality,
        )
        self.criterion = SetCriterion(
            num_classes=num_classes,
            matcher=matcher,
            weight_class=weights["class"],
            weight_bbox=weights["bbox"],
            weight_giou=weights["giou"],
            weight_one2many=weight_one2many,
            classification_loss=rank.classification_loss,
            quality_target=rank.gcl_target,
            quality_power=rank.gcl_power,
            focal_alpha=focal_alpha,
            focal_gamma=focal_gamma,
        )
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(3, 1, 1), False)

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

    def forward(self, batched_inputs: list[dict]):
        """detectron2 batched inputs -> dict of losses (training) or list of {"instances"}."""
        images, padding_mask = self.preprocess_images(batched_inputs)
        num_one2many = self.num_queries_one2many if self.training else 0
        outputs = self.predict(images.tensor, padding_mask, num_one2many)
        if self.training:
            targets = self.prepare_targets(batched_inputs, images)
            one2one, one2many = self.split_groups(_lift_to_float32(outputs))
            # Matching and losses in float32 even when the forward runs under autocast.
            with torch.autocast(self.device.type, enabled=False):
                return self.criterion(one2one, targets, one2many, self.one2many_repeats)
        return self.postprocess(_lift_to_float32(outputs), images.image_sizes, batched_inputs)

    def forward_layers(self, batched_inputs: list[dict]) -> dict:
        """Every decoder layer's raw outputs for the one-to-one queries (analysis, paper Fig. 3-5).

        Runs the network as inference does (no one-to-many queries) in the module's current mode:
        call `.eval()` first for inference behaviour, and wrap in `torch.no_grad()` when no
        gradient is needed.

        Returns:
            "logits": list over decoder layers of (N, Q, K) classification logits (float32, or
                float64 for a float64 model);
            "boxes": list over decoder layers of (N, Q, 4) boxes (cx, cy, w, h),
                normalised by the image sizes below;
            "image_sizes": N (h, w) of the model's input images (resized, before padding).
            Q = num_queries, in each layer's own query order (the decoder re-sorts them).
        """
        images, padding_mask = self.preprocess_images(batched_inputs)
        outputs = _lift_to_float32(self.predict(images.tensor, padding_mask, 0))
        one2one, _ = self.split_groups(outputs)
        return {
            "logits": one2one["logits"],
            "boxes": one2one["boxes"],
            "image_sizes": [tuple(size) for size in images.image_sizes],
        }

    def predict(self, images: torch.Tensor, padding_mask: torch.Tensor, num_one2many: int) -> dict:
        """
        Args:
            images: (N, 3, H, W) normalised, padded.
            padding_mask: (N, H, W) bool, True at padding.
            num_one2many: one-to-many queries to add after the one-to-one queries.

        Returns:
            The decoder's outputs (lists over layers of "logits" (N, Q, K), "boxes" (N, Q, 4),
            "order" (N, Q)) plus "enc_logits" (N, S, K) and "enc_boxes" (N, S, 4) of the encoder
            proposals; Q = num_queries + num_one2many, one-to-one queries first.
        """
        features = self.neck(self.backbone(images))
        src, pos, mask, spatial_shapes, level_start_index, valid_ratios = self.flatten_levels(
            features, padding_mask
        )
        memory = self.encoder(src, pos, spatial_shapes, level_start_index, valid_ratios, mask)
        total = self.num_queries + num_one2many
        proposals = self.proposals(memory, mask, spatial_shapes, total)
        content = self.query_embedding.weight[:total][None].expand(images.shape[0], -1, -1)
        group_sizes = [self.num_queries] + ([num_one2many] if num_one2many else [])
        outputs = self.decoder(
            content,
            proposals["query_pos"],
            proposals["reference_boxes"],
            memory,
            spatial_shapes,
            level_start_index,
            valid_ratios,
            mask,
            group_sizes,
        )
        outputs["enc_logits"] = proposals["enc_logits"]
        outputs["enc_boxes"] = proposals["enc_boxes"]
        return outputs

    def flatten_levels(self, features: list[torch.Tensor], padding_mask: torch.Tensor):
        """Levels (N, C, h_l, w_l) -> src (N, S, C), pos (N, S, C) with level embeddings,
        mask (N, S), spatial_shapes (L, 2), level_start_index (L,), valid_ratios (N, L, 2)."""
        srcs, poss, masks, shapes = [], [], [], []
        for level, feature in enumerate(features):
            mask = F.interpolate(padding_mask[None].float(), size=feature.shape[-2:])[0].bool()
            pos = self.position_embedding(mask).to(feature.dtype)
            srcs.append(feature.flatten(2).transpose(1, 2))
            poss.append(pos.flatten(2).transpose(1, 2) + self.level_embeds[level])
            masks.append(mask.flatten(1))
            shapes.append(feature.shape[-2:])
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=padding_mask.device)
        sizes = spatial_shapes.prod(1)
        level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
        valid_ratios = torch.stack([_valid_ratio(m.view(-1, *s)) for m, s in zip(masks, shapes)], 1)
        return (
            torch.cat(srcs, 1),
            torch.cat(poss, 1),
            torch.cat(masks, 1),
            spatial_shapes,
            level_start_index,
            valid_ratios,
        )

    def split_groups(self, outputs: dict) -> tuple[dict, dict | None]:
        """Outputs over all queries -> (one-to-one outputs with the encoder's, one-to-many)."""
        n = self.num_queries
        one2one = {
            "logits": [x[:, :n] for x in outputs["logits"]],
            "boxes": [x[:, :n] for x in outputs["boxes"]],
            "enc_logits": outputs["enc_logits"],
            "enc_boxes": outputs["enc_boxes"],
        }
        if outputs["logits"][0].shape[1] == n:
            return one2one, None
        one2many = {
            "logits": [x[:, n:] for x in outputs["logits"]],
            "boxes": [x[:, n:] for x in outputs["boxes"]],
        }
        return one2one, one2many

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


def _valid_ratio(mask: torch.Tensor) -> torch.Tensor:
    """(N, h, w) padding mask -> (N, 2) unpadded fraction (w, h)."""
    _, h, w = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).float() / h
    valid_w = (~mask[:, 0, :]).sum(1).float() / w
    return torch.stack([valid_w, valid_h], -1)


def _lift_to_float32(outputs: dict) -> dict:
    """Half-precision tensors (also inside lists) of an outputs dict lifted to float32; float32
    and float64 are kept (autocast's outputs are scored in float32, a float64 model in float64)."""

    def convert(x):
        if isinstance(x, list):
            return [convert(v) for v in x]
        return lift_to_float32(x)

    return {k: convert(v) for k, v in outputs.items()}


def _as_rank_options(rank) -> RankOptions:
    if rank is None:
        return RankOptions()
    if isinstance(rank, RankOptions):
        return rank
    return RankOptions(**dict(rank))
