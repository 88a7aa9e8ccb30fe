"""Calibrate a token-reduction method for one model and reduction amount; save the model with the result.

    rapid-hf calibrate --model ../shared/assets/deit-tiny-imagenet \\
        --data-dir ../shared/assets/imagenet-sample-dev --r 16 --output calibrated/deit-tiny-r16

Uses the calibration rows of the data (index % 5 == 0; the first --num-images of them), never the rows results
are reported on. Searches RAPID's switch layer K, pruning threshold tau, importance weight lambda and merge mode
(starting from the `switch_layer="auto"` rule) to minimise KL(unreduced || reduced), then writes the model with
the chosen values in config.json (`save_pretrained`; `rapid-hf evaluate/benchmark/push --model OUTPUT` then run
them) and the search log as calibration.json.
"""

from __future__ import annotations

import argparse

from rapid_hf.cli import common

NAME = "calibrate"
HELP = "search a method's knobs on calibration images; save the calibrated model"


def switch_layer_arg(text: str) -> int | str:
    """'auto' or an int >= 0 (argparse type)."""
    from rapid_hf.reduction.config import AUTO

    if text == AUTO:
        return AUTO
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an int >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an int >= 0, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rapid_hf.calibration import SEARCHED
    from rapid_hf.calibration.search import DEFAULT_OBJECTIVE, OBJECTIVES
    from rapid_hf.reduction.config import AUTO

    common.add_model_argument(parser)
    common.add_data_arguments(parser, default_num_workers=0, row_selection=False)
    parser.add_argument("--num-images", type=common.positive_int, default=100,
                        help="calibration images (the first N calibration rows)")
    parser.add_argument("--method", choices=sorted(SEARCHED), default="rapid", help="method to calibrate")
    amount = parser.add_mutually_exclusive_group(required=True)
    amount.add_argument("--r", type=common.non_negative_int, help="tokens removed per layer")
    amount.add_argument("--output-tokens", type=common.positive_int, help="tokens leaving the last layer")
    parser.add_argument("--switch-layer", type=switch_layer_arg, default=AUTO,
                        help="starting K: 'auto' (token-statistics rule) or an int")
    parser.add_argument("--search", type=common.comma_list(str, "knob names"),
                        help="knobs to search (default: all of the method's: "
                        + "; ".join(f"{m}: {','.join(k)}" for m, k in SEARCHED.items()) + ")")
    parser.add_argument("--objective", choices=OBJECTIVES, default=DEFAULT_OBJECTIVE,
                        help="what the search optimises on the calibration images: mean KL from the unreduced model "
                        "(ties: agreement), top-1 agreement with it (ties: KL), or the mean cross-entropy against "
                        "its top-1 class (ties: agreement)")
    parser.add_argument("--max-rounds", type=common.positive_int, default=3, help="coordinate-search rounds at most")
    parser.add_argument("--batch-size", type=common.positive_int, default=50, help="images per forward pass")
    parser.add_argument("--output", "--output-dir", dest="output", required=True,
                        help="folder for the calibrated model and calibration.json")


def check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from rapid_hf.calibration import SEARCHED
    from rapid_hf.reduction.config import RapidConfig

    common.check_data_dir(args, parser)
    unknown = sorted(set(args.search or []) - set(SEARCHED[args.method]))
    if unknown:
        parser.error(f"--search {unknown} cannot be searched for {args.method}: choose from "
                     f"{','.join(SEARCHED[args.method])}")
    try:
        args.rapid = RapidConfig(
            method=args.method,
            r=args.r or 0,
            output_tokens=args.output_tokens,
            switch_layer=args.switch_layer if args.method in ("rapid", "tofu") else None,
        )
    except ValueError as error:
        parser.error(str(error))


def run(args: argparse.Namespace) -> None:
    from transformers import AutoImageProcessor

    from rapid_hf.calibration import calibrate, load_calibration_images, save_calibrated
    from rapid_hf.evaluation.loading import load_rapid_model

    model = load_rapid_model(args.model)
    processor = AutoImageProcessor.from_pretrained(args.model)
    pixel_values, rows = load_calibration_images(
        processor, data_dir=args.data_dir, dataset=args.dataset, split=args.split, num_images=args.num_images,
        num_workers=args.num_workers,
    )
    result = calibrate(model, pixel_values, rapid=args.rapid, searched=args.search, max_rounds=args.max_rounds,
                       batch_size=args.batch_size, objective=args.objective)
    context = {"model": args.model, "data": args.data_dir or args.dataset, "data_source": common.data_source(args),
               "calibration_rows": rows, "command": common.command_line(NAME, args.argv)}
    save_calibrated(model, result, args.output, processor, context)
    common.print_json({"rapid": result.rapid.to_dict(), "kl": result.fidelity.kl,
                       "agreement": result.fidelity.agreement,
                       "top1_nll": result.fidelity.top1_nll, "start_kl": result.start_fidelity.kl,
                       "trials": len(result.trials), "seconds": round(result.seconds, 1)})
    print(f"wrote {args.output} (config.json with the chosen values, calibration.json with the search log)")
