"""Inference on single images from a LazyConfig and a checkpoint, without a dataset.

    from rankdetr import Predictor

    predictor = Predictor("configs/demo/rank_detr_r18_shapes.py", "output/demo/model_final.pth",
                          score_threshold=0.3)
    result = predictor("image.png")          # or an (H, W, 3) uint8 RGB numpy array
    result.boxes, result.scores, result.classes, result.class_names

    predictor = Predictor("model.onnx")      # an exported file (tools/export_onnx.py) alone

Images go through the config's test transform (`dataloader.test.mapper.augmentation`, e.g. the
shorter side to 800, the longer at most 1333) and the channel order the model was trained with
(the mapper's `img_format`); boxes come back in the pixels of the image as given. An exported
.onnx file runs in ONNX Runtime (:class:`rankdetr.export.runtime.OnnxDetector`) with the same
preprocessing and outputs; its test transform and class names come from the file's metadata
unless a config is given too.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from detectron2.config import instantiate
from detectron2.data import transforms as T
from omegaconf import DictConfig, OmegaConf

import rankdetr.data  # noqa: F401  (registers the bundled datasets that configs name)
from rankdetr.checkpoint.backbone_weights import CheckpointError
from rankdetr.data.datasets import DatasetFormatError, UnknownDatasetError, class_names_of
from rankdetr.data.image_io import DEFAULT_MAX_IMAGE_PIXELS, ImageReadError, read_image
from rankdetr.engine.checkpoint import load_for_evaluation
from rankdetr.engine.config_checks import ConfigError, apply_checked_overrides
from rankdetr.engine.runner import build_model, load_config, use_ema_weights

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ImageReadError",
    "Prediction",
    "Predictor",
    "as_rgb_image",
    "load_checkpoint",
]

logger = logging.getLogger(__name__)


@dataclass
class Prediction:
    """Detections of one image, in the pixels of the image as given (not the resized one).

    Attributes:
        boxes: (N, 4) float32 XYXY boxes.
        scores: (N,) float32 scores, highest first.
        classes: (N,) int64 contiguous class indices.
        class_names: N names, the name of each detection's class.
        image_size: (height, width) of the image.
    """

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    class_names: list[str] = field(default_factory=list)
    image_size: tuple[int, int] = (0, 0)

    def __len__(self) -> int:
        return len(self.scores)


def as_rgb_image(
    image: np.ndarray | str | Path, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> np.ndarray:
    """A path or an array -> (H, W, 3) uint8 RGB array (files with more than `max_pixels` pixels
    are refused, naming them).

    Arrays must be uint8: (H, W) or (H, W, 1) grayscale (repeated to 3 channels), (H, W, 3) RGB,
    or (H, W, 4) RGBA (alpha dropped). Files are read with rankdetr's reader (any PIL format,
    EXIF orientation applied). Raises FileNotFoundError / ImageReadError naming a bad file,
    TypeError / ValueError describing a bad array.
    """
    if isinstance(image, (str, Path)):
        return read_image(image, "RGB", max_pixels=max_pixels)
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy array or a path, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise TypeError(f"image array must be uint8 (0-255), got {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got "
                         f"{image.shape}")  # fmt: skip
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image array is empty: {image.shape}")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])


def load_checkpoint(model: torch.nn.Module, checkpoint: str | Path, use_ema: bool = True) -> bool:
    """Load a rankdetr checkpoint ({"model": state_dict, ...} or a bare state dict) strictly,
    with its EMA weights when it holds them and `use_ema` (as the evaluation does, see
    :func:`rankdetr.engine.checkpoint.load_for_evaluation`). Returns whether they were used.

    Read with `weights_only=True` (no code in the file runs). Raises FileNotFoundError for a
    missing file and CheckpointError naming the file when it is unreadable or does not fit.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return load_for_evaluation(model, str(path), use_ema)


