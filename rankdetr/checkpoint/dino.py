"""Converts detrex DINO checkpoints (`projects/dino`) to the names of our
:class:`rankdetr.modeling.dino.DINO`.

detrex stores the per-layer heads twice (`class_embed.<i>` and
`transformer.decoder.class_embed.<i>`, one shared module); they are checked to be equal and kept
once. Head `<depth>` scores the
two-stage proposals. Every tensor is mapped, or the error names those that are not.
"""

from __future__ import annotations

from rankdetr.checkpoint.release import _RULES as _TRANSFORMER_LAYER_RULES
from rankdetr.checkpoint.release import (
    _rename,
    describe_release_checkpoint,
    release_decoder_depth,
    rename_detrex_state_dict,
)

__all__ = ["convert_dino_state_dict", "describe_dino_checkpoint", "is_dino_checkpoint"]

_RULES = [
    (r"^transformer\.decoder\.ref_point_head\.", "decoder.ref_point_head."),
    (r"^transformer\.decoder\.norm\.", "decoder.norm."),
    (r"^transformer\.tgt_embed\.", "query_embedding."),
    (r"^label_enc\.", "label_embedding."),
    *_TRANSFORMER_LAYER_RULES,
]
_RELEASE_ONLY = ("transformer.pos_trans.", "query_embedding.", "rank_adaptive_classhead_emb.")


def is_dino_checkpoint(state_dict: dict) -> bool:
    """Whether a detrex-layout state dict is DINO's (it has the positional-query MLP and the
    denoising label embeddings) rather than the H-DETR-based Rank-DETR release's."""
    return "label_enc.weight" in state_dict and any(
        name.startswith("transformer.decoder.ref_point_head.") for name in state_dict
    )


def describe_dino_checkpoint(state_dict: dict) -> dict:
    """The sizes a matching DINO config needs, read from a detrex DINO checkpoint: backbone,
    encoder and decoder layers, classes and queries (`model.num_queries`)."""
    sizes = describe_release_checkpoint(state_dict)
    queries = state_dict.get("transformer.tgt_embed.weight")
    for release_only in ("total_queries", "rch", "qrl"):
        sizes.pop(release_only)
    sizes["num_queries"] = None if queries is None else int(queries.shape[0])
    return sizes


def convert_dino_state_dict(state_dict: dict, num_decoder_layers: int | None = None) -> dict:
    """detrex DINO names -> rankdetr names.

    Args:
        state_dict: a detrex DINO checkpoint's "model" entry (or a dict of its gradients).
        num_decoder_layers: None reads the decoder depth from the tensor names; a number is
            checked against it.

    Returns:
        A new state dict for :class:`rankdetr.modeling.dino.DINO`.

    Raises:
        KeyError: tensors that cannot be mapped (all named), e.g. a Rank-DETR release checkpoint
            given here.
        ValueError: the depth cannot be read or disagrees, or the duplicated heads differ.
    """
    depth = release_decoder_depth(state_dict)
    if num_decoder_layers is not None and num_decoder_layers != depth:
        raise ValueError(
            f"the checkpoint has {depth} decoder layers, but num_decoder_layers="
            f"{num_decoder_layers} was asked for"
        )
    return rename_detrex_state_dict(
        state_dict,
        lambda name: None if name.startswith(_RELEASE_ONLY) else _rename(name, depth, _RULES),
        "DINO",
        _release_hint,
    )


def _release_hint(unknown: list[str]) -> str:
    if any(name.startswith(_RELEASE_ONLY) for name in unknown):
        return " (this looks like a Rank-DETR release checkpoint: use convert_release_state_dict)"
    return ""
