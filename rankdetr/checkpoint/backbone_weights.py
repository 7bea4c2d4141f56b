"""Loads ImageNet backbone weights from a local file: torchvision, detectron2 (.pkl), Microsoft's
Swin or timm.

Nothing is downloaded. Files are read without running code from them: torch files with
`weights_only=True`, detectron2 pickles with an unpickler that only rebuilds plain containers and
NumPy arrays (anything else is refused with the name of what the file asked for).
"""

from __future__ import annotations

import io
import logging
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import nn

from rankdetr.checkpoint.swin import (
    convert_swin_state_dict,
    is_swin_classification_checkpoint,
    swin_sizes,
)
from rankdetr.errors import UserError

__all__ = ["load_backbone_weights", "read_checkpoint_file", "read_weights_file", "CheckpointError"]

logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError, UserError):
    """A weights file that cannot be read or does not fit the model; the message names it."""


# Globals a detectron2 .pkl may reference: NumPy's array reconstruction and plain containers.
_SAFE_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
    ("builtins", "dict"),
    ("builtins", "list"),
    ("builtins", "tuple"),
    ("builtins", "set"),
}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _SAFE_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weights file")
        return super().find_class(module, name)


def read_checkpoint_file(path: str | Path) -> Any:
    """What a checkpoint file holds, read without running code from it: `.pkl` (detectron2,
    Caffe2) through an unpickler that only rebuilds containers and NumPy arrays, `.safetensors`
    by safetensors, anything else by `torch.load(weights_only=True)`. The one reader of
    checkpoint files: the checkpointer, the tools and the backbone loader all call it.

    Raises:
        CheckpointError naming the file when it is missing, truncated, corrupt, or asks to
        rebuild objects other than tensors, arrays and containers.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        if path.suffix == ".pkl":
            with open(path, "rb") as handle:
                return _ArraysOnlyUnpickler(io.BytesIO(handle.read()), encoding="latin1").load()
        if path.suffix == ".safetensors":
            return safetensors.torch.load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001  (any failure to parse means a bad file)
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise CheckpointError(
            f"cannot load checkpoint {path}: {type(error).__name__}: {first_line} (files are "
            "read without running code from them: one that is truncated, corrupt, or holds "
            "objects other than tensors, arrays and containers is refused)"
        ) from error


def read_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict (name -> tensor) from .pkl (detectron2), .safetensors or a torch file
    (:func:`read_checkpoint_file`).

    Unwraps {"model": ...} and {"state_dict": ...}. Raises CheckpointError naming the file when
    it is missing, truncated, corrupt, or holds something other than tensors.
    """
    path = Path(path)
    data = read_checkpoint_file(path)
    for key in ("model", "state_dict"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not a dict of tensors")
    tensors = {}
    for name, value in data.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if isinstance(value, torch.Tensor):
            tensors[str(name)] = value
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors")
    return tensors


def torchvision_resnet_to_detectron2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision ResNet names (conv1, bn1, layer1.0.downsample.1, ...) -> detectron2's."""
    converted = {}
    for name, tensor in state.items():
        if name.startswith("fc.") or name.endswith("num_batches_tracked"):
            continue
        new = re.sub(r"^conv1\.", "stem.conv1.", name)
        new = re.sub(r"^bn1\.", "stem.conv1.norm.", new)
        new = re.sub(r"^layer(\d)\.", lambda m: f"res{int(m.group(1)) + 1}.", new)
        new = re.sub(r"\.downsample\.0\.", ".shortcut.", new)
        new = re.sub(r"\.downsample\.1\.", ".shortcut.norm.", new)
        new = re.sub(r"\.bn(\d)\.", r".conv\1.norm.", new)
        converted[new] = tensor
    return converted


def timm_to_features_only(state: dict[str, torch.Tensor], body: nn.Module) -> dict:
    """A timm classification checkpoint -> the names of its `features_only` wrapper.

    Original (Microsoft) Swin checkpoints are first converted by timm's own filter.
    """
    import timm

    model_name = getattr(body, "pretrained_cfg", {}).get("architecture")
    if model_name and "swin" in model_name and "relative_position_index" in str(list(state)):
        from timm.models.swin_transformer import checkpoint_filter_fn

        full = timm.create_model(model_name, pretrained=False, strict_img_size=False)
        state = checkpoint_filter_fn(state, full)
    # FeatureListNet flattens nested module names: "layers.0." -> "layers_0.".
    return {re.sub(r"^(layers|stages|blocks)\.(\d+)\.", r"\1_\2.", k): v for k, v in state.items()}


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load ImageNet weights into a :class:`ResNetBackbone`, :class:`SwinBackbone` or
    :class:`TimmBackbone`.

    Recognises torchvision and detectron2 names (also Caffe2 / MSRA .pkl names) for ResNets,
    Microsoft's and detectron2's names for Swin, and timm names for timm models. Every backbone
    tensor must be found, except a Swin's output norms when the file is an ImageNet classifier
    (they keep their initialisation, as in the release); classifier weights are ignored.
    """
    from rankdetr.modeling.backbone import TimmBackbone
    from rankdetr.modeling.swin import SwinBackbone

    state = read_weights_file(path)
    optional: set[str] = set()
    if isinstance(backbone, SwinBackbone):
        state = {re.sub(r"^backbone\.", "", k): v for k, v in state.items()}
        if is_swin_classification_checkpoint(state):
            optional = {k for k in backbone.state_dict() if re.match(r"^norm\d+\.", k)}
        try:
            state = convert_swin_state_dict(state)
        except (KeyError, ValueError) as error:
            raise CheckpointError(f"{path}: {error}") from error
        target = backbone
    elif isinstance(backbone, TimmBackbone):
        state = timm_to_features_only(state, backbone.body)
        target = backbone.body
    else:
        state = _resnet_state_to_detectron2(state)
        target = backbone
    expected = {k: v for k, v in target.state_dict().items() if k not in optional or k in state}
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(
            f"{path} lacks {len(missing)} backbone tensors, e.g. {missing[:3]}: are these the "
            f"weights of a {type(backbone).__name__} of this size?"
        )
    wrong = [k for k in expected if state[k].shape != expected[k].shape]
    if wrong:
        k = wrong[0]
        raise CheckpointError(
            f"{path}: {k} has shape {tuple(state[k].shape)}, the backbone needs "
            f"{tuple(expected[k].shape)} ({len(wrong)} tensors differ)"
        )
    if isinstance(backbone, SwinBackbone):
        # The converter already dropped the classifier: what is left must all have a place.
        extra = sorted(set(state) - set(expected))
        if extra:
            raise CheckpointError(
                f"{path} holds {len(extra)} Swin tensors this backbone has no place for, e.g. "
                f"{extra[:3]}: it is a Swin of another size ({swin_sizes(state)})"
            )
    target.load_state_dict({k: state[k] for k in expected}, strict=not optional)
    ignored = sorted(set(state) - set(expected))
    logger.info("Loaded backbone weights from %s (ignored %d tensors: %s)", path, len(ignored),
                ignored[:5])  # fmt: skip


def _resnet_state_to_detectron2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if any(k.startswith("layer1.") for k in state):
        return torchvision_resnet_to_detectron2(state)
    if any(k.endswith("_w") or k.endswith("_b") for k in state):  # Caffe2 / MSRA names
        from detectron2.checkpoint.c2_model_loading import convert_c2_detectron_names

        state, _ = convert_c2_detectron_names(state)
    # Names already in detectron2's form, possibly under a "backbone." prefix.
    return {re.sub(r"^backbone\.(bottom_up\.)?", "", k): v for k, v in state.items()}
