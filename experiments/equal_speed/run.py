"""Methods compared at equal measured speed: ToMe, ToFu, RAPID (paper's settings) and RAPID calibrated to the
speed target, on DeiT-Tiny, at batch 1 and 16, at speed-ups of about 1.3x, 1.6x and 2.0x, in one runtime (eager
PyTorch, torch.compile or ONNX Runtime: `--runtime`; the cost model and the timing both run in it).

    RAPID_HF_ASSETS=../shared/assets python experiments/equal_speed/run.py
    RAPID_HF_ASSETS=../shared/assets python experiments/equal_speed/run.py --batch-sizes 1 --targets 1.3
    RAPID_HF_ASSETS=../shared/assets python experiments/equal_speed/run.py --runtime onnx

Per batch size: the cost model (`rapid_hf.evaluation.latency_model`, measured for ToMe/ToFu/RAPID's steps, or
taken from experiments/latency_model/results.json with --cost-model-from) gives each method the
r that reaches each target (ToMe/ToFu/RAPID-paper: the smallest constant r whose predicted speed-up reaches it);
RAPID latency-calibrated is `rapid_hf.calibration.speed.speed_calibrate` on the calibration photos (every 5th row of
both dev folders; a fixed half of them to bound the search time). Every chosen config is then timed against the
unreduced model in one interleaved run (medians of per-round ratios) and evaluated on the 904 report photos (the
other rows): top-1, agreement with the unreduced model, KL, and paired bootstrap intervals (95%) of top-1 and
agreement against ToMe at the same target. Writes results.json, results.md and equal_speed.png (with
`--runtime compile|onnx`: results_RUNTIME.json, .md and equal_speed_RUNTIME.png). Accuracy is computed in eager
PyTorch for every runtime (compiled and exported models gave eager's top-1 on every dev photo where checked, at
r = 16 and r = 8-16: experiments/compile/, experiments/onnx_agreement/).
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
from rapid_hf.calibration.speed import predicted_speedup, speed_calibrate  # noqa: E402
from rapid_hf.evaluation.accuracy import paired_bootstrap_ci  # noqa: E402
from rapid_hf.evaluation.fidelity import kl_divergence  # noqa: E402
from rapid_hf.evaluation.latency_model import (  # noqa: E402
    LatencyModel,
    measure_latencies,
    measure_latency_model,
    method_step_kinds,
)
from rapid_hf.reduction.config import RapidConfig  # noqa: E402

TARGETS = (1.3, 1.6, 2.0)
ROWS = ("tome", "tofu", "rapid", "rapid-latency")
LABELS = {"tome": "ToMe", "tofu": "ToFu", "rapid": "RAPID (paper)", "rapid-latency": "RAPID latency-calibrated"}
ROUNDS = {1: 20, 16: 6}
RUNTIME_NAMES = {"eager": "eager PyTorch", "compile": "torch.compile (inductor)", "onnx": "ONNX Runtime"}
GRID = {"switch_layer": [0, 2, 4, 6, 8, 12], "prune_threshold": [0.5, 0.7, 0.9],
        "importance_weight": [0.0, 25.0, 50.0, 100.0], "merge_mode": ["mean", "mlerp"]}


def constant_r(cost: LatencyModel, method: str, target: float) -> tuple[RapidConfig, float] | None:
    """The smallest constant r of `method` (paper's knobs) whose predicted speed-up reaches `target`."""
    for r in range(1, cost.num_tokens):
        config = RapidConfig(method=method, r=r)
        speedup = predicted_speedup(cost, config)
        if speedup >= target:
            return config, speedup
    return None


def cost_model_for(batch: int, model: Any, measure: bool, runtime: str) -> LatencyModel:
    path = HERE.parent / "latency_model" / ("results.json" if runtime == "eager" else f"results_{runtime}.json")
    if not measure and path.exists():
        results = [r for r in json.loads(path.read_text())["results"] if r["machine"]["batch_size"] == batch]
        if results:
            return LatencyModel.from_dict(results[-1]["latency_model"])
    kinds = sorted({kind for method in ("tome", "tofu", "rapid") for kind in method_step_kinds(method)})
    return measure_latency_model(model, batch, threads=1, runtime=runtime, rounds=ROUNDS[batch], timer="process",
                                 step_kinds=kinds)


@torch.inference_mode()
def logits_of(model: Any, pixels: torch.Tensor, rapid: RapidConfig, batch_size: int = 50) -> torch.Tensor:
    return torch.cat([model(pixel_values=pixels[i:i + batch_size], rapid=rapid).logits.float()
                      for i in range(0, len(pixels), batch_size)])


def interval_text(values: list[float] | None, scale: float = 100.0) -> str:
    if values is None:
        return "-"
    delta, low, high = values
    return f"{delta * scale:+.1f} [{low * scale:+.1f}, {high * scale:+.1f}]"


def markdown(results: dict[str, Any]) -> str:
    lines = [f"Produced by:\n\n```\n{results['command']}\n```\n",
             f"DeiT-Tiny, {RUNTIME_NAMES[results.get('runtime', 'eager')]}, {results['threads']} thread, "
             f"{results['timer']} clock; report photos: "
             f"{results['report_photos']}; calibration photos for the search: {results['calibration_photos']}. "
             "Speed-up: unreduced time / the row's time, median of the per-round ratios of one interleaved run "
             "per batch size. Deltas: points against ToMe at the same target, paired bootstrap 95% interval.\n"]
    for batch in [b for b in results["batch_sizes"] if str(b) in results["cells"]]:
        cell = results["cells"][str(batch)]
        lines += [f"### batch {batch} (unreduced {cell['stock_ms']:.1f} ms per batch, {cell['rounds']} rounds)\n",
                  "| target | row | r | tokens out | predicted | measured speed-up | top-1 | agreement | KL | "
                  "top-1 vs ToMe | agreement vs ToMe |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in cell["rows"]:
            r = row["rapid"]["r"]
            r_text = str(r) if isinstance(r, int) else "[" + ",".join(map(str, r)) + "]"
            lines.append(
                f"| {row['target']} | {LABELS[row['row']]} | {r_text} | {row['tokens_out']} | "
                f"{row['predicted_speedup']:.2f} | {row['measured_speedup']:.2f} | {row['top1'] * 100:.1f} | "
                f"{row['agreement'] * 100:.1f} | {row['kl']:.3f} | {interval_text(row['top1_vs_tome'])} | "
                f"{interval_text(row['agreement_vs_tome'])} |")
        lines.append(f"\nUnreduced: top-1 {results['stock_top1'] * 100:.1f}.\n")
    return "\n".join(lines)


def figure(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rapid_hf.visualization import METHOD_COLOURS

    batches = [b for b in results["batch_sizes"] if str(b) in results["cells"]]
    fig, axes = plt.subplots(2, len(batches), figsize=(5.5 * len(batches), 8), squeeze=False)
    for column, batch in enumerate(batches):
        cell = results["cells"][str(batch)]
        for line, (metric, name) in enumerate((("top1", "top-1 (%)"), ("agreement", "agreement with unreduced (%)"))):
            ax = axes[line][column]
            for row in ROWS:
                points = sorted((r["measured_speedup"], r[metric] * 100) for r in cell["rows"] if r["row"] == row)
                if not points:
                    continue
                method = "rapid" if row.startswith("rapid") else row
                ax.plot(*zip(*points, strict=True), marker="s" if row == "rapid-latency" else "o",
                        linestyle="--" if row == "rapid-latency" else "-", color=METHOD_COLOURS[method],
                        label=LABELS[row])
            stock = results["stock_top1"] * 100 if metric == "top1" else 100.0
            ax.plot([1.0], [stock], marker="*", markersize=12, color=METHOD_COLOURS["none"], linestyle="none",
                    label="unreduced")
            ax.set_xlabel(f"measured speed-up (batch {batch}, {RUNTIME_NAMES[results.get('runtime', 'eager')]}, "
                          "1 thread)")
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
            if line == 0 and column == 0:
                ax.legend(fontsize=8)
    fig.suptitle("DeiT-Tiny on the 904 report photos: accuracy against measured speed-up")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    assets = Path(os.environ.get("RAPID_HF_ASSETS", HERE.parents[1].parent / "shared" / "assets"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--targets", type=float, nargs="+", default=list(TARGETS))
    parser.add_argument("--cost-model-from", action="store_true",
                        help="take the cost model from experiments/latency_model/results.json instead of measuring it")
    parser.add_argument("--calibration-every", type=int, default=2, help="use every k-th calibration photo")
    parser.add_argument("--timer", choices=["wall", "process"], default="process")
    parser.add_argument("--runtime", choices=list(RUNTIME_NAMES), default="eager")
    parser.add_argument("--output", help="default: results.json (eager) or results_RUNTIME.json")
    parser.add_argument("--resume", action="store_true", help="keep the batch sizes --output already has")
    args = parser.parse_args()
    if args.output is None:
        args.output = str(HERE / ("results.json" if args.runtime == "eager" else f"results_{args.runtime}.json"))
    torch.set_num_threads(1)
    command = "RAPID_HF_ASSETS=../shared/assets python experiments/equal_speed/run.py " + " ".join(sys.argv[1:])
    model_path = assets / "deit-tiny-imagenet"
    model = RapidViTForImageClassification.from_pretrained(model_path).eval()
    processor = AutoImageProcessor.from_pretrained(model_path)
    folders = [str(assets / "imagenet-sample-dev"), str(assets / "imagenet-val-dev")]
    calibration, _, _ = pixel_rows(folders, "calibration", processor)
    calibration = calibration[:: args.calibration_every]
    report, labels, _ = pixel_rows(folders, "report", processor)
    labels = labels.numpy()
    stock_logits = logits_of(model, report, RapidConfig(method="none"))
    stock_top1 = stock_logits.argmax(-1).numpy()
    cache: dict[str, dict[str, Any]] = {}

    def evaluate(config: RapidConfig) -> dict[str, Any]:
        key = json.dumps(config.to_dict(), sort_keys=True)
        if key not in cache:
            logits = logits_of(model, report, config)
            top1 = logits.argmax(-1).numpy()
            cache[key] = {"correct": (top1 == labels).astype(float), "agree": (top1 == stock_top1).astype(float),
                          "kl": float(kl_divergence(stock_logits, logits).mean())}
        return cache[key]

    results: dict[str, Any] = {"command": command, "runtime": args.runtime, "threads": 1, "timer": args.timer,
                               "batch_sizes": args.batch_sizes,
                               "report_photos": len(report), "calibration_photos": len(calibration),
                               "stock_top1": float((stock_top1 == labels).mean()), "cells": {}}
    output = Path(args.output)
    if args.resume and output.exists():  # keep the batch sizes already measured
        results["cells"] = json.loads(output.read_text())["cells"]
    started = time.perf_counter()
    for batch in args.batch_sizes:
        if str(batch) in results["cells"]:
            continue
        cost = cost_model_for(batch, model, not args.cost_model_from, args.runtime)
        rows: list[dict[str, Any]] = []
        for target in args.targets:
            for row in ROWS:
                if row == "rapid-latency":
                    try:
                        found = speed_calibrate(model, calibration, cost, target, RapidConfig(method="rapid"),
                                                grid=GRID, max_rounds=1, progress=False)
                    except ValueError as error:
                        print(f"batch {batch} {target}x {row}: {error}", flush=True)
                        continue
                    config, speedup, extra = found.rapid, found.predicted_speedup, {
                        "pattern": found.pattern, "calibration_kl": found.fidelity.kl,
                        "trials": len(found.trials)}
                else:
                    chosen = constant_r(cost, row, target)
                    if chosen is None:
                        print(f"batch {batch} {target}x {row}: out of reach by the cost model", flush=True)
                        continue
                    (config, speedup), extra = chosen, {}
                rows.append({"target": target, "row": row, "rapid": config.to_dict(), "predicted_speedup": speedup,
                             "tokens_out": cost.breakdown(config)["token_counts"][-1], **extra})
                print(f"batch {batch} {target}x {row}: r={config.r} predicted {speedup:.2f}", flush=True)
        configs = [RapidConfig(method="none")] + [RapidConfig.from_dict(row["rapid"]) for row in rows]
        times = measure_latencies(model, configs, batch, threads=1, rounds=ROUNDS[batch], timer=args.timer,
                                  runtime=args.runtime)
        stock = np.asarray(times[0])
        for row, own in zip(rows, times[1:], strict=True):
            ratios = stock / np.asarray(own)
            row["measured_speedup"] = float(np.median(ratios))
            row["measured_spread"] = float(np.subtract(*np.percentile(ratios, [75, 25])) / np.median(ratios))
            row["ms"] = float(np.median(own)) * 1e3
        for row in rows:
            scores = evaluate(RapidConfig.from_dict(row["rapid"]))
            row.update(top1=float(scores["correct"].mean()), agreement=float(scores["agree"].mean()), kl=scores["kl"])
            tome = next((r for r in rows if r["row"] == "tome" and r["target"] == row["target"]), None)
            if tome is not None and tome is not row:
                base = evaluate(RapidConfig.from_dict(tome["rapid"]))
                row["top1_vs_tome"] = list(paired_bootstrap_ci(scores["correct"], base["correct"]))
                row["agreement_vs_tome"] = list(paired_bootstrap_ci(scores["agree"], base["agree"]))
            else:
                row["top1_vs_tome"] = row["agreement_vs_tome"] = None
        results["cells"][str(batch)] = {"stock_ms": float(np.median(stock)) * 1e3, "rounds": ROUNDS[batch],
                                        "machine": cost.machine, "rows": rows}
        results["seconds"] = time.perf_counter() - started
        output.write_text(json.dumps(results, indent=2) + "\n")
        output.with_suffix(".md").write_text(markdown(results))
        figure(results, output.parent / ("equal_speed.png" if args.runtime == "eager"
                                         else f"equal_speed_{args.runtime}.png"))
        print(f"batch {batch} done ({results['seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
