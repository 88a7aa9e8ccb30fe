"""Fewer reduction points: RAPID (and ToMe) reducing at every n-th layer only (`RapidConfig.reduce_every`), against
the every-layer schedule at the same output token count, on DeiT-Tiny.

    RAPID_HF_ASSETS=../shared/assets python experiments/few_points/run.py
    RAPID_HF_ASSETS=../shared/assets python experiments/few_points/run.py --speed-runtimes eager,compile,onnx

Accuracy: every row's top-1, agreement with the unreduced model and KL(unreduced || reduced) on the 904 report
photos of both dev folders (rows with index % 5 != 0; nothing here is chosen on photos), and paired bootstrap
95% intervals of each few-point schedule minus the every-layer schedule of the same method and output tokens.
Speed: every row at batch 1, 1 thread, in each runtime of `--speed-runtimes`, timed against the unreduced model
of the same runtime in one interleaved run (`rapid_hf.evaluation.throughput.benchmark`, medians of rounds).
Writes results.json and results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parent / "pooled_comparison")]

from photos import pixel_rows  # noqa: E402
from transformers import AutoImageProcessor  # noqa: E402

from rapid_hf import RapidViTForImageClassification  # noqa: E402
from rapid_hf.evaluation.accuracy import paired_bootstrap_ci  # noqa: E402
from rapid_hf.evaluation.fidelity import kl_divergence  # noqa: E402
from rapid_hf.evaluation.latency_model import machine_description  # noqa: E402
from rapid_hf.evaluation.throughput import benchmark  # noqa: E402
from rapid_hf.evaluation.variants import Variant  # noqa: E402
from rapid_hf.reduction.config import RapidConfig  # noqa: E402
from rapid_hf.reduction.schedule import min_output_tokens  # noqa: E402
from rapid_hf.reduction.steps import requested_schedule  # noqa: E402

# Output tokens of constant r = 8, 12 and 16 on DeiT-Tiny's 197 input tokens (every layer), and the intervals.
OUTPUT_TOKENS = (101, 53, 11)
EVERY = (1, 2, 3, 4)
METHODS = ("rapid", "tome")
NUM_TOKENS, NUM_LAYERS, NUM_PROTECTED = 197, 12, 1


def configs(methods: tuple[str, ...]) -> list[RapidConfig]:
    """Every (method, output tokens, reduce_every) that the reducing layers can reach."""
    found = []
    for method in methods:
        for tokens in OUTPUT_TOKENS:
            for every in EVERY:
                layers = len(range(0, NUM_LAYERS, every))
                if tokens >= min_output_tokens(NUM_TOKENS, layers, NUM_PROTECTED):
                    found.append(RapidConfig(method=method, output_tokens=tokens, reduce_every=every))
    return found


def label(config: RapidConfig) -> str:
    return f"{config.method} out={config.output_tokens} every={config.reduce_every}"


@torch.inference_mode()
def logits_of(model: Any, pixels: torch.Tensor, rapid: RapidConfig, batch_size: int = 50) -> torch.Tensor:
    return torch.cat([model(pixel_values=pixels[i:i + batch_size], rapid=rapid).logits.float()
                      for i in range(0, len(pixels), batch_size)])


def interval_text(values: list[float] | None, scale: float = 100.0, digits: int = 1) -> str:
    """`delta [low, high]` of a paired interval (points for rates, raw for KL); "-" for the reference row."""
    if values is None:
        return "-"
    delta, low, high = (value * scale for value in values)
    return f"{delta:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def markdown(results: dict[str, Any]) -> str:
    runtimes = results["speed_runtimes"]
    commands = "\n".join(results.get("commands", [results["command"]]))
    lines = [f"Produced by:\n\n```\n{commands}\n```\n",
             f"DeiT-Tiny, {results['report_photos']} report photos (unreduced top-1 "
             f"{results['stock_top1'] * 100:.1f}). Deltas: this schedule minus the every-layer schedule of the same "
             "method and output tokens, points (KL: absolute), paired bootstrap 95% interval; an interval that "
             "includes 0 is a tie. Speed-up: batch 1, 1 thread, against the same runtime's unreduced model, one "
             f"interleaved run ({results['speed_rounds']} rounds); measured on {results['machine']}.\n",
             "| method | out tokens | reduce every | schedule | top-1 | agreement | KL | top-1 vs every layer | "
             "agreement vs every layer | KL vs every layer | "
             + " | ".join(f"speed-up {runtime}" for runtime in runtimes) + " |",
             "|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(runtimes)]
    for row in results["rows"]:
        speed = [row["speedup"].get(runtime) for runtime in runtimes]
        lines.append(
            f"| {row['method']} | {row['output_tokens']} | {row['reduce_every']} | "
            f"{','.join(str(r) for r in row['schedule'] if r)} | {row['top1'] * 100:.1f} | "
            f"{row['agreement'] * 100:.1f} | {row['kl']:.4f} | {interval_text(row.get('top1_vs_every_layer'))} | "
            f"{interval_text(row.get('agreement_vs_every_layer'))} | "
            f"{interval_text(row.get('kl_vs_every_layer'), scale=1.0, digits=4)} | "
            + " | ".join("-" if value is None else f"{value:.3f}" for value in speed) + " |")
    return "\n".join(lines) + "\n"


def accuracy_rows(model: Any, report: torch.Tensor, labels: np.ndarray, methods: tuple[str, ...]) -> dict[str, Any]:
    """Every row's accuracy on the report photos, with paired intervals against the every-layer row."""
    stock_logits = logits_of(model, report, RapidConfig(method="none"))
    stock_top1 = stock_logits.argmax(-1).numpy()
    rows, per_photo = [], {}
    for config in configs(methods):
        logits = logits_of(model, report, config)
        top1 = logits.argmax(-1).numpy()
        photo = {"correct": (top1 == labels).astype(float), "agree": (top1 == stock_top1).astype(float),
                 "kl": kl_divergence(stock_logits, logits).numpy().astype(float)}
        per_photo[label(config)] = photo
        row = {"label": label(config), "method": config.method, "output_tokens": config.output_tokens,
               "reduce_every": config.reduce_every, "rapid": config.to_dict(),
               "schedule": requested_schedule(config, NUM_TOKENS, NUM_LAYERS, NUM_PROTECTED),
               "top1": float(photo["correct"].mean()), "agreement": float(photo["agree"].mean()),
               "kl": float(photo["kl"].mean()), "speedup": {}}
        if config.reduce_every > 1:
            base = per_photo[label(config.replace(reduce_every=1))]
            row["top1_vs_every_layer"] = list(paired_bootstrap_ci(photo["correct"], base["correct"]))
            row["agreement_vs_every_layer"] = list(paired_bootstrap_ci(photo["agree"], base["agree"]))
            row["kl_vs_every_layer"] = list(paired_bootstrap_ci(photo["kl"], base["kl"]))
        rows.append(row)
        print(f"{row['label']}: top-1 {row['top1'] * 100:.1f}, agreement {row['agreement'] * 100:.1f}, "
              f"KL {row['kl']:.4f}", flush=True)
    return {"report_photos": len(report), "stock_top1": float((stock_top1 == labels).mean()), "rows": rows}


