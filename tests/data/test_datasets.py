"""Dataset registration (shapes, COCO 2017, COCO format) and the validating COCO loader."""

import json
import logging
import math

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, BoxMode, Instances
from PIL import Image

from rankdetr.data.datasets import (
    REPO_ROOT,
    DatasetFormatError,
    default_shapes_root,
    load_coco_json_checked,
    num_classes_of,
    register_coco_format,
    register_shapes_dataset,
)
from rankdetr.data.mapper import DetrDatasetMapper

# --- shapes --------------------------------------------------------------------------------


def test_shapes_are_registered_with_metadata_and_generated_on_first_load(tmp_path):
    root = register_shapes_dataset(tmp_path / "shapes", num_images={"train": 5, "val": 3})
    metadata = MetadataCatalog.get("shapes_val")
    assert metadata.thing_classes == ["circle", "square", "triangle", "cross", "ring"]
    assert metadata.evaluator_type == "coco"
    assert metadata.json_file == str(root / "val" / "instances_val.json")
    assert num_classes_of("shapes_train") == 5
    assert not root.exists()  # registering and asking for the classes generate nothing

    dicts = DatasetCatalog.get("shapes_val")
    assert len(dicts) == 3 and not (root / "train").exists()
    annotations = [annotation for record in dicts for annotation in record["annotations"]]
    assert annotations and all(a["bbox_mode"] == BoxMode.XYXY_ABS for a in annotations)
    assert {a["category_id"] for a in annotations} <= set(range(5))
    record = dicts[0]
    assert set(record) == {"file_name", "height", "width", "image_id", "annotations"}
    with Image.open(record["file_name"]) as image:
        assert image.size == (record["width"], record["height"])
    assert len(DatasetCatalog.get("shapes_train")) == 5


def test_shapes_val_evaluates_to_ap_100_with_its_ground_truth_as_predictions(tmp_path):
    # The generated JSON and the metadata work with detectron2's COCOEvaluator end to end.
    register_shapes_dataset(tmp_path, num_images={"val": 6})
    records = DatasetCatalog.get("shapes_val")  # generates the JSON that COCOEvaluator reads
    mapper = DetrDatasetMapper([T.ResizeShortestEdge(128, max_size=256)], is_train=False)
    evaluator = COCOEvaluator("shapes_val", use_fast_impl=False, output_dir=None)
    evaluator.reset()
    for record in records:
        inputs = mapper(record)
        truth = inputs["instances"]
        to_original = torch.tensor([inputs["width"], inputs["height"]] * 2) / torch.tensor(
            [truth.image_size[1], truth.image_size[0]] * 2
        )
        prediction = Instances(
            (inputs["height"], inputs["width"]),
            pred_boxes=Boxes(truth.gt_boxes.tensor * to_original),
            scores=torch.ones(len(truth)),
            pred_classes=truth.gt_classes,
        )
        evaluator.process([inputs], [{"instances": prediction}])
    results = evaluator.evaluate()["bbox"]
    assert results["AP"] == pytest.approx(100.0) and results["AP-ring"] == pytest.approx(100.0)


def test_shapes_registration_is_idempotent_and_follows_new_arguments(tmp_path):
    register_shapes_dataset(tmp_path / "a", num_images={"val": 2})
    register_shapes_dataset(tmp_path / "a", num_images={"val": 2})
    register_shapes_dataset(tmp_path / "b", num_images={"val": 4})
    assert MetadataCatalog.get("shapes_val").image_root == str(tmp_path / "b" / "val" / "images")
    assert len(DatasetCatalog.get("shapes_val")) == 4


def test_default_shapes_root_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("RANKDETR_DATASETS", str(tmp_path))
    assert default_shapes_root() == tmp_path / "shapes"
    assert register_shapes_dataset() == tmp_path / "shapes"
    assert MetadataCatalog.get("shapes_train").json_file.startswith(str(tmp_path / "shapes"))
    monkeypatch.delenv("RANKDETR_DATASETS")
    assert default_shapes_root() == REPO_ROOT / "datasets" / "shapes"
    assert (REPO_ROOT / "rankdetr" / "data" / "datasets.py").is_file()


def test_num_classes_of_an_unregistered_name_is_an_error():
    with pytest.raises(KeyError, match="not registered"):
        num_classes_of("no_such_dataset")


# --- COCO format ---------------------------------------------------------------------------


