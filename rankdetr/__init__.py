"""rankdetr: Rank-DETR (NeurIPS 2023) detectors on detectron2."""

from rankdetr._ext import extension_available

__version__ = "0.1.0"

# Load the compiled op now so that a missing build is reported once, at import.
extension_available()

# Imported on first use: the predictor pulls in detectron2, which `import rankdetr` should not.
_LAZY = {"Predictor": "rankdetr.predictor", "Prediction": "rankdetr.predictor"}

__all__ = ["__version__", "extension_available", "Predictor", "Prediction"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rankdetr' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
