"""Throughput, speed-up, GFLOPs and peak memory of token-reduction methods, all measured in one run.

    rapid-hf benchmark --model facebook/deit-small-patch16-224 --methods none,tome,tofu,rapid --r 8,16 \\
        --batch-size 64 --device cuda --precision fp16 --output bench.json

Synthetic inputs at the model's resolution; rows are interleaved over the timed repeats, so the speed ratios
are comparable within the run. On a busy shared CPU add `--threads 1 --timer process`.

Latency grid (online inference: small batches, few threads), one run over every cell:

    rapid-hf benchmark --model ../shared/assets/deit-tiny-imagenet --methods none,tome,tofu,rapid,crucial \\
        --r 8,16 --batch-size 1,4,16,64 --threads 1,2 --device cpu --output latency.json

Comma lists in --batch-size and --threads measure every (threads, batch) cell in turn; within a cell the rows
are interleaved and each speed-up sits beside its FLOP ratio. Writes a JSON list of
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
    common.add_precision_arguments(parser, batch_list=True)
    common.add_device_arguments(parser, thread_list=True)
    common.add_benchmark_arguments(parser)
    parser.add_argument(
        "--no-memory", dest="measure_memory", action="store_false",
        help="skip the profiled forward that measures peak memory and the reduction's share of the time",
    )
    parser.add_argument("--output", default="bench.json", help="JSON path; the Markdown table goes next to it")


def check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    common.check_device(args, parser)
    common.resolve_rows(args, parser)


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Benchmark records of `args.variant_rows` on `args.model`, with run information."""
    import torch

    from rapid_hf.evaluation.loading import load_rapid_model
    from rapid_hf.evaluation.report import run_info
    from rapid_hf.evaluation.throughput import latency_grid
    from rapid_hf.evaluation.variants import annotate_records

    def as_list(value: Any) -> list[int] | None:  # `rapid-hf sweep` passes single values
        return value if value is None or isinstance(value, list) else [value]

    model = load_rapid_model(args.model, args.device)
    records = latency_grid(
        model,
        args.variant_rows,
        batch_sizes=as_list(args.batch_size),
        threads=as_list(args.threads),
        device=args.device,
        precision=args.precision,
        warmup=args.warmup,
        repeats=args.repeats,
        number=args.number,
        timer=args.timer,
        measure_memory=getattr(args, "measure_memory", True),
    )
    info = run_info()
    if args.device == "cuda":
        info["machine"] = torch.cuda.get_device_name()
    # the record's own num_threads (the count it ran with) wins over the count in force now
    return [{"model": args.model, **info, **record} for record in annotate_records(records, args.variant_rows)]


def columns(args: argparse.Namespace) -> list:
    """The benchmark table's columns, led by threads and batch size when several are measured; peak memory
    and the reduction's share only when measured."""
    from rapid_hf.evaluation.report import BENCHMARK_COLUMNS

    chosen = [c for c in BENCHMARK_COLUMNS
              if args.measure_memory or c[0] not in ("peak MB", "reduction % of time")]
    lead = []
    if args.threads is not None and len(args.threads) > 1:
        lead.append(("threads", lambda r: str(r["num_threads"])))
    if len(args.batch_size) > 1:
        lead.append(("batch", lambda r: str(r["batch_size"])))
    return lead + chosen


def run(args: argparse.Namespace) -> None:
    records = measure(args)
    print(common.write_outputs(records, args.output, columns(args), common.command_line(NAME, args.argv)))
