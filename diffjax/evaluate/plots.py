"""Figures as PNG files, drawn off-screen (Agg), so evaluation runs on headless machines."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # after use(): the backend must be chosen first
from matplotlib.figure import Figure

DPI = 120


def new_figure(width: float = 7.0, height: float = 4.5) -> Figure:
    """A figure whose layout keeps titles, tick labels and colorbars from overlapping."""
    return plt.figure(figsize=(width, height), layout="constrained")


def save(figure: Figure, path: Path) -> str:
    """Write `figure` to `path` and free it; returns the file name (for results.json)."""
    figure.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(figure)
    return path.name
