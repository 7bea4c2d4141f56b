"""Training hooks: the training-progress signal (HMC switch), an exponential moving average, and
the per-iteration seeding that makes a resumed run repeat the uninterrupted one."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch
from detectron2.engine import HookBase
from detectron2.utils import comm

from rankdetr.data.samplers import mix_seed

__all__ = ["TrainingProgressHook", "EMAHook", "SeedHook"]


class TrainingProgressHook(HookBase):
    """Tells the model how far training is (iteration / max_iter) before every step.

    The model decides what depends on it (Rank-DETR: the switch to the high-order matching cost).
    It receives the model itself, not a DDP wrapper, so no `.module` is ever needed; every
    process computes the same fraction from the same iteration, so ranks stay in step. The
    fraction is recomputed from the trainer's iteration at every step, so a resumed run switches
    at the same iteration as an uninterrupted one.
    """

    def __init__(self, model: torch.nn.Module):
        self._model = model

    def before_step(self):
        self._model.set_training_progress(self.trainer.iter / self.trainer.max_iter)


class EMAHook(HookBase):
    """Keeps an exponential moving average of the model's floating-point state.

    The decay used at update t is min(decay, (1 + t) / (10 + t)), so that early averages follow
    the model. The average is saved with the trainer's checkpoint (`trainer.hooks.EMAHook.shadow`,
    read back by :func:`rankdetr.engine.checkpoint.ema_weights_in`) and restored on resume.
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.9998, device: str = ""):
        """
        Args:
            model: the model itself (not a DDP wrapper).
            decay: the largest decay (train.model_ema.decay).
            device: where the average lives (train.model_ema.device); "" beside the weights.
        """
        self._model = model
        self.decay = decay
        self.device = device or None
        self.updates = 0
        self.shadow = self._copy_of_float_state()

    def _float_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self._model.state_dict().items() if v.dtype.is_floating_point}

    def _copy_of_float_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to(self.device, copy=True) for k, v in self._float_state().items()}

    def before_train(self):
        # Weights loaded after construction (train.init_checkpoint) start the average; a resumed
        # average (updates > 0) is kept.
        if self.updates == 0:
            self.shadow = self._copy_of_float_state()

    @torch.no_grad()
    def after_step(self):
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, value in self._float_state().items():
            shadow = self.shadow[name]
            shadow.mul_(decay).add_(value.detach().to(shadow.device), alpha=1 - decay)

    @contextlib.contextmanager
    def averaged_weights(self):
        """Temporarily load the average into the model (e.g. to evaluate it)."""
        current = self._copy_of_float_state()
        self._model.load_state_dict(self.shadow, strict=False)
        try:
            yield
        finally:
            self._model.load_state_dict(current, strict=False)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a saved average onto the model's devices and dtypes; the names must match."""
        shadow = state_dict["shadow"]
        missing = sorted(set(self.shadow) - set(shadow))
        unexpected = sorted(set(shadow) - set(self.shadow))
        if missing or unexpected:
            raise KeyError(
                f"the checkpoint's EMA does not fit the model: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        for name, value in shadow.items():
            self.shadow[name].copy_(value)
        self.updates = int(state_dict["updates"])


class SeedHook(HookBase):
    """Seeds torch, NumPy and Python from (seed, rank, iteration) before every step, and starts a
    resumable train loader at the trainer's first iteration.

    The random draws of iteration k (dropout, ...) then depend on k alone, not on the history
    of the process, so a run resumed at k repeats the uninterrupted one, in every process. The
    seed is saved with the trainer's checkpoint: a run started with a random seed resumes with it.
    """

    def __init__(self, seed: int, data_loader=None):
        """
        Args:
            seed: the run's seed (non-negative).
            data_loader: a :class:`rankdetr.data.samplers.ResumableTrainLoader`, or None.
        """
        if seed < 0:
            raise ValueError(f"SeedHook needs a non-negative seed, got {seed}")
        self.seed = int(seed)
        self._data_loader = data_loader

    def before_train(self):
        if self._data_loader is not None:
            self._data_loader.resume_at(self.trainer.start_iter, self.seed)

    def before_step(self):
        step_seed = mix_seed(self.seed, comm.get_rank(), self.trainer.iter)
        torch.manual_seed(step_seed)
        np.random.seed(step_seed)
        random.seed(step_seed)

    def state_dict(self) -> dict:
        return {"seed": self.seed}

    def load_state_dict(self, state_dict: dict) -> None:
        self.seed = int(state_dict["seed"])