def timed_rows(model: Any, rows: list[dict[str, Any]], runtimes: list[str], methods: list[str], rounds: int) -> str:
    """Time the rows of `methods` at batch 1 in every runtime (one interleaved run); returns the machine."""
    variants = [Variant(row["label"], RapidConfig.from_dict(row["rapid"])) for row in rows if row["method"] in methods]
    records = benchmark(model, variants, batch_size=1, repeats=rounds, measure_memory=False, runtimes=runtimes,
                        progress=False)
    by_label = {row["label"]: row for row in rows}
    for record in records:
        if record["label"] in by_label:
            by_label[record["label"]]["speedup"][record["runtime"]] = record.get("speedup")
    machine = machine_description("eager", "cpu", torch.get_num_threads(), 1)
    return (f"{machine['processor']}, {machine['cpu_count']} cores, {machine['threads']} thread, "
            f"torch {machine['torch']}")


def main() -> None:
    assets = Path(os.environ.get("RAPID_HF_ASSETS", HERE.parents[1].parent / "shared" / "assets"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--speed-runtimes", default="eager", help="comma list of eager, compile, onnx ('' for none)")
    parser.add_argument("--speed-methods", default="rapid", help="the methods whose rows are timed (comma list)")
    parser.add_argument("--speed-rounds", type=int, default=10)
    parser.add_argument("--speed-only", action="store_true", help="keep --output's accuracy rows, time them again")
    parser.add_argument("--output", default=str(HERE / "results.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    command = "RAPID_HF_ASSETS=../shared/assets python experiments/few_points/run.py " + " ".join(sys.argv[1:])
    started = time.perf_counter()
    output = Path(args.output)
    model_path = assets / "deit-tiny-imagenet"
    model = RapidViTForImageClassification.from_pretrained(model_path).eval()
    runtimes = [name for name in args.speed_runtimes.split(",") if name]
    if args.speed_only:
        results = json.loads(output.read_text())
        results["commands"] = [*results.get("commands", [results["command"]]), command]
    else:
        processor = AutoImageProcessor.from_pretrained(model_path)
        folders = [str(assets / "imagenet-sample-dev"), str(assets / "imagenet-val-dev")]
        report, labels, _ = pixel_rows(folders, "report", processor)
        results = {"command": command, **accuracy_rows(model, report, labels.numpy(), tuple(args.methods.split(",")))}
    results.update(speed_runtimes=runtimes, speed_rounds=args.speed_rounds, machine="-")
    output.write_text(json.dumps(results, indent=2) + "\n")  # the accuracy is kept if timing fails
    if runtimes:
        results["machine"] = timed_rows(model, results["rows"], runtimes, args.speed_methods.split(","),
                                        args.speed_rounds)
    results["seconds"] = round(time.perf_counter() - started)
    output.write_text(json.dumps(results, indent=2) + "\n")
    output.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