class Predictor:
    """A detector built from a LazyConfig and a checkpoint (or an exported .onnx file, run by
    ONNX Runtime), applied to images.

    `predictor(image)` -> :class:`Prediction`; `predictor.predict_batch(images)` -> a list.
    Images are (H, W, 3) uint8 numpy arrays in `input_format` channel order (grayscale and
    RGBA / BGRA arrays are converted) or image file paths. The checkpoint's EMA weights are used
    when it holds them (train.model_ema.use_ema_weights_for_eval_only, an override, switches).
    """

    def __init__(
        self,
        config_file_or_cfg: str | Path | DictConfig | None,
        checkpoint: str | Path | None = None,
        device: str = "cpu",
        score_threshold: float = 0.0,
        overrides: Sequence[str] = (),
        input_format: str = "RGB",
        onnx_threads: int | None = None,
    ):
        """
        Args:
            config_file_or_cfg: a LazyConfig file or an already loaded config (not modified).
                Needs `model` and `dataloader.test.mapper`; `model.num_classes` may be None
                (taken from the dataset named by `dataloader.train.dataset.names`). None, or
                the .onnx file itself (then no `checkpoint`), for an exported file: its
                metadata gives the test transform and class names.
            checkpoint: weights file (see :func:`load_checkpoint`), or an exported .onnx file
                (run by ONNX Runtime on the CPU; the config, if given, is only read for the
                test mapper and the class names).
            device: "cpu", "cuda", "cuda:1" or "auto" (cuda when available); an .onnx file
                runs on the CPU ("cpu" or "auto").
            score_threshold: detections scoring below it are dropped.
            overrides: "key=value" config overrides, checked against the config's keys.
            input_format: "RGB" or "BGR", the channel order of the arrays given to the
                predictor (as detectron2's DefaultPredictor; e.g. "BGR" for OpenCV's images).
                Files are read in the right order whatever it is.
            onnx_threads: ONNX Runtime's intra-op threads (None: its default).
        """
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"input_format must be 'RGB' or 'BGR', got {input_format!r}")
        if checkpoint is None and _is_onnx_file(config_file_or_cfg):
            config_file_or_cfg, checkpoint = None, config_file_or_cfg
        if checkpoint is None:
            raise TypeError("Predictor needs a checkpoint (.pth, with its config) or an .onnx file")
        self.input_format = input_format
        self.score_threshold = float(score_threshold)
        if _is_onnx_file(checkpoint):
            self._init_onnx(config_file_or_cfg, checkpoint, list(overrides), device, onnx_threads)
        else:
            self._init_pytorch(config_file_or_cfg, checkpoint, list(overrides), device)

    def _init_pytorch(self, config, checkpoint, overrides: list[str], device: str) -> None:
        if config is None:
            raise TypeError(f"the checkpoint {checkpoint} needs its config (only an .onnx file "
                            "runs without one)")  # fmt: skip
        self.backend = "pytorch"
        self.cfg = _load(config, overrides)
        self.device = _resolve_device(device)
        self._test_setup_from_config()
        self.model = self._build_model()
        self.uses_ema_weights = load_checkpoint(self.model, checkpoint, use_ema_weights(self.cfg))
        self.model.eval()

    def _init_onnx(self, config, path, overrides: list[str], device: str, threads) -> None:
        """The exported file in ONNX Runtime; the test transform and class names from the
        config when given, else from the file's metadata. (EMA or not was decided at export.)"""
        from rankdetr.export.runtime import OnnxDetector

        if device not in ("cpu", "auto"):
            raise ValueError(f"device {device!r}: an .onnx file runs on the CPU (ONNX Runtime)")
        if overrides and config is None:
            raise ValueError(f"overrides {overrides} need a config; {path} was given without one")
        self.backend = "onnx"
        self.device = torch.device("cpu")
        self.uses_ema_weights = None
        self.model = OnnxDetector(path, threads)
        self.cfg = None if config is None else _load(config, overrides, needs=_ONNX_KEYS)
        if self.cfg is None:
            self.augmentations = self.model.test_augmentations()
            self.image_format = self.model.image_format
            self.max_image_pixels = DEFAULT_MAX_IMAGE_PIXELS
            self.thing_classes = self.model.class_names
        else:
            self._test_setup_from_config()
        _check_onnx_matches(self.model, self.image_format, self.thing_classes)

    def _test_setup_from_config(self) -> None:
        self.augmentations, self.image_format, self.max_image_pixels = _test_transform(self.cfg)
        self.thing_classes = _class_names(self.cfg)

    def _build_model(self) -> torch.nn.Module:
        if self.cfg.model.get("num_classes") is None:
            self.cfg.model.num_classes = len(_train_classes(self.cfg))
        if len(self.thing_classes) != self.cfg.model.num_classes:
            raise ConfigError(
                f"the model has {self.cfg.model.num_classes} classes but the test dataset "
                f"{_dataset_name(self.cfg.dataloader.test)!r} names {len(self.thing_classes)}"
            )
        self.cfg.train.device = str(self.device)
        return build_model(self.cfg)

    def __call__(self, image: np.ndarray | str | Path) -> Prediction:
        """Detect objects in one image (see :class:`Predictor` for the accepted inputs)."""
        return self.predict_batch([image])[0]

    @torch.no_grad()
    def predict_batch(
        self, images: Sequence[np.ndarray | str | Path], batch_size: int = 4
    ) -> list[Prediction]:
        """Detect objects in several images, `batch_size` at a time (padded to a common size;
        an .onnx model runs each image alone, unpadded)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        rgb_images = [self._as_rgb(image) for image in images]
        predictions = []
        for start in range(0, len(rgb_images), batch_size):
            inputs = [self.model_input(image) for image in rgb_images[start : start + batch_size]]
            outputs = self.model(inputs)
            predictions += [self._to_prediction(output["instances"]) for output in outputs]
        return predictions

    def _as_rgb(self, image: np.ndarray | str | Path) -> np.ndarray:
        rgb = as_rgb_image(image, self.max_image_pixels)
        if isinstance(image, np.ndarray) and self.input_format == "BGR":
            rgb = np.ascontiguousarray(rgb[:, :, ::-1])
        return rgb

    def model_input(self, image: np.ndarray) -> dict:
        """(H, W, 3) uint8 RGB -> the model's input dict: resized (3, H', W') uint8 image in the
        model's channel order, and the original height and width to scale the boxes back to."""
        height, width = image.shape[:2]
        augmented = T.AugInput(image)
        T.AugmentationList(self.augmentations)(augmented)
        resized = augmented.image
        if self.image_format == "BGR":
            resized = resized[:, :, ::-1]
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        return {"image": tensor, "height": height, "width": width}

    def _to_prediction(self, instances) -> Prediction:
        instances = instances.to("cpu")
        keep = instances.scores >= self.score_threshold
        classes = instances.pred_classes[keep].numpy().astype(np.int64)
        return Prediction(
            boxes=instances.pred_boxes.tensor[keep].numpy().astype(np.float32),
            scores=instances.scores[keep].numpy().astype(np.float32),
            classes=classes,
            class_names=[self._class_name(c) for c in classes],
            image_size=tuple(instances.image_size),
        )

    def _class_name(self, label: int) -> str:
        # An .onnx file exported without class names (unregistered dataset) still predicts.
        return f"class {label}" if self.thing_classes is None else self.thing_classes[label]


