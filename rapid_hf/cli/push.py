"""Share a token-reduced ViT/DeiT on the Hugging Face Hub, loadable without rapid_hf (trust_remote_code=True).

Builds the repository folder (safetensors weights, config.json with auto_map, the modeling code generated from
rapid_hf, the image processor config, the measured results and a model card) and uploads it:

    rapid-hf push --model ./calibrated --base-model facebook/deit-tiny-patch16-224 \\
        --repo-id my-user/deit-tiny-rapid-r16 --results eval.json --results bench.json

A model saved with its own settings (e.g. by `rapid-hf calibrate`) is pushed with them; --method, --r,
--output-tokens and --rapid-config override them (and the command says what they overrode). `--dry-run OUT_DIR`
writes the exact folder instead of uploading; add `--card-only` to write only README.md and eval_results.json
(how model_cards/ is generated). A benchmark file measured at several batch sizes or thread counts gives the card
the one chosen by --benchmark-batch-size / --benchmark-threads. Every flag, the results files and the output
folder are checked before the model is loaded.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from rapid_hf.cli import common

NAME = "push"
HELP = "build the Hub repository of a reduced model (weights, remote code, measured card) and upload it"
REQUIRES = {"hub": ("jinja2",)}
OUTPUT = None  # no --output: --dry-run OUT_DIR is checked by `check`
DEFAULT_R = 16


def settings_arg(text: str) -> dict[str, Any]:
    """--rapid-config: RapidConfig fields other than the method and the amount, which have their own flags."""
    from rapid_hf.evaluation.variants import parse_settings

    try:
        settings = parse_settings(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error
    clash = sorted({"method", "r", "output_tokens"} & set(settings))
    if clash:
        raise argparse.ArgumentTypeError(f"give {clash} with --method / --r / --output-tokens, not in --rapid-config")
    return settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rapid_hf.reduction.config import METHODS

    common.add_model_argument(parser)
    common.add_processor_argument(parser)
    parser.add_argument("--method", choices=METHODS,
                        help="token reduction method (default: the model's saved method, else rapid)")
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--r", type=common.non_negative_int,
                        help=f"tokens removed per layer (default: the model's saved amount, else {DEFAULT_R})")
    amount.add_argument("--output-tokens", type=common.positive_int,
                        help="instead of --r: tokens leaving the last layer")
    parser.add_argument("--rapid-config", type=settings_arg, default={}, metavar="JSON_OR_FILE",
                        help="more RapidConfig fields (e.g. switch_layer), inline JSON or a JSON file")
    parser.add_argument("--repo-id", required=True, help="OWNER/NAME of the Hub repository to create or update")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--results", action="append", default=[], metavar="FILE",
                        help="results JSON from `rapid-hf evaluate` or `rapid-hf benchmark` (repeatable); the card "
                             "quotes only these measured numbers")
    parser.add_argument("--benchmark-batch-size", type=common.positive_int, metavar="N",
                        help="with a benchmark file measured at several batch sizes: the one the card quotes")
    parser.add_argument("--benchmark-threads", type=common.positive_int, metavar="N",
                        help="with a benchmark file measured at several thread counts: the one the card quotes")
    parser.add_argument("--dry-run", metavar="OUT_DIR", type=Path,
                        help="write the repository folder to OUT_DIR (new or empty) instead of uploading")
    parser.add_argument("--card-only", action="store_true",
                        help="with --dry-run: write only README.md and eval_results.json")
    parser.add_argument("--base-model", help="Hub id of the checkpoint the weights come from (default: --model when "
                                             "it is a Hub id; required for a local folder)")
    parser.add_argument("--license", default="apache-2.0", help="license of the weights")
    parser.add_argument("--dataset-id", help="Hub id of the evaluation dataset for the card metadata (default: the "
                                             "records' --dataset; none for a local imagefolder)")
    parser.add_argument("--dataset-name", help="how the card names the evaluation data (default: the Hub id, or "
                                               "'local imagefolder' for --data-dir records)")
    parser.add_argument("--model-note", help="one line for the card about the exact weights that were measured")
    parser.add_argument("--token", help="Hugging Face token (default: HF_TOKEN or the `hf auth login` token)")


def rapid_config(args: argparse.Namespace) -> tuple[Any, str, dict[str, Any]]:
    """The reduction to ship, where it comes from ("model" or "defaults") and what the flags overrode.

    The model's saved settings when it has some (and --method, if given, names their method), then --r /
    --output-tokens and --rapid-config on top; otherwise the paper defaults of --method at --r (default 16).
    """
    from rapid_hf.evaluation.loading import saved_settings
    from rapid_hf.evaluation.variants import saved_amount
    from rapid_hf.reduction.config import RapidConfig

    saved = saved_settings(args.model)
    changes: dict[str, Any] = dict(args.rapid_config)
    if args.output_tokens is not None:
        changes.update(r=0, output_tokens=args.output_tokens)
    elif args.r is not None:
        changes.update(r=args.r, output_tokens=None)
    if saved is not None and saved_amount(saved) is not None and args.method in (None, saved.method):
        rapid = RapidConfig.from_dict({**saved.to_dict(), **changes})
        before, after = saved.to_dict(), rapid.to_dict()
        return rapid, "model", {key: after[key] for key in after if after[key] != before[key]}
    changes.setdefault("r", DEFAULT_R)
    return RapidConfig.from_dict({**changes, "method": args.method or "rapid"}), "defaults", {}


def benchmark_cell(args: argparse.Namespace) -> dict[str, int | None]:
    return {"batch_size": args.benchmark_batch_size, "num_threads": args.benchmark_threads}


def check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Every flag, the results files, the output folder and the image processor, before any weight is loaded."""
    from rapid_hf.hub.push import check_folder, check_repo_id, default_base_model
    from rapid_hf.hub.results import load_results

    if args.card_only and args.dry_run is None:
        parser.error("--card-only needs --dry-run OUT_DIR (a card alone is never uploaded)")
    missing = [path for path in args.results if not Path(path).is_file()]
    if missing:
        parser.error(f"--results {missing} do not exist (write them with `rapid-hf evaluate` / `rapid-hf benchmark`, "
                     "or leave --results out)")
    if args.dry_run is not None:
        common.check_output(parser, args.dry_run, "--dry-run", folder=True)
    try:
        check_repo_id(args.repo_id)
    except ValueError as error:
        parser.error(str(error))
    common.check_model(args, parser)
    try:
        args.base_model = check_repo_id(args.base_model, "--base-model") if args.base_model is not None \
            else default_base_model(args.model)
        if args.dry_run is not None:
            check_folder(args.dry_run, args.card_only)
        args.rapid, args.settings_source, args.overrides = rapid_config(args)
        if args.results:
            load_results(args.results, args.model, args.rapid, benchmark_cell(args))
    except (OSError, ValueError) as error:
        parser.error(common.first_line(error))
    args.image_processor = None if args.card_only else common.load_processor(args, parser)


