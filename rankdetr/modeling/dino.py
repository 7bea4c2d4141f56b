"""DINO (Zhang et al., ICLR 2023), and Rank-DETR on it (the paper's Table 3): the meta-architecture.

Data flow: backbone -> neck (4 levels) -> + sine and level embeddings -> deformable encoder ->
two-stage proposals scored per class, the top Q become the reference boxes (mixed query
selection: the content queries are learned) -> in training, contrastive denoising queries go
before them -> DINO's decoder (positional queries re-made from the boxes in every layer, with
the rank components of `model.rank`) -> losses (matching queries, denoising queries, encoder
proposals) or the top-k detections.

It shares the encoder, the deformable attention, the heads, the matcher and the criterion with
:class:`~rankdetr.modeling.rank_detr.RankDETR`; the DINO-specific parts are
:mod:`~rankdetr.modeling.denoising` and :mod:`~rankdetr.modeling.dino_decoder`.

Differences from detrex's DINO, on purpose (both also hold for our H-DETR model): at inference
the padding mask is used (detrex ignores it, so padded images score differently from unpadded
ones), and proposals on padding or outside (0.01, 0.99) cannot be selected (detrex can select
them, with infinite boxes).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rankdetr.layers.mlp import MLP
from rankdetr.layers.position_encoding import PositionEmbeddingSine
from rankdetr.modeling.criterion import build_criterion
from rankdetr.modeling.denoising import ContrastiveDenoising, DenoisingQueries
from rankdetr.modeling.detector_base import (
    DeformableDetector,
    as_rank_options,
    lift_outputs_to_float32,
)
from rankdetr.modeling.dino_decoder import DINODecoder
from rankdetr.modeling.encoder import DeformableEncoder
from rankdetr.modeling.init import init_like_release_transformer
from rankdetr.modeling.rank_options import RankOptions
from rankdetr.modeling.two_stage import grid_proposals, top_proposal_indices

__all__ = ["DINO", "DINOProposals", "DINO_BASE"]

# DINO itself: none of the four rank components.
DINO_BASE = RankOptions(rch=False, qrl=False, gcl=False, hmc=False)


class DINOProposals(nn.Module):
    """DINO's two-stage query selection: every encoder position proposes a box (as in
    :func:`~rankdetr.modeling.two_stage.grid_proposals`), a class head scores it per class and a
    box head refines it; the Q proposals with the best class score are kept."""

    def __init__(self, *, num_classes: int, embed_dim: int = 256):
        super().__init__()
        self.memory_proj = nn.Linear(embed_dim, embed_dim)
        self.memory_norm = nn.LayerNorm(embed_dim)
        self.class_head = nn.Linear(embed_dim, num_classes)
        self.box_head = MLP(embed_dim, embed_dim, 4, 3)

    def forward(
        self,
        memory: torch.Tensor,
        padding_mask: torch.Tensor,
        spatial_shapes: torch.Tensor,
        num_queries: int,
    ) -> dict[str, torch.Tensor]:
        """
        Args:
            memory: (N, S, C) encoder output.
            padding_mask: (N, S) bool, True at padding.
            spatial_shapes: (L, 2) int64.
            num_queries: Q, proposals to keep.

        Returns:
            "enc_logits" (N, Q, K) and "enc_boxes" (N, Q, 4) normalised cxcywh of the kept
            proposals (for the encoder loss), and "reference_boxes" (N, Q, 4), the same boxes
            detached (the decoder's initial boxes), best proposal first.
        """
        proposals, valid = grid_proposals(padding_mask, spatial_shapes, dtype=memory.dtype)
        features = self.memory_norm(self.memory_proj(memory.masked_fill(~valid[..., None], 0.0)))
        logits = self.class_head(features)
        box_logits = self.box_head(features) + proposals
        scores = logits.detach().amax(-1).masked_fill(~valid, float("-inf"))
        index = top_proposal_indices(scores, num_queries)[..., None]
        top_logits = logits.gather(1, index.expand(-1, -1, logits.shape[-1]))
        top_boxes = box_logits.gather(1, index.expand(-1, -1, 4)).sigmoid()
        return {
            "enc_logits": top_logits,
            "enc_boxes": top_boxes,
            "reference_boxes": top_boxes.detach(),
        }


class DINO(DeformableDetector):
    """DINO with contrastive denoising, two-stage mixed query selection and look-forward-twice;
    `rank` switches Rank-DETR's four components on it."""

    def __init__(
        self,
        *,
        backbone: nn.Module,
        neck: nn.Module,
        num_classes: int,
        rank: RankOptions | dict | None = None,
        num_queries: int = 900,
        embed_dim: int = 256,
        num_heads: int = 8,
        num_points: int = 4,
        ffn_dim: int = 2048,
        dropout: float = 0.0,
        encoder_layers: int = 6,
        decoder_layers: int = 6,
        look_forward_twice: bool = True,
        activation_checkpointing: bool = False,
        dn_number: int = 100,
        label_noise_ratio: float = 0.5,
        box_noise_scale: float = 1.0,
        loss_weights: dict | None = None,
        matching_costs: dict | None = None,
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
                None is DINO itself (all off).
            num_queries: Q matching queries (and proposals kept), 900.
            embed_dim .. decoder_layers: transformer sizes.
            look_forward_twice: box losses also reach the previous layer's refinement.
            activation_checkpointing: encoder and decoder layers recompute their activations in
                backward.
            dn_number, label_noise_ratio, box_noise_scale: contrastive denoising
                (:class:`ContrastiveDenoising`); dn_number 0 turns it off.
            loss_weights: {"class", "bbox", "giou"}, DINO's (1, 5, 2); the same for the
                denoising terms, every decoder layer and the encoder proposals.
            matching_costs: {"class", "bbox", "giou"} of the Hungarian cost, DINO's (2, 5, 2).
            focal_alpha, focal_gamma: of the focal / GIoU-aware losses and the matching cost.
            num_detections: detections kept per image at inference (top over query x class).
            pixel_mean, pixel_std: RGB normalisation of the input images.
        """
        super().__init__()
        rank = DINO_BASE if rank is None else as_rank_options(rank)
        self.rank = rank
        self.backbone = backbone
        self.neck = neck
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.num_detections = num_detections
        num_levels = neck.num_levels
        self.position_embedding = PositionEmbeddingSine(num_pos_feats=embed_dim // 2)
        self.level_embeds = nn.Parameter(torch.empty(num_levels, embed_dim))
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
        self.proposals = DINOProposals(num_classes=num_classes, embed_dim=embed_dim)
        self.query_embedding = nn.Embedding(num_queries, embed_dim)
        self.decoder = DINODecoder(
            num_classes=num_classes,
            num_queries=num_queries,
            num_layers=decoder_layers,
            rank_adaptive_head=rank.rch,
            query_rank_layer=rank.qrl,
            look_forward_twice=look_forward_twice,
            activation_checkpointing=activation_checkpointing,
            **sizes,
        )
        self.label_embedding = nn.Embedding(num_classes, embed_dim)
        self.denoising = ContrastiveDenoising(
            num_classes=num_classes,
            dn_number=dn_number,
            label_noise_ratio=label_noise_ratio,
            box_noise_scale=box_noise_scale,
        )
        self.criterion = build_criterion(
            num_classes=num_classes,
            rank=rank,
            loss_weights={"class": 1.0, "bbox": 5.0, "giou": 2.0, **(loss_weights or {})},
            matching_costs={"class": 2.0, "bbox": 5.0, "giou": 2.0, **(matching_costs or {})},
            focal_alpha=focal_alpha,
            focal_gamma=focal_gamma,
            encoder_class_agnostic=False,
        )
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(3, 1, 1), False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DINO's initialisation: xavier on the matrices of its transformer (here the proposal
        projection and the learned content queries; the encoder and decoder do their own),
        normal level embeddings; one class head (PyTorch's default, bias at the focal-loss prior)
        and one box head (last layer zero) copied to every layer and the proposals; normal label
        embeddings (nn.Embedding's default)."""
        init_like_release_transformer(self.proposals.memory_proj, self.query_embedding)
        nn.init.normal_(self.level_embeds)
        class_heads = [*self.decoder.class_heads, self.proposals.class_head]
        box_heads = [*self.decoder.box_heads, self.proposals.box_head]
        nn.init.constant_(class_heads[0].bias, -math.log((1 - 0.01) / 0.01))
        nn.init.zeros_(box_heads[0].layers[-1].weight)
        nn.init.zeros_(box_heads[0].layers[-1].bias)
        for head in class_heads[1:]:
            head.load_state_dict(class_heads[0].state_dict())
        for head in box_heads[1:]:
            head.load_state_dict(box_heads[0].state_dict())

    def forward(self, batched_inputs: list[dict]):
        """detectron2 batched inputs -> dict of losses (training) or list of {"instances"}."""
        images, padding_mask = self.preprocess_images(batched_inputs)
        if not self.training:
            outputs = lift_outputs_to_float32(self.predict(images.tensor, padding_mask))
            return self.postprocess(outputs, images.image_sizes, batched_inputs)
        targets = self.prepare_targets(batched_inputs, images)
        denoising = self.denoising(targets, self.label_embedding, self.num_queries)
        outputs = lift_outputs_to_float32(self.predict(images.tensor, padding_mask, denoising))
        if denoising is None:
            # DDP (find_unused_parameters=False) needs a gradient for every parameter in every
            # step; without denoising queries the label embeddings get an exact zero.
            outputs["logits"][0] = outputs["logits"][0] + 0.0 * self.label_embedding.weight[0, 0]
        matching, denoised = self.split_denoising(outputs)
        # Matching and losses in float32 even when the forward runs under autocast.
        with torch.autocast(self.device.type, enabled=False):
            losses = self.criterion(matching, targets)
            losses.update(
                self.criterion.denoising_losses(
                    denoised,
                    targets,
                    denoising.matches(targets) if denoising else [],
                    denoising.num_groups if denoising else 0,
                    len(self.decoder.layers),
                )
            )
        return losses

    def forward_layers(self, batched_inputs: list[dict]) -> dict:
        """Every decoder layer's raw outputs for the matching queries, as inference runs them
        (no denoising queries) in the module's current mode; see
        :meth:`RankDETR.forward_layers <rankdetr.modeling.rank_detr.RankDETR.forward_layers>`."""
        images, padding_mask = self.preprocess_images(batched_inputs)
        outputs = lift_outputs_to_float32(self.predict(images.tensor, padding_mask))
        return {
            "logits": outputs["logits"],
            "boxes": outputs["boxes"],
            "image_sizes": [tuple(size) for size in images.image_sizes],
        }

    def predict(
        self,
        images: torch.Tensor,
        padding_mask: torch.Tensor,
        denoising: DenoisingQueries | None = None,
    ) -> dict:
        """
        Args:
            images: (N, 3, H, W) normalised, padded.
            padding_mask: (N, H, W) bool, True at padding.
            denoising: denoising queries to put before the matching queries, or None.

        Returns:
            The decoder's outputs (lists over layers of "logits" (N, P + Q, K), "boxes"
            (N, P + Q, 4), "order" (N, Q)), "enc_logits" (N, Q, K) and "enc_boxes" (N, Q, 4)
            of the kept proposals, and "num_denoising" P.
        """
        features = self.neck(self.backbone(images))
        src, pos, mask, spatial_shapes, level_start_index, valid_ratios = self.flatten_levels(
            features, padding_mask
        )
        memory = self.encoder(src, pos, spatial_shapes, level_start_index, valid_ratios, mask)
        proposals = self.proposals(memory, mask, spatial_shapes, self.num_queries)
        # a contiguous copy, as in RankDETR.predict: one compiled decoder layer for all layers
        content = self.query_embedding.weight[None].expand(images.shape[0], -1, -1).contiguous()
        boxes = proposals["reference_boxes"]
        num_denoising, attn_mask = 0, None
        if denoising is not None:
            content = torch.cat([denoising.label_queries.to(content.dtype), content], dim=1)
            noised_boxes = denoising.box_logits.sigmoid().to(boxes.dtype)
            boxes = torch.cat([noised_boxes, boxes], dim=1)
            num_denoising, attn_mask = denoising.num_queries, denoising.attn_mask
        outputs = self.decoder(
            content,
            boxes,
            memory,
            spatial_shapes,
            level_start_index,
            valid_ratios,
            mask,
            num_denoising,
            attn_mask,
        )
        outputs["enc_logits"] = proposals["enc_logits"]
        outputs["enc_boxes"] = proposals["enc_boxes"]
        outputs["num_denoising"] = num_denoising
        return outputs

    @staticmethod
    def split_denoising(outputs: dict) -> tuple[dict, dict | None]:
        """Outputs over all queries -> (matching outputs with the encoder's, denoising outputs
        or None)."""
        p = outputs["num_denoising"]
        matching = {
            "logits": [x[:, p:] for x in outputs["logits"]],
            "boxes": [x[:, p:] for x in outputs["boxes"]],
            "enc_logits": outputs["enc_logits"],
            "enc_boxes": outputs["enc_boxes"],
        }
        if p == 0:
            return matching, None
        denoised = {
            "logits": [x[:, :p] for x in outputs["logits"]],
            "boxes": [x[:, :p] for x in outputs["boxes"]],
        }
        return matching, denoised
