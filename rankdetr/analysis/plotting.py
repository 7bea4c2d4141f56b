"""Headless matplotlib (Agg) for the figure commands, and the styles that tell two models apart."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: the commands only write files

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from rankdetr.analysis.stats import empirical_cdf  # noqa: E402

__all__ = ["MODEL_COLOURS", "MODEL_LINESTYLES", "cdf_steps", "plt", "save_figure"]

MODEL_LINESTYLES = ("-", "--")  # first model solid, second dashed
MODEL_COLOURS = ("tab:blue", "tab:orange")


def save_figure(figure, path: Path, dpi: int = 150) -> Path:
    """Write the figure as PNG, close it, and print where it went."""
    figure.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(figure)
    print(f"wrote {path}")
    return path


def cdf_steps(values, lower: float = 0.0, upper: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The empirical CDF of `values` as step-plot points (`where="post"`), drawn from 0 at
    `lower` to 1 at `upper`, so that every line spans the whole axis."""
    x, p = empirical_cdf(values)
    return np.concatenate([[lower], x, [upper]]), np.concatenate([[0.0], p, [1.0]])
