"""Throughput, speed-up, GFLOPs and peak memory of token-reduction methods, all measured in one run.

    rapid-hf benchmark --model facebook/deit-small-patch16-224 --methods none,tome,tofu,rapid --r 8,16 \\
        --batch-size 64 --device cuda --precision fp16 --output bench.json

Synthetic inputs at the model's resolution; rows are interleaved over the timed repeats, so the speed ratios
are comparable within the run. On a busy shared CPU add `--threads 1 --timer process`. Writes a JSON list of
records (fields: `rapid_hf.evaluation.throughput`, plus `settings_source` and `overrides`) and a Markdown table
next to it.
"""

from __future__ import annotations

import argparse
from typing import Any

from rapid_hf.cli import common

NAME = "benchmark"
HELP = "throughput, speed-up, GFLOPs and peak memory on a synthetic batch"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_model_argument(parser)
    common.add_variant_arguments(parser)
    common.add_precision_arguments(parser)
    common.add_device_arguments(parser)
    common.add_benchmark_arguments(parser)
    parser.add_argument("--output", default="bench.json", help="JSON path; the Markdown table goes next to it")


def check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    common.check_device(args, parser)
    common.resolve_rows(args, parser)


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Benchmark records of `args.variant_rows` on `args.model`, with run information."""
    import torch

    from rapid_hf.evaluation.loading import load_rapid_model
    from rapid_hf.evaluation.report import run_info
    from rapid_hf.evaluation.throughput import benchmark
    from rapid_hf.evaluation.variants import annotate_records

    common.set_threads(args)
    model = load_rapid_model(args.model, args.device)
    records = benchmark(
        model,
        args.variant_rows,
        batch_size=args.batch_size,
        device=args.device,
        precision=args.precision,
        warmup=args.warmup,
        repeats=args.repeats,
        number=args.number,
        timer=args.timer,
    )
    info = run_info()
    if args.device == "cuda":
        info["machine"] = torch.cuda.get_device_name()
    return [{"model": args.model, **record, **info} for record in annotate_records(records, args.variant_rows)]


def run(args: argparse.Namespace) -> None:
    from rapid_hf.evaluation.report import BENCHMARK_COLUMNS

    records = measure(args)
    print(common.write_outputs(records, args.output, BENCHMARK_COLUMNS, common.command_line(NAME, args.argv)))
