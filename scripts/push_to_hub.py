"""Share a token-reduced ViT/DeiT on the Hugging Face Hub, loadable without rapid_hf (trust_remote_code=True).

Builds the repository folder (safetensors weights, config.json with auto_map, the modeling code generated from
rapid_hf, the image processor config, the measured results and a model card) and uploads it:

    python scripts/push_to_hub.py --model facebook/deit-tiny-patch16-224 --method rapid --r 16 \\
        --repo-id my-user/deit-tiny-rapid-r16 --results results/deit_tiny_dev.json \\
        --results results/deit_tiny_cpu_bench.json

`--dry-run OUT_DIR` writes the exact folder instead of uploading; add `--card-only` to write only README.md and
eval_results.json (how model_cards/ is generated).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from rapid_hf.evaluation.variants import parse_settings
from rapid_hf.hub.model_card import DEFAULT_DATASET_ID, CardInfo
from rapid_hf.hub.push import (
    HubAccessError,
    build_repo_folder,
    check_repo_id,
    default_base_model,
    require_login,
    upload_folder,
)
from rapid_hf.reduction.config import METHODS, RapidConfig


def settings_arg(text: str) -> dict:
    """--rapid-config: RapidConfig fields other than the method and the amount, which have their own flags."""
    try:
        settings = parse_settings(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error
    clash = sorted({"method", "r", "output_tokens"} & set(settings))
    if clash:
        raise argparse.ArgumentTypeError(f"give {clash} with --method / --r / --output-tokens, not in --rapid-config")
    return settings


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="facebook/deit-tiny-patch16-224",
                        help="Hub id or local folder of a ViT/DeiT image classifier (default: %(default)s)")
    parser.add_argument("--method", choices=METHODS, default="rapid", help="token reduction method (default: rapid)")
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--r", type=int, default=16, help="tokens removed per layer (default: 16)")
    amount.add_argument("--output-tokens", type=int, help="instead of --r: tokens leaving the last layer")
    parser.add_argument("--rapid-config", type=settings_arg, default={}, metavar="JSON_OR_FILE",
                        help="more RapidConfig fields (e.g. calibrated switch_layer), inline JSON or a JSON file")
    parser.add_argument("--repo-id", required=True, help="OWNER/NAME of the Hub repository to create or update")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--results", action="append", default=[], metavar="FILE",
                        help="results JSON from scripts/evaluate.py or scripts/benchmark.py (repeatable); the card "
                             "quotes only these measured numbers")
    parser.add_argument("--dry-run", metavar="OUT_DIR", type=Path,
                        help="write the repository folder to OUT_DIR (new or empty) instead of uploading")
    parser.add_argument("--card-only", action="store_true",
                        help="with --dry-run: write only README.md and eval_results.json")
    parser.add_argument("--base-model", help="Hub id of the checkpoint the weights come from (default: --model when "
                                             "it is a Hub id; required for a local folder)")
    parser.add_argument("--license", default="apache-2.0", help="license of the weights (default: %(default)s)")
    parser.add_argument("--dataset-id", default=DEFAULT_DATASET_ID,
                        help="Hub id of the evaluation dataset, for the card metadata (default: %(default)s)")
    parser.add_argument("--dataset-name", default="ImageNet-1k",
                        help="how the card names the evaluation data (default: %(default)s)")
    parser.add_argument("--model-note", help="one line for the card about the exact weights that were measured")
    parser.add_argument("--token", help="Hugging Face token (default: HF_TOKEN or the `hf auth login` token)")
    args = parser.parse_args(argv)
    if args.card_only and args.dry_run is None:
        parser.error("--card-only needs --dry-run OUT_DIR (a card alone is never uploaded)")
    if args.r < 0:
        parser.error(f"--r must be >= 0, got {args.r}")
    return args


def rapid_config(args: argparse.Namespace) -> RapidConfig:
    """The reduction to ship: --method and --r / --output-tokens, plus any --rapid-config fields."""
    amount = {"r": 0, "output_tokens": args.output_tokens} if args.output_tokens is not None else {"r": args.r}
    return RapidConfig.from_dict({**args.rapid_config, "method": args.method, **amount})


def run(args: argparse.Namespace) -> str:
    """Build (and unless --dry-run, upload) the repository; returns what was done."""
    check_repo_id(args.repo_id)
    info = CardInfo(
        repo_id=args.repo_id,
        base_model=args.base_model or default_base_model(args.model),
        rapid=rapid_config(args),
        license=args.license,
        dataset_id=args.dataset_id,
        dataset_name=args.dataset_name,
        model_note=args.model_note,
    )
    if args.dry_run is not None:
        files = build_repo_folder(args.dry_run, args.model, info, args.results, card_only=args.card_only)
        return f"wrote {args.dry_run}: {', '.join(files)}"
    token, user = require_login(args.token)  # before any weight is loaded
    with tempfile.TemporaryDirectory(prefix="rapid_hf_push_") as folder:
        build_repo_folder(folder, args.model, info, args.results)
        url = upload_folder(folder, args.repo_id, token, private=args.private)
    return f"uploaded to {url} as {user}"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        print(run(args))
    except (ValueError, OSError, HubAccessError) as error:  # OSError: unreadable model or results file
        print(f"push_to_hub.py: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
