"""Shared pytest fixtures and paths."""

from pathlib import Path

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from rankdetr.data import datasets

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def isolated_catalogs():
    """Undo every dataset registration a test makes (the catalogs are process-wide)."""
    saved = (dict(DatasetCatalog), dict(MetadataCatalog), dict(datasets._REGISTERED))
    yield
    for catalog, entries in zip((DatasetCatalog, MetadataCatalog, datasets._REGISTERED), saved):
        catalog.clear()
        catalog.update(entries)
