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
from torch import nn

from rankdetr.layers.position_encoding import PositionEmbeddingSine
from rankdetr.modeling.criterion import build_criterion
from rankdetr.modeling.decoder import RankDecoder
from rankdetr.modeling.detector_base import (
    DeformableDetector,
    as_rank_options,
    lift_outputs_to_float32,
)
from rankdetr.modeling.encoder import DeformableEncoder
from rankdetr.modeling.rank_options import RankOptions
from rankdetr.modeling.two_stage import TwoStageProposals

__all__ = ["RankDETR"]


class RankDETR(DeformableDetector):
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
        rank = as_rank_options(rank)
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
        # The matching cost uses the loss weights (Deformable DETR / H-DETR).
        self.criterion = build_criterion(
            num_classes=num_classes,
            rank=rank,
            loss_weights=weights,
            matching_costs=weights,
            focal_alpha=focal_alpha,
            focal_gamma=focal_gamma,
            weight_one2many=weight_one2many,
        )
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(3, 1, 1), False)

    def forward(self, batched_inputs: list[dict]):
        """detectron2 batched inputs -> dict of losses (training) or list of {"instances"}."""
        images, padding_mask = self.preprocess_images(batched_inputs)
        num_one2many = self.num_queries_one2many if self.training else 0
        outputs = self.predict(images.tensor, padding_mask, num_one2many)
        if self.training:
            targets = self.prepare_targets(batched_inputs, images)
            one2one, one2many = self.split_groups(lift_outputs_to_float32(outputs))
            # Matching and losses in float32 even when the forward runs under autocast.
            with torch.autocast(self.device.type, enabled=False):
                return self.criterion(one2one, targets, one2many, self.one2many_repeats)
        return self.postprocess(
            lift_outputs_to_float32(outputs), images.image_sizes, batched_inputs
        )

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
        outputs = lift_outputs_to_float32(self.predict(images.tensor, padding_mask, 0))
        one2one, _ = self.split_groups(outputs)
        return {
            "logits": one2one["logits"],
            "boxes": one2one["boxes"],
            "image_sizes": [tuple(size) for size in images.image_sizes],
        }

    def predict(
        self, images: torch.Tensor, padding_mask: torch.Tensor, num_one2many: int = 0
    ) -> dict:
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
        # Contiguous, not a stride-0 expansion: the first decoder layer then gets inputs laid out
        # as the later layers' are, so `train.compile` compiles the decoder layer once, not
        # twice (test_compile.py; ~11 of ~31 s of compiling the demo's layers).
        content = self.query_embedding.weight[:total][None].expand(images.shape[0], -1, -1)
        content = content.contiguous()
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
