"""Annotation files that pycocotools would score wrongly, and training files without a usable box.

* Duplicate annotation ids: pycocotools indexes annotations by id, so perfect detections scored
  AP 77.6 instead of 100. The loader and RankDETRCOCOEvaluator refuse such a file, naming it, the
  id and how many annotations share it; annotations of unknown images and negative areas too.
* A training file whose boxes are all unusable, or without annotations: one line saying so
  (why every annotation was skipped), not detectron2's `AssertionError: No valid data found`.
"""

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from detectron2.data import DatasetCatalog, get_detection_dataset_dicts
from detectron2.structures import Boxes, BoxMode, Instances
from PIL import Image

from rankdetr.data import DatasetFormatError, register_coco_format
from rankdetr.data.training_boxes import NoTrainingBoxesError
from rankdetr.evaluation import RankDETRCOCOEvaluator

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_CONFIG = str(REPO_ROOT / "configs" / "demo" / "rank_detr_r18_shapes.py")
# A small demo model: the errors under test come before (or at) the first batch.
SMALL_MODEL = [
    "model.num_classes=None",
    "model.embed_dim=32",
    "model.neck.out_channels=32",
    "model.neck.norm_groups=8",
    "model.ffn_dim=64",
    "model.encoder_layers=1",
    "model.decoder_layers=1",
    "model.num_queries=8",
    "model.num_queries_one2many=8",
    "model.num_detections=8",
]

# (image id, [x, y, w, h], category id) of the clean file: three boxes on two 64x48 images.
BOXES = [(1, [4, 4, 20, 16], 1), (1, [30, 10, 24, 30], 2), (2, [10, 20, 30, 20], 2)]


def clean_annotations() -> list[dict]:
    return [
        {"id": index + 1, "image_id": image_id, "category_id": category, "bbox": box,
         "area": box[2] * box[3], "iscrowd": 0}
        for index, (image_id, box, category) in enumerate(BOXES)
    ]  # fmt: skip


def write_coco(folder: Path, annotations: list[dict]) -> Path:
    """Two 64x48 PNG images, categories 1 "cat" and 2 "dog", and the given annotations."""
    (folder / "images").mkdir(parents=True)
    images = []
    for image_id in (1, 2):
        Image.new("RGB", (64, 48), (60 * image_id, 90, 30)).save(
            folder / "images" / f"{image_id}.png"
        )
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": 64, "height": 48})
    categories = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    json_file = folder / "instances.json"
    json_file.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return json_file


def register(tmp_path: Path, name: str, annotations: list[dict]) -> Path:
    json_file = write_coco(tmp_path / name, annotations)
    register_coco_format(name, json_file, json_file.parent / "images")
    return json_file


def with_duplicate_id() -> list[dict]:
    """The clean file, but its third annotation reuses the second one's id (2)."""
    annotations = clean_annotations()
    annotations[2]["id"] = 2
    return annotations


def with_unknown_image() -> list[dict]:
    annotations = clean_annotations()
    annotations[2]["image_id"] = 9
    return annotations


def with_negative_area() -> list[dict]:
    annotations = clean_annotations()
    annotations[1]["area"] = -720
    return annotations


# Each corruption and what the error must name beside the file.
CORRUPTIONS = {
    "duplicate id": (with_duplicate_id, r"annotation id 2 is used by 2 annotations"),
    "unknown image": (with_unknown_image, r"1 annotation\(s\) refer to image id\(s\) .* \[9\]"),
    "negative area": (with_negative_area, r"1 annotation\(s\) have a negative 'area', .*\[2\]"),
}


# --- evaluation -----------------------------------------------------------------------------


def ground_truth_as_detections(records: list[dict]) -> list[tuple[dict, dict]]:
    """(input, output) pairs for the evaluator whose detections are exactly the ground truth."""
    pairs = []
    for record in records:
        annotations = record["annotations"]
        boxes = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32)
        detections = Instances(
            (record["height"], record["width"]),
            pred_boxes=Boxes(boxes.reshape(-1, 4)),
            scores=torch.ones(len(annotations)),
            pred_classes=torch.tensor([a["category_id"] for a in annotations], dtype=torch.int64),
        )
        pairs.append((record, {"instances": detections}))
    return pairs


