#!/usr/bin/env python
"""Cumulative distribution, per decoder layer, of the max IoU of the unmatched queries with the
ground truth (paper Fig. 4).

    .venv/bin/python tools/plot_max_iou_cdf.py \\
        --model Rank-DETR configs/demo/rank_detr_r18_shapes.py output/demo/model_final.pth \\
        --output output/figures/max_iou_cdf.png

On each image every decoder layer's one-to-one queries are matched to the ground truth with the
model's own Hungarian matcher (its cost at --training-progress, default the end of training); an
unmatched query's value is its largest IoU with any ground-truth box of the image. One panel per
decoder layer, one line per model (e.g. with and without HMC).
"""

from __future__ import annotations

import argparse

import numpy as np

from rankdetr.analysis.collect import unmatched_max_ious
from rankdetr.analysis.loading import (
    add_common_arguments,
    add_matching_arguments,
    collect_per_model,
    dataset_dicts,
    load_models,
    output_path,
    run_command,
    set_training_progress,
)
from rankdetr.analysis.plotting import MODEL_COLOURS, MODEL_LINESTYLES, cdf_steps, plt, save_figure


def plot_max_iou_cdf(ious: dict[str, list[np.ndarray]]):
    """ious: model name -> per decoder layer, the unmatched queries' max IoU."""
    num_layers = max(len(layers) for layers in ious.values())
    figure, axes = plt.subplots(1, num_layers, figsize=(3.6 * num_layers, 3.6), squeeze=False)
    for layer, panel in enumerate(axes[0]):
        for (name, layers), colour, style in zip(ious.items(), MODEL_COLOURS, MODEL_LINESTYLES):
            if layer >= len(layers) or layers[layer].size == 0:
                continue
            x, p = cdf_steps(layers[layer])
            label = f"{name} (mean {layers[layer].mean():.3f})"
            panel.step(x, p, style, where="post", color=colour, label=label)
        panel.set(title=f"decoder layer {layer + 1}", xlabel="max IoU with ground truth",
                  xlim=(0, 1), ylim=(0, 1.01))  # fmt: skip
        panel.grid(alpha=0.3)
        panel.legend(fontsize=7, loc="lower right")
    axes[0, 0].set_ylabel("cumulative probability (unmatched queries)")
    return figure


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, default_output="output/figures/max_iou_cdf.png")
    add_matching_arguments(parser)
    args = parser.parse_args(argv)
    output = output_path(args)
    models, dataset_name = load_models(args)
    set_training_progress(models, args.training_progress)
    dicts = dataset_dicts(dataset_name, args.max_images)
    ious = {
        name: [unmatched_max_ious(records, layer) for layer in range(records[0].num_layers)]
        for name, records in collect_per_model(models, dicts).items()
    }
    for name, per_layer in ious.items():
        means = ", ".join(f"{_mean(values):.4f}" for values in per_layer)
        print(f"{name}: mean max IoU of unmatched queries per layer: {means}")
    save_figure(plot_max_iou_cdf(ious), output)


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else float("nan")


if __name__ == "__main__":
    run_command(main)
