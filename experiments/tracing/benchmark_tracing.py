"""Cost of source tracing: forward time with `output_sources` / `output_dense` relative to tracing off.

    python experiments/tracing/benchmark_tracing.py --model PATH --images DIR \
        --output experiments/tracing/tracing_overhead.json

Times are taken in one run with `torch.utils.benchmark` and reported as ratios to the untraced forward of the
same method, since absolute times on a shared machine are noise.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch
from PIL import Image
from torch.utils import benchmark
from transformers import AutoImageProcessor

from rapid_hf import RapidConfig, RapidViTForImageClassification

OPTIONS = {"off": {}, "output_sources": {"output_sources": True}, "output_dense": {"output_dense": True}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="ViT image-classification checkpoint")
    parser.add_argument("--images", required=True, type=Path, help="folder of .jpg photos (the first --batch are used)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--methods", default="rapid,tome")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds; the median round is kept")
    parser.add_argument("--number", type=int, default=3, help="forwards per round")
    parser.add_argument("--output", required=True, type=Path)
    args = parser.parse_args()
    files = sorted(args.images.glob("*.jpg"))[: args.batch]
    if len(files) < args.batch:
        parser.error(f"{args.images} has {len(files)} .jpg files, fewer than --batch {args.batch}")

    processor = AutoImageProcessor.from_pretrained(args.model)
    pixel_values = processor(images=[Image.open(f).convert("RGB") for f in files], return_tensors="pt")["pixel_values"]
    model = RapidViTForImageClassification.from_pretrained(args.model).eval()
    rows = []
    for method in args.methods.split(","):
        model.set_rapid(RapidConfig(method=method, r=args.r))
        timers = {
            name: benchmark.Timer(
                stmt="with torch.no_grad(): model(pixel_values=x, **options)",
                globals={"torch": torch, "model": model, "x": pixel_values, "options": options},
            )
            for name, options in OPTIONS.items()
        }
        # Interleave the settings round by round so load from other processes hits them alike.
        times: dict[str, list[float]] = {name: [] for name in OPTIONS}
        for _ in range(args.rounds):
            for name, timer in timers.items():
                times[name].append(timer.timeit(args.number).median)
        medians = {name: statistics.median(values) for name, values in times.items()}
        for name, median in medians.items():
            ratio = round(median / medians["off"], 4)
            rows.append({"method": method, "r": args.r, "tracing": name, "ratio_to_off": ratio})
            print(f"{method} r={args.r} {name}: {median / medians['off']:.3f} x untraced")

    args.output.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "command": "python " + " ".join(sys.argv),
        "batch": args.batch,
        "rounds": args.rounds,
        "forwards_per_round": args.number,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "results": rows,
    }
    args.output.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
