"""Evaluation as --eval-only runs it (runner.do_test) gives pycocotools' own AP and AR numbers on
the predictions it dumps, and the oLRP of an independent implementation."""

import json
from pathlib import Path

import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation.testing import flatten_results_dict
from detectron2.structures import Boxes, Instances
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from rankdetr.data import register_shapes_dataset
from rankdetr.engine.runner import do_test, load_config
from rankdetr.evaluation import RankDETRCOCOEvaluator, ranking_metrics
from tests.evaluation.test_olrp import brute_force_olrp

DEMO = str(Path(__file__).resolve().parents[2] / "configs" / "demo" / "rank_detr_r18_shapes.py")


class NoisyOracle(torch.nn.Module):
    """Predicts the ground truth with jittered boxes, random scores, some wrong classes and some
    false positives, so that AP is far from 0 and 100."""

    def __init__(self):
        super().__init__()
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, batched_inputs):
        results = []
        for x in batched_inputs:
            gt = x["instances"]
            h, w = x["height"], x["width"]
            scale = torch.tensor([w / gt.image_size[1], h / gt.image_size[0]] * 2)
            boxes = gt.gt_boxes.tensor * scale
            n = len(boxes)
            boxes = boxes + torch.randn(n, 4, generator=self.generator) * 1.0
            classes = gt.gt_classes.clone()
            wrong = torch.rand(n, generator=self.generator) < 0.2
            classes[wrong] = (classes[wrong] + 1) % 5
            extra = torch.rand(3, 4, generator=self.generator) * min(h, w) / 2
            extra[:, 2:] += extra[:, :2] + 4
            instances = Instances((h, w))
            instances.pred_boxes = Boxes(torch.cat([boxes, extra]))
            instances.scores = torch.rand(n + 3, generator=self.generator)
            instances.pred_classes = torch.cat(
                [classes, torch.randint(5, (3,), generator=self.generator)]
            )
            results.append({"instances": instances})
        return results


@pytest.mark.slow
def test_do_test_matches_pycocotools_on_the_dumped_predictions(tmp_path):
    register_shapes_dataset(root=tmp_path / "shapes", num_images={"train": 4, "val": 24})
    # The evaluator writes into <train.output_dir>/inference, as detectron2's trainer does.
    cfg = load_config(DEMO, [f"train.output_dir={tmp_path}", "dataloader.test.num_workers=0"])
    results = do_test(cfg, NoisyOracle().eval())["bbox"]
    assert 10 < results["AP"] < 95

    gt = COCO(MetadataCatalog.get("shapes_val").json_file)
    predictions = json.loads((tmp_path / "inference" / "coco_instances_results.json").read_text())
    evaluation = COCOeval(gt, gt.loadRes(predictions), "bbox")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    names = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
    for index, name in enumerate(names):
        if evaluation.stats[index] < 0:  # e.g. no large shapes: pycocotools writes -1
            assert results[name] != results[name], name
        else:
            assert results[name] == pytest.approx(evaluation.stats[index] * 100, abs=1e-6), name
    assert 10 < results["AR100"] < 100

    assert not any(a["iscrowd"] for a in gt.anns.values())  # the brute force ignores crowds
    gts = [(a["image_id"], a["category_id"], a["bbox"]) for a in gt.anns.values()]
    dets = [(p["image_id"], p["category_id"], p["bbox"], p["score"]) for p in predictions]
    expected = brute_force_olrp(gts, dets, classes=gt.getCatIds())
    for name, value in zip(["oLRP", "oLRP_Loc", "oLRP_FP", "oLRP_FN"], expected):
        assert results[name] == pytest.approx(value * 100, abs=1e-6), name
    assert 10 < results["oLRP"] < 95

    # How EvalHook hands them to metrics.json during training.
    assert {"bbox/AR1", "bbox/ARl", "bbox/oLRP", "bbox/oLRP_FN"} <= set(
        flatten_results_dict({"bbox": results})
    )


def test_no_predictions_give_nan():
    values = ranking_metrics(None)
    assert len(values) == 10 and all(v != v for v in values.values())


def test_data_the_loader_accepted_never_crashes_the_evaluation(tmp_path, isolated_catalogs):
    """String bbox values (the loader skips that box) and annotations without `area` or
    `iscrowd` used to crash pycocotools in the final evaluation. The evaluation now runs on the
    same boxes the loader kept; a perfect prediction of them scores AP 100."""
    from PIL import Image

    from rankdetr.data import register_coco_format
    from rankdetr.data.datasets import load_coco_json_checked

    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 48)).save(tmp_path / "images" / "a.png")
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 5, 20, 30], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": ["1", "2", "3", "4"], "area": 12,
         "iscrowd": 0},
        {"id": 3, "image_id": 1, "category_id": 2, "bbox": [30, 10, 25, 20], "area": "big"},
    ]  # fmt: skip
    data = {
        "images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 48}],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    json_file = tmp_path / "data.json"
    json_file.write_text(json.dumps(data))
    register_coco_format("loose_val", json_file, tmp_path / "images")
    kept = load_coco_json_checked(json_file, tmp_path / "images", "loose_val")[0]["annotations"]
    assert len(kept) == 2  # the string bbox was skipped
    evaluator = RankDETRCOCOEvaluator("loose_val", output_dir=str(tmp_path / "eval"))
    evaluator.reset()
    instances = Instances((48, 64))
    instances.pred_boxes = Boxes(torch.tensor([a["bbox"] for a in kept]))
    instances.scores = torch.tensor([0.9, 0.8])
    instances.pred_classes = torch.tensor([a["category_id"] for a in kept])
    evaluator.process([{"image_id": 1, "height": 48, "width": 64}], [{"instances": instances}])
    results = evaluator.evaluate()["bbox"]
    assert results["AP"] == pytest.approx(100.0)
    areas = {a["id"]: a["area"] for a in evaluator._coco_api.dataset["annotations"]}
    assert areas == {1: 600.0, 3: 500.0}  # filled from the boxes


def test_result_files_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A failure while the results are written (as a SIGTERM would cut it) leaves no partial
    coco_instances_results.json under its final name; a complete evaluation puts both files
    in place and no staging folder behind."""
    import detectron2.evaluation.coco_evaluation as coco_evaluation
    from detectron2.data import DatasetCatalog

    register_shapes_dataset()
    out = tmp_path / "eval"
    evaluator = RankDETRCOCOEvaluator("shapes_val", output_dir=str(out))
    first = DatasetCatalog.get("shapes_val")[0]
    image = {k: first[k] for k in ("image_id", "height", "width")}
    instances = Instances((first["height"], first["width"]))
    instances.pred_boxes = Boxes(torch.tensor([[10.0, 10.0, 50.0, 60.0]]))
    instances.scores, instances.pred_classes = torch.tensor([0.5]), torch.tensor([1])

    def run():
        evaluator.reset()
        evaluator.process([image], [{"instances": instances}])
        return evaluator.evaluate()

    real_dumps = coco_evaluation.json.dumps

    def cut_short(*args, **kwargs):
        raise KeyboardInterrupt  # the process is stopped half-way through writing

    monkeypatch.setattr(coco_evaluation.json, "dumps", cut_short)
    with pytest.raises(KeyboardInterrupt):
        run()
    assert not (out / "coco_instances_results.json").exists()
    monkeypatch.setattr(coco_evaluation.json, "dumps", real_dumps)
    run()
    assert sorted(p.name for p in out.iterdir()) == [
        "coco_instances_results.json",
        "instances_predictions.pth",
    ]
    assert json.loads((out / "coco_instances_results.json").read_text())[0]["score"] == 0.5
