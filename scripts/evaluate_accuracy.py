"""`python scripts/evaluate_accuracy.py ARGS` runs `rapid-hf evaluate ARGS`, for checkouts without the installed
command. Not called evaluate.py, which would shadow the `evaluate` library for every script in this folder.
"""

import sys
from collections.abc import Sequence

from rapid_hf.cli import main as rapid_hf_main
from rapid_hf.cli import parse_args as rapid_hf_parse_args


def parse_args(argv: Sequence[str] | None = None):
    """The checked arguments of `rapid-hf evaluate`."""
    return rapid_hf_parse_args(["evaluate", *(sys.argv[1:] if argv is None else argv)])


def main(argv: Sequence[str] | None = None) -> int:
    """Run `rapid-hf evaluate`; returns the exit status."""
    return rapid_hf_main(["evaluate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
