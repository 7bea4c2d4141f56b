"""Converts the original Rank-DETR release's checkpoints (detrex layout) to rankdetr's names.

The release stores the per-layer class and box heads twice (as `class_embed.*` and
`transformer.decoder.class_embed.*`, one shared module); they are checked to be equal and kept
once. Its last head (index = number of decoder layers) belongs to the two-stage proposals. The
decoder depth is read from the checkpoint's own tensor names.
"""

from __future__ import annotations

import re

import torch

from rankdetr.checkpoint.swin import convert_swin_state_dict, swin_sizes

__all__ = [
    "convert_release_state_dict",
    "describe_release_checkpoint",
    "release_decoder_depth",
]

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
_DECODER_LAYER = re.compile(r"^transformer\.decoder\.layers\.(\d+)\.")
_ENCODER_LAYER = re.compile(r"^transformer\.encoder\.layers\.(\d+)\.")


def convert_release_state_dict(state_dict: dict, num_decoder_layers: int | None = None) -> dict:
    """Release names -> rankdetr names.

    Args:
        state_dict: the release checkpoint's "model" entry (or any part of it that holds its
            decoder layers, e.g. a dict of gradients).
        num_decoder_layers: None reads the decoder depth from the checkpoint (the number of
            `transformer.decoder.layers.<i>` blocks); a number is checked against it. The
            per-layer heads 0..depth-1 go to the decoder, head `depth` to the two-stage proposals.

    Returns:
        A new state dict for :class:`rankdetr.modeling.RankDETR`.

    Raises:
        KeyError: tensors this converter cannot map (all of them named in the message).
        ValueError: the depth cannot be read or disagrees with `num_decoder_layers`, a head index
            does not fit the depth, or the duplicated heads differ.
    """
    depth = release_decoder_depth(state_dict)
    if num_decoder_layers is not None and num_decoder_layers != depth:
        raise ValueError(
            f"the checkpoint has {depth} decoder layers (transformer.decoder.layers.0..{depth - 1})"
            f", but num_decoder_layers={num_decoder_layers} was asked for"
        )
    return rename_detrex_state_dict(state_dict, lambda name: _rename(name, depth), "release")


def rename_detrex_state_dict(state_dict: dict, rename, kind: str, hint=None) -> dict:
    """A detrex-layout state dict in rankdetr's names (shared by the release and DINO converters).

    Swin `backbone.*` tensors are converted as a whole; a head stored twice (`class_embed.<i>`
    beside `transformer.decoder.class_embed.<i>`) must be equal and is kept once; every other
    tensor goes through `rename` (name -> our name, or None when it cannot be mapped).

    Raises:
        KeyError naming every tensor that cannot be mapped (`hint(unknown_names)` may add a
        sentence); ValueError when duplicated heads differ.
    """
    converted, unknown = _convert_swin_backbone(state_dict), []
    swin = bool(converted)
    for name, tensor in state_dict.items():
        if swin and name.startswith("backbone."):
            continue  # converted above
        if _DUPLICATE_HEAD.match(name):
            original = f"transformer.decoder.{name}"
            if original in state_dict:
                if not torch.equal(state_dict[original], tensor):
                    raise ValueError(f"{name} differs from {original}: they should be one module")
                continue
            name = original
        new_name = rename(name)
        if new_name is None:
            unknown.append(name)
        else:
            converted[new_name] = tensor
    if unknown:
        shown = ", ".join(repr(n) for n in unknown[:10])
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        extra = hint(unknown) if hint else ""
        raise KeyError(f"unknown tensors in the {kind} checkpoint: {shown}{more}{extra}")
    return converted


def _backbone_part(state_dict: dict) -> dict:
    return {k[len("backbone.") :]: v for k, v in state_dict.items() if k.startswith("backbone.")}


def _convert_swin_backbone(state_dict: dict) -> dict:
    """The release's Swin `backbone.*` tensors in our names ({} for a ResNet backbone)."""
    backbone = _backbone_part(state_dict)
    if "patch_embed.proj.weight" not in backbone:
        return {}
    return {f"backbone.{k}": v for k, v in convert_swin_state_dict(backbone).items()}


def release_decoder_depth(state_dict: dict) -> int:
    """Decoder layers of a release checkpoint, read from its tensor names; the per-layer heads
    (`class_embed.<i>`, `bbox_embed.<i>`) must fit it (indices 0..depth, the last one being the
    two-stage proposals' head)."""
    layers = {int(m.group(1)) for m in map(_DECODER_LAYER.match, state_dict) if m}
    if not layers:
        raise ValueError(
            "no transformer.decoder.layers.<i> tensors: this is not a Rank-DETR release checkpoint"
        )
    depth = max(layers) + 1
    if layers != set(range(depth)):
        missing = sorted(set(range(depth)) - layers)
        raise ValueError(f"the checkpoint lacks decoder layers {missing} of 0..{depth - 1}")
    heads = {
        int(m.group(2))
        for name in state_dict
        for m in [_HEAD.match(name) or _DUPLICATE_HEAD.match(name)]
        if m
    }
    if heads and max(heads) > depth:
        raise ValueError(
            f"head index {max(heads)} does not fit {depth} decoder layers (expected 0..{depth}, "
            "the last for the two-stage proposals)"
        )
    return depth


def describe_release_checkpoint(state_dict: dict) -> dict:
    """The sizes a matching rankdetr config needs, read from a release checkpoint: the backbone
    ("resnet", or "swin" with its embed_dim, depths, num_heads and window_size), encoder and
    decoder layers, classes, queries (all groups), and whether RCH and QRL are present."""
    depth = release_decoder_depth(state_dict)
    encoder = {int(m.group(1)) for m in map(_ENCODER_LAYER.match, state_dict) if m}
    head = state_dict.get("transformer.decoder.class_embed.0.weight")
    if head is None:
        head = state_dict.get("class_embed.0.weight")
    queries = state_dict.get("query_embedding.weight")
    backbone = _backbone_part(state_dict)
    if "patch_embed.proj.weight" in backbone:
        backbone_sizes = {"backbone": "swin", **swin_sizes(backbone)}
    else:
        stages = {m.group(1) for m in (re.match(r"^res(\d)\.(\d+)\.", k) for k in backbone) if m}
        backbone_sizes = {"backbone": "resnet" if stages else None}
    return {
        **backbone_sizes,
        "encoder_layers": max(encoder) + 1 if encoder else 0,
        "decoder_layers": depth,
        "num_classes": None if head is None else int(head.shape[0]),
        "total_queries": None if queries is None else int(queries.shape[0]),
        "rch": any(n.startswith("rank_adaptive_classhead_emb.") for n in state_dict),
        "qrl": any(".rank_aware_content_query." in n for n in state_dict),
    }


def _rename(name: str, num_decoder_layers: int, rules=_RULES) -> str | None:
    """Our name for a detrex-layout tensor (the release's `rules`, or a converter's own), or
    None when no rule maps it. Head `num_decoder_layers` belongs to the two-stage proposals."""
    head = _HEAD.match(name)
    if head:
        kind, index, rest = head.group(1), int(head.group(2)), head.group(3)
        ours = {"class_embed": "class_head", "bbox_embed": "box_head"}[kind]
        if index == num_decoder_layers:
            return f"proposals.{ours}.{rest}"
        return f"decoder.{ours}s.{index}.{rest}"
    for pattern, replacement in rules:
        new, count = re.subn(pattern, replacement, name)
        if count:
            return new
    return None
