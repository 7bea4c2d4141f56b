"""ChannelMapper: level count, strides, and the release's parameter names."""

import pytest
import torch

from rankdetr.modeling.neck import ChannelMapper
from tests.reference_state_dict import reference_shapes


def test_four_levels_from_res3_res4_res5():
    neck = ChannelMapper(in_channels=[512, 1024, 2048], out_channels=256, num_extra_levels=1)
    features = [torch.randn(1, c, 64 // s, 64 // s) for c, s in [(512, 1), (1024, 2), (2048, 4)]]
    outputs = neck(features)
    assert [tuple(o.shape) for o in outputs] == [
        (1, 256, 64, 64),
        (1, 256, 32, 32),
        (1, 256, 16, 16),
        (1, 256, 8, 8),
    ]
    assert neck.num_levels == 4


def test_parameter_names_and_shapes_match_the_original_release():
    neck = ChannelMapper(in_channels=[512, 1024, 2048], out_channels=256, num_extra_levels=1)
    ours = {name: tuple(t.shape) for name, t in neck.state_dict().items()}
    assert ours == reference_shapes("neck.")


def test_wrong_number_of_levels_is_named():
    neck = ChannelMapper(in_channels=[8, 16], out_channels=32, num_extra_levels=2, norm_groups=8)
    with pytest.raises(ValueError, match="expects 2 levels, got 1"):
        neck([torch.randn(1, 8, 4, 4)])
    assert len(neck([torch.randn(1, 8, 8, 8), torch.randn(1, 16, 4, 4)])) == 4
