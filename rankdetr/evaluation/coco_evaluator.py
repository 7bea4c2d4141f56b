"""COCO evaluation with the paper's full metric set: AP, AR and oLRP (Table 4 of the paper)."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from pathlib import Path

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator, coco_evaluation
from detectron2.utils import comm
from detectron2.utils.logger import create_small_table

from rankdetr.data.datasets import check_annotation_integrity
from rankdetr.engine.run_lock import process_is_alive

from .fast_cocoeval import FastCOCOeval
from .olrp import olrp_from_coco_eval

# COCOeval.stats[6:12] for bbox: recall at 1/10/100 detections, then small/medium/large at 100.
AR_METRICS = ("AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
OLRP_METRICS = ("oLRP", "oLRP_Loc", "oLRP_FP", "oLRP_FN")
STAGING_PREFIX = ".staging-"  # + the evaluating process's pid


class RankDETRCOCOEvaluator(COCOEvaluator):
    """detectron2's COCOEvaluator whose "bbox" results also hold AR1, AR10, AR100, ARs, ARm, ARl
    and oLRP, oLRP_Loc, oLRP_FP, oLRP_FN (all in percent; see rankdetr.evaluation.olrp).

    The ground truth pycocotools reads is the dataset's JSON, made safe for what the loader
    accepted (see :func:`_sanitize_ground_truth`), so a run that trained never dies in its last
    evaluation; valid COCO files are evaluated exactly as they are. What the loader refuses
    because pycocotools would score it wrongly (e.g. duplicate annotation ids) is refused here too
    (:func:`rankdetr.data.datasets.check_annotation_integrity`).

    ``use_fast_impl=True`` (the default) evaluates boxes with
    :class:`rankdetr.evaluation.fast_cocoeval.FastCOCOeval`, pycocotools' COCOeval vectorised
    with numpy: the same AP, AR and oLRP to the last bit, ~19x faster at COCO scale (README,
    "Evaluation"). ``use_fast_impl=False`` runs pycocotools' own COCOeval, the metric of record.
    (detectron2's own fast evaluator needs C++ ops our detectron2 does not build, and keeps no
    per-image matches for oLRP.)
    """

    def __init__(self, dataset_name, tasks=None, distributed=True, output_dir=None, *,
                 use_fast_impl=True, **kwargs):  # fmt: skip
        _materialise(dataset_name)
        super().__init__(dataset_name, tasks, distributed, output_dir,
                         use_fast_impl=use_fast_impl, **kwargs)  # fmt: skip
        _check_ground_truth(self._coco_api, dataset_name)
        _sanitize_ground_truth(self._coco_api, dataset_name, self._logger)

    def evaluate(self, img_ids=None):
        """detectron2's evaluate, with its result files (`instances_predictions.pth`,
        `coco_instances_results.json`) written to a staging folder inside output_dir and then
        renamed into place: a run killed while writing never leaves a partial file under the
        final name (the previous complete one stays). The staging folders such a run left are
        removed at the next evaluation (see :func:`remove_stale_staging`)."""
        final = self._output_dir
        if not final:
            return super().evaluate(img_ids)
        if comm.is_main_process():  # the only process that writes results
            remove_stale_staging(Path(final), self._logger)
        staging = Path(final) / f"{STAGING_PREFIX}{os.getpid()}"
        self._output_dir = str(staging)
        try:
            results = super().evaluate(img_ids)
            for written in staging.iterdir() if staging.is_dir() else []:
                with open(written, "rb") as handle:
                    os.fsync(handle.fileno())
                os.replace(written, Path(final) / written.name)
        finally:
            self._output_dir = final
            shutil.rmtree(staging, ignore_errors=True)
        return results

    def _eval_predictions(self, predictions, img_ids=None):
        if not self._use_fast_impl:
            return super()._eval_predictions(predictions, img_ids)
        self._logger.info("COCO evaluation with FastCOCOeval (pycocotools' numbers, vectorised)")
        with _fast_impl_is(FastCOCOeval):
            return super()._eval_predictions(predictions, img_ids)

    def _derive_coco_results(self, coco_eval, iou_type, class_names=None):
        results = super()._derive_coco_results(coco_eval, iou_type, class_names=class_names)
        if iou_type != "bbox":
            return results
        extra = ranking_metrics(coco_eval)
        self._logger.info("Recall and oLRP for bbox: \n" + create_small_table(extra))
        # Keep AP..APl first and the per-class APs last, as the paper's tables order them.
        per_class = {k: v for k, v in results.items() if k.startswith("AP-")}
        summary = {k: v for k, v in results.items() if not k.startswith("AP-")}
        return {**summary, **extra, **per_class}


@contextlib.contextmanager
def _fast_impl_is(cls):
    """detectron2's _evaluate_predictions_on_coco instantiates its module's ``COCOeval_opt`` when
    use_fast_impl is set (COCOevalMaxDets when max_dets_per_image[2] != 100, pycocotools' own
    code): point that name at `cls` for the duration. The evaluation runs in one thread of the
    main process, so nothing else sees the swap."""
    saved = coco_evaluation.COCOeval_opt
    coco_evaluation.COCOeval_opt = cls
    try:
        yield
    finally:
        coco_evaluation.COCOeval_opt = saved


def remove_stale_staging(folder: Path, logger) -> None:
    """Remove the staging folders under `folder` whose evaluating process is gone (a SIGTERM or
    a kill during evaluation leaves one behind); a live process's folder stays, as it may still
    be writing. Only the main process calls this: its run holds the output folder's lock, so no
    other run evaluates into it, and the pids are of its machine (a rank on another machine
    sharing the folder could not tell whether they are alive)."""
    for staging in folder.glob(STAGING_PREFIX + "*"):
        pid = staging.name[len(STAGING_PREFIX) :]
        if not pid.isdigit() or not staging.is_dir() or process_is_alive(int(pid)):
            continue
        shutil.rmtree(staging, ignore_errors=True)
        logger.info("Removed %s, left by an evaluation that did not finish", staging)


def _materialise(dataset_name: str) -> None:
    """COCOEvaluator reads the dataset's JSON file directly: when it is not on disk yet (the
    bundled shapes data is generated on first use), load the dataset once, which generates it
    or raises an error naming the missing file."""
    json_file = MetadataCatalog.get(dataset_name).get("json_file")
    if json_file and not Path(json_file).is_file() and dataset_name in DatasetCatalog.list():
        DatasetCatalog.get(dataset_name)


def _check_ground_truth(coco_api, dataset_name: str) -> None:
    """Refuse ground truth that pycocotools would score wrongly without a word (duplicate
    annotation ids: perfect detections scored AP 77.6; annotations of unknown images; negative
    areas), with the training loader's own check and message, naming the file."""
    json_file = MetadataCatalog.get(dataset_name).get("json_file")
    check_annotation_integrity(coco_api.dataset, f"dataset {dataset_name!r} ({json_file})")


