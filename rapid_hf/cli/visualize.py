"""Draw which image patches a token-reduction method pruned or merged, layer by layer.

    rapid-hf visualize --model facebook/deit-tiny-patch16-224 --image ./cat.jpg --methods rapid --r 16 \\
        --output out.png
    rapid-hf visualize --model ./calibrated --image ./cat.jpg --methods rapid,tome,tofu --output cmp.png

One method draws one row of layers; several draw one row each (row titles in the method's colour). Grey patches
were pruned, tinted patches belong to a merged token (one tint per token, white outline). A model saved with its
own settings draws them for its method. Any resolution with --size (via `interpolate_pos_encoding`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rapid_hf.cli import common

NAME = "visualize"
HELP = "picture of the patches each method pruned or merged, layer by layer"
REQUIRES = {"viz": ("matplotlib",)}
OUTPUT = "file"
SETTINGS_TEXT = {"defaults": "paper defaults", "model": "the model's saved settings", "variant": "variant settings"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rapid_hf.reduction.config import METHODS

    common.add_model_argument(parser)
    common.add_processor_argument(parser)
    parser.add_argument("--image", required=True, type=Path, help="image file to trace, e.g. ./cat.jpg")
    parser.add_argument("--methods", "--compare", dest="methods", type=common.comma_list(str, "method names"),
                        default="rapid", help=f"comma-separated methods to draw, from {','.join(METHODS)}")
    parser.add_argument("--method", dest="methods", type=common.comma_list(str, "method names"),
                        help=argparse.SUPPRESS)  # the older spelling of --methods with one method
    parser.add_argument("--r", type=common.non_negative_int,
                        help="tokens removed per layer (default: the model's saved amount, else 16)")
    parser.add_argument("--layers", type=common.int_list, help="0-based layers (default: four spread over the depth)")
    parser.add_argument("--size", type=common.positive_int, help="input resolution in pixels (default: the model's)")
    parser.add_argument("--output", required=True, type=Path, help="PNG file to write")
    parser.add_argument("--dpi", type=common.positive_int, default=120, help="resolution of the PNG")


def check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from rapid_hf.reduction.config import METHODS

    args.methods = list(dict.fromkeys(args.methods))
    unknown = [method for method in args.methods if method not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}: choose from {', '.join(METHODS)}")
    common.check_image(args.image, parser)
    if args.output.suffix.lower() != ".png":
        parser.error(f"--output {str(args.output)!r} must end in .png")
    common.single_r_rows(args, parser)
    args.image_processor = common.load_processor(args, parser)


def preprocess(processor: Any, image_path: Path, size: int | None):
    """The model's own preprocessing, rescaled to a `size` x `size` input when given; returns pixels, mean, std.
    `processor` is an image processor, or the model id / folder to load it from."""
    from PIL import Image

    if isinstance(processor, str | Path):
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(processor)
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


def draw(args: argparse.Namespace):
    """The figure of `args` (one axes per panel), after printing each method's tokens and prediction."""
    import torch

    from rapid_hf.evaluation.loading import load_rapid_model
    from rapid_hf.evaluation.report import setting_label
    from rapid_hf.evaluation.variants import REFERENCE, schedule_fields
    from rapid_hf.visualization import (
        ImageTrace,
        check_layers,
        comparison_figure,
        default_layers,
        denormalize,
        layer_figure,
    )

    model = load_rapid_model(args.model)
    pixel_values, mean, std = preprocess(getattr(args, "image_processor", None) or args.model, args.image, args.size)
    patch = model.config.patch_size
    grid = (pixel_values.shape[2] // patch, pixel_values.shape[3] // patch)
    resized = tuple(pixel_values.shape[2:]) != (model.config.image_size, model.config.image_size)
    num_layers = model.config.num_hidden_layers
    layers = check_layers(args.layers if args.layers is not None else default_layers(num_layers), num_layers)

    traces: dict[str, ImageTrace] = {}
    with torch.no_grad():  # the tokens entering the encoder: what a capped r is measured against
        input_tokens = model(pixel_values=pixel_values, interpolate_pos_encoding=resized,
                             rapid=REFERENCE).token_counts[0]
    for variant in args.variant_rows:
        with torch.no_grad():
            output = model(
                pixel_values=pixel_values, interpolate_pos_encoding=resized, output_sources=True, rapid=variant.rapid
            )
        record = {"method": variant.rapid.method, "r": variant.requested_r, "rapid": variant.rapid.to_dict(),
                  **schedule_fields(variant.rapid, input_tokens, output.token_counts)}
        label = variant.label if variant.rapid.method == "none" else f"{variant.label} {setting_label(record)}"
        traces[variant.label] = ImageTrace.from_output(output, grid, label)
        predicted = model.config.id2label[int(output.logits.argmax(-1))]
        print(f"{label} ({SETTINGS_TEXT[variant.settings_source]}): tokens per layer {list(output.token_counts)}, "
              f"prediction {predicted!r}")

    image = denormalize(pixel_values[0], mean, std)
    title = f"{args.image.name}, {pixel_values.shape[2]}x{pixel_values.shape[3]} px, {grid[0] * grid[1]} patches"
    if len(traces) > 1:
        return comparison_figure(image, traces, layers, title)
    (trace,) = traces.values()
    return layer_figure(image, trace, layers, f"{title}: {trace.label}, prediction {predicted!r}")


def run(args: argparse.Namespace) -> None:
    figure = draw(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.output, dpi=args.dpi)
    print(f"wrote {args.output}")
