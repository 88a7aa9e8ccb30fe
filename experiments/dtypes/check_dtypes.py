"""Robustness numbers: reduced-precision agreement with float32, the cost of the input check, torch.compile.

    python experiments/dtypes/check_dtypes.py --num-images 400 --inductor

For every method and r, runs the real DeiT-Tiny in float32 and in each `--dtypes` entry (bfloat16 and float16,
on `--device`) on the first `--num-images` report-split dev photos and records the top-1 agreement with
float32, the mean KL(float32 || reduced precision) and the largest logit difference. It also times the NaN/inf
input check against one forward (`torch.utils.benchmark`, both in this run) and, with `--inductor`, how long
`torch.compile` (inductor) takes on a tiny random Rapid model and how far it is from eager.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils import benchmark
from transformers import AutoImageProcessor

from rapid_hf import RapidConfig, RapidViTConfig, RapidViTForImageClassification
from rapid_hf.cli.common import comma_list, int_list
from rapid_hf.evaluation.fidelity import kl_divergence, top1_agreement
from rapid_hf.evaluation.splits import report_indices
from rapid_hf.reduction.config import METHODS

ASSETS = Path(os.environ.get("RAPID_HF_ASSETS", Path(__file__).resolve().parents[3] / "shared" / "assets"))
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ASSETS / "deit-tiny-imagenet")
    parser.add_argument("--images", type=Path, default=ASSETS / "imagenet-sample-dev", help="imagefolder dir")
    parser.add_argument("--num-images", type=int, default=8, help="first N rows of the report split")
    parser.add_argument("--r", type=int_list, default="8,16", help="comma-separated r values")
    parser.add_argument("--methods", type=comma_list(str, "method names"), default=",".join(METHODS))
    parser.add_argument("--dtypes", type=comma_list(str, "dtype names"), default=",".join(sorted(DTYPES)))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--inductor", action="store_true", help="also time an inductor compile (slow on CPU)")
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().with_name("robustness_dtypes.json"))
    args = parser.parse_args()
    if args.num_images < 1 or args.batch_size < 1:
        parser.error("--num-images and --batch-size must be >= 1")
    for flag, values, allowed in (("--methods", args.methods, METHODS), ("--dtypes", args.dtypes, DTYPES)):
        if set(values) - set(allowed):
            parser.error(f"{flag} {sorted(set(values) - set(allowed))} unknown: choose from {', '.join(allowed)}")
    return args


def load_pixel_values(model_path: Path, images: Path, num_images: int) -> torch.Tensor:
    with open(images / "metadata.csv", newline="") as handle:
        files = [row["file_name"] for row in csv.DictReader(handle)]
    rows = report_indices(len(files))[:num_images]
    processor = AutoImageProcessor.from_pretrained(model_path)
    pictures = [Image.open(images / files[row]).convert("RGB") for row in rows]
    return processor(images=pictures, return_tensors="pt")["pixel_values"]


@torch.inference_mode()
def logits_of(model: RapidViTForImageClassification, pixel_values: torch.Tensor, batch_size: int) -> torch.Tensor:
    device = model.device
    batches = [model(pixel_values=batch.to(device)).logits.float().cpu() for batch in pixel_values.split(batch_size)]
    return torch.cat(batches)


def dtype_agreement(args: argparse.Namespace, pixel_values: torch.Tensor) -> list[dict]:
    reference = RapidViTForImageClassification.from_pretrained(args.model).eval().to(args.device)
    reduced = {
        name: RapidViTForImageClassification.from_pretrained(args.model, dtype=DTYPES[name]).eval().to(args.device)
        for name in args.dtypes
    }
    rows = []
    for method in args.methods:
        for r in args.r if method != "none" else [0]:
            rapid = RapidConfig(method=method, r=r)
            reference.set_rapid(rapid)
            expected = logits_of(reference, pixel_values, args.batch_size)
            for name, model in reduced.items():
                model.set_rapid(rapid)
                logits = logits_of(model, pixel_values, args.batch_size)
                rows.append(
                    {
                        "method": method,
                        "r": r,
                        "dtype": name,
                        "top1_agreement": top1_agreement(expected, logits).float().mean().item(),
                        "mean_kl": kl_divergence(expected, logits).mean().item(),
                        "max_abs_logit_diff": (expected - logits).abs().max().item(),
                        "finite": bool(torch.isfinite(logits).all()),
                    }
                )
                print(json.dumps(rows[-1]))
    return rows


def input_check_cost(args: argparse.Namespace, pixel_values: torch.Tensor) -> dict:
    """The NaN/inf check of `check_pixel_values` against one RAPID r=16 forward of the same batch."""
    model = RapidViTForImageClassification.from_pretrained(args.model, rapid=RapidConfig(method="rapid", r=16))
    model = model.eval().to(args.device)
    batch = pixel_values[: args.batch_size].to(args.device)
    stmts = {
        "check": "bool(torch.isfinite(batch.sum(dtype=torch.float32)))",
        "forward": "model(pixel_values=batch)",
    }
    with torch.inference_mode():
        times = {
            name: benchmark.Timer(stmt, globals={"torch": torch, "batch": batch, "model": model})
            .blocked_autorange(min_run_time=2)
            .median
            for name, stmt in stmts.items()
        }
    return {
        "batch": tuple(batch.shape),
        "check_s": times["check"],
        "forward_s": times["forward"],
        "check_over_forward": times["check"] / times["forward"],
    }


def inductor_compile(args: argparse.Namespace) -> dict:
    """Compile time and eager agreement of a tiny random Rapid ViT (RAPID, r=8) under the default backend."""
    torch.manual_seed(0)
    config = RapidViTConfig(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, image_size=64, patch_size=8
    )
    model = RapidViTForImageClassification(config).eval().to(args.device)
    model.set_rapid(RapidConfig(method="rapid", r=8, switch_layer=2))
    pixel_values = torch.randn(4, 3, 64, 64, device=args.device)
    compiled = torch.compile(model)
    with torch.inference_mode():
        expected = model(pixel_values=pixel_values).logits
        start = time.perf_counter()
        first = compiled(pixel_values=pixel_values).logits
        compile_s = time.perf_counter() - start
    return {"backend": "inductor", "first_call_s": compile_s, "max_abs_diff": (first - expected).abs().max().item()}


def main() -> None:
    args = parse_args()
    pixel_values = load_pixel_values(args.model, args.images, args.num_images)
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "torch": torch.__version__,
        "device": args.device,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "num_images": len(pixel_values),
        "dtype_agreement": dtype_agreement(args, pixel_values),
        "input_check_cost": input_check_cost(args, pixel_values),
    }
    print(json.dumps(result["input_check_cost"]))
    if args.inductor:
        result["inductor_compile"] = inductor_compile(args)
        print(json.dumps(result["inductor_compile"]))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