def test_perfect_detections_score_ap_100_on_the_clean_file(tmp_path):
    register(tmp_path, "clean_val", clean_annotations())
    records = DatasetCatalog.get("clean_val")  # also sets the category id mapping
    assert all(a["bbox_mode"] == BoxMode.XYXY_ABS for r in records for a in r["annotations"])
    evaluator = RankDETRCOCOEvaluator("clean_val", output_dir=None)
    evaluator.reset()
    for inputs, outputs in ground_truth_as_detections(records):
        evaluator.process([inputs], [outputs])
    results = evaluator.evaluate()["bbox"]
    assert results["AP"] == pytest.approx(100.0)
    assert results["AR100"] == pytest.approx(100.0)


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_the_evaluator_refuses_what_pycocotools_would_score_wrongly(tmp_path, corruption):
    """The duplicate-id file scored perfect detections at AP 77.6 before; now it is refused
    when the evaluator reads it, naming the file."""
    annotations, expected = CORRUPTIONS[corruption]
    json_file = register(tmp_path, "bad_val", annotations())
    with pytest.raises(DatasetFormatError, match=rf"'bad_val' \({json_file}\): {expected}"):
        RankDETRCOCOEvaluator("bad_val", output_dir=None)


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_the_loader_refuses_what_pycocotools_would_score_wrongly(tmp_path, corruption):
    annotations, expected = CORRUPTIONS[corruption]
    json_file = register(tmp_path, "bad_data", annotations())
    with pytest.raises(DatasetFormatError, match=rf"'bad_data' \({json_file}\): {expected}"):
        DatasetCatalog.get("bad_data")


def test_several_duplicated_ids_are_counted(tmp_path):
    annotations = clean_annotations() * 2  # every id twice
    register(tmp_path, "twice", annotations)
    with pytest.raises(
        DatasetFormatError, match=r"id 1 is used by 2 annotations; 2 more id\(s\) are shared too"
    ):
        DatasetCatalog.get("twice")


# --- through tools/train_net.py ---------------------------------------------------------------


def train_net(monkeypatch, tmp_path: Path, dataset: str) -> None:
    """tools/train_net.py run as a script in this process (as its __main__ block runs), training
    a small model on `dataset`; the run must end with exit status 1."""
    argv = ["train_net.py", "--config-file", DEMO_CONFIG, *SMALL_MODEL,
            f"dataloader.train.dataset.names={dataset}", "dataloader.train.num_workers=0",
            "dataloader.train.total_batch_size=1", "train.max_iter=1", "train.eval_period=0",
            f"train.output_dir={tmp_path / 'out'}"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.delenv("RANKDETR_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO_ROOT / "tools" / "train_net.py"), run_name="__main__")
    assert exit_info.value.code == 1


def last_error_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_train_net_refuses_duplicate_annotation_ids_in_one_line(tmp_path, monkeypatch, capsys):
    json_file = register(tmp_path, "dup_train", with_duplicate_id())
    train_net(monkeypatch, tmp_path, "dup_train")
    assert last_error_line(capsys) == (
        f"error: dataset 'dup_train' ({json_file}): annotation id 2 is used by 2 annotations. "
        "pycocotools indexes annotations by id, so evaluation would count one of them several "
        "times and lose the others: give every annotation its own id"
    )


def unusable_boxes() -> list[dict]:
    """Two annotations, neither usable: a zero-width box and a box outside its 64x48 image."""
    return [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 0, 16]},
        {"id": 2, "image_id": 2, "category_id": 2, "bbox": [100, 60, 10, 10]},
    ]


def test_train_net_says_why_every_annotation_was_skipped(tmp_path, monkeypatch, capsys):
    json_file = register(tmp_path, "unusable", unusable_boxes())
    train_net(monkeypatch, tmp_path, "unusable")
    line = last_error_line(capsys)
    assert line.startswith(
        "error: no usable training box: every one of the 2 annotations of dataset 'unusable' "
        f"({json_file}) was skipped: 1 non-positive width or height, 1 outside the image"
    ), line
    assert "No valid data found" not in line


def test_train_net_says_that_the_file_has_no_annotations(tmp_path, monkeypatch, capsys):
    json_file = register(tmp_path, "unlabelled", [])
    train_net(monkeypatch, tmp_path, "unlabelled")
    assert last_error_line(capsys).startswith(
        f"error: no usable training box: dataset 'unlabelled' ({json_file}) has no annotations "
        "(in its 2 images)"
    )


def test_crowd_annotations_alone_are_named_as_the_reason(tmp_path):
    annotations = clean_annotations()[:2] + [unusable_boxes()[1] | {"id": 3}]
    for annotation in annotations:
        annotation["iscrowd"] = 1
    register(tmp_path, "crowds", annotations)
    with pytest.raises(
        NoTrainingBoxesError,
        match=r"the 2 usable annotations of dataset 'crowds' .* are all crowd \(iscrowd=1\), "
        r"which training leaves out; the other 1 were skipped: 1 outside the image",
    ):
        get_detection_dataset_dicts("crowds")  # filter_empty=True, as the training configs
    # Evaluation keeps the images without usable boxes, as before.
    assert len(get_detection_dataset_dicts("crowds", filter_empty=False)) == 2


def test_data_with_one_usable_box_still_trains(tmp_path):
    register(tmp_path, "one_box", unusable_boxes() + [clean_annotations()[2] | {"id": 3}])
    (record,) = get_detection_dataset_dicts("one_box")
    assert record["image_id"] == 2 and len(record["annotations"]) == 1