def _coco(tmp_path, **changes) -> tuple:
    """A small valid COCO dataset (2 images, 3 annotations, non-contiguous category ids 3 and 7),
    with top-level entries replaced by `changes`; returns (json_file, image_root)."""
    image_root = tmp_path / "images"
    image_root.mkdir(exist_ok=True)
    for name in ("a.png", "b.png"):
        Image.new("RGB", (40, 30)).save(image_root / name)
    data = {
        "images": [
            {"id": 10, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 11, "file_name": "b.png", "width": 40, "height": 30},
        ],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 7, "bbox": [1, 2, 10, 5]},
            {"id": 2, "image_id": 10, "category_id": 3, "bbox": [20.5, 0, 4, 4], "iscrowd": 1},
            {"id": 3, "image_id": 11, "category_id": 3, "bbox": [0, 0, 40, 30]},
        ],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
    }
    data.update(changes)
    json_file = tmp_path / "instances.json"
    json_file.write_text(json.dumps(data))
    return json_file, image_root


def test_coco_format_dataset_loads_with_contiguous_ids_and_xyxy_boxes(tmp_path):
    register_coco_format("tiny_coco", *_coco(tmp_path))
    assert num_classes_of("tiny_coco") == 2  # loads the JSON for the classes
    metadata = MetadataCatalog.get("tiny_coco")
    assert metadata.thing_classes == ["cat", "dog"]
    assert metadata.thing_dataset_id_to_contiguous_id == {3: 0, 7: 1}
    assert metadata.evaluator_type == "coco"
    first, second = DatasetCatalog.get("tiny_coco")
    assert first["image_id"] == 10 and first["file_name"] == str(tmp_path / "images" / "a.png")
    xyxy = BoxMode.XYXY_ABS
    assert first["annotations"] == [
        {"bbox": [1.0, 2.0, 11.0, 7.0], "bbox_mode": xyxy, "category_id": 1, "iscrowd": 0},
        {"bbox": [20.5, 0.0, 24.5, 4.0], "bbox_mode": xyxy, "category_id": 0, "iscrowd": 1},
    ]
    assert second["annotations"][0]["bbox"] == [0.0, 0.0, 40.0, 30.0]


def test_images_without_annotations_are_kept(tmp_path):
    dicts = load_coco_json_checked(*_coco(tmp_path, annotations=[]))
    assert [record["annotations"] for record in dicts] == [[], []]


