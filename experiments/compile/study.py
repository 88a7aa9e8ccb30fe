"""torch.compile of reducing models on the real DeiT-Tiny: cold compile time beside the stock model's, and
compiled vs eager predictions on every dev photo.

    python experiments/compile/study.py compile-time --model ../shared/assets/deit-tiny-imagenet \
        --output experiments/compile/compile_time.json
    python experiments/compile/study.py agreement --model ../shared/assets/deit-tiny-imagenet \
        --data ../shared/assets/imagenet-sample-dev ../shared/assets/imagenet-val-dev \
        --output experiments/compile/agreement.json

`compile-time` runs each setting in its own process with an empty inductor cache (the cold compile a user's first
call pays), after inductor's own start-up (one tiny compiled function first, not counted), all settings in turn,
`--rounds` times, so a busy machine slows every setting alike. `agreement` compiles each setting once (inductor,
default mode, batch `--batch-size`, the last batch padded so no shape changes) and compares logits and top-1 with
eager on every photo.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS: dict[str, dict] = {
    "stock": {"method": "none"},
    "tome-r16": {"method": "tome", "r": 16},
    "rapid-r16": {"method": "rapid", "r": 16},
    "rapid-r8": {"method": "rapid", "r": 8},
}


def one_cold_compile(model_path: str, settings: dict, threads: int) -> dict:
    """Compile the model with `settings` in this process (fresh cache set by the caller) and time the first call."""
    import torch

    from rapid_hf import RapidConfig, RapidViTForImageClassification

    torch.set_num_threads(threads)
    warm = torch.compile(lambda x: (x * 2).sum())  # inductor's own start-up, not counted
    warm(torch.ones(4))
    model = RapidViTForImageClassification.from_pretrained(model_path, rapid=RapidConfig(**settings)).eval()
    compiled = torch.compile(model)
    pixel_values = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        start = time.perf_counter()
        compiled(pixel_values=pixel_values)
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        compiled(pixel_values=pixel_values)
        second_call_s = time.perf_counter() - start
    return {"compile_s": compile_s, "second_call_s": second_call_s}


def compile_time(args: argparse.Namespace) -> dict:
    results: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    for round_index in range(args.rounds):
        names = list(SETTINGS) if round_index % 2 == 0 else list(reversed(SETTINGS))
        for name in names:
            with tempfile.TemporaryDirectory() as cache:
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": cache}
                command = [sys.executable, __file__, "one", "--model", args.model, "--setting", name,
                           "--threads", str(args.threads)]
                done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
            if done.returncode != 0:
                results[name].append({"error": done.stderr.strip().splitlines()[-1:]})
            else:
                results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(name, results[name][-1], flush=True)
    summary = {}
    for name, runs in results.items():
        times = sorted(run["compile_s"] for run in runs if "compile_s" in run)
        summary[name] = {"median_compile_s": times[len(times) // 2] if times else None, "runs": runs}
    stock = summary["stock"]["median_compile_s"]
    for entry in summary.values():
        median = entry["median_compile_s"]
        entry["vs_stock"] = None if stock is None or median is None else median / stock
    return summary


def agreement(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoImageProcessor

    from experiments.pooled_comparison.photos import pixel_rows
    from rapid_hf import RapidConfig, RapidViTForImageClassification

    torch.set_num_threads(args.threads)
    processor = AutoImageProcessor.from_pretrained(args.model)
    pixels, _, _ = pixel_rows(args.data, "all", processor)
    model = RapidViTForImageClassification.from_pretrained(args.model).eval()
    results = {}
    for name in args.settings:
        torch._dynamo.reset()
        model.set_rapid(RapidConfig(**SETTINGS[name]))
        compiled = torch.compile(model)
        eager_top1, compiled_top1, largest = [], [], 0.0
        with torch.no_grad():
            for start in range(0, len(pixels), args.batch_size):
                batch = pixels[start : start + args.batch_size]
                count = len(batch)
                if count < args.batch_size:  # pad: one shape, one graph
                    batch = torch.cat([batch, batch[:1].expand(args.batch_size - count, -1, -1, -1)])
                eager = model(pixel_values=batch).logits[:count]
                fast = compiled(pixel_values=batch).logits[:count]
                largest = max(largest, (eager - fast).abs().max().item())
                eager_top1.append(eager.argmax(-1))
                compiled_top1.append(fast.argmax(-1))
        same = (torch.cat(eager_top1) == torch.cat(compiled_top1)).sum().item()
        results[name] = {"photos": len(pixels), "same_top1": same, "max_abs_logit_diff": largest}
        print(name, results[name], flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", choices=("compile-time", "agreement", "one"))
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", nargs="+", default=[])
    parser.add_argument("--setting", choices=tuple(SETTINGS))
    parser.add_argument("--settings", nargs="+", default=["tome-r16", "rapid-r16"], choices=tuple(SETTINGS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--output")
    args = parser.parse_args()
    if args.study == "one":
        print(json.dumps(one_cold_compile(args.model, SETTINGS[args.setting], args.threads)))
        return
    result = compile_time(args) if args.study == "compile-time" else agreement(args)
    record = {"command": " ".join(["python", "experiments/compile/study.py", *sys.argv[1:]]), "results": result}
    if args.output:
        Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["results"], indent=2))


if __name__ == "__main__":
    main()
