"""FastCOCOeval gives pycocotools' COCOeval numbers: the 12 stats, eval's precision/recall/scores,
the AR and oLRP metrics and oLRP's per-class values (to 1e-12; they are in fact bit-identical),
and the same per-image matches (evalImgs), on the bundled shapes validation set, on synthetic
COCO-like data (tools/make_synthetic_coco.py) and on hand-made edge cases. Deliberately wrong
variants of the fast path (another IoU threshold, another tie order, ...) must fail the same
comparison of metrics."""

import contextlib
import copy
import io
import json
import math
import sys

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, BoxMode, Instances
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from rankdetr.data import register_shapes_dataset
from rankdetr.evaluation import FastCOCOeval, RankDETRCOCOEvaluator
from rankdetr.evaluation import fast_cocoeval as fast_module
from rankdetr.evaluation import ranking_metrics
from rankdetr.evaluation.olrp import olrp_from_coco_eval
from tests.conftest import REPO_ROOT, load_tool
from tests.warm_python import run_python

TOLERANCE = 1e-12
synthetic = load_tool(REPO_ROOT / "tools" / "make_synthetic_coco.py", "make_synthetic_coco")


def coco_pair(ground_truth: dict, detections: list[dict]):
    """In-memory COCO ground truth and loadRes detections (copies: pycocotools edits them)."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(ground_truth)
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(copy.deepcopy(detections))
    return coco_gt, coco_dt


def run(cls, coco_gt, coco_dt, img_ids=None, use_cats=1):
    """evaluate, accumulate, summarize; the evaluator's AR/oLRP metrics and the oLRP summary."""
    coco_eval = cls(coco_gt, coco_dt, "bbox")
    coco_eval.params.useCats = use_cats
    if img_ids is not None:
        coco_eval.params.imgIds = img_ids
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    if not use_cats:
        return coco_eval, None, None
    return coco_eval, ranking_metrics(coco_eval), olrp_from_coco_eval(coco_eval)


def close(a, b) -> bool:
    """Equal within TOLERANCE (inf equal to inf, NaN to NaN); arrays of the same shape."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or not np.array_equal(np.isnan(a), np.isnan(b)):
        return False
    a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    with np.errstate(invalid="ignore"):  # inf - inf
        return bool(np.all((a == b) | (np.abs(a - b) <= TOLERANCE)))


def assert_same_metrics(expected, actual):
    """Every number the evaluation reports, pycocotools' run `expected` vs `actual`."""
    (e_eval, e_metrics, e_olrp), (a_eval, a_metrics, a_olrp) = expected, actual
    assert len(e_eval.stats) == 12 and close(e_eval.stats, a_eval.stats), "COCO stats"
    for key in ("precision", "recall", "scores"):
        assert close(e_eval.eval[key], a_eval.eval[key]), f"eval[{key!r}]"
    if e_metrics is None:
        return
    assert e_metrics.keys() == a_metrics.keys()
    for name in e_metrics:
        assert close(e_metrics[name], a_metrics[name]), name
    for field in ("olrp", "loc", "fp", "fn"):
        assert close(getattr(e_olrp, field), getattr(a_olrp, field)), f"oLRP {field}"
    assert e_olrp.per_class.keys() == a_olrp.per_class.keys()
    for cat, e_class in e_olrp.per_class.items():
        for field in ("olrp", "loc", "fp", "fn", "threshold"):
            value = getattr(a_olrp.per_class[cat], field)
            assert close(getattr(e_class, field), value), f"class {cat} oLRP {field}"


def assert_same_eval_imgs(expected: COCOeval, actual: FastCOCOeval):
    """pycocotools' per-image matching, entry by entry (FastCOCOeval builds it on demand)."""
    assert actual.fast_matches is not None  # the vectorised path ran
    assert len(expected.evalImgs) == len(actual.evalImgs)
    for e, a in zip(expected.evalImgs, actual.evalImgs):
        assert (e is None) == (a is None)
        if e is None:
            continue
        assert e.keys() == a.keys()
        for key, value in e.items():
            if isinstance(value, np.ndarray):  # matches, ignore flags
                assert value.shape == a[key].shape and np.array_equal(value, a[key]), (key, e, a)
            else:  # ids, scores, area range, maxDet
                assert value == a[key], (key, e, a)


