"""Running an exported .onnx detector (see :mod:`rankdetr.export.onnx` for the graph's contract)
with ONNX Runtime, in the place of the PyTorch model.

:class:`OnnxDetector` takes detectron2-style inputs and returns what the PyTorch model returns
in eval mode, so the predictor and detectron2's ``inference_on_dataset`` use it unchanged:

    detector = OnnxDetector("model.onnx")
    detector([{"image": image_chw_uint8, "height": h, "width": w}])  # -> [{"instances": ...}]

The test transform (resize) and class names come from the file's metadata
(:meth:`OnnxDetector.test_augmentations`, :attr:`OnnxDetector.class_names`), so the file alone
is enough to predict.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.structures import Boxes, Instances
from detectron2.utils.registry import locate

from rankdetr.errors import UserError
from rankdetr.export.onnx import (
    fixed_input_shape,
    onnx_session,
    read_metadata,
    require_onnx_packages,
)

__all__ = ["OnnxDetector", "OnnxInputError", "OnnxMetadataError"]


class OnnxInputError(UserError, ValueError):
    """ONNX Runtime refused an input (e.g. a wrong channel count); the message names the file."""


class OnnxMetadataError(UserError, ValueError):
    """The .onnx file lacks (or has unusable) rankdetr metadata; the message names the file."""


class OnnxDetector:
    """An exported detector in an ONNX Runtime CPU session, called like the PyTorch model.

    It has the few parts of an nn.Module that inference code uses (``training``, ``eval()``,
    ``train(mode)``); there are no gradients to switch off.
    """

    def __init__(self, path: str | Path, threads: int | None = None):
        """
        Args:
            path: the exported .onnx file.
            threads: ONNX Runtime's intra-op threads (None: its default, one per core).
        """
        require_onnx_packages("onnx", "onnxruntime")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {self.path}")
        self.metadata = read_metadata(self.path)
        self.session = onnx_session(self.path, threads)
        self.training = False
        self.fixed_shape = fixed_input_shape(self.path)  # (N, 3, H, W), None where dynamic

    # --- the nn.Module surface that detectron2's inference_on_dataset touches ---------------

    def eval(self) -> OnnxDetector:
        return self

    def train(self, mode: bool = True) -> OnnxDetector:
        if mode:
            raise ValueError(f"{self.path}: an ONNX model can only infer, not train")
        return self

    # --- metadata -----------------------------------------------------------------------------

    @property
    def image_format(self) -> str:
        """Channel order the graph expects ("RGB" or "BGR"; RGB when the file does not say)."""
        return self.metadata.get("image_format", "RGB")

    @property
    def class_names(self) -> list[str] | None:
        """The class names stored at export (index = label), or None when not stored."""
        names = self.metadata.get("class_names")
        return None if names is None else list(json.loads(names))

    def test_augmentations(self) -> list[T.Augmentation]:
        """The config's test augmentations rebuilt from the metadata (e.g. ResizeShortestEdge).

        Only detectron2 / rankdetr Augmentation classes are built: the file is data, and a
        ``_target_`` naming any other callable is refused rather than called.
        """
        text = self.metadata.get("test_augmentation")
        if text is None:
            raise OnnxMetadataError(f"{self.path} has no rankdetr.test_augmentation metadata: "
                                    "give the predictor the config too")  # fmt: skip
        return [self._augmentation(node) for node in json.loads(text)]

    def _augmentation(self, node: dict) -> T.Augmentation:
        target = node.get("_target_") if isinstance(node, dict) else None
        cls = locate(target) if isinstance(target, str) else None
        if not (isinstance(cls, type) and issubclass(cls, T.Augmentation)):
            raise OnnxMetadataError(
                f"{self.path}: test augmentation {target!r} is not a detectron2 Augmentation"
            )
        return cls(**{k: v for k, v in node.items() if k != "_target_"})

    # --- inference ----------------------------------------------------------------------------

    def __call__(self, batched_inputs: list[dict]) -> list[dict]:
        """detectron2 inputs -> [{"instances": Instances}] in each input's height x width.

        Args:
            batched_inputs: dicts with "image", a (C, H, W) tensor (uint8 or float, 0..255) in
                :attr:`image_format`, and optionally "height", "width" of the original image
                (default: H, W), which the boxes are scaled to, as the PyTorch model does.

        Each image is its own session run (N=1): a graph batch has a single size, and the
        PyTorch model's padding to a common size would change the detections anyway.
        """
        return [self._infer_one(x) for x in batched_inputs]

    def _infer_one(self, item: dict) -> dict:
        image = torch.as_tensor(item["image"])
        in_h, in_w = image.shape[-2:]
        out_h, out_w = item.get("height", in_h), item.get("width", in_w)
        boxes, scores, labels = self.run(image.float().cpu().numpy()[None])
        scale = np.array([out_w / in_w, out_h / in_h] * 2, dtype=np.float32)
        instances = Instances((out_h, out_w))
        instances.pred_boxes = Boxes(torch.from_numpy(boxes[0] * scale))
        instances.pred_boxes.clip((out_h, out_w))
        instances.scores = torch.from_numpy(scores[0])
        instances.pred_classes = torch.from_numpy(labels[0])
        return {"instances": instances}

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The graph on (N, 3, H, W) float32 images -> boxes (N, D, 4) XYXY input pixels,
        scores (N, D), labels (N, D) int64. ONNX Runtime's refusal of the input (a wrong
        channel count, an image too small for the queries) is an :class:`OnnxInputError`, as is
        any other shape than a fixed-shape file's own."""
        from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument

        if self.fixed_shape is not None and tuple(images.shape) != self.fixed_shape:
            raise OnnxInputError(
                f"{self.path} was exported for one input shape, {self.fixed_shape} (N, 3, H, W), "
                f"and got {tuple(images.shape)}: export without --input-shape for images of "
                "any size, or resize them to that size"
            )
        try:
            boxes, scores, labels = self.session.run(None, {"image": images})
        except (InvalidArgument, Fail) as error:
            message = " ".join(str(error).split())  # ORT's text spans lines; one line here
            raise OnnxInputError(
                f"{self.path} refused an input of shape {tuple(images.shape)}: {message}"
            ) from error
        return boxes, scores, labels