def _is_onnx_file(path) -> bool:
    # By suffix, here rather than from rankdetr.export: `import rankdetr` keeps ONNX out.
    return isinstance(path, (str, Path)) and Path(path).suffix.lower() == ".onnx"


_PYTORCH_KEYS = ("model", "dataloader.test.mapper")
_ONNX_KEYS = ("dataloader.test.mapper",)


def _check_onnx_matches(model, image_format: str, class_names: list[str] | None) -> None:
    """A config given beside an .onnx file must agree with it on what changes the detections:
    the channel order and the number of classes."""
    if image_format != model.image_format:
        raise ConfigError(f"the config's test images are {image_format} but {model.path} was "
                          f"exported for {model.image_format}")  # fmt: skip
    stored = model.class_names
    if class_names is not None and stored is not None and len(class_names) != len(stored):
        raise ConfigError(f"the config names {len(class_names)} classes but {model.path} was "
                          f"exported with {len(stored)}")  # fmt: skip


def _load(config_file_or_cfg, overrides: list[str], needs=_PYTORCH_KEYS) -> DictConfig:
    """A config file or a config -> a private, overridden copy, checked for what inference needs."""
    if isinstance(config_file_or_cfg, (str, Path)):
        cfg = load_config(str(config_file_or_cfg), overrides)
        source = str(config_file_or_cfg)
    elif isinstance(config_file_or_cfg, DictConfig):
        cfg = apply_checked_overrides(copy.deepcopy(config_file_or_cfg), overrides)
        source = "the given config"
    else:
        raise TypeError(f"expected a config file path or a DictConfig, got "
                        f"{type(config_file_or_cfg).__name__}")  # fmt: skip
    for key in needs:
        if OmegaConf.select(cfg, key) is None:
            raise ConfigError(f"{source} has no {key!r}: the predictor needs the model and the "
                              "test mapper (its resize and image format)")  # fmt: skip
    if "train" not in cfg:
        cfg.train = {}
    return cfg


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but no CUDA GPU is available; use 'cpu'")
    return resolved


def _test_transform(cfg: DictConfig) -> tuple[list, str, int | None]:
    """The test mapper's augmentations (resize), image format ("RGB" or "BGR") and pixel
    limit."""
    mapper = instantiate(cfg.dataloader.test.mapper)
    augmentation = getattr(mapper, "augmentation", None)
    if augmentation is None:
        raise ConfigError(f"dataloader.test.mapper ({type(mapper).__name__}) has no "
                          "`augmentation` to resize the images with")  # fmt: skip
    limit = getattr(mapper, "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)
    return list(augmentation), getattr(mapper, "img_format", "RGB"), limit


def _dataset_name(loader_cfg: DictConfig) -> str | None:
    names = OmegaConf.select(loader_cfg, "dataset.names")
    if names is None or isinstance(names, str):
        return names
    return names[0]


def _thing_classes(name: str | None, key: str) -> list[str]:
    if name is None:
        raise ConfigError(f"the config has no {key}: cannot tell the class names")
    try:
        return class_names_of(name)
    except (UnknownDatasetError, DatasetFormatError) as error:
        raise ConfigError(f"{key}: {error}") from error


def _train_classes(cfg: DictConfig) -> list[str]:
    return _thing_classes(_dataset_name(cfg.dataloader.train), "dataloader.train.dataset.names")


def _class_names(cfg: DictConfig) -> list[str]:
    """The test dataset's class names; the training dataset's when the config has no test names."""
    if _dataset_name(cfg.dataloader.test) is None and "train" in cfg.dataloader:
        return _train_classes(cfg)
    return _thing_classes(_dataset_name(cfg.dataloader.test), "dataloader.test.dataset.names")
