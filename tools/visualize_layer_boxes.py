#!/usr/bin/env python
"""Positive and top-scoring negative query boxes, decoder layer by decoder layer (paper Fig. 5).

    .venv/bin/python tools/visualize_layer_boxes.py \\
        --model Rank-DETR configs/demo/rank_detr_r18_shapes.py output/demo/model_final.pth \\
        --image-indices 0,1 --output output/figures/layer_boxes.png

One row per (image, model), one panel per decoder layer. In every layer the one-to-one queries
are matched to the ground truth with the model's own Hungarian matcher (its cost at
--training-progress, default the end of training). Green: matched (positive) query boxes; red:
the --num-negatives highest-scoring unmatched (negative) ones; yellow, dashed: ground truth.
The number by a box is its classification score (max sigmoid over classes).
"""

from __future__ import annotations

import argparse

from detectron2.data.detection_utils import read_image

from rankdetr.analysis.collect import ImageLayerOutputs
from rankdetr.analysis.loading import (
    AnalysisError,
    add_common_arguments,
    add_matching_arguments,
    collect_per_model,
    dataset_dicts,
    load_models,
    output_path,
    run_command,
    set_training_progress,
)
from rankdetr.analysis.plotting import plt, save_figure
from rankdetr.analysis.stats import positive_mask

COLOURS = {"positive": "lime", "negative": "red", "gt": "yellow"}


def _draw_box(panel, box, colour: str, text: str | None = None, dashed: bool = False) -> None:
    x0, y0, x1, y1 = (float(v) for v in box)
    panel.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour,
                                  lw=1.4, ls="--" if dashed else "-"))  # fmt: skip
    if text:
        panel.text(x0, y0, text, color="black", fontsize=6, va="bottom",
                   bbox={"facecolor": colour, "alpha": 0.8, "pad": 0.5, "lw": 0})  # fmt: skip


def layer_boxes(record: ImageLayerOutputs, layer: int, num_negatives: int):
    """(positive boxes (P, 4) xyxy, their scores, top negative boxes (N, 4), their scores)."""
    boxes, scores = record.boxes_xyxy(layer), record.scores[layer]
    positive = positive_mask(scores.shape[0], record.matches[layer][0])
    negative_scores, order = scores[~positive].sort(descending=True)
    top = order[:num_negatives]
    return boxes[positive], scores[positive], boxes[~positive][top], negative_scores[:num_negatives]


def draw_layer(panel, image, record: ImageLayerOutputs, layer: int, num_negatives: int) -> None:
    panel.imshow(image)
    for box in record.gt_xyxy():
        _draw_box(panel, box, COLOURS["gt"], dashed=True)
    pos_boxes, pos_scores, neg_boxes, neg_scores = layer_boxes(record, layer, num_negatives)
    for box, score in zip(neg_boxes, neg_scores):
        _draw_box(panel, box, COLOURS["negative"], f"{score:.2f}")
    for box, score in zip(pos_boxes, pos_scores):
        _draw_box(panel, box, COLOURS["positive"], f"{score:.2f}")
    panel.set_xlim(0, record.width)
    panel.set_ylim(record.height, 0)
    panel.axis("off")


def plot_layer_boxes(records: dict[str, list[ImageLayerOutputs]], num_negatives: int):
    """records: model name -> one ImageLayerOutputs per chosen image (same images per model)."""
    names = list(records)
    num_images = len(records[names[0]])
    num_layers = max(r.num_layers for rs in records.values() for r in rs)
    rows = num_images * len(names)
    figure, axes = plt.subplots(rows, num_layers, figsize=(2.8 * num_layers, 2.8 * rows),
                                squeeze=False)  # fmt: skip
    for image_index in range(num_images):
        image = read_image(records[names[0]][image_index].file_name, format="RGB")
        for model_index, name in enumerate(names):
            row = image_index * len(names) + model_index
            record = records[name][image_index]
            for layer in range(num_layers):
                panel = axes[row, layer]
                if layer >= record.num_layers:
                    panel.axis("off")
                    continue
                draw_layer(panel, image, record, layer, num_negatives)
                panel.set_title(f"{name}, layer {layer + 1}", fontsize=8)
    figure.suptitle("green: positive, red: top negatives, yellow dashed: ground truth", fontsize=9)
    figure.tight_layout()
    return figure


def chosen_dicts(dataset_name: str, indices: list[int] | None, max_images: int | None):
    """Dataset dicts at `indices`, else the first `max_images` (default 2)."""
    if not indices:
        return dataset_dicts(dataset_name, max_images or 2)
    dicts = dataset_dicts(dataset_name, None)
    bad = [i for i in indices if not 0 <= i < len(dicts)]
    if bad:
        raise AnalysisError(
            f"--image-indices {bad} out of range: dataset {dataset_name!r} has {len(dicts)} images"
        )
    return [dicts[i] for i in indices]


def _indices(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, default_output="output/figures/layer_boxes.png")
    add_matching_arguments(parser)
    parser.add_argument(
        "--image-indices", type=_indices, help="comma-separated dataset indices, e.g. 0,5,9"
    )
    parser.add_argument("--num-negatives", type=int, default=3, help="negatives drawn per layer")
    args = parser.parse_args(argv)
    if args.num_negatives < 0:
        raise AnalysisError(f"--num-negatives must be >= 0, got {args.num_negatives}")
    output = output_path(args)
    models, dataset_name = load_models(args)
    set_training_progress(models, args.training_progress)
    dicts = chosen_dicts(dataset_name, args.image_indices, args.max_images)
    records = collect_per_model(models, dicts)
    save_figure(plot_layer_boxes(records, args.num_negatives), output)


if __name__ == "__main__":
    run_command(main)
