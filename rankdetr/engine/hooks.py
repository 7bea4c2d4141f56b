"""Training hooks: the training-progress signal (HMC switch) and an exponential moving average."""

from __future__ import annotations

import contextlib

import torch
from detectron2.engine import HookBase

__all__ = ["TrainingProgressHook", "EMAHook"]


class TrainingProgressHook(HookBase):
    """Tells the model how far training is (iteration / max_iter) before every step.

    The model decides what depends on it (Rank-DETR: the switch to the high-order matching cost).
    It receives the model itself, not a DDP wrapper, so no `.module` is ever needed; every
    process computes the same fraction from the same iteration, so ranks stay in step.
    """

    def __init__(self, model: torch.nn.Module):
        self._model = model

    def before_step(self):
        self._model.set_training_progress(self.trainer.iter / self.trainer.max_iter)


class EMAHook(HookBase):
    """Keeps an exponential moving average of the model's floating-point state.

    The decay used at update t is min(decay, (1 + t) / (10 + t)), so that early averages follow
    the model. The average is saved with the trainer's checkpoint and restored on resume.
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.9998):
        self._model = model
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().clone() for k, v in self._float_state().items()}

    def _float_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self._model.state_dict().items() if v.dtype.is_floating_point}

    @torch.no_grad()
    def after_step(self):
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, value in self._float_state().items():
            self.shadow[name].mul_(decay).add_(value.detach(), alpha=1 - decay)

    @contextlib.contextmanager
    def averaged_weights(self):
        """Temporarily load the average into the model (e.g. to evaluate it)."""
        current = {k: v.detach().clone() for k, v in self._float_state().items()}
        self._model.load_state_dict(self.shadow, strict=False)
        try:
            yield
        finally:
            self._model.load_state_dict(current, strict=False)

    def state_dict(self):
        return {"updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state_dict):
        self.updates = state_dict["updates"]
        self.shadow = {k: v.clone() for k, v in state_dict["shadow"].items()}
