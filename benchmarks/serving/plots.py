"""PNG plots of the serving benchmark: SLO attainment against request rate, and
latency CDFs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt


def attainment_plot(
    path: Path,
    title: str,
    curves: Mapping[str, Sequence[tuple[float, float]]],
    target: float = 0.9,
) -> None:
    """One line per system: the fraction of requests meeting both targets at each rate."""
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for name, points in curves.items():
        ordered = sorted(points)
        axes.plot([r for r, _ in ordered], [100 * a for _, a in ordered], marker="o", label=name)
    axes.axhline(100 * target, color="grey", linestyle="--", linewidth=1)
    axes.set_xlabel("request rate (req/s)")
    axes.set_ylabel("requests meeting TTFT and TPOT SLOs (%)")
    axes.set_ylim(0, 102)
    _finish(figure, axes, title, path)


def cdf_plot(
    path: Path, title: str, series: Mapping[str, Sequence[float]], xlabel: str, slo: float | None
) -> None:
    """Empirical CDFs, one per system, with the SLO as a vertical line."""
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for name, values in series.items():
        ordered = sorted(values)
        if ordered:
            fractions = [100 * (i + 1) / len(ordered) for i in range(len(ordered))]
            axes.step(ordered, fractions, where="post", label=name)
    if slo is not None:
        axes.axvline(slo, color="grey", linestyle="--", linewidth=1, label="SLO")
    axes.set_xscale("log")
    axes.set_xlabel(xlabel)
    axes.set_ylabel("requests (%)")
    _finish(figure, axes, title, path)


def _finish(figure: Any, axes: Any, title: str, path: Path) -> None:
    """The title, grid and legend every plot here has; then write the PNG."""
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
