"""SwinBackbone computes what the release's Swin (detectron2's SwinTransformer) computes, and the
weights users have load into it: detectron2 / release checkpoints, Microsoft's ImageNet files.
"""

import math
import re
from pathlib import Path

import pytest
import torch
from detectron2.config import LazyConfig, instantiate

from rankdetr.checkpoint import (
    convert_release_state_dict,
    convert_swin_state_dict,
    describe_release_checkpoint,
    swin_sizes,
)
from rankdetr.checkpoint.backbone_weights import CheckpointError, load_backbone_weights
from rankdetr.engine.checkpoint import SafeCheckpointer
from rankdetr.modeling.neck import ChannelMapper
from rankdetr.modeling.rank_detr import RankDETR
from rankdetr.modeling.swin import SwinBackbone, relative_position_index, shift_mask
from tests.reference_state_dict import reference_shapes
from tests.shared_reference import load_shared_reference

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY = {"embed_dim": 32, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 4, 8), "window_size": 7}


@pytest.fixture(scope="module")
def fixture():
    return load_shared_reference("swin-tiny/swin_tiny_fixture.pth")


def test_detectron2_swin_maps_are_reproduced_at_three_sizes(fixture):
    """The fixture is detectron2's SwinTransformer run in float64 at 224x224, 200x264 and 96x352
    (the last two pad to whole patches and windows); its weights go through our converter."""
    config = fixture["config"]
    sizes = swin_sizes(fixture["state_dict"])
    assert sizes == {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in TINY.items()}
    assert (config["embed_dim"], tuple(config["depths"])) == (32, (2, 2, 2, 2))
    backbone = SwinBackbone(**sizes, drop_path_rate=0.0, out_indices=tuple(config["out_indices"]))
    backbone.load_state_dict(convert_swin_state_dict(fixture["state_dict"]), strict=True)
    backbone = backbone.double().eval()
    assert len(fixture["inputs"]) == 3
    for image, expected in zip(fixture["inputs"], fixture["outputs"]):
        with torch.no_grad():
            maps = backbone(image)
        assert [f"p{i}" for i in config["out_indices"]] == list(expected)
        for ours, name in zip(maps, expected):
            theirs = expected[name]
            assert ours.shape == theirs.shape, (tuple(image.shape), name)
            scale = theirs.abs().max().item()
            torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10 * scale)


