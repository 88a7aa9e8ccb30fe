"""How close PyTorch can get to the FLOP ratio at small batches: the same layers with a free reduction step, eager
or compiled.

    RAPID_HF_ASSETS=../shared/assets python experiments/latency/limit.py
    RAPID_HF_ASSETS=../shared/assets python experiments/latency/limit.py --runtime eager,compile --batch-sizes 1
    python experiments/latency/limit.py --models tiny --runtime eager,compile --methods rapid --r 8 --rounds 2 \\
        --threads 1 --batch-sizes 1 --output limit_tiny.json

For each method and r, a "free" row runs the model's own layers on exactly the token counts the method leaves
(attention on the layer's input tokens, MLP on its output tokens, the proportional-attention bias from the first
merge on, as the method does) but replaces the reduction step by keeping the first tokens: what the method would
cost if its reduction steps took no time. Its speed-up over the unreduced model is the ceiling for any reduction
step at that batch size; `speedup / free speedup` says how much of that ceiling the method reaches, and
`free speedup / FLOP ratio` how much of the FLOP saving the layers themselves can turn into time (small matrix
products and per-module overhead do not shrink with the token count).

`--runtime compile` runs every row (unreduced, method, free) through `torch.compile` as well (inductor by default,
static shapes, compiled once per row before timing: `rapid_hf.evaluation.throughput`'s compile helpers), so the
compiled method is measured against the *compiled* free ceiling. Rows of every runtime are interleaved within
each (model, threads, batch) cell, the order alternating between rounds; medians. A row that fails to compile is
recorded with its error. `--models tiny` is a 4-layer random ViT for a quick check of the script itself. Writes
limit.json and limit.md (or --output).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE)]

from run import COST, build_model  # noqa: E402
from transformers import ViTConfig  # noqa: E402

from rapid_hf import RapidViTForImageClassification  # noqa: E402
from rapid_hf.evaluation.flops import model_flops  # noqa: E402
from rapid_hf.evaluation.report import run_info  # noqa: E402
from rapid_hf.evaluation.throughput import first_call, fresh_compiler, interleaved_times  # noqa: E402
from rapid_hf.export import LogitsForward  # noqa: E402
from rapid_hf.reduction.config import RapidConfig  # noqa: E402
from rapid_hf.reduction.matching import removal_cap  # noqa: E402
from rapid_hf.reduction.steps import layer_steps  # noqa: E402

METHODS = ["tome", "rapid"]
R_VALUES = [8, 16]
RUNTIMES = ("eager", "compile")
ROUNDS = {"deit-tiny": 25, "deit-small (random weights)": 12, "vit-base (random weights)": 6, "tiny": 3}
NUMBER = {1: 3, 4: 1}
TINY = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 128,
        "image_size": 64, "patch_size": 8, "num_labels": 10}


def load_model(name: str, assets: Path) -> RapidViTForImageClassification:
    if name == "tiny":
        torch.manual_seed(0)
        return RapidViTForImageClassification(ViTConfig(**TINY)).eval()
    return build_model(name, assets)


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
        hidden = layer.attention_residual(hidden, bias)
        if step.operation is not None:
            cap = removal_cap(hidden.shape[1], backbone.num_protected_tokens)
            hidden = hidden[:, : hidden.shape[1] - min(step.r, cap)]
            merged = merged or step.operation.startswith("merge")
        hidden = layer.mlp_residual(hidden)
    last_hidden_state, _ = backbone.finish(hidden, hidden.new_ones(*hidden.shape[:2], 1, dtype=torch.float32))
    return model.classifier(last_hidden_state[:, 0])


class FreeReductionForward(nn.Module):
    """`free_reduction_forward(model, pixel_values, rapid)` as a module (one tensor in, logits out), the
    counterpart of `rapid_hf.export.LogitsForward` for the free rows: what `torch.compile` compiles."""

    def __init__(self, model: nn.Module, rapid: RapidConfig) -> None:
        super().__init__()
        self.model = model
        self.rapid = rapid

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return free_reduction_forward(self.model, pixel_values, self.rapid)


def cell_rows(methods: list[str], r_values: list[int]) -> list[tuple[str, RapidConfig, bool]]:
    """(label, settings, free) of one cell: the unreduced model, then per r and method the method and its free
    row."""
    rows: list[tuple[str, RapidConfig, bool]] = [("none", RapidConfig(method="none"), False)]
    for r in r_values:
        for method in methods:
            rows += [(f"{method} r={r}", RapidConfig(method=method, r=r), False),
                     (f"free {method} r={r}", RapidConfig(method=method, r=r), True)]
    return rows


@torch.inference_mode()
def measure_cell(model: Any, batch: int, rounds: int, runtimes: list[str], methods: list[str], r_values: list[int],
                 backend: str = "inductor", timeout_s: float | None = None) -> list[dict[str, Any]]:
    size = model.config.image_size
    pixel_values = torch.randn(batch, model.config.num_channels, size, size, generator=torch.Generator().manual_seed(0))
    rows = cell_rows(methods, r_values)
    modules = {label: (FreeReductionForward if free else LogitsForward)(model, rapid).eval()
               for label, rapid, free in rows}

    flops = {}
    for label, rapid, _ in rows:
        counts = model(pixel_values=pixel_values[:1], rapid=rapid).token_counts
        flops[label] = model_flops(model, counts, rapid).total
    forwards: dict[tuple[str, str], Any] = {}
    prepared: dict[tuple[str, str], dict[str, Any]] = {}
    for label, _, _ in rows:  # eager
        forward = functools.partial(modules[label], pixel_values)
        for _ in range(2):
            forward()
        forwards["eager", label] = forward
        prepared["eager", label] = {"compile_s": None, "error": None}
    with contextlib.ExitStack() as stack:
        if "compile" in runtimes:
            stack.enter_context(fresh_compiler(backend, graphs=64 + 16 * len(rows)))
            for label, _, _ in rows:
                compiled = torch.compile(modules[label], backend=backend, dynamic=False)
                forward = functools.partial(compiled, pixel_values)
                _, seconds, error = first_call(forward, timeout_s=timeout_s)
                prepared["compile", label] = {"compile_s": seconds, "error": error}
                if error is None:
                    forward()
                    forwards["compile", label] = forward
        keys = list(forwards)
        times = dict(zip(keys, interleaved_times([forwards[key] for key in keys], rounds, NUMBER[batch]), strict=True))

    median = {key: statistics.median(values) for key, values in times.items()}
    records = []
    for runtime in runtimes:
        for label, rapid, free in rows:
            key = (runtime, label)
            own, stock = median.get(key), median.get((runtime, "none"))
            speedup = None if own is None or stock is None else stock / own
            flop_ratio = flops["none"] / flops[label]
            records.append({"label": label, "method": rapid.method, "r": rapid.r, "free_reduction": free,
                            "runtime": runtime, "batch_size": batch, "num_threads": torch.get_num_threads(),
                            "rounds": rounds, "time_ms": None if own is None else own * 1e3, "speedup": speedup,
                            "speedup_vs_eager_stock": None if own is None else median["eager", "none"] / own,
                            "flop_ratio": flop_ratio,
                            "speedup_over_flop_ratio": None if speedup is None else speedup / flop_ratio,
                            **prepared[key]})
    for record in records:
        if record["free_reduction"] or record["method"] == "none":
            continue
        free = next(r for r in records if r["runtime"] == record["runtime"] and r["label"] == "free " + record["label"])
        usable = record["speedup"] is not None and free["speedup"] is not None
        record["speedup_over_free"] = record["speedup"] / free["speedup"] if usable else None
        record["reduction_ms_per_forward"] = record["time_ms"] - free["time_ms"] if usable else None
    return records


def _number(value: float | None, digits: int = 2) -> str:
    return "failed" if value is None else f"{value:.{digits}f}"


def markdown(records: list[dict[str, Any]], command: str) -> str:
    lines = [f"Produced by:\n\n```\n{command}\n```\n",
             "Each cell: speed-up over the unreduced model of the same runtime (fraction of the FLOP ratio). `free`: "
             "the same layers on the same token counts with a free reduction step (the ceiling of any reduction "
             "step). `of free`: the method's speed-up / the free row's. `step ms`: the method's time minus the free "
             "row's, per forward. `none ms`: the unreduced model's time per forward in that runtime.\n"]
    labels = list(dict.fromkeys(r["label"] for r in records if not r["free_reduction"] and r["method"] != "none"))
    lines += ["| model | runtime | threads | batch | none ms | FLOP ratio | " + " | ".join(
        f"{label} | free {label} | of free | step ms" for label in labels) + " |",
        "|---|---|---|---|---|---|" + "---|---|---|---|" * len(labels)]
    cells = dict.fromkeys((r["model"], r["runtime"], r["num_threads"], r["batch_size"]) for r in records)
    for model, runtime, threads, batch in cells:
        cell = {r["label"]: r for r in records
                if (r["model"], r["runtime"], r["num_threads"], r["batch_size"]) == (model, runtime, threads, batch)}
        ratios = "/".join(dict.fromkeys(f"{cell[label]['flop_ratio']:.2f}" for label in labels))
        parts = []
        for label in labels:
            method, free = cell[label], cell["free " + label]
            parts.append(f"{_number(method['speedup'])} ({_number(method['speedup_over_flop_ratio'])}) | "
                         f"{_number(free['speedup'])} ({_number(free['speedup_over_flop_ratio'])}) | "
                         f"{_number(method['speedup_over_free'])} | {_number(method['reduction_ms_per_forward'])}")
        none_ms = _number(cell["none"]["time_ms"], 1)
        lines.append(f"| {model} | {runtime} | {threads} | {batch} | {none_ms} | {ratios} | "
                     + " | ".join(parts) + " |")
    compiled = [r for r in records if r["runtime"] == "compile"]
    if compiled:
        lines += ["", "Compile time of each row (s, first call: dynamo and the backend) or why it failed:\n",
                  "| model | threads | batch | row | compile s | error |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['num_threads']} | {r['batch_size']} | {r['label']} | {r['compile_s']:.1f} | "
                  f"{(r['error'] or '').replace('|', '/')} |" for r in compiled]
    return "\n".join(lines) + "\n"


def main() -> None:
    assets = Path(os.environ.get("RAPID_HF_ASSETS", HERE.parents[1].parent / "shared" / "assets"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=[name for name in ROUNDS if name != "tiny"],
                        choices=list(ROUNDS))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4], choices=list(NUMBER))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runtime", default="eager", help=f"comma list from {','.join(RUNTIMES)} (default: eager)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list (default: %(default)s)")
    parser.add_argument("--r", default=",".join(map(str, R_VALUES)), help="comma list (default: %(default)s)")
    parser.add_argument("--rounds", type=int, help="timed rounds per cell (default: ROUNDS per model)")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--compile-timeout", type=float, default=0.0,
                        help="seconds; a row compiling for longer is recorded as failed (default: 0, no limit)")
    parser.add_argument("--output", default=str(HERE / "limit.json"))
    args = parser.parse_args()
    runtimes = [name for name in RUNTIMES if name in args.runtime.split(",")]
    unknown = set(args.runtime.split(",")) - set(RUNTIMES)
    if unknown or not runtimes:
        parser.error(f"--runtime {args.runtime!r}: choose from {','.join(RUNTIMES)}")
    methods, r_values = args.methods.split(","), [int(r) for r in args.r.split(",")]
    command = "RAPID_HF_ASSETS=../shared/assets python experiments/latency/limit.py " + " ".join(sys.argv[1:])
    cost = {**COST, "tiny": 0.01}
    cells = sorted(((m, t, b) for m in args.models for t in args.threads for b in args.batch_sizes),
                   key=lambda cell: (cost[cell[0]] * cell[2], cell[1]))
    models, records, started = {}, [], time.perf_counter()
    original_threads = torch.get_num_threads()
    try:
        for name, threads, batch in cells:
            if name not in models:
                models[name] = load_model(name, assets)
            torch.set_num_threads(threads)
            cell = measure_cell(models[name], batch, args.rounds or ROUNDS[name], runtimes, methods, r_values,
                                args.compile_backend, args.compile_timeout or None)
            records += [{"model": name, **run_info(), **record} for record in cell]
            print(f"{name} threads {threads} batch {batch}: " + ", ".join(
                f"{r['label']} ({r['runtime']}) {_number(r['speedup'])}/{r['flop_ratio']:.2f}"
                for r in cell if r["label"] != "none"), flush=True)
            output = Path(args.output)
            output.write_text(json.dumps({"command": command, "seconds": time.perf_counter() - started,
                                          "records": records}, indent=2) + "\n")
            output.with_suffix(".md").write_text(markdown(records, command.strip()))
    finally:
        torch.set_num_threads(original_threads)


if __name__ == "__main__":
    main()
