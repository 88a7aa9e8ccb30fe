"""Command-line front ends of scripts/evaluate.py, scripts/benchmark.py and scripts/sweep.py.

The parsers and runners live here so the sweep reuses them (a script named evaluate.py cannot be imported
beside the `evaluate` library) and the scripts stay thin.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch

from rapid_hf.evaluation.loading import PRECISIONS, load_rapid_model
from rapid_hf.evaluation.report import (
    ACCURACY_COLUMNS,
    BENCHMARK_COLUMNS,
    Column,
    command_line,
    markdown_table,
    run_info,
    write_json,
    write_markdown,
)
from rapid_hf.evaluation.splits import SUBSETS
from rapid_hf.evaluation.throughput import TIMERS
from rapid_hf.evaluation.variants import grid_variants, parse_named_variant, parse_settings

DEFAULT_MODEL = "facebook/deit-small-patch16-224"


def int_list(text: str) -> list[int]:
    """`8,13,16` -> [8, 13, 16] (integers >= 0)."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 0, got {text!r}")
    return values


def _argument_type(parse):
    """Turn a parser's ValueError into argparse's 'invalid value' message."""

    def parse_argument(text: str):
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse_argument


def add_variant_arguments(parser: argparse.ArgumentParser) -> None:
    """The table's rows: methods x (r values | output-token targets), plus named variants."""
    parser.add_argument("--methods", default="none,tome,tofu,rapid", help="comma-separated: none,tome,tofu,rapid")
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--r", type=int_list, default=[], help="tokens removed per layer, e.g. 8,13,16")
    amount.add_argument("--output-tokens", type=int_list, default=[], help="tokens leaving the last layer, e.g. 65,29")
    parser.add_argument(
        "--rapid-config",
        type=_argument_type(parse_settings),
        metavar="JSON_OR_FILE",
        help="RapidConfig fields for the `rapid` rows (e.g. calibrated switch_layer/prune_threshold): inline JSON "
        "or a JSON file (fields at top level or under 'rapid')",
    )
    parser.add_argument(
        "--variant",
        "--config-name",
        dest="variants",
        type=_argument_type(parse_named_variant),
        action="append",
        default=[],
        metavar="NAME=JSON_OR_FILE",
        help="extra row NAME running these RapidConfig fields (method defaults to rapid; without r/output_tokens "
        "it runs at every --r/--output-tokens value); repeatable",
    )


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the labelled images come from (`DataSpec`) and how they are batched."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--dataset", help="Hub dataset id (default imagenet-1k when --data-dir is not given)")
    source.add_argument("--data-dir", help="imagefolder directory (images + metadata.csv with file_name,label)")
    parser.add_argument("--split", help="dataset split (default: validation for --dataset, train for --data-dir)")
    parser.add_argument("--streaming", action="store_true", help="stream the dataset instead of downloading it")
    parser.add_argument(
        "--subset", choices=SUBSETS, default="all",
        help="rows: all, report (index %% 5 != 0) or calibration (index %% 5 == 0)",
    )
    parser.add_argument("--max-samples", type=int, help="use only the first N rows of the subset")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader workers")


def add_benchmark_arguments(parser: argparse.ArgumentParser) -> None:
    """How the speed benchmark runs."""
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=2, help="untimed forwards per method before timing")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds over all methods (median taken)")
    parser.add_argument("--number", type=int, default=1, help="forwards per method per round")
    parser.add_argument(
        "--timer", choices=list(TIMERS), default="wall",
        help="wall clock, or this process's CPU time ('process', for busy shared CPU machines; use --threads 1)",
    )


def _parser(description: str | None) -> argparse.ArgumentParser:
    """The arguments every script shares: model, batch size, precision, threads."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="Hub id or local folder of a ViT/DeiT classifier")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--precision", choices=list(PRECISIONS), default="fp32", help="autocast dtype (paper: fp16)")
    parser.add_argument(
        "--threads", type=int, help="torch.set_num_threads (default: torch's); 1 on a busy shared CPU machine"
    )
    return parser


def evaluation_parser(description: str | None = None) -> argparse.ArgumentParser:
    parser = _parser(description)
    add_data_arguments(parser)
    add_variant_arguments(parser)
    parser.add_argument("--output", default="results/eval.json", help="JSON path; the Markdown table goes next to it")
    return parser


def benchmark_parser(description: str | None = None) -> argparse.ArgumentParser:
    parser = _parser(description)
    add_variant_arguments(parser)
    add_benchmark_arguments(parser)
    parser.add_argument("--output", default="results/bench.json", help="JSON path; the Markdown table goes next to it")
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and resolve the rows into `args.variant_rows`; a bad combination is a usage error naming it."""
    args = parser.parse_args(argv)
    if hasattr(args, "data_dir") and args.dataset is None and args.data_dir is None:
        args.dataset = "imagenet-1k"
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        args.variant_rows = grid_variants(methods, args.r, args.output_tokens, args.rapid_config, args.variants)
    except ValueError as error:
        parser.error(str(error))
    return args


