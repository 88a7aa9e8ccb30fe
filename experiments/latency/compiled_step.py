"""Does compiling the reduction step with `torch.compile` buy batch-1 speed? (It does not: not offered.)

    RAPID_HF_ASSETS=../shared/assets python experiments/latency/compiled_step.py

DeiT-Tiny, batch 1, CPU. The layers call `rapid_hf.models.layers.reduce_tokens`; this study swaps that module
attribute for `torch.compile(reduce_tokens)` (inductor, default dynamic-shape policy) in this process only, then
times eager and compiled rows interleaved (order alternating between rounds, medians) against the unreduced model.
It also records the compile time of the first forward per setting, the number of compiled graphs (one per
distinct layer input size and step, so a new input size or r compiles again), and the largest logit difference
from the eager step. Writes compiled_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._dynamo

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

import rapid_hf.models.layers as layers  # noqa: E402
from rapid_hf import RapidConfig  # noqa: E402
from rapid_hf.evaluation.loading import load_rapid_model  # noqa: E402
from rapid_hf.evaluation.report import run_info  # noqa: E402
from rapid_hf.reduction.steps import reduce_tokens  # noqa: E402

SETTINGS = {"tome r=16": RapidConfig(method="tome", r=16), "rapid r=8": RapidConfig(method="rapid", r=8),
            "rapid r=16": RapidConfig(method="rapid", r=16)}


def main() -> None:
    assets = Path(os.environ.get("RAPID_HF_ASSETS", HERE.parents[1].parent / "shared" / "assets"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch._dynamo.config.cache_size_limit = 64  # one graph per layer shape: the default (8) would fall back
    model = load_rapid_model(str(assets / "deit-tiny-imagenet"))
    pixel_values = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(reduce_tokens)
    record: dict = {"command": "RAPID_HF_ASSETS=../shared/assets python experiments/latency/compiled_step.py "
                    + " ".join(sys.argv[1:]), **run_info(), "first_forward_s": {}, "max_logit_difference": {}}
    with torch.inference_mode():
        eager_logits = {name: model(pixel_values=pixel_values, rapid=rapid).logits for name, rapid in SETTINGS.items()}
        layers.reduce_tokens = compiled
        for name, rapid in SETTINGS.items():
            started = time.perf_counter()
            logits = model(pixel_values=pixel_values, rapid=rapid).logits
            record["first_forward_s"][name] = round(time.perf_counter() - started, 2)
            record["max_logit_difference"][name] = (logits - eager_logits[name]).abs().max().item()
        record["compiled_graphs"] = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        rows = [("none", None)] + [(f"{name}{suffix}", step) for name in SETTINGS
                                   for suffix, step in (("", reduce_tokens), (" compiled", compiled))]
        times: dict[str, list[float]] = {label: [] for label, _ in rows}
        for round_index in range(args.rounds):
            for label, step in rows if round_index % 2 == 0 else rows[::-1]:
                rapid = RapidConfig(method="none") if step is None else SETTINGS[label.removesuffix(" compiled")]
                layers.reduce_tokens = step or reduce_tokens
                started = time.perf_counter()
                for _ in range(3):
                    model(pixel_values=pixel_values, rapid=rapid)
                times[label].append((time.perf_counter() - started) / 3)
        layers.reduce_tokens = reduce_tokens
    median = {label: statistics.median(values) for label, values in times.items()}
    record["none_ms"] = median["none"] * 1e3
    record["speedup"] = {label: median["none"] / value for label, value in median.items() if label != "none"}
    (HERE / "compiled_step.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