def compare(ground_truth, detections, img_ids=None):
    coco_gt, coco_dt = coco_pair(ground_truth, detections)
    expected = run(COCOeval, coco_gt, coco_dt, img_ids)
    actual = run(FastCOCOeval, coco_gt, coco_dt, img_ids)
    assert_same_metrics(expected, actual)
    assert_same_eval_imgs(expected[0], actual[0])
    return expected


# ---- data ----------------------------------------------------------------------------------------


def noisy_detections(ground_truth: dict, seed: int) -> list[dict]:
    """Jittered ground truth (some with the wrong class, scores at 2 decimals so that many tie),
    near-duplicates, and false positives; images 1..3 get no detections."""
    rng = np.random.default_rng(seed)
    cats = [c["id"] for c in ground_truth["categories"]]
    dets = []
    for a in ground_truth["annotations"]:
        if a["image_id"] <= 3:
            continue
        x, y, w, h = a["bbox"]
        for _ in range(1 + int(rng.random() < 0.3)):
            noise = rng.normal(0, 0.08, 4) * [w, h, w, h]
            box = [x + noise[0], y + noise[1], max(w + noise[2], 1), max(h + noise[3], 1)]
            cat = a["category_id"] if rng.random() > 0.15 else int(rng.choice(cats))
            score = round(rng.random(), 2)
            dets.append({"image_id": a["image_id"], "category_id": cat,
                         "bbox": [float(v) for v in box], "score": score})  # fmt: skip
    for image in ground_truth["images"]:
        if image["id"] <= 3:
            continue
        for _ in range(3):
            size = rng.uniform(5, 60, 2)
            corner = rng.uniform(0, 1, 2) * [image["width"] - size[0], image["height"] - size[1]]
            dets.append({"image_id": image["id"], "category_id": int(rng.choice(cats)),
                         "bbox": [*map(float, corner), *map(float, size)],
                         "score": round(rng.random() * 0.5, 2)})  # fmt: skip
    return dets


def edge_case_data():
    """Hand-made: images 1-6, categories 1-4 (3 has no ground truth, 4 nothing at all).

    1: two identical boxes, a crowd box with three detections on it, a small box; 2: ground
       truth, no detections; 3: detections, no ground truth; 4: 120 detections of one class
       (beyond maxDets 100), all tied at 0.5; 5: a box of area in each range and one with
       annotation id 0 (COCOeval counts a match to id 0 as unmatched); 6: nothing; 7: a detection
       of equal IoU (0.818) with two boxes takes the last, so the next one (IoU 1 with the first
       box, 0.667 with the last) is a TP at IoU thresholds above 0.65."""
    images = [{"id": i, "width": 640, "height": 480} for i in range(1, 8)]
    categories = [{"id": c, "name": f"c{c}"} for c in range(1, 5)]
    gts = [
        (1, 1, [10, 10, 100, 80], 0), (1, 1, [10, 10, 100, 80], 0), (1, 2, [300, 200, 200, 150], 1),
        (1, 2, [5, 400, 20, 20], 0), (2, 1, [50, 50, 60, 60], 0), (2, 2, [100, 100, 40, 40], 0),
        (4, 1, [200, 200, 50, 50], 0), (4, 1, [260, 200, 50, 50], 0),
        (5, 1, [0, 0, 20, 20], 0), (5, 1, [100, 100, 60, 60], 0), (5, 2, [200, 100, 150, 150], 0),
        (7, 1, [0, 0, 100, 100], 0), (7, 1, [20, 0, 100, 100], 0), (5, 2, [400, 300, 30, 30], 0),
    ]  # fmt: skip
    annotations = [
        {"id": i + 1, "image_id": img, "category_id": cat, "bbox": box,
         "area": box[2] * box[3] * 0.9, "iscrowd": crowd}
        for i, (img, cat, box, crowd) in enumerate(gts)
    ]  # fmt: skip
    annotations[-1]["id"] = 0
    dets = [
        (1, 1, [12, 11, 98, 80], 0.9), (1, 1, [10, 10, 100, 80], 0.9),
        (1, 1, [30, 30, 50, 40], 0.9), (1, 2, [310, 210, 100, 100], 0.95),
        (1, 2, [400, 250, 90, 90], 0.7), (1, 2, [320, 220, 150, 120], 0.7),
        (1, 2, [6, 401, 19, 19], 0.7), (1, 3, [0, 0, 30, 30], 0.8),
        (3, 1, [10, 10, 50, 50], 0.9), (3, 3, [20, 20, 50, 50], 0.9),
        (5, 1, [1, 1, 19, 19], 0.9), (5, 1, [102, 98, 58, 62], 0.5),
        (5, 2, [205, 105, 140, 150], 0.5), (5, 2, [401, 301, 29, 29], 0.5),
        (5, 2, [402, 302, 28, 28], 0.4),
        (7, 1, [10, 0, 100, 100], 0.8), (7, 1, [0, 0, 100, 100], 0.7),
    ]  # fmt: skip
    rng = np.random.default_rng(0)
    for _ in range(120):  # image 4: 120 tied detections around its two boxes and elsewhere
        box = [200 + rng.uniform(-15, 75), 200 + rng.uniform(-15, 15), 50, 50]
        dets.append((4, 1, box, 0.5))
    detections = [{"image_id": i, "category_id": c, "bbox": [float(v) for v in b], "score": s}
                  for i, c, b, s in dets]  # fmt: skip
    return {"images": images, "categories": categories, "annotations": annotations}, detections


