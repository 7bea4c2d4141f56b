"""Headless matplotlib (Agg) for the figure commands, and the styles that tell two models apart."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: the commands only write files

import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["MODEL_COLOURS", "MODEL_LINESTYLES", "plt", "save_figure"]

MODEL_LINESTYLES = ("-", "--")  # first model solid, second dashed
MODEL_COLOURS = ("tab:blue", "tab:orange")


def save_figure(figure, path: Path, dpi: int = 150) -> Path:
    """Write the figure as PNG, close it, and print where it went."""
    figure.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(figure)
    print(f"wrote {path}")
    return path
