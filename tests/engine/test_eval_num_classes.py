"""--eval-only checks model.num_classes against the test data before any inference, as training
checks it against the training data: a mismatch is one line naming both numbers, not
detectron2's evaluator failing after the whole inference."""

import json
import re

import numpy as np
import pytest
from PIL import Image

import rankdetr.engine.runner as runner
from rankdetr.data import register_coco_format, register_shapes_dataset
from rankdetr.data.datasets import num_classes_of
from tests.engine.test_lock_first import train_net
from tests.test_predictor import TINY_OVERRIDES


def write_two_class_data(folder):
    """Two 64 x 48 images with one box each, in two classes ("cat", "dog")."""
    (folder / "images").mkdir(parents=True)
    images, annotations = [], []
    for index in (1, 2):
        Image.fromarray(np.full((48, 64, 3), 40 * index, np.uint8)).save(
            folder / "images" / f"{index}.png"
        )
        images.append({"id": index, "file_name": f"{index}.png", "width": 64, "height": 48})
        annotations.append({"id": index, "image_id": index, "category_id": index,
                            "bbox": [8, 8, 20, 16], "area": 320, "iscrowd": 0})  # fmt: skip
    categories = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    json_file = folder / "instances.json"
    json_file.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return json_file


@pytest.fixture
def two_class_test_data(tmp_path, isolated_catalogs, monkeypatch):
    """Shapes as the training data, a two-class file as the test data; inference is recorded."""
    register_shapes_dataset(root=tmp_path / "shapes", num_images={"train": 2, "val": 2})
    json_file = write_two_class_data(tmp_path / "two")
    register_coco_format("two_val", json_file, json_file.parent / "images")
    inferred = []
    real = runner.inference_on_dataset
    monkeypatch.setattr(
        runner, "inference_on_dataset", lambda *a, **k: inferred.append(1) or real(*a, **k)
    )
    return ["dataloader.test.dataset.names=two_val", "dataloader.test.num_workers=0",
            f"train.output_dir={tmp_path / 'out'}"], inferred  # fmt: skip


@pytest.mark.parametrize("num_classes", ["5", "None"])
def test_a_class_count_other_than_the_test_datas_is_refused_before_inference(
    two_class_test_data, monkeypatch, capsys, num_classes
):
    """5 classes, or None (the training data's count, as training takes it): what the test data
    has is what counts."""
    overrides, inferred = two_class_test_data
    expected_count = num_classes_of("shapes_train") if num_classes == "None" else 5
    assert expected_count != 2
    with pytest.raises(SystemExit) as exit_info:
        train_net(monkeypatch, "--eval-only", *overrides, *TINY_OVERRIDES,
                  f"model.num_classes={num_classes}")  # fmt: skip
    assert exit_info.value.code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    expected = (
        rf"error: model.num_classes={expected_count} but the test data 'two_val' has 2 classes "
        r"\(set model.num_classes=2"
    )
    assert len(errors) == 1 and re.match(expected, errors[0]), errors
    assert not inferred


def test_the_test_datas_class_count_evaluates(two_class_test_data, monkeypatch):
    overrides, inferred = two_class_test_data
    train_net(monkeypatch, "--eval-only", *overrides, *TINY_OVERRIDES, "model.num_classes=2")
    assert inferred == [1]
