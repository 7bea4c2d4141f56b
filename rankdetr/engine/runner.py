"""Training and evaluation from a LazyConfig: what tools/train_net.py runs in every process.

The config has the nodes `model`, `optimizer`, `lr_multiplier`, `dataloader` (train, test,
evaluator) and `train` (output_dir, init_checkpoint, max_iter, device, amp, clip_grad_norm, ema,
checkpoint_period, eval_period, log_period, seed, ddp).
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import hooks
from detectron2.engine.defaults import default_writers
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel

from rankdetr.engine.hooks import EMAHook, TrainingProgressHook
from rankdetr.engine.trainer import RankDETRTrainer

__all__ = ["ConfigError", "load_config", "build_model", "do_test", "do_train", "resolve_device"]

logger = logging.getLogger("rankdetr")


class ConfigError(KeyError):
    """A config or override that cannot work; the message names the key."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


def load_config(config_file: str, overrides: list[str]) -> DictConfig:
    """LazyConfig.load + overrides, refusing overrides of keys the config does not have."""
    if not Path(config_file).is_file():
        raise ConfigError(f"config file not found: {config_file}")
    cfg = LazyConfig.load(config_file)
    check_override_keys(cfg, overrides)
    return LazyConfig.apply_overrides(cfg, overrides)


def _all_keys(node, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, DictConfig):
        for key in node:
            path = f"{prefix}{key}"
            keys.append(path)
            keys += _all_keys(node._get_node(key), path + ".")
    elif isinstance(node, ListConfig):
        for index in range(len(node)):
            keys += _all_keys(node._get_node(index), f"{prefix}{index}.")
    return keys


def check_override_keys(cfg: DictConfig, overrides: list[str]) -> None:
    """Raise KeyError naming an overridden key that the config lacks, with close matches.

    A leading "+" (hydra's syntax for adding a key) skips the check for that override.
    """
    known = None
    for override in overrides:
        key = override.split("=", 1)[0].strip()
        if key.startswith(("+", "~")):
            continue
        if OmegaConf.select(cfg, key, default="__missing__") != "__missing__":
            continue
        known = known or _all_keys(cfg)
        close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise ConfigError(f"config has no key {key!r} (from override {override!r}){hint}")


def resolve_device(device: str) -> torch.device:
    """ "auto" -> cuda when available, else cpu; "cuda" without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no GPU is available; use train.device=cpu")
    return torch.device(device)


def _num_classes_from_data(cfg: DictConfig) -> int:
    from detectron2.data import MetadataCatalog

    names = cfg.dataloader.train.dataset.names
    name = names if isinstance(names, str) else names[0]
    return len(MetadataCatalog.get(name).thing_classes)


def build_model(cfg: DictConfig) -> torch.nn.Module:
    """Instantiate cfg.model on train.device; num_classes=None takes it from the train data."""
    if cfg.model.get("num_classes") is None:
        cfg.model.num_classes = _num_classes_from_data(cfg)
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


def do_train(cfg: DictConfig, resume: bool = False) -> dict:
    """Train cfg.model as configured; returns the last evaluation's results."""
    model = build_model(cfg)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)
    ddp_model = _wrap_ddp(model, cfg)
    trainer = RankDETRTrainer(
        ddp_model,
        train_loader,
        optimizer,
        device_type=resolve_device(cfg.train.device).type,
        amp=cfg.train.get("amp"),
        clip_grad_norm=cfg.train.get("clip_grad_norm"),
    )
    checkpointer = DetectionCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    ema = EMAHook(model, cfg.train.ema.decay) if cfg.train.get("ema", {}).get("enabled") else None

    def evaluate():
        if ema is not None and cfg.train.ema.get("evaluate_average", True):
            with ema.averaged_weights():
                return do_test(cfg, model)
        return do_test(cfg, model)

    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            TrainingProgressHook(model),
            ema,
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
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=resume)
    start_iter = trainer.iter + 1 if resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)
    return trainer.storage.latest() if hasattr(trainer, "storage") else {}
