"""The training step: forward under autocast, a check that every loss term is finite, backward
(with a GradScaler for fp16), gradient clipping, optimiser step. Everything else (LR schedule,
HMC switch, EMA, checkpoints, evaluation, logging) is a hook.

Non-finite losses (`train.nonfinite_loss`):

* "error" (default): the step raises :class:`NonFiniteLossError` naming the non-finite terms and
  the iteration, before backward and before the optimiser step. The hooks' after_step does not
  run for it, so no checkpoint is written from the bad step: the newest checkpoint is the last
  good one.
* "skip": no backward and no optimiser step for that iteration (the weights stay as they were);
  the count of skipped steps is logged and written to the event storage as "nonfinite_skips".
  With `train.max_nonfinite_skips` = n, n consecutive skips raise NonFiniteLossError.

With DDP every process must take the same decision (a process that skips backward while the
others run it would wait forever in DDP's gradient all-reduce), so the per-term non-finite flags
are summed over processes (all_reduce) before anything is decided: a term that is non-finite in
any process is non-finite for all.
"""

from __future__ import annotations

import logging
import os
import time

import torch
import torch.distributed as dist
from detectron2.engine import SimpleTrainer

from rankdetr.engine.precision import AMP_DTYPES, AmpChoice, choose_amp_dtype
from rankdetr.errors import UserError, is_user_error, user_message

__all__ = [
    "NONFINITE_LOSS_MODES",
    "NonFiniteLossError",
    "RankDETRTrainer",
    "TrainValueError",
    "autocast_dtype",
    "resolve_amp",
]

logger = logging.getLogger(__name__)

NONFINITE_LOSS_MODES = ("error", "skip")

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class TrainValueError(ValueError, UserError):
    """A train.* value the trainer cannot use (e.g. fp16 without CUDA); the message names it."""


def autocast_dtype(amp: str | None) -> torch.dtype | None:
    """ "bf16" / "fp16" (a resolved train.amp.dtype) or None (autocast off) -> the autocast
    dtype, or None."""
    if amp is None:
        return None
    if amp not in _AMP_DTYPES:
        raise TrainValueError(f"train.amp.dtype must be 'bf16', 'fp16' or 'auto', got {amp!r}")
    return _AMP_DTYPES[amp]


def resolve_amp(amp: str | None, device_type: str) -> AmpChoice:
    """train.amp.dtype (None: train.amp.enabled=False) -> the dtype to use and why; logged."""
    if amp is None:
        choice = AmpChoice(None, "train.amp.enabled=False")
    elif amp not in AMP_DTYPES:
        autocast_dtype(amp)  # raises, naming the allowed values
    else:
        choice = choose_amp_dtype(amp, device_type)
    precision = f"{choice.dtype} autocast" if choice.dtype else "float32 (autocast off)"
    level = logging.WARNING if choice.slow else logging.INFO
    logger.log(level, "Training precision on %s: %s; %s", device_type, precision, choice.reason)
    return choice


class NonFiniteLossError(FloatingPointError, UserError):
    """A loss term became NaN or infinite; the message names the terms and the iteration."""


class _UserErrorsWithoutTraceback(logging.Filter):
    """detectron2's training loop logs every exception with its traceback ("Exception during
    training:") before re-raising it, to the console and log.txt. A user error (bad data, a full
    disk, ...) is then printed by the tool as one line; the log keeps that line too, without the
    traceback, which RANKDETR_TRACEBACK=1 keeps."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and is_user_error(error) and not _traceback_asked():
            record.msg = f"{record.getMessage()} {user_message(error)}"
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


def _traceback_asked() -> bool:
    return os.environ.get("RANKDETR_TRACEBACK") == "1"


def _log_user_errors_of_the_training_loop_in_one_line() -> None:
    """Installs the filter above on detectron2's training-loop logger, once per process."""
    loop_logger = logging.getLogger("detectron2.engine.train_loop")
    if not any(isinstance(f, _UserErrorsWithoutTraceback) for f in loop_logger.filters):
        loop_logger.addFilter(_UserErrorsWithoutTraceback())


