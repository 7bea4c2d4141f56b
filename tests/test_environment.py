"""The installed environment: rankdetr with its extension, and a detectron2 that works here."""

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import rankdetr


def test_rankdetr_extension_is_built():
    assert rankdetr.extension_available(), "rankdetr._C is missing: run `make setup`"
    schema = torch.ops.rankdetr.ms_deform_attn_forward.default._schema
    assert str(schema).startswith("rankdetr::ms_deform_attn_forward(Tensor value")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("rankdetr::ms_deform_attn_forward", "CPU")


def test_missing_extension_warns_once_and_still_imports():
    # Block `rankdetr._C` in a fresh interpreter, as if it had never been built.
    code = """
import importlib.abc, sys, warnings
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "rankdetr._C":
            raise ImportError("blocked by the test")
sys.meta_path.insert(0, Block())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import rankdetr
    from rankdetr._ext import extension_available
    assert extension_available() is False and extension_available() is False
messages = [str(w.message) for w in caught if "rankdetr._C" in str(w.message)]
assert len(messages) == 1, messages
assert "pure-PyTorch" in messages[0] and "blocked by the test" in messages[0]
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_detectron2_imports_with_the_modules_rankdetr_uses():
    import detectron2
    from detectron2.checkpoint import DetectionCheckpointer  # noqa: F401
    from detectron2.config import LazyConfig, instantiate  # noqa: F401
    from detectron2.data import build_detection_train_loader  # noqa: F401
    from detectron2.engine import SimpleTrainer, launch  # noqa: F401
    from detectron2.evaluation import COCOEvaluator  # noqa: F401
    from detectron2.modeling import ResNet  # noqa: F401
    from detectron2.structures import Boxes, ImageList, Instances  # noqa: F401

    assert detectron2.__version__.startswith("0.")


def test_detectron2_works_with_numpy2_and_pillow10():
    # v0.6 used np.int in this histogram and Image.LINEAR in transforms, both gone now.
    from detectron2.data.build import print_instances_class_histogram
    from detectron2.data.transforms import ExtentTransform

    dicts = [{"annotations": [{"category_id": 0}, {"category_id": 1, "iscrowd": 0}]}]
    print_instances_class_histogram(dicts, ["a", "b"])
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    assert ExtentTransform((0, 0, 8, 8), (4, 4)).apply_image(image).shape == (4, 4, 3)


def test_detectron2_stub_ops_fail_with_a_clear_message():
    import detectron2._C as d2c

    if getattr(d2c, "__file__", "").endswith(".so"):
        pytest.skip("a compiled detectron2 is installed")
    with pytest.raises(AttributeError, match="without its C.. ops"):
        d2c.box_iou_rotated  # noqa: B018


def test_lazyconfig_round_trip(tmp_path):
    from detectron2.config import LazyConfig, instantiate

    config_file = tmp_path / "cfg.py"
    config_file.write_text(
        "from detectron2.config import LazyCall as L\n"
        "import torch\n"
        "model = L(torch.nn.Linear)(in_features=3, out_features=2)\n"
        "train = dict(max_iter=10)\n"
    )
    cfg = LazyConfig.load(str(config_file))
    cfg = LazyConfig.apply_overrides(cfg, ["train.max_iter=20", "model.out_features=5"])
    assert instantiate(cfg.model).out_features == 5
    LazyConfig.save(cfg, str(tmp_path / "saved.yaml"))
    assert LazyConfig.load(str(tmp_path / "saved.yaml")).train.max_iter == 20


def _all_reduce_worker(expected_world_size):
    import torch.distributed as dist

    assert dist.get_world_size() == expected_world_size
    tensor = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(tensor)
    assert tensor.item() == sum(range(1, expected_world_size + 1))
    # detectron2's worker leaves the group to the interpreter's exit, where GLOO's threads can
    # abort the process ("terminate called without an active exception", seen under load).
    dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (GLOO) path of launch")
def test_detectron2_launch_runs_two_processes_without_a_gpu():
    from detectron2.engine import launch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        launch(_all_reduce_worker, 2, dist_url="auto", args=(2,))
