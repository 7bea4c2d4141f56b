"""Training and evaluation from a LazyConfig: what tools/train_net.py runs in every process.

The config has the nodes `model`, `optimizer`, `lr_multiplier`, `dataloader` (train, test,
evaluator) and `train` (configs/common/train.py, detrex's names: output_dir, init_checkpoint,
max_iter, device, amp, clip_grad, model_ema, fast_dev_run, checkpointer, eval_period, log_period,
seed, ddp, and rankdetr's compile, nonfinite_loss, deterministic).
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.data import build_detection_train_loader
from detectron2.engine import hooks
from detectron2.engine.defaults import default_writers
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.registry import locate
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel

from rankdetr.data.datasets import num_classes_of
from rankdetr.data.samplers import ResumableTrainLoader, build_resumable_train_loader
from rankdetr.engine.checkpoint import SafeCheckpointer
from rankdetr.engine.config_checks import (
    ConfigError,
    apply_checked_overrides,
    check_renamed_keys,
    new_name_of,
)
from rankdetr.engine.hooks import EMAHook, SeedHook, TrainingProgressHook
from rankdetr.engine.run_lock import run_lock
from rankdetr.engine.trainer import RankDETRTrainer

__all__ = [
    "ConfigError",
    "apply_fast_dev_run",
    "load_config",
    "use_ema_weights",
    "build_model",
    "do_test",
    "do_train",
    "resolve_device",
]

logger = logging.getLogger("rankdetr")


def load_config(config_file: str, overrides: list[str]) -> DictConfig:
    """LazyConfig.load + overrides, refusing a missing file, old key names, overrides of keys
    the config does not have (with close matches) and values of the wrong type (see
    :mod:`rankdetr.engine.config_checks`); then train.fast_dev_run. Every problem is a
    ConfigError naming it."""
    if not Path(config_file).is_file():
        raise ConfigError(f"config file not found: {config_file}")
    try:
        cfg = LazyConfig.load(config_file)
    except (AttributeError, KeyError) as error:  # e.g. `train.ema.enabled = True` in the file
        _refuse_old_name_in_file(error, config_file)
        raise
    check_renamed_keys(cfg, config_file)
    return apply_fast_dev_run(apply_checked_overrides(cfg, overrides))


def _refuse_old_name_in_file(error: Exception, config_file: str) -> None:
    """A config file that reads a node by its old name fails while it runs: name the new one."""
    name = getattr(error, "name", None) or getattr(error, "key", None)
    new = new_name_of(f"train.{name}") if isinstance(name, str) else None
    if new is not None:
        raise ConfigError(
            f"{config_file} uses train.{name}, renamed to {new} (detrex's name)"
        ) from error


def apply_fast_dev_run(cfg: DictConfig) -> DictConfig:
    """train.fast_dev_run.enabled, as in detrex: 20 iterations, evaluation every 10, a log line
    every iteration (a quick check that a config runs end to end)."""
    if OmegaConf.select(cfg, "train.fast_dev_run.enabled", default=False):
        cfg.train.max_iter, cfg.train.eval_period, cfg.train.log_period = 20, 10, 1
    return cfg


def use_ema_weights(cfg: DictConfig) -> bool:
    """Whether evaluation takes a checkpoint's EMA weights when it holds them
    (train.model_ema.use_ema_weights_for_eval_only; yes for a config without the key)."""
    key = "train.model_ema.use_ema_weights_for_eval_only"
    return bool(OmegaConf.select(cfg, key, default=True))


def resolve_device(device: str) -> torch.device:
    """ "auto" -> cuda when available, else cpu; "cuda" without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no GPU is available; use train.device=cpu")
    return torch.device(device)


def _training_dataset(cfg: DictConfig) -> str:
    names = cfg.dataloader.train.dataset.names
    return names if isinstance(names, str) else names[0]


def _num_classes_unset(cfg: DictConfig) -> bool:
    """model.num_classes left to the data: None, or "None" / "null" typed as an override."""
    return cfg.model.get("num_classes") in (None, "None", "none", "null")


def check_num_classes(cfg: DictConfig) -> None:
    """Before training: model.num_classes must be the training data's (None takes it from
    there); a mismatch is one ConfigError naming both, not an IndexError mid-run."""
    data_classes = num_classes_of(_training_dataset(cfg))
    if _num_classes_unset(cfg):
        cfg.model.num_classes = data_classes
    elif cfg.model.num_classes != data_classes:
        raise ConfigError(
            f"model.num_classes={cfg.model.num_classes} but the training data "
            f"{_training_dataset(cfg)!r} has {data_classes} classes (set model.num_classes="
            f"{data_classes}, or None to take it from the data)"
        )


def build_model(cfg: DictConfig) -> torch.nn.Module:
    """Instantiate cfg.model on train.device; num_classes=None takes it from the train data."""
    if _num_classes_unset(cfg):
        cfg.model.num_classes = num_classes_of(_training_dataset(cfg))
    model = instantiate(cfg.model)
    model.to(resolve_device(cfg.train.device))
    logger.info("Model: %s, %.2f M parameters", type(model).__name__,
                sum(p.numel() for p in model.parameters()) / 1e6)  # fmt: skip
    return model


