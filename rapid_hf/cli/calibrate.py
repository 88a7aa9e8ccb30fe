"""Calibrate a token-reduction method for one model and reduction amount; save the model with the result.

    rapid-hf calibrate --model facebook/deit-tiny-patch16-224 --data-dir ./photos --r 16 \\
        --output calibrated/deit-tiny-r16

Uses the calibration rows of the data (index % 5 == 0; the first --num-images of them), never the rows results
are reported on: a folder of 500 photos has 100 calibration rows. Searches RAPID's switch layer K, pruning
threshold tau, importance weight lambda and merge mode (starting from the `switch_layer="auto"` rule) to minimise
KL(unreduced || reduced), then writes the model with the chosen values in config.json (`save_pretrained`;
`rapid-hf evaluate/benchmark/push --model OUTPUT` then run them), its image processor and the search log as
calibration.json.

    rapid-hf calibrate --model facebook/deit-tiny-patch16-224 --data-dir ./photos --speedup 1.6 \\
        --speed-batch-size 1 --threads 1 --output calibrated/deit-tiny-1.6x

Instead of r, --speedup (or --latency-ms) asks for a speed on this machine: the cost model of
`rapid_hf.evaluation.latency_model` is measured first (in --runtime, at --speed-batch-size, --threads), then
`rapid_hf.calibration.speed` searches where and how much to reduce (per-layer r, including every 2nd-4th layer
only) with the knobs, for the lowest KL whose predicted speed-up reaches the target; the saved model is then
timed against the unreduced one and config.json records the target, the machine and the measured speed-up under
`rapid_speed`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from rapid_hf.cli import common

NAME = "calibrate"
HELP = "search a method's knobs on calibration images; save the calibrated model"
REQUIRES = {"eval": ("datasets",)}
OUTPUT = "folder"
DEFAULT_NUM_IMAGES = 100


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
    from rapid_hf.calibration.choices import DEFAULT_OBJECTIVE, OBJECTIVES, SEARCHED
    from rapid_hf.reduction.config import AUTO

    common.add_model_argument(parser)
    common.add_processor_argument(parser)
    common.add_data_arguments(parser, default_num_workers=0, row_selection=False)
    parser.add_argument("--num-images", type=common.positive_int,
                        help=f"calibration images: the first N calibration rows (default: {DEFAULT_NUM_IMAGES}, or "
                        "all of them when there are fewer)")
    parser.add_argument("--method", choices=sorted(SEARCHED), default="rapid", help="method to calibrate")
    amount = parser.add_mutually_exclusive_group(required=True)
    amount.add_argument("--r", type=common.non_negative_int, help="tokens removed per layer")
    amount.add_argument("--output-tokens", type=common.positive_int, help="tokens leaving the last layer")
    amount.add_argument("--speedup", type=speedup_arg,
                        help="instead of r: the speed-up over the unreduced model to reach on this machine (e.g. 1.6); "
                        "searches where and how much to reduce with the knobs, then measures it")
    amount.add_argument("--latency-ms", type=latency_arg,
                        help="instead of r: the time per forward to reach on this machine (ms, at --speed-batch-size)")
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
                        help="folder for the calibrated model and calibration.json, e.g. ./calibrated")
    add_speed_arguments(parser)


def check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from rapid_hf.calibration.choices import SEARCHED
    from rapid_hf.reduction.config import RapidConfig

    common.check_data_dir(args, parser)
    common.check_model(args, parser)
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
    check_speed(args, parser)
    args.image_processor = common.load_processor(args, parser)


def calibration_rows(args: argparse.Namespace) -> Any:
    """The calibration rows to use; refuses an explicit --num-images the data cannot give, and says how many it
    uses when that is fewer than the default."""
    from rapid_hf.calibration import calibration_rows as select_rows
    from rapid_hf.evaluation.splits import CALIBRATION_EVERY

    wanted = args.num_images or DEFAULT_NUM_IMAGES
    rows = select_rows(data_dir=args.data_dir, dataset=args.dataset, split=args.split, num_images=None,
                       image_column=args.image_column, label_column=args.label_column)
    total = len(rows.dataset)
    why = (f"{args.data_dir or args.dataset} has {total} image(s), and only every {CALIBRATION_EVERY}th (row index "
           f"% {CALIBRATION_EVERY} == 0) calibrates, the others being kept for reported results")
    if len(rows) < wanted:
        if args.num_images is not None:
            raise ValueError(f"--num-images {args.num_images} asks for more calibration images than there are: {why}, "
                             f"so {len(rows)} can be used; pass --num-images {len(rows)} or add images")
        print(f"calibrating on {len(rows)} image(s), not {DEFAULT_NUM_IMAGES}: {why}", file=sys.stderr)
    rows.rows = rows.rows[:wanted]
    return rows


def run(args: argparse.Namespace) -> None:
    from rapid_hf.calibration import calibrate, load_calibration_images, save_calibrated
    from rapid_hf.evaluation.loading import load_rapid_model

    processor = args.image_processor
    rows = calibration_rows(args)  # before the model: a too-small folder is found at once
    model = load_rapid_model(args.model)
    pixel_values, rows = load_calibration_images(processor, rows=rows, num_workers=args.num_workers)
    if args.speedup is not None or args.latency_ms is not None:
        return run_speed(args, model, pixel_values, rows, processor)
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


# --- calibrating to a speed target (--speedup / --latency-ms) -------------------------------------------------

SPEED_FLAGS = ("speed_batch_size", "threads", "runtime", "timer", "speed_rounds")


def speedup_arg(text: str) -> float:
    """A speed-up > 1 (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a speed-up > 1, e.g. 1.6, got {text!r}") from None
    if not value > 1.0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a speed-up > 1, e.g. 1.6, got {text!r}")
    return value


def latency_arg(text: str) -> float:
    """A time in ms > 0 (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a time in ms > 0, got {text!r}") from None
    if not value > 0.0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a time in ms > 0, got {text!r}")
    return value


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    speed = parser.add_argument_group("with --speedup or --latency-ms (how speed is measured)")
    speed.add_argument("--speed-batch-size", type=common.positive_int,
                       help="images per forward when timing (default: 1)")
    speed.add_argument("--threads", type=common.positive_int,
                       help="torch threads when timing (default: torch's); 1 on a busy shared CPU")
    speed.add_argument("--runtime", choices=["eager", "compile", "onnx"],
                       help="runtime the speed is for: eager PyTorch (default), torch.compile (inductor) or ONNX "
                            "Runtime; the cost model and the final check both run in it")
    speed.add_argument("--timer", choices=["wall", "process"],
                       help="wall clock (default), or this process's CPU time ('process', busy machines, 1 thread)")
    speed.add_argument("--speed-rounds", type=common.positive_int,
                       help="interleaved timing rounds of the cost model and of the final check (default: 15)")


def check_speed(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Speed flags only with a speed target; defaults filled in; --runtime onnx needs the onnx extra."""
    given = [f"--{name.replace('_', '-')}" for name in SPEED_FLAGS if getattr(args, name, None) is not None]
    if args.speedup is None and args.latency_ms is None:
        if given:
            parser.error(f"{', '.join(given)} only apply with --speedup or --latency-ms")
        return
    if args.runtime == "onnx":
        common.check_onnx_modules(parser)
    defaults = {"speed_batch_size": 1, "runtime": "eager", "timer": "wall", "speed_rounds": 15}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def run_speed(args: argparse.Namespace, model: Any, pixel_values: Any, rows: list[int], processor: Any) -> None:
    """Measure the cost model, search for the target, measure the chosen config, save it with the speed record."""
    from rapid_hf.calibration import save_calibrated
    from rapid_hf.calibration.speed import (
        SPEED_METADATA_KEY,
        measure_speedup,
        miss_message,
        speed_calibrate,
        speed_metadata,
        target_from_latency,
    )
    from rapid_hf.evaluation.latency_model import measure_latency_model, method_step_kinds

    device = next(model.parameters()).device
    print(f"measuring the cost model ({args.runtime}, batch {args.speed_batch_size}, threads "
          f"{args.threads or 'default'})", file=sys.stderr)
    cost = measure_latency_model(model, args.speed_batch_size, args.threads, args.runtime, device,
                                 rounds=args.speed_rounds, timer=args.timer,
                                 step_kinds=method_step_kinds(args.rapid.method))
    target = args.speedup if args.speedup is not None else target_from_latency(cost, args.latency_ms)
    result = speed_calibrate(model, pixel_values, cost, target, rapid=args.rapid, searched=args.search,
                             max_rounds=args.max_rounds, batch_size=args.batch_size, objective=args.objective)
    result.measured = measure_speedup(model, result.rapid, args.speed_batch_size, args.threads, device,
                                      rounds=max(args.speed_rounds, 10), timer=args.timer, runtime=args.runtime)
    metadata = speed_metadata(result, args.latency_ms)
    setattr(model.config, SPEED_METADATA_KEY, metadata)
    context = {"model": args.model, "data": args.data_dir or args.dataset, "data_source": common.data_source(args),
               "calibration_rows": rows, "command": common.command_line(NAME, args.argv),
               SPEED_METADATA_KEY: metadata, "cost_model": cost.to_dict()}
    save_calibrated(model, result, args.output, processor, context)
    common.print_json({"rapid": result.rapid.to_dict(), "kl": result.fidelity.kl,
                       "agreement": result.fidelity.agreement, "top1_nll": result.fidelity.top1_nll,
                       "trials": len(result.trials), "seconds": round(result.seconds, 1), SPEED_METADATA_KEY: metadata})
    message = miss_message(result)
    if message:
        print(message, file=sys.stderr)
    print(f"wrote {args.output} (config.json with the chosen values and {SPEED_METADATA_KEY}, calibration.json with "
          "the search log and the cost model)")
