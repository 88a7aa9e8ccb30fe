"""What every `rapid-hf` subcommand shares: the help format, argument types, flag groups, checks and outputs.

A subcommand is one module of this package with `NAME`, `HELP`, `add_arguments(parser)` and `run(args)`
(plus, optionally, `check(args, parser)` for checks that need several arguments); `rapid_hf.cli.COMMANDS` lists
the modules. `run` raising ValueError or OSError is reported as one line (exit status 2; `--verbose` shows the
traceback). Nothing here imports torch, transformers or datasets at module level or while building a parser.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import re
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

PRECISION_NAMES: tuple[str, ...] = ("fp32", "fp16", "bf16")
"""`rapid_hf.evaluation.loading.PRECISIONS`' names (a test keeps them equal; spelled out so --help needs no torch)."""
TIMER_NAMES: tuple[str, ...] = ("wall", "process")
"""`rapid_hf.evaluation.throughput.TIMERS`' names (likewise)."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the description's layout (examples) and show every default in --help.

    A help text that states its own default ("(default: ...)") keeps it; required flags, switches (on or off)
    and flags without a default value get no "(default: None)" / "(default: True)" noise.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        if ("(default" in help_text or action.required or action.nargs == 0
                or action.default in (None, False, [], {}, argparse.SUPPRESS)):
            return help_text
        return super()._get_help_string(action)


ARGPARSE_MESSAGES = ("argument ", "the following arguments", "one of the arguments", "unrecognized arguments",
                     "invalid choice", "expected one argument", "not allowed with")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: `rapid-hf evaluate: error: <problem>` (argparse's own, about the flags
    themselves, end with where to read about them) instead of the usage block and then the problem."""

    def error(self, message: str):  # type: ignore[override]
        hint = f" (see `{self.prog} --help`)" if any(text in message for text in ARGPARSE_MESSAGES) else ""
        self.exit(2, f"{self.prog}: error: {message}{hint}\n")


def missing_modules(names: Sequence[str]) -> list[str]:
    """The modules of `names` that cannot be imported (not installed, or blocked with `sys.modules[name] = None`),
    found without importing them."""
    missing = []
    for name in names:
        if name in sys.modules:
            if sys.modules[name] is None:
                missing.append(name)
        elif importlib.util.find_spec(name) is None:
            missing.append(name)
    return missing


QUIET_ENVIRONMENT = {
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",  # "Downloading data", "Generating train split", ...
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # huggingface_hub's bars, and transformers' "Loading weights" bar
    "TRANSFORMERS_VERBOSITY": "error",
    "DATASETS_VERBOSITY": "error",
}
TORCHVISION_NOTICE = "requires torchvision (not installed)"


class _DropTorchvisionNotice(logging.Filter):
    """transformers' "`ViTImageProcessor` requires torchvision (not installed); falling back to ..." notice: the
    PIL image processors it falls back to are the ones rapid_hf is tested with, so nothing is to be done."""

    def filter(self, record: logging.LogRecord) -> bool:
        return TORCHVISION_NOTICE not in record.getMessage()


