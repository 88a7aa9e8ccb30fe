"""What every `rapid-hf` subcommand shares: the help format, argument types, flag groups and output writing.

A subcommand is one module of this package with `NAME`, `HELP`, `add_arguments(parser)` and `run(args)`
(plus, optionally, `check(args, parser)` for checks that need several arguments); `rapid_hf.cli.COMMANDS` lists
the modules. `run` raising ValueError or FileNotFoundError is reported like a usage error (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rapid_hf.evaluation.report import Column, markdown_table, write_json, write_markdown


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the description's layout (examples) and show every default in --help.

    A help text that states its own default ("(default: ...)") keeps it; required flags, switches and flags
    without a default value get no "(default: None)" noise.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        if "(default" in help_text or action.required or action.default in (None, False, [], {}, argparse.SUPPRESS):
            return help_text
        return super()._get_help_string(action)


def comma_list(cast: Callable[[str], Any], what: str) -> Callable[[str], list]:
    """An argparse type for `a,b,c` lists, e.g. `--r 8,16`; a bad item is an 'invalid value' error naming it."""

    def parse(text: str) -> list:
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, got {text!r}")
        try:
            return [cast(item) for item in items]
        except (ValueError, argparse.ArgumentTypeError) as error:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, got {text!r} ({error})") \
                from None

    parse.__name__ = what  # argparse names the type in its messages
    return parse


def non_negative_int(text: str) -> int:
    """An int >= 0 (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An int >= 1 (argparse type)."""
    value = non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


int_list = comma_list(non_negative_int, "integers >= 0")


def argument_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """Turn a parser's ValueError into argparse's 'invalid value' message."""

    def parse_argument(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse_argument.__name__ = getattr(parse, "__name__", "value")
    return parse_argument


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True,
        help="Hub id or local folder of a ViT/DeiT image classifier; a model saved with rapid settings (e.g. by "
             "`rapid-hf calibrate`) runs those settings unless flags override them",
    )


positive_int_list = comma_list(positive_int, "integers >= 1")


def add_device_arguments(parser: argparse.ArgumentParser, thread_list: bool = False) -> None:
    """--device and --threads; with `thread_list`, --threads takes a comma list (one run per thread count)."""
    parser.add_argument("--device", choices=["cpu", "cuda"], default=default_device(), help="where the model runs")
    parser.add_argument(
        "--threads", type=positive_int_list if thread_list else positive_int,
        help="torch.set_num_threads (default: torch's); 1 on a busy shared CPU"
        + ("; a comma list, e.g. 1,2, measures each" if thread_list else ""),
    )


def add_data_arguments(
    parser: argparse.ArgumentParser, default_num_workers: int | None = None, row_selection: bool = True
) -> None:
    """Where the labelled images come from (`rapid_hf.evaluation.data.DataSpec`) and, with `row_selection`,
    which rows and columns are used."""
    from rapid_hf.evaluation.splits import SUBSETS

    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", help="Hub dataset id, e.g. imagenet-1k")
    source.add_argument("--data-dir", help="imagefolder directory (images + metadata.csv with file_name,label)")
    parser.add_argument("--split", help="dataset split (default: validation for --dataset, train for --data-dir)")
    if row_selection:
        parser.add_argument("--streaming", action="store_true", help="stream the dataset instead of downloading it")
        parser.add_argument(
            "--subset", choices=SUBSETS, default="all",
            help="rows: all, report (index %% 5 != 0) or calibration (index %% 5 == 0)",
        )
        parser.add_argument("--max-samples", type=positive_int, help="use only the first N rows of the subset")
        parser.add_argument("--image-column", default="image", help="dataset column holding the images")
        parser.add_argument("--label-column", default="label", help="dataset column holding the class indices")
    parser.add_argument(
        "--num-workers", type=non_negative_int,
        default=min(4, os.cpu_count() or 1) if default_num_workers is None else default_num_workers,
        help="DataLoader worker processes",
    )


def add_class_names_argument(parser: argparse.ArgumentParser) -> None:
    """Zero-shot classification of the evaluation photos with a CLIP model."""
    parser.add_argument(
        "--class-names",
        help="zero-shot classification with a CLIP model: a text file with one class name per line, in label order "
        "(the dataset's labels index it)",
    )


def check_data_dir(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """A missing --data-dir folder is a usage error, before any model is loaded."""
    data_dir = getattr(args, "data_dir", None)
    if data_dir is not None and not Path(data_dir).is_dir():
        parser.error(f"--data-dir {data_dir!r} is not a directory")


def data_source(args: argparse.Namespace) -> str:
    """'imagefolder' for --data-dir, 'hub' for --dataset (recorded so cards can name the data honestly)."""
    return "imagefolder" if getattr(args, "data_dir", None) is not None else "hub"


def command_line(command: str, argv: Sequence[str] | None) -> str:
    """How this run is typed: `rapid-hf COMMAND ARGS` (from `argv`, or this process's arguments)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == command:
        args = args[1:]
    return " ".join(shlex.quote(part) for part in ["rapid-hf", command, *args])


def write_outputs(records: list[dict[str, Any]], path: str | Path, columns: list[Column], command: str) -> str:
    """Write the JSON records and the Markdown table (headed by `command`) next to it; return the table."""
    path = write_json(records, path)
    table = markdown_table(records, columns)
    markdown = write_markdown(table, Path(path).with_suffix(".md"), command)
    print(f"wrote {path} and {markdown}")
    return table


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def add_variant_arguments(parser: argparse.ArgumentParser) -> None:
    """The table's rows: methods x (r values | output-token targets), plus named variants."""
    from rapid_hf.evaluation.variants import parse_named_variant, parse_settings
    from rapid_hf.reduction.config import METHODS

    parser.add_argument(
        "--methods", type=comma_list(str, "method names"), default="none,tome,tofu,rapid",
        help=f"comma-separated, from {','.join(METHODS)}",
    )
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument(
        "--r", type=int_list, default=[],
        help="tokens removed per layer, e.g. 8,13,16 (default: the model's saved amount, if it has one)",
    )
    amount.add_argument("--output-tokens", type=int_list, default=[], help="tokens leaving the last layer, e.g. 65,29")
    parser.add_argument(
        "--rapid-config", type=argument_type(parse_settings), metavar="JSON_OR_FILE",
        help="RapidConfig fields for the `rapid` rows, overriding the model's saved ones: inline JSON or a JSON "
             "file (fields at top level or under 'rapid')",
    )
    parser.add_argument(
        "--variant", dest="variants", type=argument_type(parse_named_variant), action="append", default=[],
        metavar="NAME=JSON_OR_FILE",
        help="extra row NAME running these RapidConfig fields (method defaults to rapid; without r/output_tokens "
             "it runs at every --r/--output-tokens value); repeatable",
    )


def resolve_rows(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Set `args.variant_rows` from the grid flags and the model's saved settings; a bad combination is a usage
    error naming it."""
    from rapid_hf.evaluation.loading import saved_settings
    from rapid_hf.evaluation.variants import grid_variants

    methods = args.methods.split(",") if isinstance(args.methods, str) else args.methods
    try:
        saved = saved_settings(args.model)
    except (OSError, ValueError) as error:
        parser.error(f"--model {args.model!r} cannot be read: {error}")
    try:
        args.variant_rows = grid_variants(methods, args.r, args.output_tokens, args.rapid_config, args.variants, saved)
    except ValueError as error:
        parser.error(str(error))


def add_precision_arguments(parser: argparse.ArgumentParser, batch_list: bool = False) -> None:
    """--batch-size and --precision; with `batch_list`, --batch-size takes a comma list (one run per size)."""
    from rapid_hf.evaluation.loading import PRECISIONS

    if batch_list:
        parser.add_argument("--batch-size", type=positive_int_list, default=[64],
                            help="images per forward pass; a comma list, e.g. 1,4,16,64, measures each (default: 64)")
    else:
        parser.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass")
    parser.add_argument("--precision", choices=list(PRECISIONS), default="fp32", help="autocast dtype (paper: fp16)")


def add_benchmark_arguments(parser: argparse.ArgumentParser) -> None:
    """How the speed benchmark runs."""
    from rapid_hf.evaluation.throughput import TIMERS

    parser.add_argument("--warmup", type=non_negative_int, default=2, help="untimed forwards per row before timing")
    parser.add_argument("--repeats", type=positive_int, default=10, help="timed rounds over all rows (median taken)")
    parser.add_argument("--number", type=positive_int, default=1, help="forwards per row per round")
    parser.add_argument(
        "--timer", choices=list(TIMERS), default="wall",
        help="wall clock, or this process's CPU time ('process', for busy shared CPU machines; use --threads 1)",
    )


def check_device(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    import torch

    if getattr(args, "device", None) == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here (use --device cpu)")


def set_threads(args: argparse.Namespace) -> None:
    import torch

    if getattr(args, "threads", None) is not None:
        torch.set_num_threads(args.threads)


def single_r_rows(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """`args.variant_rows` for commands with one `--r`: the given r, else the model's saved amount, else 16."""
    from rapid_hf.evaluation.loading import saved_settings
    from rapid_hf.evaluation.variants import grid_variants, saved_amount

    try:
        saved = saved_settings(args.model)
    except (OSError, ValueError) as error:
        parser.error(f"--model {args.model!r} cannot be read: {error}")
    default_r = [16] if saved is None or saved_amount(saved) is None else []
    try:
        args.variant_rows = grid_variants(args.methods, [args.r] if args.r is not None else default_r, saved=saved)
    except ValueError as error:
        parser.error(str(error))