def test_relative_position_index_and_shift_mask_follow_their_definitions():
    """Index: tokens (y1, x1), (y2, x2) of a window use row (y1-y2+w-1)(2w-1) + (x1-x2+w-1).
    Mask: on an 8x8 map with window 4 and shift 2, after rolling by -2, two tokens of a window
    may attend to each other only if they came from the same region of the unrolled map."""
    window = 3
    index = relative_position_index(window)
    for i in range(window * window):
        for j in range(window * window):
            (y1, x1), (y2, x2) = divmod(i, window), divmod(j, window)
            assert index[i, j] == (y1 - y2 + window - 1) * (2 * window - 1) + (x1 - x2 + window - 1)
    mask = shift_mask(8, 8, 4, 2, "cpu", torch.float64)
    assert mask.shape == (4, 16, 16)

    def region(v):  # rows / columns [0, 4) -> 0, [4, 6) -> 1, [6, 8) -> 2
        return 0 if v < 4 else (1 if v < 6 else 2)

    for window_index in range(4):
        wy, wx = divmod(window_index, 2)
        for i in range(16):
            for j in range(16):
                ys = [(wy * 4 + t // 4) for t in (i, j)]
                xs = [(wx * 4 + t % 4) for t in (i, j)]
                same = region(ys[0]) == region(ys[1]) and region(xs[0]) == region(xs[1])
                assert mask[window_index, i, j].item() == (0.0 if same else -100.0)


def detectron2_layout(backbone: SwinBackbone, classifier: bool = False) -> dict:
    """The backbone's weights as detectron2's module stores them (with index buffers), or as
    Microsoft's ImageNet file does (also attn_mask buffers, a final norm and a 1000-way head,
    and no output norms)."""
    state = {k: v.clone() for k, v in backbone.state_dict().items()}
    for stage, layer in enumerate(backbone.layers):
        for block_index, block in enumerate(layer.blocks):
            prefix = f"layers.{stage}.blocks.{block_index}.attn."
            state[prefix + "relative_position_index"] = relative_position_index(block.window)
            if classifier and block.shift:
                state[f"layers.{stage}.blocks.{block_index}.attn_mask"] = torch.zeros(4, 49, 49)
    if classifier:
        state = {k: v for k, v in state.items() if not re.match(r"^norm\d+\.", k)}
        channels = backbone.layers[-1].blocks[0].norm1.normalized_shape[0]
        state["norm.weight"], state["norm.bias"] = torch.randn(channels), torch.randn(channels)
        state["head.weight"], state["head.bias"] = torch.randn(1000, channels), torch.randn(1000)
    return state


def random_swin(seed: int, **sizes) -> SwinBackbone:
    torch.manual_seed(seed)
    backbone = SwinBackbone(**{**TINY, **sizes}, drop_path_rate=0.0)
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return backbone


def test_microsoft_imagenet_file_loads_into_the_backbone(tmp_path):
    source = random_swin(1)
    path = tmp_path / "swin_tiny_patch4_window7_224.pth"
    torch.save({"model": detectron2_layout(source, classifier=True)}, path)
    target = random_swin(2)
    norms_before = {k: v.clone() for k, v in target.state_dict().items() if k.startswith("norm")}
    load_backbone_weights(target, path)
    for name, tensor in target.state_dict().items():
        if name.startswith("norm"):
            assert torch.equal(tensor, norms_before[name]), name  # output norms: not in the file
        else:
            assert torch.equal(tensor, source.state_dict()[name]), name


def swin_rank_detr(**swin) -> RankDETR:
    backbone = SwinBackbone(**{**TINY, **swin}, drop_path_rate=0.0)
    neck = ChannelMapper(in_channels=backbone.out_channels, out_channels=64, norm_groups=8)
    return RankDETR(backbone=backbone, neck=neck, num_classes=3, embed_dim=64, num_heads=4,
                    ffn_dim=64, encoder_layers=1, decoder_layers=2, num_queries=10,
                    num_queries_one2many=20, num_detections=10)  # fmt: skip


def test_microsoft_imagenet_file_as_init_checkpoint(tmp_path):
    """`train.init_checkpoint=swin_..._224.pth` (the release's configs): the checkpointer puts
    the ImageNet weights into the backbone and leaves everything else alone."""
    source = random_swin(3)
    path = tmp_path / "swin_tiny_patch4_window7_224.pth"
    torch.save({"model": detectron2_layout(source, classifier=True)}, path)
    model = swin_rank_detr()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    SafeCheckpointer(model).load(str(path))
    for name, tensor in model.state_dict().items():
        inner = name.removeprefix("backbone.")
        if name.startswith("backbone.") and not inner.startswith("norm"):
            assert torch.equal(tensor, source.state_dict()[inner]), name
        else:
            assert torch.equal(tensor, before[name]), name


def test_a_release_swin_checkpoint_converts_strictly_and_reports_its_sizes():
    """A checkpoint in the release's layout: its transformer names (the R50 reference listing)
    with a detectron2 Swin under `backbone.` (with its index buffers) and a matching neck."""
    g = torch.Generator().manual_seed(0)
    backbone = random_swin(4)
    release = {
        name: torch.randn(shape, generator=g)
        for name, shape in reference_shapes().items()
        if not name.startswith(("backbone.", "neck.convs.", "neck.extra_convs."))
    }
    release.update({f"backbone.{k}": v for k, v in detectron2_layout(backbone).items()})
    model = RankDETR(
        backbone=SwinBackbone(**TINY, drop_path_rate=0.0),
        neck=ChannelMapper(in_channels=[64, 128, 256], out_channels=256),
        num_classes=80,
    )
    for name, tensor in model.state_dict().items():
        if name.startswith("neck."):
            release[name] = torch.randn(tensor.shape, generator=g)
    for name in list(release):
        if name.startswith(("class_embed.", "bbox_embed.")):
            release[name] = release[f"transformer.decoder.{name}"]
    sizes = describe_release_checkpoint(release)
    assert sizes["backbone"] == "swin" and sizes["depths"] == (2, 2, 2, 2)
    assert (sizes["embed_dim"], sizes["num_heads"], sizes["window_size"]) == (32, (1, 2, 4, 8), 7)
    model.load_state_dict(convert_release_state_dict(release), strict=True)
    torch.testing.assert_close(
        model.backbone.layers[2].blocks[1].attn.relative_position_bias_table,
        release["backbone.layers.2.blocks.1.attn.relative_position_bias_table"],
    )


def test_bad_swin_weights_are_named(tmp_path):
    state = detectron2_layout(random_swin(5))
    state["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    with pytest.raises(ValueError, match="layers.0.blocks.0.attn.relative_position_index"):
        convert_swin_state_dict(state)
    state = detectron2_layout(random_swin(5))
    state["layers.0.blocks.0.attn.extra"] = torch.zeros(1)
    with pytest.raises(KeyError, match="layers.0.blocks.0.attn.extra"):
        convert_swin_state_dict(state)
    # An ImageNet file of another size: the backbone names what does not fit.
    path = tmp_path / "swin_small.pth"
    torch.save({"model": detectron2_layout(random_swin(6, depths=(2, 2, 4, 2)), True)}, path)
    with pytest.raises(CheckpointError, match="swin_small.pth"):
        load_backbone_weights(random_swin(7), path)


@pytest.mark.parametrize(
    "name,embed,depths,heads",
    [("swin_t", 96, (2, 2, 6, 2), (3, 6, 12, 24)), ("swin_l", 192, (2, 2, 18, 2), (6, 12, 24, 48))],
)
def test_swin_configs_follow_the_release(name, embed, depths, heads):
    cfg = LazyConfig.load(str(CONFIGS / "rank_detr" / f"rank_detr_{name}_12ep.py"))
    backbone = cfg.model.backbone
    assert (backbone.embed_dim, tuple(backbone.depths), tuple(backbone.num_heads)) == (
        embed,
        depths,
        heads,
    )
    assert (backbone.window_size, backbone.drop_path_rate) == (7, 0.2)
    assert tuple(backbone.out_indices) == (1, 2, 3)
    assert list(cfg.model.neck.in_channels) == [embed * 2, embed * 4, embed * 8]
    built = instantiate(backbone)
    assert built.out_channels == [embed * 2, embed * 4, embed * 8] and built.strides == [8, 16, 32]
    stage_rates = [block.drop_path for layer in built.layers for block in layer.blocks]
    assert stage_rates[0] == 0 and math.isclose(stage_rates[-1], 0.2, rel_tol=1e-6)  # float32
