"""The training step: forward under autocast, backward (with a GradScaler for fp16), gradient
clipping, optimiser step. Everything else (LR schedule, HMC switch, EMA, checkpoints, evaluation,
logging) is a hook."""

from __future__ import annotations

import time

import torch
from detectron2.engine import SimpleTrainer

__all__ = ["RankDETRTrainer", "autocast_dtype"]

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(amp: str | None) -> torch.dtype | None:
    """ "bf16" / "fp16" / None (or "", "none", "off") -> the autocast dtype, or None."""
    if amp in (None, "", "none", "off", False):
        return None
    if amp not in _AMP_DTYPES:
        raise ValueError(f"train.amp must be one of 'bf16', 'fp16' or None, got {amp!r}")
    return _AMP_DTYPES[amp]


class RankDETRTrainer(SimpleTrainer):
    """SimpleTrainer with mixed precision and gradient clipping."""

    def __init__(
        self,
        model: torch.nn.Module,
        data_loader,
        optimizer: torch.optim.Optimizer,
        *,
        device_type: str = "cpu",
        amp: str | None = None,
        clip_grad_norm: float | None = 0.1,
    ):
        """
        Args:
            model: returns a dict of losses for a list of detectron2 inputs.
            data_loader: an iterable of batches.
            optimizer: the optimiser.
            device_type: "cpu" or "cuda", for autocast.
            amp: "bf16", "fp16" (CUDA; uses a GradScaler) or None.
            clip_grad_norm: max gradient norm, or None for no clipping.
        """
        super().__init__(model, data_loader, optimizer)
        self.device_type = device_type
        self.amp_dtype = autocast_dtype(amp)
        if self.amp_dtype == torch.float16 and device_type != "cuda":
            raise ValueError("train.amp='fp16' needs CUDA; use 'bf16' on the CPU")
        self.grad_scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.clip_grad_norm = clip_grad_norm

    def run_step(self):
        assert self.model.training, "the model was switched to eval mode during training"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start

        with torch.autocast(self.device_type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):  # fmt: skip
            loss_dict = self.model(data)
        losses = sum(loss_dict.values())

        self.optimizer.zero_grad(set_to_none=True)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(losses).backward()
            self.grad_scaler.unscale_(self.optimizer)
        else:
            losses.backward()
        self._write_metrics(loss_dict, data_time)
        if self.clip_grad_norm:
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()

    def state_dict(self):
        state = super().state_dict()
        if self.grad_scaler is not None:
            state["grad_scaler"] = self.grad_scaler.state_dict()
        return state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
