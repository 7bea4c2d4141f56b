"""Checkpoint conversion and loading."""

from rankdetr.checkpoint.release import (
    convert_release_state_dict,
    describe_release_checkpoint,
    release_decoder_depth,
)
from rankdetr.checkpoint.swin import convert_swin_state_dict, swin_sizes

__all__ = [
    "convert_release_state_dict",
    "convert_swin_state_dict",
    "describe_release_checkpoint",
    "release_decoder_depth",
    "swin_sizes",
]
