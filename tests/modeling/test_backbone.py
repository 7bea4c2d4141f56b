"""Backbone adapters: levels, channels, strides, frozen parts, the release's parameter names."""

import pytest
import torch

from rankdetr.modeling.backbone import ResNetBackbone, TimmBackbone
from tests.reference_state_dict import reference_shapes


@pytest.mark.parametrize("depth,channels", [(18, [128, 256, 512]), (50, [512, 1024, 2048])])
def test_resnet_levels(depth, channels):
    backbone = ResNetBackbone(depth=depth)
    features = backbone(torch.randn(1, 3, 64, 96))
    assert backbone.out_channels == channels and backbone.strides == [8, 16, 32]
    assert [tuple(f.shape[1:]) for f in features] == [
        (c, 64 // s, 96 // s) for c, s in zip(channels, [8, 16, 32])
    ]
    assert not any(p.requires_grad for p in backbone.stem.parameters())
    assert all(p.requires_grad for p in backbone.res2.parameters())


def test_resnet50_parameter_names_match_the_original_release():
    ours = {name: tuple(t.shape) for name, t in ResNetBackbone(depth=50).state_dict().items()}
    assert ours == reference_shapes("backbone.")


def test_bad_depth_is_named():
    with pytest.raises(ValueError, match="depth"):
        ResNetBackbone(depth=42)


@pytest.mark.slow
def test_swin_tiny_handles_any_input_size():
    backbone = TimmBackbone(model_name="swin_tiny_patch4_window7_224").eval()
    assert backbone.out_channels == [192, 384, 768] and backbone.strides == [8, 16, 32]
    with torch.no_grad():
        for h, w in [(96, 128), (100, 72)]:
            features = backbone(torch.randn(1, 3, h, w))
            assert [f.shape[1] for f in features] == [192, 384, 768]
            assert features[0].shape[2:] == (-(-h // 8), -(-w // 8))


def _basic_resnet_parameter_count(width: int, blocks=(2, 2, 2, 2)) -> int:
    """Parameters of a BasicBlock ResNet with BN, counted by hand from its layer shapes."""
    total = 3 * width * 7 * 7 + 2 * width  # stem conv + BN
    c_in = width
    for stage, num_blocks in enumerate(blocks):
        c_out = width * 2**stage
        for block in range(num_blocks):
            block_in = c_in if block == 0 else c_out
            total += block_in * c_out * 9 + 2 * c_out + c_out * c_out * 9 + 2 * c_out
            if block_in != c_out:
                total += block_in * c_out + 2 * c_out  # projection shortcut + BN
        c_in = c_out
    return total


@pytest.mark.parametrize("width", [64, 32, 16])
def test_resnet_width_scales_every_stage(width):
    backbone = ResNetBackbone(depth=18, width=width, norm="BN", freeze_at=0)
    assert backbone.out_channels == [2 * width, 4 * width, 8 * width]
    assert sum(p.numel() for p in backbone.parameters()) == _basic_resnet_parameter_count(width)
    features = backbone(torch.randn(2, 3, 64, 64))
    assert [f.shape[1] for f in features] == backbone.out_channels


def test_resnet50_width_scales_bottlenecks():
    backbone = ResNetBackbone(depth=50, width=32)
    assert backbone.out_channels == [256, 512, 1024]
    assert backbone.res2[0].conv1.weight.shape == (32, 32, 1, 1)


def test_bad_width_is_named():
    with pytest.raises(ValueError, match="width"):
        ResNetBackbone(depth=18, width=20)
