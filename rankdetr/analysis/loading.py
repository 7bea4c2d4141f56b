"""What the figure commands share: their command-line arguments, loading a model from a config and
a checkpoint, choosing the dataset (the config's test set by default) and mapping its images."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from detectron2.config import instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from omegaconf import DictConfig, OmegaConf

import rankdetr.data  # noqa: F401  (registers shapes_train / shapes_val)
from rankdetr.analysis.collect import collect_layer_outputs
from rankdetr.data.datasets import num_classes_of, register_coco_format
from rankdetr.engine.checkpoint import CheckpointError, load_for_evaluation
from rankdetr.engine.runner import load_config, resolve_device, use_ema_weights
from rankdetr.errors import UserError, report_user_errors

__all__ = [
    "AnalysisError",
    "LoadedModel",
    "add_common_arguments",
    "add_matching_arguments",
    "class_names",
    "dataset_dicts",
    "dataset_from_args",
    "load_models",
    "mapped_inputs",
    "output_path",
    "run_command",
    "set_training_progress",
]

logger = logging.getLogger("rankdetr.analysis")
MAX_MODELS = 2


class AnalysisError(ValueError, UserError):
    """A problem with the command's inputs; the message names the file, key or option."""


@dataclass
class LoadedModel:
    name: str
    cfg: DictConfig
    model: torch.nn.Module


def add_common_arguments(parser: argparse.ArgumentParser, default_output: str) -> None:
    """--model (1-2), dataset choice, --max-images, --device, --output, trailing overrides."""
    parser.add_argument(
        "--model",
        nargs=3,
        action="append",
        required=True,
        metavar=("NAME", "CONFIG", "CHECKPOINT"),
        help="a model to plot: legend name, LazyConfig file, checkpoint (.pth); at most twice",
    )
    parser.add_argument(
        "--dataset",
        help="registered dataset name (default: the first model's dataloader.test.dataset.names)",
    )
    parser.add_argument("--coco-json", help="use this COCO-format annotation file instead")
    parser.add_argument("--image-root", help="image folder of --coco-json")
    parser.add_argument(
        "--max-images", type=int, default=None, help="use the first N images (default: all)"
    )
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, ... (default: the config's train.device)"
    )
    parser.add_argument("--output", default=default_output, help="PNG file to write")
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        help="key=value config overrides applied to every model, e.g. model.num_queries=100",
    )


def add_matching_arguments(parser: argparse.ArgumentParser) -> None:
    """--training-progress: which matching cost the model's matcher uses (HMC switches on at
    model.rank.hmc_start)."""
    parser.add_argument(
        "--training-progress",
        type=float,
        default=1.0,
        help="training fraction the matcher assumes (default 1.0: the cost at the end of "
        "training, i.e. the high-order cost when HMC is on)",
    )


def set_training_progress(models: list[LoadedModel], progress: float) -> None:
    if not 0.0 <= progress <= 1.0:
        raise AnalysisError(f"--training-progress must be in [0, 1], got {progress}")
    for loaded in models:
        loaded.model.set_training_progress(progress)


