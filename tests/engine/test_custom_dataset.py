"""The README's custom-dataset recipe end to end, and num_classes checked before training."""

from pathlib import Path

import pytest

from rankdetr.data import register_coco_format
from rankdetr.data.synthetic import generate_shapes_dataset
from rankdetr.engine.config_checks import ConfigError
from rankdetr.engine.runner import do_test, do_train, load_config

DEMO = str(Path(__file__).resolve().parents[2] / "configs" / "demo" / "rank_detr_r18_shapes.py")


@pytest.fixture
def my_data(tmp_path, isolated_catalogs):
    """Your own COCO-format data under your own names (5 classes), as the README registers it."""
    for split, count, seed in (("train", 4, 11), ("val", 2, 12)):
        json_file = generate_shapes_dataset(tmp_path / "mine", split, count, seed=seed)
        register_coco_format(f"my_{split}", json_file, json_file.parent / "images")
    return [
        "dataloader.train.dataset.names=my_train",
        "dataloader.test.dataset.names=my_val",
        "dataloader.train.total_batch_size=2",
        "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0",
        "model.num_queries=10",
        "model.num_queries_one2many=20",
        "model.num_detections=10",
        f"train.output_dir={tmp_path / 'out'}",
    ]


def test_register_train_two_iterations_and_evaluate(my_data):
    cfg = load_config(DEMO, my_data + ["model.num_classes=None", "train.max_iter=2",
                                       "train.eval_period=2"])  # fmt: skip
    results = do_train(cfg)
    assert cfg.model.num_classes == 5  # taken from the registered data
    assert "bbox/AP" in results and "bbox/oLRP" in results  # evaluated at the end
    from rankdetr.engine.runner import build_model

    evaluation = do_test(cfg, build_model(cfg))["bbox"]
    assert {"AP", "AP50", "oLRP"} <= set(evaluation)


@pytest.mark.parametrize("num_classes", [3, 80])
def test_num_classes_other_than_the_data_is_refused_before_training(my_data, num_classes):
    cfg = load_config(DEMO, my_data + [f"model.num_classes={num_classes}", "train.max_iter=2"])
    with pytest.raises(
        ConfigError, match=f"model.num_classes={num_classes} but .*'my_train' has 5"
    ):
        do_train(cfg)
