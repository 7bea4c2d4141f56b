"""rankdetr: Rank-DETR (NeurIPS 2023) detectors on detectron2."""

from rankdetr._ext import extension_available

__version__ = "0.1.0"

# Load the compiled op now so that a missing build is reported once, at import.
extension_available()

__all__ = ["__version__", "extension_available"]