@contextlib.contextmanager
def quiet_libraries(verbose: bool = False) -> Iterator[None]:
    """Within a command line: no library progress bars ("Loading weights", "Downloading data") and only the
    libraries' errors, unless `verbose`; never transformers' torchvision notice. Everything is restored afterwards
    (the command can run inside another program, e.g. the tests)."""
    notice_logger = logging.getLogger("transformers.utils.import_utils")
    notice_filter = _DropTorchvisionNotice()
    notice_logger.addFilter(notice_filter)
    saved_environment = {name: os.environ.get(name) for name in QUIET_ENVIRONMENT}
    restore: list[Callable[[], None]] = []
    if not verbose:
        for name, value in QUIET_ENVIRONMENT.items():  # read when the libraries are imported
            os.environ.setdefault(name, value)
        if sys.modules.get("transformers") is not None:  # already imported: its own switches
            from transformers.utils import logging as transformers_logging

            level, bars = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
            transformers_logging.set_verbosity_error()
            transformers_logging.disable_progress_bar()
            restore.append(lambda: transformers_logging.set_verbosity(level))
            if bars:
                restore.append(transformers_logging.enable_progress_bar)
        if sys.modules.get("datasets") is not None:
            import datasets

            level, bars = datasets.logging.get_verbosity(), not datasets.utils.are_progress_bars_disabled()
            datasets.logging.set_verbosity_error()
            datasets.disable_progress_bars()
            restore.append(lambda: datasets.logging.set_verbosity(level))
            if bars:
                restore.append(datasets.enable_progress_bars)
    try:
        yield
    finally:
        notice_logger.removeFilter(notice_filter)
        for undo in restore:
            undo()
        for name, value in saved_environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (library errors can run to several lines of advice)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def error_message(error: BaseException) -> str:
    """One line for an error: an error raised in a DataLoader worker ("Caught ValueError in DataLoader worker
    process 0. Original Traceback ...") by its original message, any other by its first line."""
    text = str(error).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        return re.sub(r"^[\w.]*\w(Error|Exception): ", "", last)
    return first_line(error)


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
        help="Hub id (e.g. facebook/deit-small-patch16-224) or local folder (e.g. ./my-vit) of a ViT/DeiT image "
             "classifier; a model saved with rapid settings (e.g. by `rapid-hf calibrate`) runs those settings unless "
             "flags override them",
    )


def add_processor_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--processor", metavar="ID_OR_PATH",
        help="image processor to preprocess with (default: the one saved with --model), e.g. the Hub id of the "
             "checkpoint the model came from",
    )


positive_int_list = comma_list(positive_int, "integers >= 1")


def add_device_arguments(parser: argparse.ArgumentParser, thread_list: bool = False) -> None:
    """--device and --threads; with `thread_list`, --threads takes a comma list (one run per thread count)."""
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        help="where the model runs (default: cuda when available, else cpu)")
    parser.add_argument(
        "--threads", type=positive_int_list if thread_list else positive_int,
        help="torch.set_num_threads (default: torch's); 1 on a busy shared CPU"
        + ("; a comma list, e.g. 1,2, measures each" if thread_list else ""),
    )


def add_data_arguments(
    parser: argparse.ArgumentParser, default_num_workers: int | None = None, row_selection: bool = True
) -> None:
    """Where the labelled images come from (`rapid_hf.evaluation.data.DataSpec`), their columns and, with
    `row_selection`, which rows are used."""
    from rapid_hf.evaluation.splits import SUBSETS

    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", help="Hub dataset id, e.g. imagenet-1k")
    source.add_argument("--data-dir", help="imagefolder directory, e.g. ./photos (images + metadata.csv with "
                                           "file_name,label)")
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
    """A missing --data-dir folder, or one without metadata.csv (where the labels are), is a usage error before
    any model is loaded."""
    from rapid_hf.evaluation.data import check_image_folder

    data_dir = getattr(args, "data_dir", None)
    if data_dir is None:
        return
    try:
        check_image_folder(data_dir)
    except ValueError as error:
        parser.error(str(error))


def looks_local(name: str) -> bool:
    """Whether `name` is written as a path, not a Hub id: it starts with ./ ../ / or ~, or holds a path separator
    a Hub id cannot (a second "/", or the system's own separator where that is not "/")."""
    if name in (".", "..") or name.startswith(("./", "../", "/", "~")):
        return True
    if os.sep != "/" and os.sep in name:
        return True
    return name.count("/") > 1


