"""Classify one image with every token-reduction method and show what each one costs and changes.

    rapid-hf demo --model facebook/deit-small-patch16-224 --image cat.jpg --r 16

Prints, per method: the top-3 classes, the tokens left after the last layer and the speed-up over the unreduced
model measured in this run (a batch of copies of the image, methods interleaved). A model saved with its own
settings (e.g. calibrated) runs them in its method's row.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rapid_hf.cli import common

NAME = "demo"
HELP = "classify one image with every method: predictions, tokens left, same-run speed-up"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rapid_hf.reduction.config import METHODS

    common.add_model_argument(parser)
    parser.add_argument("--image", required=True, type=Path, help="image file to classify")
    parser.add_argument("--methods", type=common.comma_list(str, "method names"), default="none,tome,tofu,rapid",
                        help=f"comma-separated, from {','.join(METHODS)}")
    parser.add_argument("--r", type=common.non_negative_int,
                        help="tokens removed per layer (default: the model's saved amount, else 16)")
    parser.add_argument("--batch-size", type=common.positive_int, default=16,
                        help="copies of the image in the timed batch")
    parser.add_argument("--repeats", type=common.positive_int, default=3, help="timed rounds over all methods")
    common.add_device_arguments(parser)


def check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if not args.image.is_file():
        parser.error(f"--image {str(args.image)!r} is not a file")
    common.check_device(args, parser)

    if "none" not in args.methods:
        args.methods = ["none", *args.methods]  # the speed-up is measured against it

    common.single_r_rows(args, parser)


def run(args: argparse.Namespace) -> None:
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor

    from rapid_hf.evaluation.loading import load_rapid_model
    from rapid_hf.evaluation.throughput import TIMERS, time_forward

    common.set_threads(args)
    processor = AutoImageProcessor.from_pretrained(args.model)
    model = load_rapid_model(args.model, args.device)
    with Image.open(args.image) as picture:
        pixel_values = processor(images=picture.convert("RGB"), return_tensors="pt")["pixel_values"].to(args.device)
    batch = pixel_values.expand(args.batch_size, -1, -1, -1).contiguous()

    print(f"{args.model} on {args.image}, device={args.device}")
    for variant in args.variant_rows:
        with torch.inference_mode():
            output = model(pixel_values=pixel_values, rapid=variant.rapid)
        top = output.logits.softmax(-1)[0].topk(3)
        labels = ", ".join(
            f"{model.config.id2label[index].split(',')[0]} {probability:.2f}"
            for probability, index in zip(top.values.tolist(), top.indices.tolist(), strict=True)
        )
        amount = "" if variant.rapid.method == "none" else f"r={variant.requested_r}"
        print(f"  {variant.label:7s} {amount:6s} tokens {output.token_counts[-1]:4d}  {labels}")

    times: dict[str, list[float]] = {variant.label: [] for variant in args.variant_rows}
    with torch.inference_mode():
        for variant in args.variant_rows:  # warm-up
            model(pixel_values=batch, rapid=variant.rapid)
        for _ in range(args.repeats):  # interleaved, so every method sees the same machine load
            for variant in args.variant_rows:
                times[variant.label].append(
                    time_forward(
                        lambda rapid=variant.rapid: model(pixel_values=batch, rapid=rapid),
                        1,
                        TIMERS["wall"],
                        torch.device(args.device),
                    )
                )
    baseline = min(times["none"])
    print("  speed-up over none (same run, batch "
          f"{args.batch_size}): " + ", ".join(f"{label} {baseline / min(t):.2f}x" for label, t in times.items()))
