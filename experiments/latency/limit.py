"""How close eager PyTorch can get to the FLOP ratio at small batches: the same layers with a free reduction step.

    RAPID_HF_ASSETS=../shared/assets python experiments/latency/limit.py

For each method and r, a "free" row runs the model's own layers on exactly the token counts the method leaves
(attention on the layer's input tokens, MLP on its output tokens, the proportional-attention bias from the first
merge on, as the method does) but replaces the reduction step by keeping the first tokens: what the method would
cost if its reduction steps took no time. Its speed-up over the unreduced model is the ceiling for any reduction
step at that batch size; `speedup / free speedup` says how much of that ceiling the method reaches, and
`free speedup / FLOP ratio` how much of the FLOP saving the layers themselves can turn into time (small matrix
products and per-module overhead do not shrink with the token count). Rows are interleaved within each
(model, threads, batch) cell, the order alternating between rounds; medians. Writes limit.json and limit.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE)]

from run import COST, build_model  # noqa: E402

from rapid_hf.evaluation.flops import model_flops  # noqa: E402
from rapid_hf.evaluation.report import run_info  # noqa: E402
from rapid_hf.evaluation.throughput import time_forward  # noqa: E402
from rapid_hf.reduction.config import RapidConfig  # noqa: E402
from rapid_hf.reduction.matching import removal_cap  # noqa: E402
from rapid_hf.reduction.steps import layer_steps  # noqa: E402

METHODS = ["tome", "rapid"]
R_VALUES = [8, 16]
ROUNDS = {"deit-tiny": 25, "deit-small (random weights)": 12, "vit-base (random weights)": 6}
NUMBER = {1: 3, 4: 1}


def free_reduction_forward(model: Any, pixel_values: torch.Tensor, rapid: RapidConfig) -> torch.Tensor:
    """Logits of the layers on `rapid`'s token counts with every reduction step replaced by a slice."""
    backbone = model.rapid_backbone
    hidden = backbone.embed(pixel_values, None, False)
    layers = backbone.reducing_layers
    steps = layer_steps(rapid, hidden.shape[1], len(layers), backbone.num_protected_tokens)
    zero_bias = hidden.new_zeros(hidden.shape[0], 1, 1, hidden.shape[1])
    merged = False
    for layer, step in zip(layers, steps, strict=True):
        bias = zero_bias[..., : hidden.shape[1]] if merged else None
        hidden, _, _ = layer.attention_residual(hidden, bias)
        if step.operation is not None:
            cap = removal_cap(hidden.shape[1], backbone.num_protected_tokens)
            hidden = hidden[:, : hidden.shape[1] - min(step.r, cap)]
            merged = merged or step.operation.startswith("merge")
        hidden = layer.mlp_residual(hidden)
    last_hidden_state, _ = backbone.finish(hidden)
    return model.classifier(last_hidden_state[:, 0])


@torch.inference_mode()
def measure_cell(model: Any, batch: int, rounds: int) -> list[dict[str, Any]]:
    pixel_values = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    reference = RapidConfig(method="none")
    rows: list[tuple[str, RapidConfig, bool]] = [("none", reference, False)]
    for r in R_VALUES:
        for method in METHODS:
            rows += [(f"{method} r={r}", RapidConfig(method=method, r=r), False),
                     (f"free {method} r={r}", RapidConfig(method=method, r=r), True)]

    def forward(rapid: RapidConfig, free: bool) -> Any:
        return free_reduction_forward(model, pixel_values, rapid) if free else model(pixel_values=pixel_values,
                                                                                     rapid=rapid)

    flops = {}
    for label, rapid, free in rows:
        for _ in range(2):
            forward(rapid, free)
        counts = model(pixel_values=pixel_values[:1], rapid=rapid).token_counts
        flops[label] = model_flops(model, counts, rapid).total
    times: dict[str, list[float]] = {label: [] for label, _, _ in rows}
    for round_index in range(rounds):
        for label, rapid, free in rows if round_index % 2 == 0 else rows[::-1]:
            timed = functools.partial(forward, rapid, free)
            times[label].append(time_forward(timed, NUMBER[batch], time.perf_counter, torch.device("cpu")))
    median = {label: statistics.median(values) for label, values in times.items()}
    records = []
    for label, rapid, free in rows:
        speedup = median["none"] / median[label]
        flop_ratio = flops["none"] / flops[label]
        records.append({"label": label, "method": rapid.method, "r": rapid.r, "free_reduction": free,
                        "batch_size": batch, "num_threads": torch.get_num_threads(), "rounds": rounds,
                        "time_ms": median[label] * 1e3, "speedup": speedup, "flop_ratio": flop_ratio,
                        "speedup_over_flop_ratio": speedup / flop_ratio})
    free_speedup = {r["label"].removeprefix("free "): r["speedup"] for r in records if r["free_reduction"]}
    for record in records:
        if not record["free_reduction"] and record["method"] != "none":
            record["speedup_over_free"] = record["speedup"] / free_speedup[record["label"]]
            record["reduction_ms_per_forward"] = record["time_ms"] - median["free " + record["label"]] * 1e3
    return records


