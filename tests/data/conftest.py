"""Shared fixtures of the data tests."""

import pytest


@pytest.fixture(autouse=True)
def _every_data_test_isolates_the_catalogs(isolated_catalogs):
    """Every data test registers datasets: undo them afterwards (tests/conftest.py)."""
    yield
