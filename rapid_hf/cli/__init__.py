"""The `rapid-hf` command: one subcommand per user task.

    rapid-hf --help
    rapid-hf evaluate --help

Each subcommand is one module of this package (listed in `COMMANDS`) defining `NAME`, `HELP`,
`add_arguments(parser)`, `run(args)` and optionally `check(args, parser)`; adding a command is adding a module
and its name here. Bad input exits with status 2 and an argparse message naming the problem.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

from rapid_hf.cli.common import HelpFormatter

COMMANDS: tuple[str, ...] = ("evaluate", "benchmark", "sweep", "calibrate", "visualize", "push", "demo", "export")


def command_module(name: str) -> ModuleType:
    return importlib.import_module(f"rapid_hf.cli.{name}")


def build_parser() -> argparse.ArgumentParser:
    """`rapid-hf` with every subcommand of `COMMANDS`."""
    import rapid_hf

    parser = argparse.ArgumentParser(
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
        module.add_arguments(subparser)
        subparser.set_defaults(module=module, subparser=subparser)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check one command line (usage errors exit with status 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    check = getattr(args.module, "check", None)
    if check is not None:
        check(args, args.subparser)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command line; returns the exit status."""
    args = parse_args(argv)
    try:
        status = args.module.run(args)
    except (ValueError, FileNotFoundError) as error:
        args.subparser.error(str(error))
    return int(status or 0)


__all__ = ["COMMANDS", "build_parser", "main", "parse_args"]