def markdown(records: list[dict[str, Any]], command: str) -> str:
    lines = [f"Produced by:\n\n```\n{command}\n```\n",
             "Each cell: speed-up over the unreduced model (fraction of the FLOP ratio). `free`: the same layers on "
             "the same token counts with a free reduction step (the ceiling of any reduction step). `of free`: the "
             "method's speed-up / the free row's. `step ms`: the method's time minus the free row's, per forward.\n"]
    labels = [f"{m} r={r}" for r in R_VALUES for m in METHODS]
    lines += ["| model | threads | batch | none ms | FLOP ratio | " + " | ".join(
        f"{label} | free {label} | of free | step ms" for label in labels) + " |",
        "|---|---|---|---|---|" + "---|---|---|---|" * len(labels)]
    cells = dict.fromkeys((r["model"], r["num_threads"], r["batch_size"]) for r in records)
    for model, threads, batch in cells:
        cell = {r["label"]: r for r in records
                if (r["model"], r["num_threads"], r["batch_size"]) == (model, threads, batch)}
        ratios = "/".join(f"{cell[f'tome r={r}']['flop_ratio']:.2f}" for r in R_VALUES)
        parts = []
        for label in labels:
            method, free = cell[label], cell["free " + label]
            parts.append(f"{method['speedup']:.2f} ({method['speedup_over_flop_ratio']:.2f}) | "
                         f"{free['speedup']:.2f} ({free['speedup_over_flop_ratio']:.2f}) | "
                         f"{method['speedup_over_free']:.2f} | {method['reduction_ms_per_forward']:.2f}")
        lines.append(f"| {model} | {threads} | {batch} | {cell['none']['time_ms']:.1f} | {ratios} | "
                     + " | ".join(parts) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    assets = Path(os.environ.get("RAPID_HF_ASSETS", HERE.parents[1].parent / "shared" / "assets"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(ROUNDS), choices=list(ROUNDS))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4], choices=list(NUMBER))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--output", default=str(HERE / "limit.json"))
    args = parser.parse_args()
    command = "RAPID_HF_ASSETS=../shared/assets python experiments/latency/limit.py " + " ".join(sys.argv[1:])
    cells = sorted(((m, t, b) for m in args.models for t in args.threads for b in args.batch_sizes),
                   key=lambda cell: (COST[cell[0]] * cell[2], cell[1]))
    models, records, started = {}, [], time.perf_counter()
    original_threads = torch.get_num_threads()
    for name, threads, batch in cells:
        if name not in models:
            models[name] = build_model(name, assets)
        torch.set_num_threads(threads)
        cell = measure_cell(models[name], batch, ROUNDS[name])
        records += [{"model": name, **run_info(), **record} for record in cell]
        print(f"{name} threads {threads} batch {batch}: " + ", ".join(
            f"{r['label']} {r['speedup']:.2f}/{r['flop_ratio']:.2f}" for r in cell[1:]), flush=True)
        output = Path(args.output)
        output.write_text(json.dumps({"command": command, "seconds": time.perf_counter() - started,
                                      "records": records}, indent=2) + "\n")
        output.with_suffix(".md").write_text(markdown(records, command.strip()))
    torch.set_num_threads(original_threads)


if __name__ == "__main__":
    main()