def check_model(args: argparse.Namespace, parser: argparse.ArgumentParser, flag: str = "--model") -> None:
    """A --model written as a path must be a folder holding config.json (not "Repo id must use alphanumeric
    chars"); a Hub id is checked when its config is read."""
    name = getattr(args, flag[2:].replace("-", "_"))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            parser.error(f"{flag} {name!r} holds no config.json: pass a folder written by save_pretrained, or a Hub id")
        return
    if path.exists():
        parser.error(f"{flag} {name!r} is a file: pass the model's folder (written by save_pretrained) or a Hub id")
    if looks_local(name):
        parser.error(f"{flag} {name!r}: no such folder")


def check_output(parser: argparse.ArgumentParser, path: str | Path | None, flag: str = "--output",
                 folder: bool = False) -> None:
    """Refuse an output that cannot be written (a parent that is a file, an unwritable folder, an existing folder
    where a file goes) before any work is done."""
    if path is None:
        return
    path = Path(path).expanduser()
    if folder:
        if path.exists() and not path.is_dir():
            parser.error(f"{flag} {str(path)!r} is a file, not a folder")
        target = path
    else:
        if path.is_dir():
            parser.error(f"{flag} {str(path)!r} is a folder: give a file name")
        target = path.parent
    existing = target
    while not existing.exists():  # the nearest existing ancestor must be a writable folder
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        parser.error(f"{flag} {str(path)!r} cannot be written: {str(existing)!r} is a file, not a folder")
    if existing.exists() and not os.access(existing, os.W_OK | os.X_OK):
        parser.error(f"{flag} {str(path)!r} cannot be written: no permission to write in {str(existing)!r}")


PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def load_processor(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Any:
    """The image processor of `--processor`, else the one saved with `--model`; a missing one is a usage error
    saying how to provide it (a model saved alone, e.g. `model.save_pretrained("vit-rapid")`, has none)."""
    from transformers import AutoImageProcessor

    given = getattr(args, "processor", None)
    name = given or args.model
    folder = Path(name).expanduser()
    if given is None and folder.is_dir() and not any((folder / file).is_file() for file in PROCESSOR_FILES):
        parser.error(f"--model {name!r} has no image processor (preprocessor_config.json): save it beside the model "
                     f"(processor.save_pretrained({name!r})) or pass --processor ID_OR_PATH, e.g. the Hub id of the "
                     "checkpoint the model came from")
    if given is not None and looks_local(given) and not folder.is_dir():
        parser.error(f"--processor {given!r}: no such folder")
    try:
        return AutoImageProcessor.from_pretrained(name)
    except (OSError, ValueError) as error:
        hint = "" if given else " (pass --processor ID_OR_PATH to use another one)"
        parser.error(f"{'--processor' if given else '--model'} {name!r}: its image processor cannot be loaded: "
                     f"{first_line(error)}{hint}")


def check_image(path: Path, parser: argparse.ArgumentParser, flag: str = "--image") -> None:
    """An image file that exists and that PIL can decode (a truncated or corrupt file is named, in one line)."""
    from PIL import Image

    if not path.is_file():
        parser.error(f"{flag} {str(path)!r} is not a file")
    try:
        with Image.open(path) as picture:
            picture.load()
    except (OSError, SyntaxError, ValueError) as error:
        parser.error(f"{flag} {str(path)!r} cannot be read as an image ({first_line(error)})")


def data_source(args: argparse.Namespace) -> str:
    """'imagefolder' for --data-dir, 'hub' for --dataset (recorded so cards can name the data honestly)."""
    return "imagefolder" if getattr(args, "data_dir", None) is not None else "hub"


def command_line(command: str, argv: Sequence[str] | None) -> str:
    """How this run is typed: `rapid-hf COMMAND ARGS` (from `argv`, or this process's arguments)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == command:
        args = args[1:]
    return " ".join(shlex.quote(part) for part in ["rapid-hf", command, *args])


ONNX_MODULES = ("onnx", "onnxscript", "onnxruntime")


def check_onnx_modules(parser: argparse.ArgumentParser) -> None:
    """`--runtime onnx` needs the onnx extra: a one-line usage error naming what is missing."""
    from importlib.util import find_spec

    missing = [name for name in ONNX_MODULES if find_spec(name) is None]
    if missing:
        parser.error(f"--runtime onnx needs {', '.join(missing)}: pip install \"rapid_hf[onnx]\"")


def write_outputs(records: list[dict[str, Any]], path: str | Path, columns: list, command: str) -> str:
    """Write the JSON records and the Markdown table (headed by `command`) next to it; return the table."""
    from rapid_hf.evaluation.report import markdown_table, write_json, write_markdown

    warn_capped(records)
    path = write_json(records, path)
    table = markdown_table(records, columns)
    markdown = write_markdown(table, Path(path).with_suffix(".md"), command)
    print(f"wrote {path} and {markdown}")
    return table


def warn_capped(records: Sequence[dict[str, Any]]) -> None:
    """One line on stderr per reduction amount that the layers could not remove in full."""
    from rapid_hf.evaluation.variants import capped_notes

    for note in capped_notes(records):
        print(note, file=sys.stderr)


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


def read_saved_settings(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Any:
    """The `--model`'s saved settings (None for a plain checkpoint), read from its config alone (no weights); a
    missing folder or unreadable config is a usage error."""
    from rapid_hf.evaluation.loading import saved_settings

    check_model(args, parser)
    try:
        return saved_settings(args.model)
    except (OSError, ValueError) as error:
        parser.error(f"--model {args.model!r} cannot be read: {first_line(error)}")


def resolve_rows(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Set `args.variant_rows` from the grid flags and the model's saved settings; a bad combination is a usage
    error naming it."""
    from rapid_hf.evaluation.variants import grid_variants

    methods = args.methods.split(",") if isinstance(args.methods, str) else args.methods
    saved = read_saved_settings(args, parser)
    try:
        args.variant_rows = grid_variants(methods, args.r, args.output_tokens, args.rapid_config, args.variants, saved)
    except ValueError as error:
        parser.error(str(error))


def add_precision_arguments(parser: argparse.ArgumentParser, batch_list: bool = False) -> None:
    """--batch-size and --precision; with `batch_list`, --batch-size takes a comma list (one run per size)."""
    if batch_list:
        parser.add_argument("--batch-size", type=positive_int_list, default=[64],
                            help="images per forward pass; a comma list, e.g. 1,4,16,64, measures each (default: 64)")
    else:
        parser.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass")
    parser.add_argument("--precision", choices=list(PRECISION_NAMES), default="fp32",
                        help="autocast dtype (paper: fp16)")


def add_benchmark_arguments(parser: argparse.ArgumentParser) -> None:
    """How the speed benchmark runs."""
    parser.add_argument("--warmup", type=non_negative_int, default=2, help="untimed forwards per row before timing")
    parser.add_argument("--repeats", type=positive_int, default=10, help="timed rounds over all rows (median taken)")
    parser.add_argument("--number", type=positive_int, default=1, help="forwards per row per round")
    parser.add_argument(
        "--timer", choices=list(TIMER_NAMES), default="wall",
        help="wall clock, or this process's CPU time ('process', for busy shared CPU machines; use --threads 1)",
    )


def check_device(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Resolve the default --device (cuda when available) and refuse cuda where there is none."""
    import torch

    if getattr(args, "device", "") is None:
        args.device = default_device()
    if getattr(args, "device", None) == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here (use --device cpu)")


def set_threads(args: argparse.Namespace) -> None:
    import torch

    if getattr(args, "threads", None) is not None:
        torch.set_num_threads(args.threads)


def single_r_rows(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """`args.variant_rows` for commands with one `--r`: the given r, else the model's saved amount, else 16."""
    from rapid_hf.evaluation.variants import grid_variants, saved_amount

    saved = read_saved_settings(args, parser)
    default_r = [16] if saved is None or saved_amount(saved) is None else []
    try:
        args.variant_rows = grid_variants(args.methods, [args.r] if args.r is not None else default_r, saved=saved)
    except ValueError as error:
        parser.error(str(error))
