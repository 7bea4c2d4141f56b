#!/usr/bin/env python
"""Classification scores of matched (positive) and unmatched (negative) queries (paper Fig. 3b/3c).

    .venv/bin/python tools/plot_score_distributions.py \\
        --model Rank-DETR configs/demo/rank_detr_r18_shapes.py output/demo/model_final.pth \\
        --output output/figures/score_distributions.png

On each image the final decoder layer's one-to-one queries are matched to the ground truth with
the model's own Hungarian matcher (its cost at --training-progress, default the end of training);
a query's score is its max sigmoid over classes. Top row: density histograms, bottom row:
cumulative distributions; left: positives, right: negatives; one colour per model (e.g. with and
without QRL: add `--model "w/o QRL" CFG CKPT` with a config or checkpoint trained without it).
"""

from __future__ import annotations

import argparse

import numpy as np

from rankdetr.analysis.collect import matched_and_unmatched_scores
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
from rankdetr.analysis.plotting import MODEL_COLOURS, cdf_steps, plt, save_figure


def plot_score_distributions(scores: dict[str, tuple[np.ndarray, np.ndarray]], bins: int):
    """scores: model name -> (positive scores, negative scores)."""
    figure, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    edges = np.linspace(0.0, 1.0, bins + 1)
    for column, (kind, title) in enumerate(
        [(0, "matched (positive)"), (1, "unmatched (negative)")]
    ):
        for (name, values), colour in zip(scores.items(), MODEL_COLOURS):
            data = values[kind]
            if data.size == 0:
                continue
            label = f"{name} (n={data.size}, mean {data.mean():.3f})"
            axes[0, column].hist(data, bins=edges, density=True, histtype="stepfilled",
                                 alpha=0.35, color=colour, label=label)  # fmt: skip
            axes[0, column].hist(data, bins=edges, density=True, histtype="step", color=colour)
            x, p = cdf_steps(data)
            axes[1, column].step(x, p, where="post", color=colour, label=name)
        axes[0, column].set(title=f"{title} queries", ylabel="density")
        axes[1, column].set(xlabel="classification score", ylabel="cumulative probability",
                            xlim=(0, 1), ylim=(0, 1.01))  # fmt: skip
        axes[0, column].legend(fontsize=8)
        axes[1, column].legend(fontsize=8, loc="lower right")
        for row in range(2):
            axes[row, column].grid(alpha=0.3)
    return figure


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, default_output="output/figures/score_distributions.png")
    add_matching_arguments(parser)
    parser.add_argument("--bins", type=int, default=50, help="histogram bins over [0, 1]")
    args = parser.parse_args(argv)
    if args.bins < 1:
        raise AnalysisError(f"--bins must be at least 1, got {args.bins}")
    output = output_path(args)
    models, dataset_name = load_models(args)
    set_training_progress(models, args.training_progress)
    dicts = dataset_dicts(dataset_name, args.max_images)
    scores = {
        name: matched_and_unmatched_scores(records, layer=-1)
        for name, records in collect_per_model(models, dicts).items()
    }
    for name, (positives, negatives) in scores.items():
        print(f"{name}: {positives.size} matched queries (mean score "
              f"{_mean(positives):.4f}), {negatives.size} unmatched (mean score "
              f"{_mean(negatives):.4f}) on {len(dicts)} images")  # fmt: skip
    save_figure(plot_score_distributions(scores, args.bins), output)


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else float("nan")


if __name__ == "__main__":
    run_command(main)