def test_missing_json_file_is_named(tmp_path):
    register_coco_format("gone", tmp_path / "nowhere.json", tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        DatasetCatalog.get("gone")


def test_malformed_json_names_the_file_and_position(tmp_path):
    json_file = tmp_path / "broken.json"
    json_file.write_text('{\n  "images": [],\n  "annotations": [,]\n}')
    with pytest.raises(
        DatasetFormatError, match=r"broken.json is not valid JSON: .* line 3 column"
    ):
        load_coco_json_checked(json_file, tmp_path)


def test_missing_top_level_key_is_named(tmp_path):
    json_file, image_root = _coco(tmp_path)
    data = json.loads(json_file.read_text())
    del data["categories"]
    json_file.write_text(json.dumps(data))
    with pytest.raises(DatasetFormatError, match="missing top-level key.*'categories'"):
        load_coco_json_checked(json_file, image_root)


def test_missing_entry_keys_are_named(tmp_path):
    images = [
        {"id": 10, "file_name": "a.png", "width": 40, "height": 30},
        {"id": 11, "file_name": "b.png"},
    ]
    with pytest.raises(DatasetFormatError, match=r"images\[1\] lacks 'width', 'height'"):
        load_coco_json_checked(*_coco(tmp_path, images=images))
    annotations = [{"id": 1, "image_id": 10, "bbox": [0, 0, 1, 1]}]
    with pytest.raises(DatasetFormatError, match=r"annotations\[0\] lacks 'category_id'"):
        load_coco_json_checked(*_coco(tmp_path, annotations=annotations))


def test_unknown_category_and_image_ids_are_errors(tmp_path):
    annotations = [{"id": 1, "image_id": 10, "category_id": 42, "bbox": [0, 0, 5, 5]}]
    with pytest.raises(DatasetFormatError, match=r"category id\(s\) \[42\].*known: \[3, 7\]"):
        load_coco_json_checked(*_coco(tmp_path, annotations=annotations))
    annotations = [{"id": 1, "image_id": 99, "category_id": 3, "bbox": [0, 0, 5, 5]}]
    with pytest.raises(DatasetFormatError, match=r"image id\(s\) .* \[99\]"):
        load_coco_json_checked(*_coco(tmp_path, annotations=annotations))


def test_duplicate_ids_and_bad_image_sizes_are_errors(tmp_path):
    categories = [{"id": 3, "name": "cat"}, {"id": 3, "name": "dog"}]
    with pytest.raises(DatasetFormatError, match=r"duplicate category id\(s\) \[3\]"):
        load_coco_json_checked(*_coco(tmp_path, categories=categories))
    images = [{"id": 10, "file_name": "a.png", "width": 0, "height": 30}]
    with pytest.raises(DatasetFormatError, match="a.png.*must be positive integers"):
        load_coco_json_checked(*_coco(tmp_path, images=images, annotations=[]))


def test_unusable_boxes_are_skipped_and_counted_in_the_log(tmp_path, caplog):
    boxes = [
        [1, 2, 10, 5],  # fine
        [math.nan, 0, 5, 5],
        [0, 0, 0, 5],
        [0, 0, 5, -1],
        [50, 0, 5, 5],  # entirely right of the 40-px-wide image
        [0, 0, 5],
        "1 2 3 4",
        [35, 25, 10, 10],  # partly outside: clipped to [35, 25, 40, 30]
    ]
    annotations = [
        {"id": i, "image_id": 10, "category_id": 3, "bbox": box} for i, box in enumerate(boxes)
    ]
    with caplog.at_level(logging.WARNING, logger="rankdetr.data.datasets"):
        dicts = load_coco_json_checked(*_coco(tmp_path, annotations=annotations))
    assert [a["bbox"] for a in dicts[0]["annotations"]] == [[1, 2, 11, 7], [35, 25, 40, 30]]
    log = caplog.text
    assert "skipped 6 of 8 annotations" in log
    assert "1 NaN or infinite coordinates" in log and "2 non-positive width or height" in log
    assert "1 outside the image" in log and "2 not a list of 4 numbers" in log
    assert "clipped 1 of 8 boxes" in log


def test_missing_image_files_and_folders_are_named(tmp_path):
    json_file, image_root = _coco(tmp_path)
    (image_root / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match="1 image file.*missing.*b.png"):
        load_coco_json_checked(json_file, image_root)
    assert len(load_coco_json_checked(json_file, image_root, check_image_files=False)) == 2
    with pytest.raises(FileNotFoundError, match="image folder not found: .*elsewhere"):
        load_coco_json_checked(json_file, tmp_path / "elsewhere")


def test_registered_metadata_must_agree_with_the_file(tmp_path):
    MetadataCatalog.get("mismatch").set(thing_dataset_id_to_contiguous_id={1: 0})
    with pytest.raises(DatasetFormatError, match="disagree with the registered metadata"):
        load_coco_json_checked(*_coco(tmp_path), dataset_name="mismatch")


def test_coco_format_registration_replaces_its_own_names_only(tmp_path):
    json_file, image_root = _coco(tmp_path)
    register_coco_format("mine", json_file, image_root)
    register_coco_format("mine", json_file, image_root)  # same files: nothing to do
    register_coco_format("mine", json_file, tmp_path / "other")
    assert MetadataCatalog.get("mine").image_root == str(tmp_path / "other")
    with pytest.raises(ValueError, match="already registered"):
        register_coco_format("coco_2017_val", json_file, image_root)


# --- COCO 2017 -----------------------------------------------------------------------------


def test_detectron2_registers_coco_2017_itself():
    # The configs name detectron2's own registration (see rankdetr.data.datasets).
    assert {"coco_2017_train", "coco_2017_val"} <= set(DatasetCatalog.list())
    assert len(MetadataCatalog.get("coco_2017_val").thing_classes) == 80


# --- more malformed files ----------------------------------------------------------------------


def test_a_binary_file_is_named_as_not_json(tmp_path):
    json_file = tmp_path / "photo.json"
    json_file.write_bytes(b"\xff\xd8\xff\xe0 JFIF")
    with pytest.raises(DatasetFormatError, match=r"photo.json is not a UTF-8 text file"):
        load_coco_json_checked(json_file, tmp_path)


@pytest.mark.parametrize("top_level", ["[]", '"images"', "null"])
def test_a_top_level_that_is_not_an_object_is_an_error(tmp_path, top_level):
    json_file = tmp_path / "list.json"
    json_file.write_text(top_level)
    with pytest.raises(DatasetFormatError, match="list.json: the top level must be a JSON object"):
        load_coco_json_checked(json_file, tmp_path)


def test_sections_and_entries_of_the_wrong_type_are_named(tmp_path):
    with pytest.raises(DatasetFormatError, match="'annotations' must be a list"):
        load_coco_json_checked(*_coco(tmp_path, annotations={"id": 1}))
    with pytest.raises(DatasetFormatError, match=r"images\[0\] is not an object"):
        load_coco_json_checked(*_coco(tmp_path, images=["a.png"]))


def test_bad_image_ids_and_file_names_are_named(tmp_path):
    images = [{"id": [10], "file_name": "a.png", "width": 40, "height": 30}]
    with pytest.raises(DatasetFormatError, match=r"image id \[10\] must be an integer or a string"):
        load_coco_json_checked(*_coco(tmp_path, images=images, annotations=[]))
    images = [{"id": 10, "file_name": None, "width": 40, "height": 30}]
    with pytest.raises(DatasetFormatError, match="image 10 has file_name None"):
        load_coco_json_checked(*_coco(tmp_path, images=images, annotations=[]))
    images = [{"id": 10, "file_name": "a.png", "width": 40.5, "height": 30}]
    with pytest.raises(DatasetFormatError, match=r"a.png\) has size 40.5 x 30"):
        load_coco_json_checked(*_coco(tmp_path, images=images, annotations=[]))


def test_bad_annotation_ids_and_iscrowd_are_named(tmp_path):
    annotations = [{"id": 1, "image_id": 10, "category_id": {"id": 3}, "bbox": [0, 0, 5, 5]}]
    with pytest.raises(DatasetFormatError, match=r"must be integers or strings, got e.g. \[\{"):
        load_coco_json_checked(*_coco(tmp_path, annotations=annotations))
    annotations = [
        {"id": 1, "image_id": 10, "category_id": 3, "bbox": [0, 0, 5, 5], "iscrowd": "yes"}
    ]
    with pytest.raises(DatasetFormatError, match=r"'iscrowd' must be 0 or 1; .*id\(s\) \[1\]"):
        load_coco_json_checked(*_coco(tmp_path, annotations=annotations))


def test_category_ids_given_as_strings_are_unknown_categories(tmp_path):
    # "3" is not the category 3: a common slip when a JSON is written by hand.
    annotations = [{"id": 1, "image_id": 10, "category_id": "3", "bbox": [0, 0, 5, 5]}]
    with pytest.raises(DatasetFormatError, match=r"category id\(s\) \['3'\] .*known: \[3, 7\]"):
        load_coco_json_checked(*_coco(tmp_path, annotations=annotations))


def test_nan_and_infinity_literals_in_the_file_are_skipped_boxes(tmp_path, caplog):
    json_file, image_root = _coco(tmp_path)
    text = json_file.read_text().replace("[1, 2, 10, 5]", "[NaN, 2, 10, 5]")
    json_file.write_text(text.replace("[0, 0, 40, 30]", "[0, 0, Infinity, 30]"))
    with caplog.at_level(logging.WARNING, logger="rankdetr.data.datasets"):
        first, second = load_coco_json_checked(json_file, image_root)
    assert len(first["annotations"]) == 1 and second["annotations"] == []
    assert "skipped 2 of 3 annotations" in caplog.text
    assert "2 NaN or infinite coordinates" in caplog.text


def test_a_box_touching_the_border_from_outside_is_skipped(tmp_path, caplog):
    # Width > 0 but the box starts at the right edge: clipped to zero width -> outside.
    annotations = [
        {"id": 1, "image_id": 10, "category_id": 3, "bbox": [40, 0, 5, 5]},
        {"id": 2, "image_id": 10, "category_id": 3, "bbox": [-9, -9, 10, 10]},
    ]
    with caplog.at_level(logging.WARNING, logger="rankdetr.data.datasets"):
        first, _ = load_coco_json_checked(*_coco(tmp_path, annotations=annotations))
    assert [a["bbox"] for a in first["annotations"]] == [[0.0, 0.0, 1.0, 1.0]]
    assert "1 outside the image" in caplog.text and "clipped 1 of 2 boxes" in caplog.text
