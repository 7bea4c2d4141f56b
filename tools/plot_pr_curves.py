#!/usr/bin/env python
"""Precision-recall curves at IoU 0.50:0.05:0.95 for one or two models (paper Fig. 3a).

    .venv/bin/python tools/plot_pr_curves.py \\
        --model Rank-DETR configs/demo/rank_detr_r18_shapes.py output/demo/model_final.pth \\
        --output output/figures/pr_curves.png

Each curve is COCOeval's precision at recall 0:0.01:1 (area all, maxDets 100) averaged over the
classes that have ground truth; colour = IoU threshold, line style = model (first solid, second
dashed). The dataset is the first model's test dataset unless --dataset or --coco-json says
otherwise; trailing key=value overrides apply to every model's config.
"""

from __future__ import annotations

import argparse

import numpy as np

from rankdetr.analysis.loading import (
    add_common_arguments,
    dataset_dicts,
    load_models,
    mapped_inputs,
    output_path,
    run_command,
)
from rankdetr.analysis.plotting import MODEL_LINESTYLES, plt, save_figure
from rankdetr.analysis.pr import coco_ground_truth, coco_precision, predict_coco_json
from rankdetr.analysis.stats import (
    COCO_IOU_THRESHOLDS,
    COCO_RECALL_THRESHOLDS,
    average_precision,
    pr_curves,
)


def plot_pr_curves(curves: dict[str, np.ndarray], aps: dict[str, float], dataset_name: str):
    """curves: model name -> (10, 101) precision per IoU threshold and recall threshold."""
    figure, axes = plt.subplots(figsize=(6.5, 5))
    colours = plt.cm.viridis(np.linspace(0.0, 0.9, len(COCO_IOU_THRESHOLDS)))
    for curve, style in zip(curves.values(), MODEL_LINESTYLES):
        for row, (iou, colour) in enumerate(zip(COCO_IOU_THRESHOLDS, colours)):
            label = f"IoU {iou:.2f}" if style == MODEL_LINESTYLES[0] else None
            axes.plot(COCO_RECALL_THRESHOLDS, curve[row], style, color=colour, lw=1.3, label=label)
    iou_legend = axes.legend(loc="lower left", fontsize=7, ncol=2, title="IoU threshold")
    axes.add_artist(iou_legend)
    model_lines = [
        axes.plot([], [], style, color="black", label=f"{name} (AP {100 * aps[name]:.1f})")[0]
        for name, style in zip(curves, MODEL_LINESTYLES)
    ]
    axes.legend(handles=model_lines, loc="upper right", fontsize=8)
    axes.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
    axes.set_title(f"Precision-recall, {dataset_name} (area all, maxDets 100)", fontsize=10)
    axes.grid(alpha=0.3)
    return figure


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, default_output="output/figures/pr_curves.png")
    args = parser.parse_args(argv)
    output = output_path(args)
    models, dataset_name = load_models(args)
    dicts = dataset_dicts(dataset_name, args.max_images)
    coco_gt = coco_ground_truth(dataset_name)
    curves, aps = {}, {}
    for loaded in models:
        results, image_ids = predict_coco_json(
            loaded.model, mapped_inputs(loaded.cfg, dicts), dataset_name, len(dicts), loaded.name
        )
        precision = coco_precision(coco_gt, results, image_ids)
        curves[loaded.name] = pr_curves(precision)
        aps[loaded.name] = average_precision(precision)
        print(f"{loaded.name}: AP {100 * aps[loaded.name]:.1f} on {len(dicts)} images")
    save_figure(plot_pr_curves(curves, aps, dataset_name), output)


if __name__ == "__main__":
    run_command(main)
