"""Checkpoint conversion and loading."""

from rankdetr.checkpoint.release import convert_release_state_dict

__all__ = ["convert_release_state_dict"]