@pytest.fixture(scope="module")
def shapes_val():
    """The bundled shapes_val (200 images; generated into datasets/shapes on first use)."""
    register_shapes_dataset()
    DatasetCatalog.get("shapes_val")
    return json.loads(open(MetadataCatalog.get("shapes_val").json_file).read())


@pytest.fixture(scope="module")
def synthetic_coco():
    """200 synthetic COCO-like images, 100 detections each, and pycocotools' results on them."""
    ground_truth, detections = synthetic.make_synthetic_coco(num_images=200, seed=1)
    coco_gt, coco_dt = coco_pair(ground_truth, detections)
    return coco_gt, coco_dt, run(COCOeval, coco_gt, coco_dt)


# ---- equality ------------------------------------------------------------------------------------


def test_shapes_val_with_noisy_detections(shapes_val):
    expected = compare(shapes_val, noisy_detections(shapes_val, seed=0))
    assert 0.2 < expected[0].stats[0] < 0.9 and 0.1 < expected[2].olrp < 0.95  # not trivial


def test_shapes_val_on_an_image_subset(shapes_val):
    """detectron2 sets params.imgIds to the images it evaluated."""
    compare(shapes_val, noisy_detections(shapes_val, seed=1), img_ids=list(range(1, 200, 3)))


def test_synthetic_coco(synthetic_coco):
    coco_gt, coco_dt, expected = synthetic_coco
    actual = run(FastCOCOeval, coco_gt, coco_dt)
    assert_same_metrics(expected, actual)
    assert_same_eval_imgs(expected[0], actual[0])
    assert 0.05 < expected[0].stats[0] < 0.9 and 0.1 < expected[2].olrp < 0.95


def test_edge_cases():
    ground_truth, detections = edge_case_data()
    expected = compare(ground_truth, detections)
    stats = expected[0].stats
    assert 0 < stats[0] < 1 and stats[3] > 0 and stats[5] > 0  # small and large areas present
    assert 3 not in expected[2].per_class  # no ground truth, no oLRP


def test_tied_scores_across_images_keep_the_image_order():
    """Two images, one TP and one FP at the same score: the precision curve, hence AP, depends on
    which comes first (COCOeval: the first image's)."""
    box = {"id": 1, "image_id": 2, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100,
           "iscrowd": 0}  # fmt: skip
    ground_truth = {"images": [{"id": 1}, {"id": 2}], "categories": [{"id": 1}],
                    "annotations": [box]}  # fmt: skip
    detections = [{"image_id": i, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.5}
                  for i in (1, 2)]  # fmt: skip
    expected = compare(ground_truth, detections)
    assert expected[0].stats[1] == pytest.approx(0.5, abs=0.01)  # FP first: precision 1/2


