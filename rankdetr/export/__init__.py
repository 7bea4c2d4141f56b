"""Deployment exports of trained detectors (ONNX: :mod:`rankdetr.export.onnx`) and running them
(ONNX Runtime: :mod:`rankdetr.export.runtime`).

Nothing here is imported by ``import rankdetr``: onnx, onnxruntime and onnxscript are an
optional extra (``pip install -e .[onnx]``), needed only when exporting, checking or running an
exported file (they are imported on first use, so importing this package works without them).
"""

from rankdetr.export.runtime import OnnxDetector, OnnxInputError, OnnxMetadataError

__all__ = ["OnnxDetector", "OnnxInputError", "OnnxMetadataError"]