class RankDETRTrainer(SimpleTrainer):
    """SimpleTrainer with mixed precision, gradient clipping and a non-finite loss policy."""

    def __init__(
        self,
        model: torch.nn.Module,
        data_loader,
        optimizer: torch.optim.Optimizer,
        *,
        device_type: str = "cpu",
        amp: str | None = None,
        clip_grad_params: dict | None = None,
        nonfinite_loss: str = "error",
        max_nonfinite_skips: int | None = None,
    ):
        """
        Args:
            model: returns a dict of losses for a list of detectron2 inputs.
            data_loader: an iterable of batches.
            optimizer: the optimiser.
            device_type: "cpu" or "cuda", for autocast.
            amp: the autocast dtype, "bf16", "fp16" (CUDA; uses a GradScaler) or "auto" (bf16
                where the device computes it natively, else float32:
                :mod:`rankdetr.engine.precision`), or None (float32).
            clip_grad_params: arguments of torch.nn.utils.clip_grad_norm_ (max_norm, norm_type;
                train.clip_grad.params), or None for no clipping.
            nonfinite_loss: "error" or "skip", what a NaN / infinite loss term does (module doc).
            max_nonfinite_skips: in "skip" mode, stop with an error after this many consecutive
                skipped steps; None never stops.
        """
        super().__init__(model, data_loader, optimizer)
        _log_user_errors_of_the_training_loop_in_one_line()
        self.device_type = device_type
        self.amp_choice = resolve_amp(amp, device_type)
        self.amp_dtype = autocast_dtype(self.amp_choice.dtype)
        if self.amp_dtype == torch.float16 and device_type != "cuda":
            raise TrainValueError("train.amp.dtype='fp16' needs CUDA; use 'bf16' on the CPU")
        self.grad_scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.clip_grad_params = dict(clip_grad_params) if clip_grad_params else None
        if nonfinite_loss not in NONFINITE_LOSS_MODES:
            raise TrainValueError(
                f"train.nonfinite_loss must be 'error' or 'skip', got {nonfinite_loss!r}"
            )
        if max_nonfinite_skips is not None and max_nonfinite_skips < 1:
            raise TrainValueError(
                f"train.max_nonfinite_skips must be a positive int or None, got "
                f"{max_nonfinite_skips!r}"
            )
        self.nonfinite_loss = nonfinite_loss
        self.max_nonfinite_skips = max_nonfinite_skips
        self.nonfinite_skips = 0  # skipped steps in this run
        self.consecutive_nonfinite_skips = 0

    def run_step(self):
        assert self.model.training, "the model was switched to eval mode during training"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start

        with torch.autocast(self.device_type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):  # fmt: skip
            loss_dict = self.model(data)
        losses = sum(loss_dict.values())
        bad_terms = nonfinite_terms(loss_dict)
        if bad_terms:
            self._on_nonfinite_loss(bad_terms, loss_dict)
            return
        self.consecutive_nonfinite_skips = 0

        self.optimizer.zero_grad(set_to_none=True)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(losses).backward()
            self.grad_scaler.unscale_(self.optimizer)
        else:
            losses.backward()
        self._write_metrics(loss_dict, data_time)
        if self.clip_grad_params:
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, **self.clip_grad_params)
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()

    def _on_nonfinite_loss(self, bad_terms: list[str], loss_dict: dict) -> None:
        """Raise (mode "error", or too many consecutive skips) or count a skipped step."""
        values = ", ".join(
            f"{name}={loss_dict[name].detach().float().mean().item():g}" for name in bad_terms
        )
        where = f"non-finite loss at iteration {self.iter}: {values}"
        if self.nonfinite_loss == "error":
            raise NonFiniteLossError(
                f"{where} (train.nonfinite_loss='skip' skips such steps instead)"
            )
        self.nonfinite_skips += 1
        self.consecutive_nonfinite_skips += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.storage.put_scalar("nonfinite_skips", self.nonfinite_skips, smoothing_hint=False)
        logger.warning(
            "%s; optimizer step skipped (%d skipped so far, %d in a row)",
            where,
            self.nonfinite_skips,
            self.consecutive_nonfinite_skips,
        )
        limit = self.max_nonfinite_skips
        if limit is not None and self.consecutive_nonfinite_skips >= limit:
            raise NonFiniteLossError(
                f"{where}; {self.consecutive_nonfinite_skips} consecutive steps had non-finite "
                f"losses (train.max_nonfinite_skips={limit}), stopping"
            )

    def state_dict(self):
        state = super().state_dict()
        if self.grad_scaler is not None:
            state["grad_scaler"] = self.grad_scaler.state_dict()
        return state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])


def nonfinite_terms(loss_dict: dict[str, torch.Tensor]) -> list[str]:
    """Names of the loss terms that are NaN or infinite in this process or, with DDP, in any
    process (the flags are summed over processes, so that every process gets the same list)."""
    if not loss_dict:
        return []
    names = list(loss_dict)
    with torch.no_grad():  # one check of all terms (scalars): 3 operations instead of 4 a term
        values = [loss_dict[name] for name in names]
        if all(value.dim() == 0 for value in values):
            flags = ~torch.isfinite(torch.stack(values))
        else:
            flags = torch.stack([~torch.isfinite(value).all() for value in values])
    flags = flags.to(torch.int32)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags)  # on the losses' device: NCCL needs CUDA tensors
    return [name for name, flag in zip(names, flags.tolist()) if flag]
