"""Pictures of what token reduction did: patches coloured by the token they belong to, pruned patches greyed.

Drawing only (numpy + matplotlib, no model): feed it the `layer_sources` / `token_counts` of a model output run
with `output_sources=True`. Figures are built with `matplotlib.figure.Figure` (no pyplot global state), so they
can be made from threads and tests and saved with `fig.savefig(path)`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.colors import hsv_to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from rapid_hf.reduction.tracing import assignment_from_sources

GOLDEN_RATIO_CONJUGATE = 0.618033988749895
MERGED_COLOUR_WEIGHT = 0.55
BORDER_COLOUR = (1.0, 1.0, 1.0)

# One colour per method in every figure the package draws (token pictures, accuracy/speed curves, studies).
METHOD_COLOURS: dict[str, str] = {
    "none": "#444444",
    "rapid": "#1f77b4",
    "tome": "#ff7f0e",
    "tofu": "#2ca02c",
    "crucial": "#9467bd",
    "pitome": "#d62728",
    "topk": "#8c564b",
}


def method_colour(method: str) -> str:
    """The colour of `method` in every figure (ValueError for an unknown method, never a silent default)."""
    if method not in METHOD_COLOURS:
        raise ValueError(f"no colour for method {method!r}: choose from {', '.join(METHOD_COLOURS)}")
    return METHOD_COLOURS[method]


@dataclass(frozen=True)
class ImageTrace:
    """One image's reduction, ready to draw.

    Attributes:
        assignments: per layer, `(P,)` index of the token standing for each patch after that layer (-1 pruned).
        token_counts: tokens after each layer.
        grid: `(rows, cols)` of the patch grid (`rows * cols == P`).
        label: what to call it in titles, e.g. "rapid r=16".
    """

    assignments: tuple[np.ndarray, ...]
    token_counts: tuple[int, ...]
    grid: tuple[int, int]
    label: str

    @classmethod
    def from_output(cls, output, grid: tuple[int, int], label: str, index: int = 0) -> ImageTrace:
        """Take image `index` of a Rapid model output computed with `output_sources=True`."""
        if getattr(output, "layer_sources", None) is None:
            raise ValueError("the model output has no layer_sources: call the model with output_sources=True")
        assignments = tuple(
            assignment_from_sources(sources[index : index + 1])[0].cpu().numpy() for sources in output.layer_sources
        )
        if assignments and assignments[0].shape[0] != grid[0] * grid[1]:
            raise ValueError(f"grid {grid} has {grid[0] * grid[1]} patches but the trace has {assignments[0].shape[0]}")
        return cls(assignments=assignments, token_counts=tuple(output.token_counts), grid=grid, label=label)


def denormalize(pixel_values: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A preprocessed `(3, H, W)` image back to `(H, W, 3)` RGB in [0, 1], exactly what the model saw."""
    if pixel_values.ndim != 3 or pixel_values.shape[0] != len(mean) or len(mean) != len(std):
        raise ValueError(
            f"denormalize needs one (channels, H, W) image and per-channel mean/std, got shape "
            f"{tuple(pixel_values.shape)}, {len(mean)} means, {len(std)} stds"
        )
    mean_t = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    std_t = torch.tensor(std, dtype=torch.float32)[:, None, None]
    image = pixel_values.detach().float().cpu() * std_t + mean_t
    return image.clamp(0, 1).permute(1, 2, 0).numpy()


def token_colours(num_tokens: int) -> np.ndarray:
    """`(num_tokens, 3)` distinct, deterministic colours (hues spaced by the golden ratio)."""
    hues = (np.arange(num_tokens) * GOLDEN_RATIO_CONJUGATE) % 1.0
    return hsv_to_rgb(np.stack([hues, np.full_like(hues, 0.8), np.full_like(hues, 0.95)], axis=-1))