def output_path(args) -> Path:
    """The --output file (must end in .png); its folder is created."""
    path = Path(args.output)
    if path.suffix.lower() != ".png":
        raise AnalysisError(f"--output must be a .png file, got {args.output}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _check_model_args(model_args: list[list[str]]) -> None:
    if len(model_args) > MAX_MODELS:
        raise AnalysisError(f"at most {MAX_MODELS} --model options, got {len(model_args)}")
    names = [name for name, _, _ in model_args]
    if len(set(names)) != len(names):
        raise AnalysisError(f"--model names must differ, got {names}")
    for name, config, checkpoint in model_args:
        if not Path(config).is_file():
            raise AnalysisError(f"model {name!r}: config file not found: {config}")
        if not Path(checkpoint).is_file():
            raise AnalysisError(f"model {name!r}: checkpoint file not found: {checkpoint}")


def _require(cfg: DictConfig, key: str, config_file: str, why: str) -> None:
    if OmegaConf.select(cfg, key, default=None) is None:
        raise AnalysisError(f"config {config_file} has no '{key}' ({why})")


def dataset_from_args(args, first_cfg: DictConfig, first_config_file: str) -> str:
    """The dataset to analyse: --coco-json (registered here), --dataset, or the first model's
    dataloader.test.dataset.names; checked to be registered."""
    if args.coco_json or args.image_root:
        if not (args.coco_json and args.image_root):
            raise AnalysisError("--coco-json and --image-root go together")
        if not Path(args.coco_json).is_file():
            raise AnalysisError(f"--coco-json file not found: {args.coco_json}")
        name = f"analysis_{Path(args.coco_json).stem}"
        register_coco_format(name, args.coco_json, args.image_root)
        return name
    if args.dataset:
        name = args.dataset
    else:
        _require(first_cfg, "dataloader.test.dataset.names", first_config_file, "the dataset")
        name = first_cfg.dataloader.test.dataset.names
        if not isinstance(name, str):
            if len(name) != 1:
                raise AnalysisError(
                    f"config {first_config_file}: dataloader.test.dataset.names has several "
                    f"datasets {list(name)}; choose one with --dataset"
                )
            name = name[0]
    if name not in DatasetCatalog.list():
        raise AnalysisError(f"dataset {name!r} is not registered (use --coco-json/--image-root)")
    return name


def _load_checkpoint(model: torch.nn.Module, name: str, checkpoint: str, use_ema: bool) -> None:
    """Load the checkpoint's weights strictly, with the project's safe reader (no code in the
    file runs), its EMA weights when it holds them and `use_ema`; a checkpoint that does not fit
    the config is refused, naming tensors."""
    try:
        load_for_evaluation(model, checkpoint, use_ema)
    except CheckpointError as error:
        raise AnalysisError(f"model {name!r}: {error}") from error


def _build_model(cfg: DictConfig, dataset_name: str, device: torch.device) -> torch.nn.Module:
    if cfg.model.get("num_classes") is None:
        train_names = OmegaConf.select(cfg, "dataloader.train.dataset.names", default=None)
        source = train_names if isinstance(train_names, str) else dataset_name
        cfg.model.num_classes = num_classes_of(source)
    model = instantiate(cfg.model)
    for method in ("forward_layers", "criterion"):
        if not hasattr(model, method):
            raise AnalysisError(
                f"the config's model ({type(model).__name__}) has no '{method}': the figures "
                "need a rankdetr RankDETR"
            )
    return model.to(device)


def load_models(args) -> tuple[list[LoadedModel], str]:
    """Load every --model (config + overrides + checkpoint, eval mode) and choose the dataset.

    Returns:
        The models in --model order, and the dataset name.
    """
    _check_model_args(args.model)
    configs = []
    for _, config_file, _ in args.model:
        cfg = load_config(config_file, list(args.opts or []))
        _require(cfg, "model", config_file, "the model to build")
        _require(cfg, "dataloader.test.mapper", config_file, "how to map the test images")
        configs.append(cfg)
    dataset_name = dataset_from_args(args, configs[0], args.model[0][1])
    loaded = []
    for cfg, (name, _, checkpoint) in zip(configs, args.model):
        device_name = args.device or OmegaConf.select(cfg, "train.device", default="auto")
        model = _build_model(cfg, dataset_name, resolve_device(device_name))
        _load_checkpoint(model, name, checkpoint, use_ema_weights(cfg))
        loaded.append(LoadedModel(name, cfg, model.eval()))
    return loaded, dataset_name


def dataset_dicts(dataset_name: str, max_images: int | None) -> list[dict]:
    """The first `max_images` (all if None) dataset dicts of a registered dataset."""
    dicts = DatasetCatalog.get(dataset_name)
    if max_images is not None:
        if max_images < 1:
            raise AnalysisError(f"--max-images must be at least 1, got {max_images}")
        dicts = dicts[:max_images]
    if not dicts:
        raise AnalysisError(f"dataset {dataset_name!r} has no images")
    return dicts


def mapped_inputs(cfg: DictConfig, dicts: list[dict]) -> Iterator[dict]:
    """The config's test mapper applied to each dataset dict, lazily."""
    mapper = instantiate(cfg.dataloader.test.mapper)
    return (mapper(d) for d in dicts)


def collect_per_model(models: list[LoadedModel], dicts: list[dict]) -> dict[str, list]:
    """Model name -> per-image, per-layer outputs (:class:`ImageLayerOutputs`) on `dicts`."""
    return {
        loaded.name: collect_layer_outputs(
            loaded.model, mapped_inputs(loaded.cfg, dicts), total=len(dicts),
            description=loaded.name,
        )  # fmt: skip
        for loaded in models
    }


def class_names(dataset_name: str) -> list[str]:
    return list(MetadataCatalog.get(dataset_name).get("thing_classes", []))


def run_command(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Run a figure command's main: its input errors end the process with a one-line message."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    report_user_errors(main, argv)
