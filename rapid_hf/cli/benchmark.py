"""Throughput, speed-up, GFLOPs and peak memory of token-reduction methods, all measured in one run.

    rapid-hf benchmark --model facebook/deit-small-patch16-224 --methods none,tome,tofu,rapid --r 8,16 \\
        --batch-size 64 --device cuda --precision fp16 --output bench.json

Synthetic inputs at the model's resolution; rows are interleaved over the timed repeats, so the speed ratios
are comparable within the run. Without --threads the thread count is chosen so as not to oversubscribe the
machine (its idle cores, at most torch's default); the run prints what it measured on and warns when the
speed-ups varied too much between rounds to be trusted. On a busy shared CPU add `--threads 1 --timer process`.

Latency grid (online inference: small batches, few threads), one run over every cell:

    rapid-hf benchmark --model facebook/deit-tiny-patch16-224 --methods none,tome,tofu,rapid,crucial \\
        --r 8,16 --batch-size 1,4,16,64 --threads 1,2 --device cpu --output latency.json

Comma lists in --batch-size and --threads measure every (threads, batch) cell in turn; within a cell the rows
are interleaved and each speed-up sits beside its FLOP ratio.

Compiled and ONNX Runtime, beside eager PyTorch (what a deployment would run instead):

    rapid-hf benchmark --model facebook/deit-tiny-patch16-224 --methods none,tome,rapid --r 8,16 \\
        --batch-size 1 --threads 1,2 --runtime eager,compile,onnx --output deploy.json

Every row of every runtime is timed in the same interleaved loop; `speedup` is against the same runtime's
unreduced model and `speedup_vs_eager_stock` against unreduced eager PyTorch. A row that fails to compile or
export is written with its error and the run goes on. Writes a JSON list of records (fields:
`rapid_hf.evaluation.throughput`, plus `settings_source` and `overrides`) and a Markdown table next to it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from rapid_hf.cli import common

NAME = "benchmark"
HELP = "throughput, speed-up, GFLOPs and peak memory on a synthetic batch"
RUNTIMES: tuple[str, ...] = ("eager", "compile", "onnx")
"""`rapid_hf.evaluation.throughput.RUNTIMES` (a test keeps them equal; spelled out so --help needs no torch)."""


def runtime_name(text: str) -> str:
    if text not in RUNTIMES:
        raise ValueError(f"{text!r} is not one of {', '.join(RUNTIMES)}")
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_model_argument(parser)
    common.add_variant_arguments(parser)
    common.add_precision_arguments(parser, batch_list=True)
    common.add_device_arguments(parser, thread_list=True)
    threads = parser._option_string_actions["--threads"]
    threads.help = ("torch.set_num_threads; a comma list, e.g. 1,2, measures each (default: the machine's idle "
                    "cores, at most torch's own count)")
    common.add_benchmark_arguments(parser)
    parser.add_argument(
        "--runtime", type=common.comma_list(runtime_name, "runtimes"), default=["eager"],
        help=f"comma list from {','.join(RUNTIMES)}: eager PyTorch, torch.compile(model), ONNX Runtime (each row "
             "exported with rapid_hf.export); all timed in the same interleaved loop (default: eager)",
    )
    parser.add_argument("--compile", action="store_true", help="the same as adding compile to --runtime")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compile rows")
    parser.add_argument(
        "--compile-timeout", type=float, default=0.0, metavar="SECONDS",
        help="a row whose compile or export takes longer is written as failed (default: 0, no limit)",
    )
    parser.add_argument(
        "--no-memory", dest="measure_memory", action="store_false",
        help="skip the profiled forward that measures peak memory and the reduction's share of the time "
             "(default: measured)",
    )
    parser.add_argument("--output", default="bench.json", help="JSON path; the Markdown table goes next to it")


def check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    runtimes = list(getattr(args, "runtime", None) or ["eager"])
    if getattr(args, "compile", False) and "compile" not in runtimes:
        runtimes.append("compile")
    args.runtime = [name for name in RUNTIMES if name in runtimes]
    if "onnx" in args.runtime:
        common.check_onnx_modules(parser)
    if getattr(args, "compile_timeout", 0) < 0:
        parser.error("--compile-timeout must be >= 0 seconds")
    common.check_device(args, parser)
    common.resolve_rows(args, parser)


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Benchmark records of `args.variant_rows` on `args.model`, with run information. Sets
    `args.threads_reason` (how the thread count was chosen)."""
    import torch

    from rapid_hf.evaluation.loading import load_rapid_model
    from rapid_hf.evaluation.report import run_info
    from rapid_hf.evaluation.throughput import default_threads, latency_grid
    from rapid_hf.evaluation.variants import annotate_records

    def as_list(value: Any) -> list[int] | None:  # `rapid-hf sweep` passes single values
        return value if value is None or isinstance(value, list) else [value]

    threads = as_list(args.threads)
    args.threads_reason = "given"
    if threads is None:
        choice = default_threads()
        threads, args.threads_reason = [choice.count], choice.reason
    model = load_rapid_model(args.model, args.device)
    records = latency_grid(
        model,
        args.variant_rows,
        batch_sizes=as_list(args.batch_size),
        threads=threads,
        device=args.device,
        precision=args.precision,
        warmup=args.warmup,
        repeats=args.repeats,
        number=args.number,
        timer=args.timer,
        measure_memory=getattr(args, "measure_memory", True),
        runtimes=getattr(args, "runtime", None) or ["eager"],
        compile_backend=getattr(args, "compile_backend", "inductor"),
        compile_timeout_s=getattr(args, "compile_timeout", 0) or None,
    )
    info = run_info()
    if args.device == "cuda":
        info["machine"] = torch.cuda.get_device_name()
    # the record's own num_threads (the count it ran with) wins over the count in force now
    return [{"model": args.model, **info, **record} for record in annotate_records(records, args.variant_rows)]


