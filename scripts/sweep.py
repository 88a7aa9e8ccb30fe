"""`python scripts/sweep.py ARGS` runs `rapid-hf sweep ARGS`, for checkouts without the installed command."""

import sys
from collections.abc import Sequence

from rapid_hf.cli import main as rapid_hf_main
from rapid_hf.cli import parse_args as rapid_hf_parse_args


def parse_args(argv: Sequence[str] | None = None):
    """The checked arguments of `rapid-hf sweep`."""
    return rapid_hf_parse_args(["sweep", *(sys.argv[1:] if argv is None else argv)])


def main(argv: Sequence[str] | None = None) -> int:
    """Run `rapid-hf sweep`; returns the exit status."""
    return rapid_hf_main(["sweep", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