def render_tokens(image: np.ndarray, assignment: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Draw one layer's token groups over `image` `(H, W, 3)` in [0, 1].

    Patches of a merged token (size >= 2) are tinted with that token's colour and outlined in white, patches
    still alone are left as they are, pruned patches (-1) are shown as dim grey. The image is cropped to whole
    patches (`H // rows` pixels per patch row, likewise for columns).
    """
    rows, cols = grid
    assignment = np.asarray(assignment)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (height, width, 3) RGB, got shape {image.shape}")
    if assignment.shape != (rows * cols,):
        raise ValueError(f"assignment must have one entry per patch of the {rows}x{cols} grid, got {assignment.shape}")
    patch_h, patch_w = image.shape[0] // rows, image.shape[1] // cols
    if patch_h < 1 or patch_w < 1:
        raise ValueError(f"image of shape {image.shape} is smaller than the {rows}x{cols} patch grid")
    image = image[: rows * patch_h, : cols * patch_w].astype(np.float64)
    owners = assignment.reshape(rows, cols)

    sizes = np.bincount(assignment[assignment >= 0], minlength=1)
    merged = np.zeros(owners.shape, dtype=bool)
    merged[owners >= 0] = sizes[owners[owners >= 0]] > 1
    colours = token_colours(int(sizes.shape[0]))[owners.clip(min=0)]

    def upsample(patches: np.ndarray) -> np.ndarray:
        return patches.repeat(patch_h, axis=0).repeat(patch_w, axis=1)

    luma = image @ np.array([0.299, 0.587, 0.114])
    grey = np.repeat((0.35 + 0.15 * luma)[..., None], 3, axis=-1)
    tinted = (1 - MERGED_COLOUR_WEIGHT) * image + MERGED_COLOUR_WEIGHT * upsample(colours)
    picture = np.where(upsample(owners < 0)[..., None], grey, np.where(upsample(merged)[..., None], tinted, image))

    # Outline merged groups: an edge between two different tokens where at least one side is merged.
    right = np.zeros(owners.shape, dtype=bool)
    right[:, :-1] = (owners[:, 1:] != owners[:, :-1]) & (merged[:, 1:] | merged[:, :-1])
    below = np.zeros(owners.shape, dtype=bool)
    below[:-1] = (owners[1:] != owners[:-1]) & (merged[1:] | merged[:-1])
    right_edge = np.zeros((patch_h, patch_w), dtype=bool)
    right_edge[:, -1] = True
    bottom_edge = np.zeros((patch_h, patch_w), dtype=bool)
    bottom_edge[-1] = True
    border = np.kron(right, right_edge).astype(bool) | np.kron(below, bottom_edge).astype(bool)
    picture[border] = BORDER_COLOUR
    return picture


def check_layers(layers: Sequence[int], num_layers: int) -> list[int]:
    """Validate 0-based layer indices against the model depth."""
    if not layers:
        raise ValueError("choose at least one layer to draw")
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad:
        raise ValueError(f"layer(s) {bad} out of range: this model has layers 0..{num_layers - 1}")
    return list(layers)


def default_layers(num_layers: int) -> list[int]:
    """Four layers spread over the depth, ending at the last (3, 6, 9, 11 for 12 layers)."""
    return sorted({min(num_layers - 1, round(num_layers * k / 4)) for k in range(1, 5)})


def _draw_panel(axes, image: np.ndarray, trace: ImageTrace, layer: int, title_prefix: str = "") -> None:
    axes.imshow(render_tokens(image, trace.assignments[layer], trace.grid))
    pruned, pruned_of = int((trace.assignments[layer] < 0).sum()), trace.assignments[layer].shape[0]
    axes.set_title(
        f"{title_prefix}layer {layer}: {trace.token_counts[layer]} tokens\n{pruned}/{pruned_of} patches pruned",
        fontsize=9,
    )
    axes.set_axis_off()


def add_token_legend(figure: Figure) -> None:
    """Explain the colours of `render_tokens` under the panels: pruned grey, merged tinted, alone unchanged."""
    handles = [
        Patch(facecolor=(0.45, 0.45, 0.45), edgecolor="black", label="pruned patch (grey)"),
        Patch(facecolor=token_colours(3)[1], edgecolor="white", label="merged group (a tint per token, white outline)"),
        Patch(facecolor="white", edgecolor="black", label="token still alone (image unchanged)"),
    ]
    figure.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=8, frameon=False)


def layer_figure(image: np.ndarray, trace: ImageTrace, layers: Sequence[int], title: str) -> Figure:
    """One panel per layer in `layers` (0-based), token groups after that layer's reduction."""
    layers = check_layers(layers, len(trace.assignments))
    figure = Figure(figsize=(3.2 * len(layers), 3.6), layout="constrained")
    for axes, layer in zip(figure.subplots(1, len(layers), squeeze=False)[0], layers, strict=True):
        _draw_panel(axes, image, trace, layer)
    figure.suptitle(title)
    add_token_legend(figure)
    return figure


def comparison_figure(image: np.ndarray, traces: Mapping[str, ImageTrace], layers: Sequence[int], title: str) -> Figure:
    """Methods side by side: one row per trace (keyed by method name), one column per layer.

    Row titles take the method's colour (`METHOD_COLOURS`), as in the accuracy/speed picture.
    """
    if not traces:
        raise ValueError("comparison_figure needs at least one trace")
    layers = check_layers(layers, min(len(trace.assignments) for trace in traces.values()))
    figure = Figure(figsize=(3.2 * len(layers), 3.4 * len(traces)), layout="constrained")
    grid = figure.subplots(len(traces), len(layers), squeeze=False)
    for row, (method, trace) in zip(grid, traces.items(), strict=True):
        for axes, layer in zip(row, layers, strict=True):
            _draw_panel(axes, image, trace, layer, title_prefix=f"{trace.label}: ")
            if method in METHOD_COLOURS:
                axes.title.set_color(METHOD_COLOURS[method])
    figure.suptitle(title)
    add_token_legend(figure)
    return figure


__all__ = [
    "METHOD_COLOURS",
    "ImageTrace",
    "add_token_legend",
    "check_layers",
    "comparison_figure",
    "default_layers",
    "denormalize",
    "layer_figure",
    "method_colour",
    "render_tokens",
    "token_colours",
]
