"""tools/install_detectron2.py: the repairs of v0.6 and the archive check, without a network."""

from pathlib import Path

import pytest

from tests.conftest import load_tool

TOOL = Path(__file__).resolve().parents[2] / "tools" / "install_detectron2.py"


@pytest.fixture(scope="module")
def installer():
    return load_tool(TOOL, "install_detectron2")


LAUNCH_V06 = """def _distributed_worker(local_rank, main_func, world_size, num_gpus_per_machine):
    assert torch.cuda.is_available(), "cuda is not available. Please check your installation."
    global_rank = local_rank
    dist.init_process_group(
        backend="NCCL",
        init_method=dist_url,
    )
    assert num_gpus_per_machine <= torch.cuda.device_count()
    torch.cuda.set_device(local_rank)
    comm.synchronize()
"""


def make_fake_v06(root: Path) -> Path:
    """A tiny tree with the v0.6 lines the installer repairs."""
    package = root / "detectron2"
    (package / "data" / "transforms").mkdir(parents=True)
    (package / "engine").mkdir()
    (package / "data" / "transforms" / "transform.py").write_text(
        "def f(interp=Image.LINEAR):\n    return Image.BICUBIC\n"
    )
    (package / "data" / "build.py").write_text(
        "a = np.zeros((3,), dtype=np.int)\nb = x.astype(np.bool)\nc = np.float\n"
        "d = np.int64(1) + np.float32(2) + np.bool_(3)\ne = np.str_('s')\nf = np.int.__name__\n"
    )
    (package / "engine" / "launch.py").write_text(LAUNCH_V06)
    (root / "setup.cfg").write_text("[isort]\n")
    return root


def test_repairs_apply_to_v06_sources(installer, tmp_path):
    source = make_fake_v06(tmp_path)
    installer.repair_v06_sources(source)
    package = source / "detectron2"
    transform = (package / "data/transforms/transform.py").read_text()
    assert "Image.BILINEAR" in transform and "Image.LINEAR" not in transform
    build = (package / "data/build.py").read_text()
    assert "dtype=int)" in build and "astype(bool)" in build and "c = float\n" in build
    # Sized types and the underscore types are real NumPy 2 names and must stay.
    assert "np.int64(1) + np.float32(2) + np.bool_(3)" in build and "np.str_('s')" in build
    launch = (package / "engine/launch.py").read_text()
    assert 'backend="NCCL" if has_gpu else "GLOO"' in launch
    assert "    if has_gpu:\n        assert num_gpus_per_machine" in launch
    assert "assert torch.cuda.is_available()" not in launch
    stub = (package / "_C.py").read_text()
    assert "def __getattr__" in stub
    assert 'version="0.6+rankdetr"' in (source / "setup.py").read_text()
    assert not (source / "setup.cfg").exists()


def test_repairs_refuse_an_unexpected_archive(installer, tmp_path):
    source = make_fake_v06(tmp_path)
    launch = source / "detectron2/engine/launch.py"
    launch.write_text(LAUNCH_V06.replace('backend="NCCL",', 'backend="gloo",'))
    with pytest.raises(SystemExit, match="expected 1 occurrence"):
        installer.repair_v06_sources(source)


def test_a_damaged_archive_is_refused_and_deleted(installer, tmp_path):
    archive = tmp_path / installer.PB1_ARCHIVE
    archive.write_bytes(b"not the release")
    with pytest.raises(SystemExit, match="does not match the verified v0.6 archive"):
        installer.download_pb1_archive(tmp_path)
    assert not archive.exists()


def test_stub_module_names_the_missing_op(installer, tmp_path):
    namespace = {}
    exec(compile(installer.STUB_C, "stub", "exec"), namespace)
    with pytest.raises(AttributeError, match="detectron2._C.nms_rotated is unavailable"):
        namespace["__getattr__"]("nms_rotated")
    assert namespace["has_cuda"]() is False
