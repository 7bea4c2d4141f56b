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
import yaml
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
from rankdetr.engine.run_lock import hold_output_dir
from rankdetr.engine.trainer import RankDETRTrainer

__all__ = [
    "ConfigError",
    "apply_fast_dev_run",
    "load_config",
    "load_yaml_config",
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
    ConfigError naming it. A .yaml config is read as plain data only (:func:`load_yaml_config`):
    it runs no code."""
    if not Path(config_file).is_file():
        raise ConfigError(f"config file not found: {config_file}")
    try:
        cfg = _read_config_file(config_file)
    except ConfigError:  # already names the file and the problem
        raise
    except (AttributeError, KeyError) as error:  # e.g. `train.ema.enabled = True` in the file
        _refuse_old_name_in_file(error, config_file)
        raise
    check_renamed_keys(cfg, config_file)
    return apply_fast_dev_run(apply_checked_overrides(cfg, overrides))


# --- reading a config file: a .py config is code by design, a .yaml config is data ---------

_YAML_SUFFIXES = (".yaml", ".yml")
# The callables a .yaml config may name as `_target_`: this project's and the model, data,
# optimiser and schedule parts of the libraries that detrex-style configs build from. A plain
# string `_target_: os.system` would otherwise run code as soon as the config is instantiated.
YAML_TARGET_MODULES = (
    "rankdetr.",
    "detectron2.data.",
    "detectron2.evaluation.",
    "detectron2.layers.",
    "detectron2.modeling.",
    "detectron2.solver.",
    "fvcore.common.param_scheduler.",
    "torch.nn.",
    "torch.optim.",
)
_YAML_TAG_PREFIX = "tag:yaml.org,2002:"


class _RefusedTag(Exception):
    """A YAML node whose tag the plain-data loader does not construct."""

    def __init__(self, node: yaml.Node):
        super().__init__(node.tag)
        self.tag = node.tag.replace(_YAML_TAG_PREFIX, "!!", 1)
        self.line = node.start_mark.line + 1


class _PlainDataLoader(yaml.SafeLoader):
    """YAML's standard data types only (mappings, lists, strings, numbers, booleans, null, ...):
    all that detectron2's LazyConfig.save writes for a config of plain values and `_target_`
    names. Every other tag, !!python/... above all, is refused before anything is built."""


def _refuse_tag(loader: yaml.SafeLoader, node: yaml.Node) -> None:
    raise _RefusedTag(node)


_PlainDataLoader.add_constructor(None, _refuse_tag)  # None: every tag without a constructor


def _read_config_file(config_file: str) -> DictConfig:
    """A .py config runs (configs are Python by design); a .yaml config is only read."""
    suffix = Path(config_file).suffix
    if suffix in _YAML_SUFFIXES:
        return load_yaml_config(config_file)
    if suffix != ".py":  # e.g. config.yaml.pkl, detectron2's pickle fallback: code, not data
        raise ConfigError(f"{config_file}: a config is a .py, .yaml or .yml file, not {suffix!r}")
    return LazyConfig.load(config_file)


def load_yaml_config(config_file: str) -> DictConfig:
    """A .yaml config (e.g. the config.yaml a run writes) as a config, without running code:
    a Python tag, a `_target_` outside :data:`YAML_TARGET_MODULES` or a file that is not a YAML
    mapping is one ConfigError naming the file (and the tag or key)."""
    with open(config_file, "rb") as stream:  # bytes: YAML detects the encoding and a BOM
        try:
            data = yaml.load(stream, Loader=_PlainDataLoader)
        except _RefusedTag as refused:
            raise ConfigError(_refused_tag_message(config_file, refused)) from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{config_file}: not valid YAML: {_one_line(error)}") from None
    if not isinstance(data, dict):
        what = "nothing" if data is None else f"a {type(data).__name__}"
        raise ConfigError(f"{config_file} holds {what}, not a mapping of config nodes")
    _check_yaml_targets(data, config_file, prefix="")
    return OmegaConf.create(data, flags={"allow_objects": True})  # as LazyConfig.load


def _refused_tag_message(config_file: str, refused: _RefusedTag) -> str:
    why = (
        "it would build a Python object (run code)"
        if refused.tag.startswith("!!python/")
        else "it is not a YAML data type"
    )
    return (
        f"{config_file}, line {refused.line}: refused the YAML tag {refused.tag}: {why}; a .yaml "
        "config is read as plain data only (Python objects belong in a .py config)"
    )


def _one_line(error: yaml.YAMLError) -> str:
    """A YAML error's problem and line, without PyYAML's multi-line excerpt of the file."""
    problem = getattr(error, "problem", None)
    mark = getattr(error, "problem_mark", None)
    if problem is None:
        return " ".join(str(error).split())
    return problem if mark is None else f"{problem} (line {mark.line + 1})"


def _check_yaml_targets(node, config_file: str, prefix: str) -> None:
    """Every `_target_` of a .yaml config is a literal name in :data:`YAML_TARGET_MODULES`
    (instantiate calls it, so an arbitrary name would be code)."""
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:  # a scalar: nothing below it
        return
    for key, value in items:
        path = f"{prefix}{key}"
        if key == "_target_" and isinstance(value, str):
            _check_yaml_target(value, path, config_file)
        _check_yaml_targets(value, config_file, prefix=f"{path}.")


def _check_yaml_target(target: str, key: str, config_file: str) -> None:
    """The name must start with an allowed module and lead to an object defined in one: a name
    like `rankdetr.engine.runner.os.system` reaches os.system through a module's imports."""
    if "${" in target or "__" in target or not target.startswith(YAML_TARGET_MODULES):
        _refuse_yaml_target(target, key, config_file)
    try:
        module = getattr(locate(target), "__module__", None) or ""
    except ImportError:
        raise ConfigError(f"{config_file}: {key}={target!r} names no callable") from None
    if not f"{module}.".startswith(YAML_TARGET_MODULES):
        _refuse_yaml_target(target, key, config_file)


def _refuse_yaml_target(target: str, key: str, config_file: str) -> None:
    allowed = ", ".join(module.rstrip(".") for module in YAML_TARGET_MODULES)
    raise ConfigError(
        f"{config_file}: {key}={target!r} is not a callable a .yaml config may name (only "
        f"those defined under {allowed}); name it in a .py config instead"
    )


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
    return _dataset_of(cfg, "train")


def _dataset_of(cfg: DictConfig, node: str) -> str:
    """The (first) dataset name of cfg.dataloader.<node>, "train" or "test"."""
    names = cfg.dataloader[node].dataset.names
    return names if isinstance(names, str) else names[0]


def _num_classes_unset(cfg: DictConfig) -> bool:
    """model.num_classes left to the data: None, or "None" / "null" typed as an override."""
    return cfg.model.get("num_classes") in (None, "None", "none", "null")


def check_num_classes(cfg: DictConfig, node: str = "train") -> None:
    """Before training (node "train"), or before an evaluation alone (node "test": the data
    evaluated is what the class count must fit): model.num_classes must be that data's (None
    takes it from there); a mismatch is one ConfigError naming both, not an IndexError mid-run
    or an evaluator's error after the whole inference."""
    dataset = _dataset_of(cfg, node)
    data_classes = num_classes_of(dataset)
    if _num_classes_unset(cfg):
        cfg.model.num_classes = data_classes
    elif cfg.model.num_classes != data_classes:
        role = "training" if node == "train" else node
        raise ConfigError(
            f"model.num_classes={cfg.model.num_classes} but the {role} data {dataset!r} has "
            f"{data_classes} classes (set model.num_classes={data_classes}, or None to take it "
            "from the data)"
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
    """Run cfg.dataloader.evaluator on cfg.dataloader.test; print and return its results.

    No evaluator (`dataloader.evaluator=None`) runs nothing, not even the inference, and returns
    {}: a training without any evaluation, since `train.eval_period=0` still evaluates after the
    last iteration (detectron2's EvalHook)."""
    if cfg.dataloader.get("evaluator") is None:
        logger.info("dataloader.evaluator is None: no evaluation")
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
    # One run per output folder: the main process locks it (a no-op when the caller holds the
    # lock already, as tools/train_net.py does), the other ranks follow the main one.
    with hold_output_dir(cfg.train.output_dir):
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
