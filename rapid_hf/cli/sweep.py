"""Evaluate and benchmark one grid of token-reduction settings; write the tables and the Pareto picture.

    rapid-hf sweep --model facebook/deit-tiny-patch16-224 --data-dir ./photos --name deit_tiny \\
        --methods none,tome,tofu,rapid --r 4,8,12,16 --threads 1 --timer process --output sweep

writes OUTPUT/NAME_dev.{json,md} (accuracy, fidelity, speed tables), OUTPUT/NAME_<device>_bench.{json,md} and
OUTPUT/pareto_NAME.png (top-1 vs throughput and vs GFLOPs, one curve per method).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rapid_hf.cli import benchmark, common, evaluate

NAME = "sweep"
HELP = "evaluate + benchmark one grid; tables and the accuracy/speed picture"
REQUIRES = {**evaluate.REQUIRES, "viz": ("matplotlib",)}
OUTPUT = "folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_model_argument(parser)
    common.add_processor_argument(parser)
    common.add_data_arguments(parser)
    common.add_class_names_argument(parser)
    common.add_variant_arguments(parser)
    common.add_precision_arguments(parser)
    common.add_device_arguments(parser)
    common.add_benchmark_arguments(parser)
    parser.add_argument("--name", default="model", help="file prefix: NAME_dev.json, NAME_<device>_bench.json, ...")
    parser.add_argument("--output", "--results-dir", dest="output", default=".",
                        help="folder the files are written to, e.g. ./sweep")
    parser.add_argument("--skip-evaluation", action="store_true", help="reuse NAME_dev.json from an earlier sweep")
    parser.add_argument("--skip-benchmark", action="store_true", help="reuse NAME_<device>_bench.json")


def check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    evaluate.check(args, parser)
    folder = Path(args.output)
    for flag, path in (("--skip-evaluation", folder / f"{args.name}_dev.json"),
                       ("--skip-benchmark", folder / f"{args.name}_{args.device}_bench.json")):
        if getattr(args, flag[2:].replace("-", "_")) and not path.is_file():
            parser.error(f"{flag}: {path} does not exist (run the sweep without {flag} first)")


def run(args: argparse.Namespace) -> None:
    from rapid_hf.evaluation.pareto import plot_pareto
    from rapid_hf.evaluation.report import (
        ACCURACY_COLUMNS,
        BENCHMARK_COLUMNS,
        combined_table,
        markdown_table,
        read_json,
        write_json,
        write_markdown,
    )

    command = common.command_line(NAME, args.argv)
    folder = Path(args.output)
    accuracy_path = folder / f"{args.name}_dev.json"
    bench_path = folder / f"{args.name}_{args.device}_bench.json"
    if args.skip_evaluation:
        accuracy = read_json(accuracy_path)
    else:
        accuracy = evaluate.evaluate(args)
        if accuracy is None:  # a non-main process of a distributed run
            return
        write_json(accuracy, accuracy_path)
    if args.skip_benchmark:
        bench = read_json(bench_path)
    else:
        bench = benchmark.measure(args)
        write_json(bench, bench_path)
        write_markdown(markdown_table(bench, BENCHMARK_COLUMNS), bench_path.with_suffix(".md"), command)
    common.warn_capped(accuracy if any("capped" in record for record in accuracy) else bench)
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
