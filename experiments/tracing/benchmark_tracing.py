"""Cost of source tracing: forward time with `output_sources` / `output_dense` relative to tracing off.

    python experiments/tracing/benchmark_tracing.py --model ../shared/assets/deit-tiny-imagenet \
        --data-dir ../shared/assets/imagenet-sample-dev --threads 1 --timer process

Times come from the package's benchmark clock (`rapid_hf.evaluation.throughput.time_forward`), settings
interleaved round by round, and are reported as ratios to the untraced forward of the same method, since
absolute times on a shared machine are noise. Writes tracing_overhead.json (records plus run information) and
its Markdown table beside this script unless --output says otherwise.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoImageProcessor

from rapid_hf.cli.common import comma_list, positive_int, write_outputs
from rapid_hf.evaluation.loading import load_rapid_model
from rapid_hf.evaluation.report import command_line, run_info
from rapid_hf.evaluation.throughput import TIMERS, time_forward
from rapid_hf.reduction.config import RapidConfig

HERE = Path(__file__).resolve().parent
OPTIONS = {"off": {}, "output_sources": {"output_sources": True}, "output_dense": {"output_dense": True}}
COLUMNS = [
    ("method", lambda record: record["method"]),
    ("r", lambda record: str(record["r"])),
    ("tracing", lambda record: record["tracing"]),
    ("time / untraced", lambda record: f"{record['ratio_to_off']:.3f}"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="ViT/DeiT image-classification checkpoint")
    parser.add_argument("--data-dir", required=True, type=Path, help="folder of .jpg photos (the first are used)")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--r", type=positive_int, default=16)
    parser.add_argument("--methods", type=comma_list(str, "method names"), default="rapid,tome")
    parser.add_argument("--rounds", type=positive_int, default=15, help="interleaved rounds; the median is kept")
    parser.add_argument("--number", type=positive_int, default=3, help="forwards per round")
    parser.add_argument("--timer", choices=list(TIMERS), default="wall")
    parser.add_argument("--threads", type=positive_int, help="torch.set_num_threads")
    parser.add_argument("--output", type=Path, default=HERE / "tracing_overhead.json")
    args = parser.parse_args(argv)
    args.files = sorted(args.data_dir.glob("*.jpg"))[: args.batch_size]
    if len(args.files) < args.batch_size:
        parser.error(f"{args.data_dir} has {len(args.files)} .jpg files, fewer than --batch-size {args.batch_size}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    processor = AutoImageProcessor.from_pretrained(args.model)
    images = [Image.open(path).convert("RGB") for path in args.files]
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    model = load_rapid_model(args.model)
    clock, device = TIMERS[args.timer], torch.device("cpu")
    records = []
    for method in args.methods:
        model.set_rapid(RapidConfig(method=method, r=args.r))
        times: dict[str, list[float]] = {name: [] for name in OPTIONS}
        with torch.no_grad():
            for _ in range(args.rounds):  # interleaved, so load from other processes hits every setting alike
                for name, options in OPTIONS.items():
                    forward = lambda options=options: model(pixel_values=pixel_values, **options)  # noqa: E731
                    times[name].append(time_forward(forward, args.number, clock, device))
        medians = {name: statistics.median(values) for name, values in times.items()}
        for name, median in medians.items():
            records.append({"model": args.model, "method": method, "r": args.r, "tracing": name,
                            "ratio_to_off": round(median / medians["off"], 4), "batch_size": args.batch_size,
                            "rounds": args.rounds, "number": args.number, "timer": args.timer, **run_info()})
    print(write_outputs(records, args.output, COLUMNS, command_line()))


if __name__ == "__main__":
    main()
