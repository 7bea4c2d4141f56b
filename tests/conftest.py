"""Shared pytest fixtures and paths."""

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog

from rankdetr.data import datasets

REPO_ROOT = Path(__file__).resolve().parents[1]


def load_tool(path: Path, name: str) -> ModuleType:
    """A script of tools/ imported as a module (tools/ is not a package), registered in
    sys.modules under `name` as an import would be (dataclasses look their module up there)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
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


def _usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's cpuset), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per usable core, at most one per 4 GB of memory (a worker can hold
    a few GB: R50 / Swin models, ONNX exports)."""
    try:
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        memory_gb = 4.0 * _usable_cores()
    return max(1, min(_usable_cores(), int(memory_gb // 4)))


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs `-n auto`), each worker gets an equal share of the
    cores: torch in the worker, and OMP/MKL for the tools the tests start as subprocesses. Without
    this every worker would use all cores and the workers would fight over them."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not workers:
        return
    threads = max(1, _usable_cores() // int(workers))
    torch.set_num_threads(threads)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)


def pytest_collection_modifyitems(config, items):
    """Files run longest first, by what their `slow` marks declare: `slow(seconds=N)` for the
    longest tests, a bare `slow` counts 1 s, other tests 0 (the order is otherwise kept). With
    xdist's `--dist loadfile --no-loadscope-reorder` a file is one unit of work, handed out in
    this order: a long file started last would leave the other workers idle at the end."""
    file_seconds: dict = {}
    for item in items:
        marker = item.get_closest_marker("slow")
        seconds = marker.kwargs.get("seconds", 1) if marker else 0
        file_seconds[item.path] = max(file_seconds.get(item.path, 0), seconds)
    items.sort(key=lambda item: -file_seconds[item.path])