def _or_dash(cell: Callable[[dict[str, Any]], str]) -> Callable[[dict[str, Any]], str]:
    """A table cell that reads "-" where its value is missing (a failed row, a runtime without that figure)."""

    def format_cell(record: dict[str, Any]) -> str:
        try:
            return cell(record)
        except (TypeError, KeyError):
            return "-"

    return format_cell


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def columns(args: argparse.Namespace) -> list:
    """The benchmark table's columns, led by threads and batch size when several are measured; the runtime,
    the speed-up over eager stock and compile times when other runtimes run; peak memory and the reduction's
    share only when measured."""
    from rapid_hf.evaluation.report import BENCHMARK_COLUMNS

    runtimes = getattr(args, "runtime", None) or ["eager"]
    several = runtimes != ["eager"]
    chosen = [(name, _or_dash(cell)) for name, cell in BENCHMARK_COLUMNS
              if getattr(args, "measure_memory", True) or name not in ("peak MB", "reduction % of time")]
    if several:
        position = [name for name, _ in chosen].index("speedup") + 1
        chosen[2:2] = [("runtime", lambda r: r["runtime"])]
        chosen[position + 1:position + 1] = [
            ("vs eager stock", _or_dash(lambda r: f"{r['speedup_vs_eager_stock']:.3f}"))]
    chosen.append(("spread", _or_dash(lambda r: f"{r['speedup_spread']:.0%}")))
    if several:
        chosen.append(("compile s", lambda r: _seconds(r.get("compile_s"))))
        chosen.append(("error", lambda r: (r.get("error") or "").replace("|", "/")))
    lead = []
    threads = args.threads if isinstance(args.threads, list) else None
    if threads is not None and len(threads) > 1:
        lead.append(("threads", lambda r: str(r["num_threads"])))
    if isinstance(args.batch_size, list) and len(args.batch_size) > 1:
        lead.append(("batch", lambda r: str(r["batch_size"])))
    return lead + chosen


def run(args: argparse.Namespace) -> None:
    from rapid_hf.evaluation.throughput import describe_run, spread_warning

    records = measure(args)
    print(common.write_outputs(records, args.output, columns(args), common.command_line(NAME, args.argv)))
    print(describe_run(records, getattr(args, "threads_reason", None)))
    failed = [r for r in records if r.get("error")]
    for record in failed:
        print(f"{record['label']} r={record['r']} ({record['runtime']}) failed: {record['error']}", file=sys.stderr)
    warning = spread_warning(records)
    if warning:
        print(warning, file=sys.stderr)
