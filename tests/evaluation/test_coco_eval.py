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
    cfg = load_config(DEMO, [f"dataloader.evaluator.output_dir={tmp_path / 'eval'}",
                             "dataloader.test.num_workers=0"])  # fmt: skip
    results = do_test(cfg, NoisyOracle().eval())["bbox"]
    assert 10 < results["AP"] < 95

    gt = COCO(MetadataCatalog.get("shapes_val").json_file)
    predictions = json.loads((tmp_path / "eval" / "coco_instances_results.json").read_text())
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


def test_fast_impl_is_refused_and_no_predictions_give_nan():
    with pytest.raises(ValueError, match="use_fast_impl=False"):
        RankDETRCOCOEvaluator("shapes_val", use_fast_impl=True)
    values = ranking_metrics(None)
    assert len(values) == 10 and all(v != v for v in values.values())
