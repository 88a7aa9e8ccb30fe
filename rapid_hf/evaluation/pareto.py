"""The accuracy/speed picture: top-1 against throughput and against GFLOPs, one curve per method."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rapid_hf.evaluation.report import row_key, setting


def pareto_points(accuracy: Sequence[dict[str, Any]], bench: Sequence[dict[str, Any]]) -> dict[str, list[dict]]:
    """Per label, points `{setting, top1, throughput, gflops}` joined by row, from least to most reduced (GFLOPs).

    The unreduced model ("full") is added to every curve as its starting point.
    """
    by_key = {row_key(b): b for b in bench}
    curves: dict[str, list[dict]] = {}
    start = None
    for record in accuracy:
        timing = by_key.get(row_key(record))
        if timing is None:
            continue
        point = {
            "setting": "full" if record["method"] == "none" else setting(record),
            "top1": 100 * record["top1"],
            "throughput": timing["throughput"],
            "gflops": timing["gflops"],
        }
        if record["method"] == "none":
            start = point
        else:
            curves.setdefault(record["label"], []).append(point)
    for points in curves.values():
        if start is not None:
            points.append(start)
        points.sort(key=lambda p: -p["gflops"])
    return curves


def pareto_figure(accuracy: Sequence[dict[str, Any]], bench: Sequence[dict[str, Any]], title: str = ""):
    """Two panels: top-1 vs throughput (left) and vs GFLOPs per image (right), one curve per row label in its
    method's `rapid_hf.visualization.METHOD_COLOURS` colour (named variants dashed)."""
    from matplotlib.figure import Figure

    from rapid_hf.visualization import method_colour

    curves = pareto_points(accuracy, bench)
    if not curves:
        raise ValueError("no row appears in both the accuracy and the benchmark records: nothing to plot")
    methods = {record["label"]: record["method"] for record in accuracy}
    figure = Figure(figsize=(12, 4.8), layout="constrained")
    axes = figure.subplots(1, 2, sharey=True)
    for label, points in sorted(curves.items()):
        style = "-" if label == methods[label] else "--"
        for axis, key in zip(axes, ("throughput", "gflops"), strict=True):
            axis.plot([p[key] for p in points], [p["top1"] for p in points], marker="o", label=label,
                      color=method_colour(methods[label]), linestyle=style)
            for p in points:
                axis.annotate(p["setting"], (p[key], p["top1"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axes[0].set_xlabel("throughput (images/s, this run)")
    axes[1].set_xlabel("GFLOPs per image (2 per multiply-add)")
    axes[0].set_ylabel("top-1 accuracy (%)")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend()
    if title:
        figure.suptitle(title)
    return figure


def plot_pareto(
    accuracy: Sequence[dict[str, Any]], bench: Sequence[dict[str, Any]], path: str | Path, title: str = ""
) -> Path:
    """Save `pareto_figure` as a PNG at `path`."""
    figure = pareto_figure(accuracy, bench, title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path
