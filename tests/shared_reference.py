"""Reference data produced by running the original code, read from ../shared/reference.

CI has it; a checkout without ../shared skips the tests that need it, naming the missing file.
"""

from pathlib import Path

import pytest
import torch

SHARED_REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


def load_shared_reference(relative: str) -> dict:
    """torch.load(weights_only=True) of ../shared/reference/<relative>, or skip naming it."""
    path = SHARED_REFERENCE / relative
    if not path.is_file():
        pytest.skip(f"reference data not found: {path}")
    return torch.load(path, weights_only=True)
