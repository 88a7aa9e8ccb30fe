"""Demo: classify one image with every token-reduction method and show what each one costs and changes.

    python scripts/demo.py --model facebook/deit-small-patch16-224 --image cat.jpg --r 16

Prints, for none/ToMe/ToFu/RAPID: the top-3 classes, the tokens left after the last layer and the speed-up
over the unreduced model measured in this run (batch of copies of the image, CPU or CUDA).
"""

from __future__ import annotations

import argparse

import torch
from PIL import Image
from torch.utils import benchmark
from transformers import AutoImageProcessor

from rapid_hf import RapidConfig, RapidViTForImageClassification

METHODS = ("none", "tome", "tofu", "rapid")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="facebook/deit-small-patch16-224", help="Hub id or local folder")
    parser.add_argument("--image", required=True, help="path to an image file")
    parser.add_argument("--r", type=int, default=16, help="tokens removed per layer")
    parser.add_argument("--batch-size", type=int, default=16, help="batch used for the speed measurement")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    processor = AutoImageProcessor.from_pretrained(args.model)
    model = RapidViTForImageClassification.from_pretrained(args.model).eval().to(args.device)
    pixel_values = processor(images=Image.open(args.image).convert("RGB"), return_tensors="pt")["pixel_values"]
    pixel_values = pixel_values.to(args.device)
    batch = pixel_values.expand(args.batch_size, -1, -1, -1).contiguous()

    timers = {}
    print(f"{args.model} on {args.image}, r={args.r}, device={args.device}")
    for method in METHODS:
        model.set_rapid(RapidConfig(method=method, r=args.r))
        with torch.inference_mode():
            output = model(pixel_values=pixel_values)
        probabilities = output.logits.softmax(-1)[0]
        top = probabilities.topk(3)
        labels = ", ".join(
            f"{model.config.id2label[index].split(',')[0]} {probability:.2f}"
            for probability, index in zip(top.values.tolist(), top.indices.tolist(), strict=True)
        )
        print(f"  {method:6s} tokens {output.token_counts[-1]:4d}  {labels}")
        timers[method] = benchmark.Timer(
            stmt="model(pixel_values=batch)",
            setup=f"model.set_rapid(RapidConfig(method={method!r}, r={args.r}))",
            globals={"model": model, "batch": batch, "RapidConfig": RapidConfig},
        )
    # Interleave the timings so every method sees the same machine load.
    times: dict[str, list[float]] = {method: [] for method in METHODS}
    with torch.inference_mode():
        for _ in range(3):
            for method, timer in timers.items():
                times[method].append(timer.timeit(2).median)
    baseline = min(times["none"])
    print("  speed-up over none (same run): " + ", ".join(f"{m} {baseline / min(t):.2f}x" for m, t in times.items()))


if __name__ == "__main__":
    main()
