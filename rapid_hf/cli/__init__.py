"""The `rapid-hf` command: one subcommand per user task.

    rapid-hf --help
    rapid-hf evaluate --help

Each subcommand is one module of this package (listed in `COMMANDS`) defining `NAME`, `HELP`,
`add_arguments(parser)`, `run(args)` and optionally `check(args, parser)` and `REQUIRES` (the extra it needs:
`{"eval": ("datasets", ...)}`); adding a command is adding a module and its name here. Bad input exits with
status 2 and one line naming the problem.

Answering `--help`, `--version` or a usage error imports neither torch nor transformers: the command modules
import heavy libraries inside their functions, and only the chosen subcommand's flags are built. `check` runs
after parsing and checks every argument and path before `run` loads a model or reads data.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

from rapid_hf.cli.common import (
    ArgumentParser,
    HelpFormatter,
    check_output,
    error_message,
    missing_modules,
    quiet_libraries,
)

COMMANDS: tuple[str, ...] = ("evaluate", "benchmark", "sweep", "calibrate", "visualize", "push", "demo", "export")


def command_module(name: str) -> ModuleType:
    return importlib.import_module(f"rapid_hf.cli.{name}")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """`rapid-hf` with every subcommand of `COMMANDS`; with `only`, the flags of that subcommand alone (the others
    are listed, not built: what `parse_args` does, so a command line costs only its own subcommand's imports)."""
    import rapid_hf

    parser = ArgumentParser(
        prog="rapid-hf",
        description="Training-free token reduction (RAPID, ToMe, ToFu, crucial merging) for Hugging Face ViT, DeiT, "
        "DINOv2 and CLIP vision encoders.",
        epilog="`rapid-hf COMMAND --help` shows a command's flags and their defaults.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"rapid_hf {rapid_hf.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = command_module(name)
        subparser = subparsers.add_parser(
            module.NAME, help=module.HELP, description=module.__doc__, formatter_class=HelpFormatter
        )
        if only is None or only == name:
            module.add_arguments(subparser)
            subparser.add_argument("--verbose", action="store_true",
                                   help="show the libraries' progress bars, log messages and full tracebacks")
        subparser.set_defaults(module=module, subparser=subparser)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check one command line: flags, the extra the subcommand needs, then its `check` (paths, the
    model's config, the rows), all before any model is loaded. Usage errors exit with status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)  # the top level takes no valued flag
    args = build_parser(only=chosen if chosen in COMMANDS else "").parse_args(argv)
    args.argv = argv
    check_requirements(args.module, args.subparser)
    output_kind = getattr(args.module, "OUTPUT", "file")
    if output_kind is not None and getattr(args, "output", None) is not None:
        check_output(args.subparser, args.output, folder=output_kind == "folder")
    check = getattr(args.module, "check", None)
    if check is not None:
        check(args, args.subparser)
    return args


def check_requirements(module: ModuleType, parser: argparse.ArgumentParser) -> None:
    """Stop with one line naming the `pip install` to run when the subcommand's extra is not installed."""
    for extra, modules in getattr(module, "REQUIRES", {}).items():
        missing = missing_modules(modules)
        if missing:
            parser.exit(2, f"{parser.prog}: error: needs {', '.join(missing)}, which "
                           f"{'is' if len(missing) == 1 else 'are'} not installed: run "
                           f"pip install \"rapid_hf[{extra}]\"\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command line; returns the exit status. A bad input or an unreadable file ends it with one line
    naming the problem (status 2); `--verbose` shows the traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    with quiet_libraries(verbose="--verbose" in argv):
        args = parse_args(argv)
        try:
            status = args.module.run(args)
        except (ValueError, OSError) as error:
            if args.verbose:
                raise
            args.subparser.exit(2, f"{args.subparser.prog}: error: {error_message(error)}\n")
    return int(status or 0)


__all__ = ["COMMANDS", "build_parser", "main", "parse_args"]
