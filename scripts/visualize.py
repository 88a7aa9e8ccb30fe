"""Draw which image patches a token-reduction method pruned or merged, layer by layer.

One method:      python scripts/visualize.py --model PATH --image IMG --method rapid --r 16 --output out.png
Methods compared: python scripts/visualize.py --model PATH --image IMG --compare rapid,tome,tofu --r 16 --output cmp.png
Options: --layers 3,6,9,11 (0-based, default four spread over the depth), --size 288 (any resolution, via
`interpolate_pos_encoding`), --dpi.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure
from PIL import Image
from transformers import AutoImageProcessor

from rapid_hf.evaluation.loading import load_rapid_model
from rapid_hf.reduction.config import METHODS, RapidConfig
from rapid_hf.visualization import (
    ImageTrace,
    check_layers,
    comparison_figure,
    default_layers,
    denormalize,
    layer_figure,
)


def preprocess(name_or_path: str, image_path: Path, size: int | None) -> tuple[torch.Tensor, list[float], list[float]]:
    """The model's own preprocessing, rescaled to a `size` x `size` input when given; returns pixels, mean, std."""
    processor = AutoImageProcessor.from_pretrained(name_or_path)
    kwargs = {}
    if size is not None:
        if "height" not in (processor.size or {}):
            raise ValueError(f"--size needs an image processor with a (height, width) size, got {processor.size}")
        crops = bool(getattr(processor, "do_center_crop", False))
        # Keep the processor's resize-to-crop ratio (DeiT: 256 -> 224) at the new size.
        resize = round(processor.size["height"] * size / processor.crop_size["height"]) if crops else size
        kwargs["size"] = {"height": resize, "width": resize}
        if crops:
            kwargs["crop_size"] = {"height": size, "width": size}
    with Image.open(image_path) as picture:
        pixel_values = processor(images=picture.convert("RGB"), return_tensors="pt", **kwargs)["pixel_values"]
    return pixel_values, list(processor.image_mean), list(processor.image_std)


def parse_list(text: str, cast: type, what: str) -> list:
    try:
        return [cast(item) for item in text.split(",") if item.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{what} must be a comma-separated list, got {text!r}") from error


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="ViT/DeiT image-classification checkpoint (path or Hub id)")
    parser.add_argument("--image", required=True, type=Path, help="image file to trace")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--method", default="rapid", choices=METHODS, help="method to draw (default rapid)")
    mode.add_argument(
        "--compare",
        type=lambda text: parse_list(text, str, "--compare"),
        help=f"comma-separated methods to draw side by side, from {', '.join(METHODS)}",
    )
    parser.add_argument("--r", type=int, default=16, help="tokens removed per layer (default 16)")
    parser.add_argument(
        "--layers", type=lambda text: parse_list(text, int, "--layers"), help="0-based layers, e.g. 3,6,9,11"
    )
    parser.add_argument("--size", type=int, help="input resolution in pixels (default: the checkpoint's)")
    parser.add_argument("--output", required=True, type=Path, help="PNG file to write")
    parser.add_argument("--dpi", type=int, default=120)
    args = parser.parse_args(argv)
    methods = list(dict.fromkeys(args.compare)) if args.compare else [args.method]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        parser.error(f"unknown method(s) {unknown}: choose from {', '.join(METHODS)}")
    if not args.image.is_file():
        parser.error(f"--image {args.image} is not a file")
    if args.size is not None and args.size < 1:
        parser.error(f"--size must be a positive number of pixels, got {args.size}")
    args.methods = methods
    return args


def main(argv: Sequence[str] | None = None) -> Figure:
    """Write the picture and return its figure (one axes per panel)."""
    args = parse_args(argv)
    model = load_rapid_model(args.model)
    pixel_values, mean, std = preprocess(args.model, args.image, args.size)
    patch = model.config.patch_size
    grid = (pixel_values.shape[2] // patch, pixel_values.shape[3] // patch)
    resized = tuple(pixel_values.shape[2:]) != (model.config.image_size, model.config.image_size)
    num_layers = model.config.num_hidden_layers
    layers = check_layers(args.layers if args.layers is not None else default_layers(num_layers), num_layers)

    traces: dict[str, ImageTrace] = {}
    for method in args.methods:
        model.set_rapid(RapidConfig(method=method, r=args.r))
        with torch.no_grad():
            output = model(pixel_values=pixel_values, interpolate_pos_encoding=resized, output_sources=True)
        label = f"{method} r={args.r}"
        traces[method] = ImageTrace.from_output(output, grid, label)
        predicted = model.config.id2label[int(output.logits.argmax(-1))]
        print(f"{label}: tokens per layer {list(output.token_counts)}, prediction {predicted!r}")

    image = denormalize(pixel_values[0], mean, std)
    title = f"{args.image.name}, {pixel_values.shape[2]}x{pixel_values.shape[3]} px, {grid[0] * grid[1]} patches"
    if args.compare:
        figure = comparison_figure(image, traces, layers, f"{title}, r={args.r}")
    else:
        figure = layer_figure(image, traces[args.method], layers, f"{title}: {label}, prediction {predicted!r}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.output, dpi=args.dpi)
    print(f"wrote {args.output}")
    return figure


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:
        sys.exit(f"error: {error}")