def do_test(cfg: DictConfig, model: torch.nn.Module) -> dict:
    """Run cfg.dataloader.evaluator on cfg.dataloader.test; print and return its results."""
    if "evaluator" not in cfg.dataloader:
        return {}
    results = inference_on_dataset(
        model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    )
    if comm.is_main_process():
        print_csv_format(results)
    return results


def _wrap_ddp(model: torch.nn.Module, cfg: DictConfig) -> torch.nn.Module:
    if comm.get_world_size() == 1:
        return model
    device_ids = [comm.get_local_rank()] if next(model.parameters()).is_cuda else None
    return DistributedDataParallel(model, device_ids=device_ids, **cfg.train.get("ddp", {}))


def _seed_everything(cfg: DictConfig) -> int:
    """The run's seed: train.seed when >= 0 (then torch, NumPy and Python are seeded with
    seed + rank right away, so the model's initialisation repeats), else a random seed shared by
    all processes. A resumed run replaces it with the seed of its checkpoint (SeedHook)."""
    seed = int(cfg.train.get("seed", -1))
    if seed < 0:
        return int(comm.shared_random_seed())
    seed_all_rng(seed + comm.get_rank())
    return seed


def _set_deterministic(enabled: bool) -> None:
    """train.deterministic: refuse nondeterministic torch kernels (an error names the op)."""
    if not enabled:
        return
    # cuBLAS needs this before its first call to be deterministic (no effect on the CPU).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def _build_train_loader(cfg: DictConfig, seed: int):
    """cfg.dataloader.train, with detectron2's build_detection_train_loader replaced by
    build_resumable_train_loader (same arguments) so that a resumed run sees the same data."""
    node = cfg.dataloader.train
    target = locate(node._target_) if isinstance(node._target_, str) else node._target_
    if target not in (build_detection_train_loader, build_resumable_train_loader):
        logger.warning(
            "dataloader.train builds its loader with %s: a resumed run will not see the same "
            "data as an uninterrupted one (use rankdetr.data.samplers."
            "build_resumable_train_loader)",
            getattr(target, "__qualname__", target),
        )
        return instantiate(node)
    node = copy.deepcopy(node)
    node._target_ = build_resumable_train_loader
    node.seed = seed
    return instantiate(node)


def do_train(cfg: DictConfig, resume: bool = False) -> dict:
    """Train cfg.model as configured; returns the last evaluation's results.

    With resume=True, training continues from the newest complete checkpoint in
    train.output_dir (weights, optimizer, iteration, LR schedule, EMA, seed and data position),
    and ends with the weights an uninterrupted run would have (CPU, train.deterministic).
    """
    check_num_classes(cfg)
    if comm.is_main_process():  # one run per output folder (the other ranks follow the main one)
        with run_lock(cfg.train.output_dir):
            return _train(cfg, resume)
    return _train(cfg, resume)


def _train(cfg: DictConfig, resume: bool) -> dict:
    seed = _seed_everything(cfg)
    _set_deterministic(cfg.train.get("deterministic", False))
    model = build_model(cfg)
    if cfg.train.get("compile", False):
        model.compile_layers()
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = _build_train_loader(cfg, seed)
    ddp_model = _wrap_ddp(model, cfg)
    trainer = RankDETRTrainer(
        ddp_model,
        train_loader,
        optimizer,
        device_type=resolve_device(cfg.train.device).type,
        amp=cfg.train.amp.dtype if cfg.train.amp.enabled else None,
        clip_grad_params=cfg.train.clip_grad.params if cfg.train.clip_grad.enabled else None,
        nonfinite_loss=cfg.train.get("nonfinite_loss", "error"),
        max_nonfinite_skips=cfg.train.get("max_nonfinite_skips"),
    )
    checkpointer = SafeCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    ema_cfg = cfg.train.model_ema
    ema = EMAHook(model, ema_cfg.decay, ema_cfg.device) if ema_cfg.enabled else None

    def evaluate():
        if ema is not None and use_ema_weights(cfg):
            logger.info(
                "Evaluating the EMA weights (train.model_ema.use_ema_weights_for_eval_only)"
            )
            with ema.averaged_weights():
                return do_test(cfg, model)
        return do_test(cfg, model)

    resumable = isinstance(train_loader, ResumableTrainLoader)
    trainer.register_hooks(
        [
            SeedHook(seed, train_loader if resumable else None),
            hooks.IterationTimer(),
            TrainingProgressHook(model),
            ema,  # before the checkpointer: a checkpoint holds the average of its iteration
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            (
                hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
                if comm.is_main_process()
                else None
            ),
            hooks.EvalHook(cfg.train.eval_period, evaluate),
            (
                hooks.PeriodicWriter(
                    default_writers(cfg.train.output_dir, cfg.train.max_iter),
                    period=cfg.train.log_period,
                )
                if comm.is_main_process()
                else None
            ),
        ]
    )
    resuming = resume and checkpointer.has_checkpoint()
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=resuming)
    # The LR scheduler is built in before_train from the resumed iteration (its last_iter), and
    # the SeedHook starts the data stream there.
    start_iter = trainer.iter + 1 if resuming else 0
    trainer.train(start_iter, cfg.train.max_iter)
    return trainer.storage.latest() if hasattr(trainer, "storage") else {}
