"""Token-group pictures: the drawing functions on hand-made traces, and `rapid-hf visualize` on the real DeiT-Tiny."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from matplotlib.colors import to_hex
from PIL import Image

from rapid_hf import RapidConfig, cli
from rapid_hf.cli.visualize import draw
from rapid_hf.evaluation.pareto import pareto_figure
from rapid_hf.reduction.tracing import sources_from_assignment
from rapid_hf.visualization import (
    METHOD_COLOURS,
    ImageTrace,
    comparison_figure,
    default_layers,
    denormalize,
    layer_figure,
    method_colour,
    render_tokens,
    token_colours,
)

# A 4x4 patch grid of 2x2-pixel patches: patches 0 and 1 are merged into token 1, patch 15 is pruned,
# the rest stand alone (tokens 2..14; token 0 is CLS).
ASSIGNMENT = np.array([1, 1, *range(2, 15), -1])
GRID = (4, 4)


def visualize(argv: list[str]):
    """`rapid-hf visualize ARGV`: write the picture and return its figure."""
    args = cli.parse_args(["visualize", *argv])
    figure = draw(args)
    figure.savefig(args.output, dpi=args.dpi)
    return figure


def patch_pixels(picture: np.ndarray, patch: int) -> np.ndarray:
    row, col = divmod(patch, GRID[1])
    return picture[2 * row : 2 * row + 2, 2 * col : 2 * col + 2]


def test_render_tints_merged_greys_pruned_and_keeps_lone_patches():
    image = np.random.default_rng(0).uniform(0.2, 0.8, size=(8, 8, 3))
    picture = render_tokens(image, ASSIGNMENT, GRID)
    assert picture.shape == (8, 8, 3)
    lone = 10  # not next to the merged group, so no outline crosses it
    assert np.array_equal(patch_pixels(picture, lone), patch_pixels(image, lone))
    pruned = patch_pixels(picture, 15)
    assert np.allclose(pruned[..., 0], pruned[..., 1]) and np.allclose(pruned[..., 1], pruned[..., 2])
    assert not np.allclose(pruned, patch_pixels(image, 15))
    # The merged patches carry the same tint: picture - 0.45 * image is the tint colour everywhere inside them.
    tint = (picture[:1, :3] - 0.45 * image[:1, :3]).reshape(-1, 3)
    assert np.allclose(tint, tint[0]) and not np.allclose(picture[:1, :3], image[:1, :3])
    # White outline between the merged group and its neighbours (right edge of patch 1, bottom of patch 0).
    assert np.array_equal(picture[0, 3], [1.0, 1.0, 1.0]) and np.array_equal(picture[1, 0], [1.0, 1.0, 1.0])


def test_render_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="one entry per patch"):
        render_tokens(np.zeros((8, 8, 3)), ASSIGNMENT[:-1], GRID)
    with pytest.raises(ValueError, match="RGB"):
        render_tokens(np.zeros((8, 8)), ASSIGNMENT, GRID)
    with pytest.raises(ValueError, match="smaller than"):
        render_tokens(np.zeros((2, 2, 3)), ASSIGNMENT, GRID)


def test_token_colours_are_distinct_and_deterministic():
    colours = token_colours(200)
    assert colours.shape == (200, 3) and len(np.unique(colours.round(6), axis=0)) == 200
    assert np.array_equal(colours, token_colours(200))


def test_denormalize_inverts_the_processor_normalisation():
    image = torch.rand(3, 5, 7)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    normalised = (image - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    assert np.allclose(denormalize(normalised, mean, std), image.permute(1, 2, 0).numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="one"):
        denormalize(normalised[None], mean, std)


def hand_made_trace(label: str) -> ImageTrace:
    layers = (np.arange(1, 17), ASSIGNMENT, ASSIGNMENT)
    return ImageTrace(assignments=layers, token_counts=(17, 15, 15), grid=GRID, label=label)


def test_layer_figure_has_one_titled_panel_per_layer():
    figure = layer_figure(np.zeros((8, 8, 3)), hand_made_trace("rapid r=1"), [0, 2], "rapid r=1")
    assert len(figure.axes) == 2
    assert [axes.get_title() for axes in figure.axes] == [
        "layer 0: 17 tokens\n0/16 patches pruned",
        "layer 2: 15 tokens\n1/16 patches pruned",
    ]
    assert figure.get_suptitle() == "rapid r=1"
    with pytest.raises(ValueError, match=r"out of range: this model has layers 0\.\.2"):
        layer_figure(np.zeros((8, 8, 3)), hand_made_trace("x"), [3], "x")


def test_comparison_figure_has_a_row_per_method():
    traces = {name: hand_made_trace(name) for name in ("rapid", "tome", "tofu")}
    figure = comparison_figure(np.zeros((8, 8, 3)), traces, [1, 2], "compare")
    assert len(figure.axes) == 6
    assert figure.axes[2].get_title().startswith("tome: layer 1")


def test_trace_from_output_reads_layer_sources_and_checks_the_grid():
    sources = tuple(sources_from_assignment(torch.as_tensor(a)[None], 17) for a in hand_made_trace("x").assignments)
    output = SimpleNamespace(layer_sources=sources, token_counts=(17, 15, 15))
    trace = ImageTrace.from_output(output, GRID, "x")
    assert all(np.array_equal(a, b) for a, b in zip(trace.assignments, hand_made_trace("x").assignments, strict=True))
    with pytest.raises(ValueError, match="grid"):
        ImageTrace.from_output(output, (3, 3), "x")
    with pytest.raises(ValueError, match="output_sources=True"):
        ImageTrace.from_output(SimpleNamespace(layer_sources=None), GRID, "x")


def test_default_layers_spread_over_the_depth():
    assert default_layers(12) == [3, 6, 9, 11]
    assert default_layers(4) == [1, 2, 3]


def assert_png(path: Path, figure, dpi: int) -> None:
    with Image.open(path) as picture:
        assert picture.format == "PNG"
        picture.verify()
    with Image.open(path) as picture:
        expected = np.round(figure.get_size_inches() * dpi).astype(int)
        assert np.abs(np.array(picture.size) - expected).max() <= 1


def test_script_writes_one_panel_per_layer(deit_tiny_path, dev_images_path, tmp_path, capsys):
    image = sorted(dev_images_path.glob("*.jpg"))[0]
    output = tmp_path / "rapid.png"
    args = ["--model", str(deit_tiny_path), "--image", str(image), "--method", "rapid", "--r", "16"]
    figure = visualize([*args, "--layers", "0,5,11", "--output", str(output), "--dpi", "50"])
    assert len(figure.axes) == 3
    assert "rapid r=16" in figure.get_suptitle()
    assert [axes.get_title().split("\n")[0] for axes in figure.axes] == [
        "layer 0: 181 tokens",
        "layer 5: 101 tokens",
        "layer 11: 11 tokens",
    ]
    assert_png(output, figure, dpi=50)
    with pytest.raises(SystemExit):
        cli.main(["visualize", *args, "--layers", "12", "--output", str(tmp_path / "bad.png")])
    assert "out of range" in capsys.readouterr().err
    assert not (tmp_path / "bad.png").exists()


def test_script_compares_methods_at_another_resolution(deit_tiny_path, dev_images_path, tmp_path):
    image = sorted(dev_images_path.glob("*.jpg"))[1]
    output = tmp_path / "compare.png"
    figure = visualize(
        [
            *("--model", str(deit_tiny_path), "--image", str(image), "--compare", "rapid,tome,tofu", "--r", "16"),
            *("--layers", "3,11", "--size", "160", "--output", str(output), "--dpi", "50"),
        ]
    )
    assert len(figure.axes) == 6
    assert "160x160 px, 100 patches" in figure.get_suptitle()
    # 101 tokens at 160 px: layer 3 has removed 4 x 16, layer 11 is capped at (N - 1) // 2 per layer.
    assert figure.axes[0].get_title().startswith("rapid r=16: layer 3: 37 tokens")
    assert_png(output, figure, dpi=50)


def test_script_rejects_bad_arguments(tmp_path, capsys):
    missing = ["--model", "m", "--image", str(tmp_path / "none.jpg"), "--output", str(tmp_path / "x.png")]
    with pytest.raises(SystemExit):
        visualize(missing)
    assert "is not a file" in capsys.readouterr().err
    image = tmp_path / "image.png"
    Image.new("RGB", (8, 8)).save(image)
    with pytest.raises(SystemExit):
        visualize(["--model", "m", "--image", str(image), "--compare", "rapid,nope", "--output", "x.png"])
    assert "unknown method(s) ['nope']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        visualize(["--model", "m", "--image", str(image), "--layers", "a,b", "--output", "x.png"])
    assert "expected a comma-separated list of integers >= 0, got 'a,b'" in capsys.readouterr().err


def test_token_pictures_have_a_legend_and_methods_keep_their_colour(deit_tiny_path, dev_images_path, tmp_path):
    image = sorted(dev_images_path.glob("*.jpg"))[0]
    figure = visualize(["--model", str(deit_tiny_path), "--image", str(image), "--methods", "rapid,tome",
                        "--layers", "11", "--output", str(tmp_path / "cmp.png"), "--dpi", "30"])
    (legend,) = figure.legends
    labels = [text.get_text() for text in legend.get_texts()]
    assert any("pruned" in label and "grey" in label for label in labels)
    assert any("merged group" in label for label in labels)
    rapid_title, tome_title = (axes.title for axes in figure.axes)
    assert to_hex(rapid_title.get_color()) == METHOD_COLOURS["rapid"]
    assert to_hex(tome_title.get_color()) == METHOD_COLOURS["tome"]


def test_one_colour_per_method_in_the_accuracy_speed_picture(tmp_path):
    accuracy, bench = [], []
    for method in ("none", "tome", "rapid"):
        for r in (4, 8) if method != "none" else (0,):
            key = {"label": method, "method": method, "r": r, "rapid": RapidConfig(method=method, r=r).to_dict()}
            accuracy.append({**key, "top1": 0.7 - 0.01 * r})
            bench.append({**key, "throughput": 10.0 + r, "gflops": 2.0 - 0.1 * r})
    figure = pareto_figure(accuracy, bench)
    for axes in figure.axes:
        colours = {line.get_label(): to_hex(line.get_color()) for line in axes.get_lines()}
        assert colours == {"rapid": METHOD_COLOURS["rapid"], "tome": METHOD_COLOURS["tome"]}
    with pytest.raises(ValueError, match="no colour for method 'magic'"):
        method_colour("magic")
