"""Calibrate a token-reduction method for one model and reduction amount, and save the model with the result.

    python scripts/calibrate.py --model ../shared/assets/deit-tiny-imagenet \
        --data-dir ../shared/assets/imagenet-sample-dev --r 16 --output-dir calibrated/deit-tiny-r16

Uses the calibration rows of the data (index % 5 == 0; the first --num-images of them), never the rows results
are reported on. Searches RAPID's switch layer K, pruning threshold tau, importance weight lambda and merge mode
(starting from the `switch_layer="auto"` rule; rho cannot change RAPID's choices, see rapid_hf/calibration/search.py)
to minimise KL(unreduced || reduced), then writes the model with
the chosen values in config.json (`save_pretrained`, reload with `from_pretrained`) and the search log as
calibration.json.
"""

from __future__ import annotations

import argparse
import json

from rapid_hf.calibration import SEARCHED, calibrate, load_calibration_images, save_calibrated
from rapid_hf.reduction.config import AUTO, RapidConfig


def switch_layer_arg(text: str) -> int | str:
    if text == AUTO:
        return AUTO
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an int >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an int >= 0, got {text!r}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hub id or local folder of a ViT/DeiT image classifier")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-dir", help="imagefolder directory (images + metadata.csv)")
    source.add_argument("--dataset", help="Hub dataset id")
    parser.add_argument("--split", help="dataset split (default: validation for --dataset, train for --data-dir)")
    parser.add_argument("--num-images", type=int, default=100, help="calibration images (first N calibration rows)")
    parser.add_argument("--method", choices=sorted(SEARCHED), default="rapid")
    amount = parser.add_mutually_exclusive_group(required=True)
    amount.add_argument("--r", type=int, help="tokens removed per layer")
    amount.add_argument("--output-tokens", type=int, help="tokens leaving the last layer")
    parser.add_argument("--switch-layer", type=switch_layer_arg, default=AUTO,
                        help="starting K: 'auto' (token-statistics rule, default) or an int")
    parser.add_argument("--search", help="comma-separated knobs to search (default: all of the method's: "
                        + "; ".join(f"{m}: {','.join(k)}" for m, k in SEARCHED.items()) + ")")
    parser.add_argument("--max-rounds", type=int, default=3, help="coordinate-search rounds at most")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--output-dir", required=True, help="where the calibrated model and calibration.json go")
    args = parser.parse_args(argv)
    if args.num_images < 1:
        parser.error(f"--num-images must be >= 1, got {args.num_images}")
    args.searched = None if args.search is None else [k.strip() for k in args.search.split(",") if k.strip()]
    try:
        args.rapid = RapidConfig(
            method=args.method,
            r=args.r or 0,
            output_tokens=args.output_tokens,
            switch_layer=args.switch_layer if args.method in ("rapid", "tofu") else None,
        )
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoImageProcessor

    from rapid_hf.evaluation.loading import load_rapid_model

    args = parse_args(argv)
    model = load_rapid_model(args.model)
    model.set_rapid(args.rapid)
    processor = AutoImageProcessor.from_pretrained(args.model)
    pixel_values, rows = load_calibration_images(
        processor, data_dir=args.data_dir, dataset=args.dataset, split=args.split, num_images=args.num_images
    )
    result = calibrate(model, pixel_values, searched=args.searched, max_rounds=args.max_rounds,
                       batch_size=args.batch_size)
    context = {"model": args.model, "data": args.data_dir or args.dataset, "calibration_rows": rows}
    save_calibrated(model, result, args.output_dir, processor, context)
    print(json.dumps({"rapid": result.rapid.to_dict(), "kl": result.fidelity.kl,
                      "agreement": result.fidelity.agreement, "start_kl": result.start_fidelity.kl,
                      "trials": len(result.trials), "seconds": round(result.seconds, 1)}, indent=2))
    print(f"wrote {args.output_dir} (config.json with the chosen values, calibration.json with the search log)")


if __name__ == "__main__":
    main()
