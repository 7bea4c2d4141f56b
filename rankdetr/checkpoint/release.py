"""Converts the original Rank-DETR release's checkpoints (detrex layout) to rankdetr's names.

The release stores the per-layer class and box heads twice (as `class_embed.*` and
`transformer.decoder.class_embed.*`, one shared module); they are checked to be equal and kept
once. Its 7th head (index = number of decoder layers) belongs to the two-stage proposals.
"""

from __future__ import annotations

import re

import torch

__all__ = ["convert_release_state_dict"]

_ENC = r"^transformer\.encoder\.layers\.(\d+)\."
_DEC = r"^transformer\.decoder\.layers\.(\d+)\."
# (pattern, replacement) applied in order; the first match wins.
_RULES = [
    (r"^transformer\.level_embeds$", "level_embeds"),
    (_ENC + r"attentions\.0\.", r"encoder.layers.\1.self_attn."),
    (_ENC + r"ffns\.0\.layers\.0\.0\.", r"encoder.layers.\1.ffn.linear1."),
    (_ENC + r"ffns\.0\.layers\.1\.", r"encoder.layers.\1.ffn.linear2."),
    (_ENC + r"norms\.0\.", r"encoder.layers.\1.norm1."),
    (_ENC + r"norms\.1\.", r"encoder.layers.\1.norm2."),
    (_DEC + r"attentions\.0\.attn\.", r"decoder.layers.\1.self_attn.attn."),
    (_DEC + r"attentions\.1\.", r"decoder.layers.\1.cross_attn."),
    (_DEC + r"ffns\.0\.layers\.0\.0\.", r"decoder.layers.\1.ffn.linear1."),
    (_DEC + r"ffns\.0\.layers\.1\.", r"decoder.layers.\1.ffn.linear2."),
    (_DEC + r"norms\.0\.", r"decoder.layers.\1.norm1."),
    (_DEC + r"norms\.1\.", r"decoder.layers.\1.norm2."),
    (_DEC + r"norms\.2\.", r"decoder.layers.\1.norm3."),
    (r"^transformer\.decoder\.rank_aware_content_query\.", "decoder.rank_content_query."),
    (r"^transformer\.decoder\.pre_racq_trans\.", "decoder.rank_query_proj."),
    (r"^transformer\.decoder\.post_racq_trans\.", "decoder.rank_query_fuse."),
    (r"^rank_adaptive_classhead_emb\.", "decoder.rank_class_bias."),
    (r"^transformer\.enc_output\.", "proposals.memory_proj."),
    (r"^transformer\.enc_output_norm\.", "proposals.memory_norm."),
    (r"^transformer\.pos_trans\.", "proposals.pos_proj."),
    (r"^transformer\.pos_trans_norm\.", "proposals.pos_norm."),
    (r"^(backbone|neck|query_embedding)\.", r"\1."),
]

_HEAD = re.compile(r"^transformer\.decoder\.(class_embed|bbox_embed)\.(\d+)\.(.*)$")
_DUPLICATE_HEAD = re.compile(r"^(class_embed|bbox_embed)\.(\d+)\.(.*)$")


def convert_release_state_dict(state_dict: dict, num_decoder_layers: int = 6) -> dict:
    """Release names -> rankdetr names.

    Args:
        state_dict: the release checkpoint's "model" entry.
        num_decoder_layers: decoder layers; head index num_decoder_layers is the proposals' head.

    Returns:
        A new state dict for :class:`rankdetr.modeling.RankDETR`.

    Raises:
        KeyError: a tensor name this converter does not know (named in the message).
        ValueError: the duplicated heads differ.
    """
    converted = {}
    for name, tensor in state_dict.items():
        duplicate = _DUPLICATE_HEAD.match(name)
        if duplicate:
            original = f"transformer.decoder.{name}"
            if original in state_dict and not torch.equal(state_dict[original], tensor):
                raise ValueError(f"{name} differs from {original}: they should be one module")
            if original in state_dict:
                continue
            name = original
        converted[_rename(name, num_decoder_layers)] = tensor
    return converted


def _rename(name: str, num_decoder_layers: int) -> str:
    head = _HEAD.match(name)
    if head:
        kind, index, rest = head.group(1), int(head.group(2)), head.group(3)
        ours = {"class_embed": "class_head", "bbox_embed": "box_head"}[kind]
        if index == num_decoder_layers:
            return f"proposals.{ours}.{rest}"
        return f"decoder.{ours}s.{index}.{rest}"
    for pattern, replacement in _RULES:
        new, count = re.subn(pattern, replacement, name)
        if count:
            return new
    raise KeyError(f"unknown tensor in the release checkpoint: {name!r}")
