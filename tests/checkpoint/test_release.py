"""The original release's R50 two-stage checkpoint layout loads strictly into our model."""

import re

import pytest
import torch

from rankdetr.checkpoint import convert_release_state_dict, describe_release_checkpoint
from rankdetr.modeling.backbone import ResNetBackbone
from rankdetr.modeling.neck import ChannelMapper
from rankdetr.modeling.rank_detr import RankDETR
from rankdetr.modeling.rank_options import RankOptions
from tests.reference_state_dict import reference_shapes


def r50_two_stage(rank=None) -> RankDETR:
    backbone = ResNetBackbone(depth=50)
    neck = ChannelMapper(in_channels=backbone.out_channels, out_channels=256, num_extra_levels=1)
    return RankDETR(backbone=backbone, neck=neck, num_classes=80, rank=rank)


@pytest.fixture(scope="module")
def model():
    return r50_two_stage()


def fake_release_state_dict():
    """Random tensors under every reference name; the shared heads are stored twice."""
    g = torch.Generator().manual_seed(0)
    state = {name: torch.randn(shape, generator=g) for name, shape in reference_shapes().items()}
    for name in list(state):
        if name.startswith(("class_embed.", "bbox_embed.")):
            state[name] = state[f"transformer.decoder.{name}"]
    return state


def test_release_layout_loads_strictly(model):
    release = fake_release_state_dict()
    converted = convert_release_state_dict(release)
    result = model.load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    ours = model.state_dict()
    pairs = [  # (release name, our name)
        ("transformer.decoder.class_embed.6.weight", "proposals.class_head.weight"),
        ("transformer.decoder.bbox_embed.2.layers.1.bias", "decoder.box_heads.2.layers.1.bias"),
        ("rank_adaptive_classhead_emb.5.weight", "decoder.rank_class_bias.5.weight"),
        ("transformer.decoder.post_racq_trans.4.weight", "decoder.rank_query_fuse.4.weight"),
        (
            "transformer.encoder.layers.3.ffns.0.layers.0.0.weight",
            "encoder.layers.3.ffn.linear1.weight",
        ),
        (
            "transformer.decoder.layers.1.attentions.0.attn.in_proj_weight",
            "decoder.layers.1.self_attn.attn.in_proj_weight",
        ),
        (
            "transformer.decoder.layers.1.attentions.1.sampling_offsets.bias",
            "decoder.layers.1.cross_attn.sampling_offsets.bias",
        ),
        ("transformer.decoder.layers.5.norms.2.weight", "decoder.layers.5.norm3.weight"),
        ("transformer.pos_trans_norm.bias", "proposals.pos_norm.bias"),
        ("transformer.level_embeds", "level_embeds"),
    ]
    for release_name, our_name in pairs:
        assert torch.equal(ours[our_name], release[release_name]), (release_name, our_name)


def inference_parameter_count(model: RankDETR) -> float:
    """Millions of parameters used at inference: rows of the per-query tables (content queries,
    RCH biases, QRL embeddings) beyond the one-to-one queries only serve the one-to-many branch."""
    total = 0
    for name, p in model.named_parameters():
        per_query = name.startswith(
            ("query_embedding", "decoder.rank_class_bias", "decoder.rank_content_query")
        )
        total += p[: model.num_queries].numel() if per_query else p.numel()
    return total / 1e6


@pytest.mark.parametrize(
    "rank,paper", [(None, 49.10), (RankOptions(rch=False, qrl=False, gcl=False, hmc=False), 47.56)]
)
def test_parameter_count_matches_the_paper(rank, paper):
    """Table 6: Rank-DETR R50 has 49.10 M parameters, H-DETR R50 47.56 M."""
    assert inference_parameter_count(r50_two_stage(rank)) == pytest.approx(paper, abs=0.05)


def test_diverging_duplicate_heads_and_unknown_names_are_refused():
    release = fake_release_state_dict()
    release["class_embed.0.weight"] = release["class_embed.0.weight"] + 1
    with pytest.raises(ValueError, match="should be one module"):
        convert_release_state_dict(release)
    release = fake_release_state_dict()
    release["transformer.mystery.weight"] = torch.zeros(1)
    release["extra.head.bias"] = torch.zeros(1)
    with pytest.raises(KeyError, match="'transformer.mystery.weight', 'extra.head.bias'"):
        convert_release_state_dict(release)
    with pytest.raises(ValueError, match="not a Rank-DETR release checkpoint"):
        convert_release_state_dict({"backbone.stem.conv1.weight": torch.zeros(1)})


def three_layer_release() -> dict:
    """The R50 release layout cut to 3 decoder layers: layers, QRL / RCH tables and heads 0..2
    kept, the proposals' head (index 6 in the 6-layer layout) renumbered to 3."""
    cut = {}
    for name, tensor in fake_release_state_dict().items():
        match = re.match(
            r"^(transformer\.decoder\.layers|transformer\.decoder\.(?:rank_aware_content_query"
            r"|pre_racq_trans|post_racq_trans)|rank_adaptive_classhead_emb"
            r"|(?:transformer\.decoder\.)?(?:class_embed|bbox_embed))\.(\d+)\.(.*)$",
            name,
        )
        if not match:
            cut[name] = tensor
            continue
        prefix, index, rest = match.group(1), int(match.group(2)), match.group(3)
        is_head = prefix.endswith(("class_embed", "bbox_embed"))
        if is_head and index == 6:
            index = 3
        elif index >= (3 if is_head or "layers" in prefix or "classhead" in prefix else 2):
            continue
        cut[f"{prefix}.{index}.{rest}"] = tensor
    return cut


def test_the_decoder_depth_is_read_from_the_checkpoint():
    release = three_layer_release()
    assert describe_release_checkpoint(release)["decoder_layers"] == 3
    converted = convert_release_state_dict(release)  # no depth given: read from the names
    backbone = ResNetBackbone(depth=50)
    neck = ChannelMapper(in_channels=backbone.out_channels, out_channels=256, num_extra_levels=1)
    model = RankDETR(backbone=backbone, neck=neck, num_classes=80, decoder_layers=3)
    model.load_state_dict(converted, strict=True)
    assert torch.equal(
        model.proposals.class_head.weight, release["transformer.decoder.class_embed.3.weight"]
    )
    assert torch.equal(
        model.decoder.class_heads[2].weight, release["transformer.decoder.class_embed.2.weight"]
    )
    with pytest.raises(ValueError, match="has 3 decoder layers .* num_decoder_layers=6"):
        convert_release_state_dict(release, num_decoder_layers=6)


def test_inconsistent_depths_are_named():
    release = three_layer_release()
    gap = {k: v for k, v in release.items() if not k.startswith("transformer.decoder.layers.1.")}
    with pytest.raises(ValueError, match=r"lacks decoder layers \[1\]"):
        convert_release_state_dict(gap)
    release["transformer.decoder.class_embed.5.weight"] = torch.zeros(80, 256)
    with pytest.raises(ValueError, match="head index 5 does not fit 3 decoder layers"):
        convert_release_state_dict(release)
