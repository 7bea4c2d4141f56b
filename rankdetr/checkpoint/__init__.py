"""Checkpoint conversion and loading."""

from rankdetr.checkpoint.release import (
    convert_release_state_dict,
    describe_release_checkpoint,
    release_decoder_depth,
)

__all__ = ["convert_release_state_dict", "describe_release_checkpoint", "release_decoder_depth"]
