"""Shared pytest fixtures and paths."""

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from rankdetr.data import datasets

REPO_ROOT = Path(__file__).resolve().parents[1]


def load_tool(path: Path, name: str) -> ModuleType:
    """A script of tools/ imported as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
