"""The figures: matplotlib, loaded lazily (it comes with the [train] extra), drawn off-screen, PNGs written whole."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from ..errors import DogkitError


def have_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def pyplot():
    if not have_matplotlib():
        raise DogkitError("plots need matplotlib: pip install matplotlib (it comes with the [train] extra)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def percent_axis(axis) -> None:
    """Label a 0–1 axis in %, as the report's tables are, with as many decimals as the view needs: a fixed 0
    wrote "1%" under every tick of a weak model's 0.8–1.2 % curve."""
    from matplotlib.ticker import PercentFormatter

    axis.set_major_formatter(PercentFormatter(1.0, decimals=None))


def points(count: int) -> str | None:
    """The marker of a curve of ``count`` points: a line through one point draws nothing, and markers show a
    short curve's epochs; a long one reads better as a line."""
    return "o" if count <= 20 else None


def save(fig, path: Path) -> str:
    """Write the figure as a PNG, atomically: a reader never sees half of one."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")  # the temporary name has no .png
        pyplot().close(fig)
    return path.name


def plot_confusion(cm: np.ndarray, class_names: list[str], path: Path) -> str:
    """Row-normalised heatmap; breed names on the axes when there are few enough to read."""
    plt = pyplot()
    n = len(class_names)
    side = min(max(6.0, n * 0.12), 24.0)
    fig, ax = plt.subplots(figsize=(side, side))
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (rows normalised)")
    if n <= 40:
        ax.set_xticks(range(n), class_names, rotation=90, fontsize=6)
        ax.set_yticks(range(n), class_names, fontsize=6)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return save(fig, path)
