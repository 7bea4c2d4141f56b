"""Shared fixtures of the data tests."""

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from rankdetr.data import datasets


@pytest.fixture(autouse=True)
def isolated_catalogs():
    """Undo every registration a test makes (the catalogs are process-wide)."""
    saved = (dict(DatasetCatalog), dict(MetadataCatalog), dict(datasets._REGISTERED))
    yield
    for catalog, entries in zip((DatasetCatalog, MetadataCatalog, datasets._REGISTERED), saved):
        catalog.clear()
        catalog.update(entries)
