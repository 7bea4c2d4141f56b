"""tools/train_net.py as users run it: bad overrides, and a two-process CPU (GLOO) run."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from rankdetr.engine.precision import choose_amp_dtype
from tests.warm_python import run_python

ROOT = Path(__file__).resolve().parents[2]
TRAIN_NET = ROOT / "tools" / "train_net.py"
DEMO = ROOT / "configs" / "demo" / "rank_detr_r18_shapes.py"


def run_train_net(*args, env=None, timeout=600, config=DEMO):
    return run_python(
        [sys.executable, str(TRAIN_NET), "--config-file", str(config), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def test_wrong_override_key_fails_with_its_name(tmp_path):
    result = run_train_net(f"train.output_dir={tmp_path}", "train.max_itr=5")
    assert result.returncode == 1
    assert "train.max_itr" in result.stderr and "train.max_iter" in result.stderr


def write_square_dataset(root: Path) -> Path:
    """Four 96x96 images with one or two boxes each, in COCO format: equal sizes, so that a batch
    of two needs no padding (padding would change GroupNorm's statistics)."""
    from PIL import Image

    (root / "images").mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    images, annotations = [], []
    for index in range(4):
        pixels = torch.randint(0, 256, (96, 96, 3), generator=generator, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(root / "images" / f"{index}.png")
        images.append({"id": index + 1, "file_name": f"{index}.png", "height": 96, "width": 96})
        for k in range(1 + index % 2):
            x, y = 10 + 30 * k + 5 * index, 12 + 20 * k
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1,
                                "category_id": 1 + (index + k) % 2, "bbox": [x, y, 30, 40],
                                "area": 1200, "iscrowd": 0})  # fmt: skip
    categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    json_file = root / "instances.json"
    json_file.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return json_file


SQUARE_CONFIG = """
from detectron2.config import LazyConfig
from rankdetr.data import register_coco_format

register_coco_format("square_train", {json!r}, {images!r})
_demo = LazyConfig.load({demo!r})
model, optimizer, lr_multiplier, dataloader, train = (
    _demo[k] for k in ("model", "optimizer", "lr_multiplier", "dataloader", "train")
)
dataloader.train.dataset.names = "square_train"
model.num_classes = 2
"""


@pytest.mark.slow(seconds=20)
def test_two_processes_end_with_the_weights_of_one_process_with_the_same_total_batch(tmp_path):
    """Two GLOO processes with batch 1 each against one process with batch 2, 3 iterations.

    Equal in exact arithmetic: rank r takes stream positions r, r + 2, ... (the single process
    takes them all, in the same order), each sample's augmentation is seeded by its position,
    the loss is normalised by the boxes averaged over processes, and DDP averages gradients, so
    the gradient is the same sum. Batch statistics are kept out (FrozenBN; equal image sizes, so
    no padding enters GroupNorm). What differs is the summation order, about 1e-7 relative, and
    AdamW's first steps divide each gradient by its own magnitude, so an element whose gradient
    is itself at rounding level can move by up to lr either way. Hence: 99.9 % of the elements
    within 1e-5 (absolute, lr = 6e-4), and every element within 2 * lr per step.
    """
    json_file = write_square_dataset(tmp_path / "data")
    config = tmp_path / "square.py"
    images = json_file.parent / "images"
    config.write_text(SQUARE_CONFIG.format(json=str(json_file), images=str(images), demo=str(DEMO)))
    common = [
        "train.device=cpu",
        "train.max_iter=3",
        "train.eval_period=0",
        "dataloader.evaluator=None",  # no evaluation after the last iteration
        "train.log_period=1",
        "train.seed=5",
        "train.checkpointer.period=100",
        "dataloader.train.total_batch_size=2",
        "dataloader.train.num_workers=0",
        "dataloader.train.mapper.augmentation.1.short_edge_length=[96]",
        "dataloader.train.mapper.augmentation.1.max_size=96",
        "dataloader.train.mapper.crop_probability=0.0",
        "model.backbone.norm=FrozenBN",
        # float32: the demo's amp "auto" is bf16 on CPUs with native bf16, whose rounding
        # would hide the difference between one and two processes that this test measures.
        "train.amp.enabled=False",
    ]
    weights = []
    for processes in (1, 2):
        out = tmp_path / f"out{processes}"
        result = run_train_net(
            "--num-gpus", str(processes), *common, f"train.output_dir={out}",
            env={"GLOO_SOCKET_IFNAME": "lo"}, config=config,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "iter: 2" in result.stdout + result.stderr
        weights.append(torch.load(out / "model_final.pth", weights_only=True)["model"])
    one, two = weights
    differences = torch.cat(
        [
            (one[k].float() - two[k].float()).abs().flatten()
            for k in one
            if one[k].is_floating_point()
        ]
    )
    assert differences.numel() > 1e6
    assert (differences <= 1e-5).float().mean() >= 0.999, differences.quantile(0.999)
    assert differences.max() <= 2 * 6e-4 * 3


def test_the_demo_trains_under_bf16_autocast(tmp_path):
    """The command that crashed before the op had an autocast contract (issue: AMP on real
    models): two iterations of the demo config with bf16 autocast (train.amp.enabled) on the CPU,
    at batch 2 (two images, padded to one size: on CPUs without bf16 units batch 4 took 14 s)."""
    result = run_train_net(
        "train.amp.enabled=True",
        "train.amp.dtype=bf16",
        "train.max_iter=2",
        "dataloader.train.total_batch_size=2",
        "train.eval_period=0",
        "dataloader.evaluator=None",  # no evaluation after the last iteration
        "train.log_period=1",
        "dataloader.train.num_workers=0",
        f"train.output_dir={tmp_path / 'out'}",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "out" / "model_final.pth").is_file()
    output = result.stdout + result.stderr
    assert "iter: 1" in output
    (precision,) = [line for line in output.splitlines() if "Training precision on cpu" in line]
    assert "bf16 autocast" in precision
    # Where the CPU has no bf16 units the log warns that bf16 is slow here.
    assert ("WARNING" in precision) == choose_amp_dtype("bf16", "cpu").slow, precision