def card_info(args: argparse.Namespace):
    from rapid_hf.hub.model_card import CardInfo
    from rapid_hf.hub.push import default_base_model

    return CardInfo(
        repo_id=args.repo_id,
        base_model=args.base_model or default_base_model(args.model),
        rapid=args.rapid,
        license=args.license,
        dataset_id=args.dataset_id,
        dataset_name=args.dataset_name,
        model_note=args.model_note,
        settings_source=args.settings_source,
        overrides=args.overrides,
        speed=saved_speed(args.model),
    )


def saved_speed(model: str) -> dict[str, Any] | None:
    """The `rapid_speed` record of a model calibrated to a speed target (its config.json), None otherwise."""
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(model), "rapid_speed", None)


def run(args: argparse.Namespace) -> int:
    """Build (and unless --dry-run, upload) the repository; exit status 1 when the Hub cannot be used."""
    from rapid_hf.hub.push import HubAccessError, build_repo_folder, require_login, upload_folder
    from rapid_hf.hub.results import setting_text

    source = "the model's saved settings" if args.settings_source == "model" else "the paper defaults"
    overridden = f", overriding {args.overrides}" if args.overrides else ""
    print(f"pushing {setting_text(args.rapid)} ({source}{overridden})")
    info = card_info(args)
    if args.dry_run is not None:
        files = build_repo_folder(args.dry_run, args.model, info, args.results, card_only=args.card_only,
                                  image_processor=args.image_processor, benchmark_cell=benchmark_cell(args))
        print(f"wrote {args.dry_run}: {', '.join(files)}")
        return 0
    try:
        token, user = require_login(args.token)  # before any weight is loaded
        with tempfile.TemporaryDirectory(prefix="rapid_hf_push_") as folder:
            build_repo_folder(folder, args.model, info, args.results, image_processor=args.image_processor,
                              benchmark_cell=benchmark_cell(args))
            url = upload_folder(folder, args.repo_id, token, private=args.private)
    except HubAccessError as error:
        print(f"rapid-hf push: error: {error}", file=sys.stderr)
        return 1
    print(f"uploaded to {url} as {user}")
    return 0
