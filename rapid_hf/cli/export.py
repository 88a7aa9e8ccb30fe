"""Export a Rapid model with its reduction settings to ONNX, for ONNX Runtime (no PyTorch needed to run it).

    rapid-hf export --model facebook/deit-tiny-patch16-224 --method rapid --r 16 --output deit-rapid-r16.onnx
    rapid-hf export --model ./calibrated --output deit-calibrated.onnx   # the model's saved settings

The graph takes `pixel_values` of one fixed shape (batch size x channels x image size; float32, preprocessed by
the model's image processor) and returns `logits`. Without --method/--r the model's saved settings run (none for
a plain checkpoint); --r without --method changes the amount of the saved method. With --verify, onnxruntime
runs the file once on a random input and the largest logit difference from PyTorch is printed. Needs the
optional extra: pip install "rapid_hf[onnx]".
"""

from __future__ import annotations

import argparse

from rapid_hf.cli import common

NAME = "export"
HELP = "write an ONNX model of a Rapid model with its settings, for ONNX Runtime"
REQUIRES = {"onnx": ("onnx", "onnxscript", "onnxruntime")}
OUTPUT = "file"
DEFAULT_OPSET_TEXT = "18, rapid_hf.export.DEFAULT_OPSET"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rapid_hf.reduction.config import METHODS

    common.add_model_argument(parser)
    parser.add_argument("--output", required=True, help="ONNX file to write, e.g. ./model.onnx")
    parser.add_argument(
        "--method", choices=list(METHODS),
        help="reduction method (default: the model's saved method, none for a plain checkpoint)",
    )
    parser.add_argument(
        "--r", type=common.non_negative_int,
        help="tokens removed per layer (default: the model's saved amount, else 16 when --method reduces)",
    )
    parser.add_argument(
        "--rapid-config", type=common.argument_type(_parse_settings), metavar="JSON_OR_FILE",
        help="RapidConfig fields overriding the saved ones: inline JSON or a JSON file",
    )
    parser.add_argument(
        "--image-size", type=common.positive_int,
        help="input height and width in pixels (default: the model's own; another size interpolates positions)",
    )
    parser.add_argument("--batch-size", type=common.positive_int, default=1, help="images per call (fixed)")
    parser.add_argument("--opset", type=common.positive_int,
                        help=f"ONNX opset version (default: {DEFAULT_OPSET_TEXT})")
    parser.add_argument(
        "--verify", action="store_true",
        help="run the file once with onnxruntime on a random input and print the largest |logit diff| from PyTorch",
    )


def _parse_settings(text: str):
    from rapid_hf.evaluation.variants import parse_settings

    return parse_settings(text)


def check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from rapid_hf.evaluation.variants import grid_variants, saved_amount
    from rapid_hf.reduction.config import RapidConfig

    if not args.output.endswith(".onnx"):
        parser.error(f"--output {args.output!r} must end in .onnx")
    saved = common.read_saved_settings(args, parser)
    method = args.method or (saved.method if saved is not None else "none")
    if method == "none" and args.r:
        parser.error("--r needs a reducing --method (the model's saved method is none)")
    has_saved_amount = saved is not None and saved.method == method and saved_amount(saved) is not None
    r_values = [args.r] if args.r is not None else ([] if has_saved_amount or method == "none" else [16])
    try:
        if method == "none":
            args.rapid = RapidConfig()
        else:
            (variant,) = grid_variants([method], r_values, rapid_settings=args.rapid_config, saved=saved)
            args.rapid = variant.rapid
    except ValueError as error:
        parser.error(str(error))


def run(args: argparse.Namespace) -> None:
    import torch

    from rapid_hf.evaluation.loading import load_rapid_model
    from rapid_hf.export import DEFAULT_OPSET, export_onnx, onnx_metadata

    model = load_rapid_model(args.model)
    path = export_onnx(
        model, args.output, image_size=args.image_size, rapid=args.rapid, batch_size=args.batch_size,
        opset=args.opset or DEFAULT_OPSET,
    )
    metadata = onnx_metadata(path)
    result = {"output": str(path), **metadata}
    if args.verify:
        import numpy as np
        import onnxruntime

        pixel_values = torch.randn(*metadata["input_shape"], generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            expected = model(pixel_values=pixel_values, rapid=args.rapid,
                             interpolate_pos_encoding=args.image_size is not None).logits.numpy()
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (logits,) = session.run(None, {"pixel_values": pixel_values.numpy()})
        result["max_abs_logit_diff"] = float(np.abs(logits - expected).max())
    common.print_json(result)