def test_no_ground_truth_and_image_without_detections():
    ground_truth, detections = edge_case_data()
    ground_truth["annotations"] = []
    compare(ground_truth, detections)
    ground_truth, _ = edge_case_data()
    compare(ground_truth, detections[:1])  # one detection in all


def test_what_the_fast_path_does_not_cover_runs_pycocotools():
    """useCats=0, non-finite boxes and accumulate() with other parameters: pycocotools' own code,
    with pycocotools' numbers."""
    ground_truth, detections = edge_case_data()
    coco_gt, coco_dt = coco_pair(ground_truth, detections)
    fast = run(FastCOCOeval, coco_gt, coco_dt, use_cats=0)
    assert fast[0].fast_matches is None
    assert_same_metrics(run(COCOeval, coco_gt, coco_dt, use_cats=0), fast)

    # A NaN x alone gives a finite IoU (C's fmin/fmax skip NaN; the fast path does the same); a
    # NaN x and width a NaN one.
    for box, vectorised in (([math.nan, 10, 5, 5], True), ([math.nan, 10, math.nan, 5], False)):
        nan_box = {"image_id": 1, "category_id": 1, "bbox": box, "score": 0.99}
        coco_gt, coco_dt = coco_pair(ground_truth, [*detections, nan_box])
        fast = run(FastCOCOeval, coco_gt, coco_dt)
        assert (fast[0].fast_matches is not None) == vectorised
        assert_same_metrics(run(COCOeval, coco_gt, coco_dt), fast)

    # accumulate() on other parameters reads evalImgs, which FastCOCOeval builds on demand.
    coco_gt, coco_dt = coco_pair(ground_truth, detections)
    results = []
    for cls in (COCOeval, FastCOCOeval):
        coco_eval = cls(coco_gt, coco_dt, "bbox")
        with contextlib.redirect_stdout(io.StringIO()):
            coco_eval.evaluate()
            coco_eval.params.maxDets = [1, 10]
            coco_eval.accumulate()
        results.append(coco_eval.eval)
    for key in ("precision", "recall", "scores"):
        assert results[0][key].shape[-1] == 2 and close(results[0][key], results[1][key]), key


def test_evaluator_fast_and_official_give_the_same_results(shapes_val, tmp_path, monkeypatch):
    """RankDETRCOCOEvaluator: use_fast_impl=True (the default) and False, the same predictions,
    the same results dict (AP..APl, per-class AP, AR, oLRP)."""
    from detectron2.evaluation import coco_evaluation

    detectron2_fast_impl = coco_evaluation.COCOeval_opt
    fast_runs = []
    real_evaluate = FastCOCOeval.evaluate

    def spy(self):
        real_evaluate(self)
        fast_runs.append(self.fast_matches is not None)

    monkeypatch.setattr(FastCOCOeval, "evaluate", spy)
    detections = noisy_detections(shapes_val, seed=2)
    by_image = {}
    for d in detections:
        by_image.setdefault(d["image_id"], []).append(d)
    contiguous = MetadataCatalog.get("shapes_val").thing_dataset_id_to_contiguous_id
    results = {}
    for fast in (True, False):
        evaluator = RankDETRCOCOEvaluator("shapes_val", use_fast_impl=fast,
                                          output_dir=str(tmp_path / str(fast)))  # fmt: skip
        evaluator.reset()
        for image in shapes_val["images"]:
            dets = by_image.get(image["id"], [])
            instances = Instances((image["height"], image["width"]))
            boxes = torch.tensor([d["bbox"] for d in dets], dtype=torch.float64).reshape(-1, 4)
            instances.pred_boxes = Boxes(BoxMode.convert(boxes, BoxMode.XYWH_ABS,
                                                         BoxMode.XYXY_ABS))  # fmt: skip
            instances.scores = torch.tensor([d["score"] for d in dets], dtype=torch.float64)
            instances.pred_classes = torch.tensor([contiguous[d["category_id"]] for d in dets],
                                                  dtype=torch.int64)  # fmt: skip
            evaluator.process([{"image_id": image["id"], "height": image["height"],
                                "width": image["width"]}], [{"instances": instances}])  # fmt: skip
        results[fast] = evaluator.evaluate()["bbox"]
        assert fast_runs == [True]  # the vectorised path ran for use_fast_impl=True only
        assert coco_evaluation.COCOeval_opt is detectron2_fast_impl  # put back
    assert results[True].keys() == results[False].keys()
    assert {"AP", "AP-circle", "AR100", "oLRP", "oLRP_FN"} <= results[True].keys()
    for name, value in results[False].items():
        assert close(results[True][name], value), name
    assert 10 < results[True]["AP"] < 90