def _usable_box(bbox) -> bool:
    """A COCO [x, y, w, h] of four finite numbers with positive width and height."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return False
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
        return False
    return all(math.isfinite(v) for v in bbox) and bbox[2] > 0 and bbox[3] > 0


def _sanitize_ground_truth(coco_api, dataset_name: str, logger) -> None:
    """Make the raw JSON's annotations evaluable, as the training loader treats them: boxes that
    are not four finite numbers with a positive size are left out (the loader skips them), a
    missing or non-numeric `area` becomes the box's w * h, a missing `iscrowd` 0. Valid
    annotations are untouched, so COCO's own numbers are unchanged."""
    kept, dropped, filled = [], 0, 0
    for annotation in coco_api.dataset.get("annotations", []):
        if not _usable_box(annotation.get("bbox")):
            dropped += 1
            continue
        area = annotation.get("area")
        if not isinstance(area, (int, float)) or isinstance(area, bool) or not math.isfinite(area):
            annotation["area"] = float(annotation["bbox"][2] * annotation["bbox"][3])
            filled += 1
        annotation.setdefault("iscrowd", 0)
        kept.append(annotation)
    if dropped or filled:
        logger.warning(
            "%s: evaluating without %d annotation(s) whose bbox is unusable, and with the box "
            "area for %d without a numeric area", dataset_name, dropped, filled
        )  # fmt: skip
        coco_api.dataset["annotations"] = kept
        coco_api.createIndex()


def ranking_metrics(coco_eval) -> dict[str, float]:
    """AR1..ARl and oLRP with its components, in percent, from a summarized COCOeval (None when
    the model predicted nothing: every metric is NaN)."""
    if coco_eval is None:
        return {name: float("nan") for name in AR_METRICS + OLRP_METRICS}
    # COCOeval writes -1 for a recall it cannot compute (e.g. no ground truth in an area range).
    results = {
        name: float(value * 100) if value >= 0 else float("nan")
        for name, value in zip(AR_METRICS, coco_eval.stats[6:12])
    }
    olrp = olrp_from_coco_eval(coco_eval, tau=0.5)
    values = (olrp.olrp, olrp.loc, olrp.fp, olrp.fn)
    results.update(
        {name: value * 100 if not math.isnan(value) else value
         for name, value in zip(OLRP_METRICS, values)}
    )  # fmt: skip
    return results
