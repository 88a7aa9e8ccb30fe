"""Classify one image with every token-reduction method and show what each one costs and changes.

    rapid-hf demo --model facebook/deit-small-patch16-224 --image cat.jpg --r 16
    rapid-hf demo --model ./vit-rapid --processor facebook/deit-small-patch16-224 --image ./photos/cat.jpg

Prints, per method: the top-3 classes, the tokens left after the last layer and the speed-up over the unreduced
model measured in this run (a batch of copies of the image; methods interleaved round by round, the order
alternating; the median of the per-round speed-ups), then what it was measured on and, when the rounds disagree
too much to trust the figures (a busy machine), a warning. The timing runs on one thread by default: several
threads on a machine whose cores are busy with other work wait for each other and can turn any speed-up into a
slow-down. A model saved with its own settings (e.g. calibrated) runs them in its method's row.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path
from typing import Any

from rapid_hf.cli import common

NAME = "demo"
HELP = "classify one image with every method: predictions, tokens left, same-run speed-up"
DEFAULT_THREADS = 1
TIME_BUDGET_S = 8.0  # timed rounds: as many as fit in this, within [MIN_ROUNDS, MAX_ROUNDS]
MIN_ROUNDS, MAX_ROUNDS = 5, 30
CLOCK = time.perf_counter  # the timing clock (tests replace it)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rapid_hf.reduction.config import METHODS

    common.add_model_argument(parser)
    parser.add_argument("--image", required=True, type=Path, help="image file to classify, e.g. ./photos/cat.jpg")
    common.add_processor_argument(parser)
    parser.add_argument("--methods", type=common.comma_list(str, "method names"), default="none,tome,tofu,rapid",
                        help=f"comma-separated, from {','.join(METHODS)}")
    parser.add_argument("--r", type=common.non_negative_int,
                        help="tokens removed per layer (default: the model's saved amount, else 16)")
    parser.add_argument("--batch-size", type=common.positive_int, default=16,
                        help="copies of the image in the timed batch")
    parser.add_argument(
        "--repeats", type=common.positive_int,
        help=f"timed rounds over all methods (default: as many as fit in about {TIME_BUDGET_S:g} s, "
             f"{MIN_ROUNDS} to {MAX_ROUNDS})",
    )
    common.add_device_arguments(parser)
    threads = parser._option_string_actions["--threads"]
    threads.default = DEFAULT_THREADS
    threads.help = (f"torch.set_num_threads while the demo runs (default: {DEFAULT_THREADS}: a timing on one core "
                    "is not upset by other work on the machine)")


def check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    common.check_image(args.image, parser)
    common.check_device(args, parser)

    if "none" not in args.methods:
        args.methods = ["none", *args.methods]  # the speed-up is measured against it

    common.single_r_rows(args, parser)
    args.image_processor = common.load_processor(args, parser)  # a model saved alone: one line on what to do


def run(args: argparse.Namespace) -> None:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        demo(args)
    finally:
        torch.set_num_threads(previous)


def demo(args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from rapid_hf.evaluation.loading import load_rapid_model
    from rapid_hf.evaluation.throughput import (
        SPREAD_LIMIT,
        interleaved_times,
        paired_ratios,
        ratio_spread,
        rounds_for_budget,
    )

    processor = getattr(args, "image_processor", None)
    if processor is None:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(args.processor or args.model)
    device = torch.device(args.device)
    model = load_rapid_model(args.model, args.device)
    with Image.open(args.image) as picture:
        pixel_values = processor(images=picture.convert("RGB"), return_tensors="pt")["pixel_values"].to(device)
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

    def forward(rapid: Any) -> Any:
        return model(pixel_values=batch, rapid=rapid)

    forwards = [functools.partial(forward, variant.rapid) for variant in args.variant_rows]
    with torch.inference_mode():
        for call in forwards:  # warm-up
            call()
        repeats = args.repeats
        if repeats is None:  # one timed round (also a second warm-up) sets how many fit in the budget
            sizing = interleaved_times(forwards, 1, clock=CLOCK, device=device)
            repeats = rounds_for_budget(sum(times[0] for times in sizing), TIME_BUDGET_S, MIN_ROUNDS, MAX_ROUNDS)
        times = interleaved_times(forwards, repeats, clock=CLOCK, device=device)
    ratios = [paired_ratios(times[0], row) for row in times]  # row 0 is "none" (check puts it first)
    speedups = [float(np.median(r)) for r in ratios]
    spreads = [ratio_spread(times[0], row) for row in times]
    labels = [variant.label for variant in args.variant_rows]
    print(f"  speed-up over none (same run, batch {args.batch_size}): "
          + ", ".join(f"{label} {speedup:.2f}x" for label, speedup in zip(labels, speedups, strict=True)))
    widest = max(range(len(spreads)), key=spreads.__getitem__)
    threads = torch.get_num_threads()
    print(f"  measured on {device.type}, {threads} thread{'s' * (threads != 1)}, batch {args.batch_size}, "
          f"{repeats} interleaved rounds, median of the per-round speed-ups; spread {spreads[widest]:.0%} "
          "(IQR/median, widest row)")
    if spreads[widest] > SPREAD_LIMIT:
        advice = "--threads 1, " if threads > 1 else ""
        print(f"warning: {labels[widest]}'s speed-up varied by {spreads[widest]:.0%} between rounds (a busy "
              f"machine?): too wide to trust; rerun with {advice}--repeats {MAX_ROUNDS}, or when the machine is "
              "quieter", file=sys.stderr)