def run_evaluation(args: argparse.Namespace, accelerator: Any = None) -> list[dict[str, Any]] | None:
    """Accuracy records of `args.variant_rows` (None on non-main processes of a distributed run)."""
    from accelerate import Accelerator
    from transformers import AutoImageProcessor

    from rapid_hf.evaluation.accuracy import predict, summarize
    from rapid_hf.evaluation.data import DataSpec, load_rows, make_dataloader

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    owns_accelerator = accelerator is None
    accelerator = accelerator or Accelerator()
    spec = DataSpec(
        dataset=args.dataset,
        data_dir=args.data_dir,
        split=args.split,
        subset=args.subset,
        max_samples=args.max_samples,
        streaming=args.streaming,
        image_column=args.image_column,
        label_column=args.label_column,
    )
    model = load_rapid_model(args.model, accelerator.device)
    processor = AutoImageProcessor.from_pretrained(args.model)
    rows = load_rows(spec)
    loader = make_dataloader(rows, processor, args.batch_size, args.num_workers, args.image_column, args.label_column)
    predictions = predict(model, loader, args.variant_rows, accelerator, args.precision)
    accelerator.wait_for_everyone()
    if owns_accelerator:  # tear the process group down before exit, or a rank can abort while shutting down
        accelerator.end_training()
    if not accelerator.is_main_process:
        return None
    records = summarize(
        predictions,
        args.variant_rows,
        model=args.model,
        dataset=spec.name,
        split=spec.resolved_split,
        subset=spec.subset,
        precision=args.precision,
    )
    return [{**record, **run_info()} for record in records]


def run_benchmark(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Benchmark records of `args.variant_rows` on `args.model`, with run information."""
    from rapid_hf.evaluation.throughput import benchmark

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here (use --device cpu)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
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
    return [{"model": args.model, **record, **info} for record in records]


def invocation(script: str, argv: list[str] | None) -> str:
    """The command line of this run: the real one, or `python scripts/<script> ARGV` when called with `argv`."""
    return command_line(None if argv is None else [f"scripts/{script}", *argv])


def write_outputs(records: list[dict[str, Any]], path: str | Path, columns: list[Column], command: str) -> str:
    """Write the JSON records and the Markdown table (headed by `command`) next to it; return the table."""
    path = write_json(records, path)
    table = markdown_table(records, columns)
    markdown = write_markdown(table, Path(path).with_suffix(".md"), command)
    print(f"wrote {path} and {markdown}")
    return table


def evaluate_main(argv: list[str] | None = None, description: str | None = None) -> None:
    args = parse(evaluation_parser(description), argv)
    records = run_evaluation(args)
    if records is not None:
        print(write_outputs(records, args.output, ACCURACY_COLUMNS, invocation("evaluate.py", argv)))


def benchmark_main(argv: list[str] | None = None, description: str | None = None) -> None:
    args = parse(benchmark_parser(description), argv)
    print(write_outputs(run_benchmark(args), args.output, BENCHMARK_COLUMNS, invocation("benchmark.py", argv)))


def sweep_parser(description: str | None = None) -> argparse.ArgumentParser:
    parser = _parser(description)
    add_data_arguments(parser)
    add_variant_arguments(parser)
    add_benchmark_arguments(parser)
    parser.add_argument("--name", default="model", help="file prefix: NAME_dev.json, NAME_<device>_bench.json, ...")
    parser.add_argument("--results-dir", default="results")
    parser.add_argument("--skip-evaluation", action="store_true", help="reuse NAME_dev.json from an earlier sweep")
    parser.add_argument("--skip-benchmark", action="store_true", help="reuse NAME_<device>_bench.json")
    return parser


def sweep_main(argv: list[str] | None = None, description: str | None = None) -> None:
    """Evaluate + benchmark one grid; write NAME_dev.{json,md}, NAME_<device>_bench.{json,md}, pareto_NAME.png."""
    from rapid_hf.evaluation.pareto import plot_pareto
    from rapid_hf.evaluation.report import combined_table, read_json

    args = parse(sweep_parser(description), argv)
    command = invocation("sweep.py", argv)
    folder = Path(args.results_dir)
    accuracy_path = folder / f"{args.name}_dev.json"
    bench_path = folder / f"{args.name}_{args.device}_bench.json"
    if args.skip_evaluation:
        accuracy = read_json(accuracy_path)
    else:
        accuracy = run_evaluation(args)
        if accuracy is None:  # a non-main process of a distributed run
            return
        write_json(accuracy, accuracy_path)
    if args.skip_benchmark:
        bench = read_json(bench_path)
    else:
        bench = run_benchmark(args)
        write_json(bench, bench_path)
        write_markdown(markdown_table(bench, BENCHMARK_COLUMNS), bench_path.with_suffix(".md"), command)
    title = f"{args.name}: top-1 on {accuracy[0]['n_samples']} images vs speed ({args.device}, batch {args.batch_size})"
    picture = plot_pareto(accuracy, bench, folder / f"pareto_{args.name}.png", title=title)
    sections = [
        f"## Accuracy and fidelity ({accuracy[0]['n_samples']} images, {accuracy[0]['dataset']})\n\n"
        + markdown_table(accuracy, ACCURACY_COLUMNS),
        f"## Speed ({args.device}, batch {bench[0]['batch_size']}, {bench[0]['num_threads']} thread(s), "
        f"timer {bench[0]['timer']}, {bench[0]['date']})\n\n" + markdown_table(bench, BENCHMARK_COLUMNS),
        "## Accuracy vs speed\n\n" + combined_table(accuracy, bench) + f"\n![Pareto]({picture.name})\n",
    ]
    markdown = write_markdown("\n".join(sections), accuracy_path.with_suffix(".md"), command)
    print("\n".join(sections))
    print(f"wrote {accuracy_path}, {markdown}, {bench_path}, {picture}")