# ---- wrong fast paths must fail ------------------------------------------------------------------


def shifted_thresholds(monkeypatch):
    """Matching at IoU thresholds 0.02 higher than the parameters say."""
    real = fast_module._match_all

    def wrong(dt, gt, params):
        params = copy.deepcopy(params)
        params.iouThrs = params.iouThrs + 0.02
        return real(dt, gt, params)

    monkeypatch.setattr(fast_module, "_match_all", wrong)


def reversed_ties(monkeypatch):
    """Tied scores in reverse order (an unstable sort could do that), within and across images."""

    def wrong(key, score):
        index = np.arange(len(score))
        return np.lexsort((-index, -score, key))

    monkeypatch.setattr(fast_module, "_by_key_and_score", wrong)


def reversed_ties_across_images(monkeypatch):
    """Tie order reversed only in accumulate's sort over images (per image it stays right)."""
    real = fast_module._by_key_and_score

    def wrong(self):
        order = real(self.dt["category"][::-1], self.dt["score"][::-1])
        return len(self.dt["score"]) - 1 - order

    monkeypatch.setattr(fast_module.BoxMatches, "by_category_and_score", wrong)


def first_of_equal_ious(monkeypatch):
    """The first of equal IoUs instead of COCOeval's last."""

    def wrong(iou, mask):
        values = np.where(mask, iou, -np.inf)
        return np.where(mask.any(axis=-1), np.argmax(values, axis=-1), -1)

    monkeypatch.setattr(fast_module, "_last_best", wrong)


def crowd_as_regular_iou(monkeypatch):
    """A crowd box's IoU with the usual union."""
    real = fast_module.coco_box_iou
    monkeypatch.setattr(fast_module, "coco_box_iou", lambda d, g, crowd: real(d, g, crowd & False))


@pytest.mark.parametrize(
    "mutate, data",
    [
        (shifted_thresholds, "synthetic"),
        (reversed_ties, "synthetic"),
        (reversed_ties_across_images, "synthetic"),
        (first_of_equal_ious, "edge"),
        (crowd_as_regular_iou, "synthetic"),
    ],
)
def test_a_wrong_fast_path_fails_the_comparison(mutate, data, synthetic_coco, monkeypatch):
    if data == "synthetic":
        coco_gt, coco_dt, expected = synthetic_coco
    else:
        coco_gt, coco_dt = coco_pair(*edge_case_data())
        expected = run(COCOeval, coco_gt, coco_dt)
    assert_same_metrics(expected, run(FastCOCOeval, coco_gt, coco_dt))  # right as it is
    mutate(monkeypatch)
    with pytest.raises(AssertionError):
        assert_same_metrics(expected, run(FastCOCOeval, coco_gt, coco_dt))


@pytest.mark.slow
def test_benchmark_tool_prints_the_table_and_finds_the_numbers_identical():
    result = run_python(
        [sys.executable, str(REPO_ROOT / "tools" / "benchmark_coco_eval.py"), "--images", "30"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in result.stdout.splitlines()
            if line.startswith("| ")}  # fmt: skip
    assert {"evaluate", "accumulate", "summarize", "AR + oLRP", "total"} <= rows.keys()
    assert "CPU: " in result.stdout and "identical (all <= 1e-12): yes" in result.stdout
    # tools/benchmark_cpu_goals.py reads this output: the total's speed-up and "identical".
    goals = load_tool(REPO_ROOT / "tools" / "benchmark_cpu_goals.py", "benchmark_cpu_goals")
    outcome = goals.GOALS[0].read(result.stdout, 0.0, REPO_ROOT)
    speedup = rows["total"].split("|")[4].strip()
    assert outcome.measured.startswith(f"{speedup} (") and "identical: yes" in outcome.measured
    assert outcome.met == (goals.ratio(speedup) >= 3.0)
