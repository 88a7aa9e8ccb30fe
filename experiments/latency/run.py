"""Latency grid on CPU: speed-up beside FLOP ratio for every method at batch 1, 4, 16, 64 and 1, 2 threads.

    RAPID_HF_ASSETS=../shared/assets python experiments/latency/run.py

Models: DeiT-Tiny (the real ImageNet weights in the assets folder), and DeiT-S and ViT-B built from their
configurations with random weights (speed does not depend on the weights): DeiT-S hidden 384, 6 heads, 12 layers,
MLP 1536; ViT-B 768, 12 heads, 12 layers, 3072; both patch 16 at 224 px. Rows: none, ToMe, ToFu, RAPID, crucial
at r = 8 and 16, interleaved within each (threads, batch) cell by `rapid_hf.evaluation.throughput.latency_grid`
(the same code as `rapid-hf benchmark --batch-size 1,4,16,64 --threads 1,2`). Repeats shrink with the cost of
a forward (see REPEATS): large batches of the large models get one or two timed rounds, so read their speed-ups
as +-5% at best. Writes results.json and results.md next to this file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from transformers import ViTConfig  # noqa: E402

from rapid_hf import RapidViTForImageClassification  # noqa: E402
from rapid_hf.evaluation.loading import load_rapid_model  # noqa: E402
from rapid_hf.evaluation.report import run_info  # noqa: E402
from rapid_hf.evaluation.throughput import latency_grid  # noqa: E402
from rapid_hf.evaluation.variants import grid_variants  # noqa: E402

METHODS = ["none", "tome", "tofu", "rapid", "crucial"]
R_VALUES = [8, 16]
BATCH_SIZES = [1, 4, 16, 64]
THREADS = [1, 2]
RANDOM_CONFIGS = {
    "deit-small (random weights)": {"hidden_size": 384, "num_attention_heads": 6, "intermediate_size": 1536},
    "vit-base (random weights)": {"hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072},
}
# Timed rounds per (model, batch size); the profiled forward before timing doubles as warm-up for big batches.
REPEATS = {
    "deit-tiny": {1: 30, 4: 12, 16: 5, 64: 3},
    "deit-small (random weights)": {1: 10, 4: 5, 16: 2, 64: 1},
    "vit-base (random weights)": {1: 5, 4: 2, 16: 1, 64: 1},
}
WARMUP = {1: 3, 4: 1, 16: 0, 64: 0}
# Left out to keep the whole run under ~25 minutes on a shared 2-core CPU: ViT-B at batch 64 on one thread
# (nine rows of ~2 TFLOPs per forward, ~10 minutes for a single timed round); it is measured on two threads.
COST = {"deit-tiny": 1.0, "deit-small (random weights)": 3.7, "vit-base (random weights)": 14.0}  # GFLOPs vs Tiny
SKIPPED = {("vit-base (random weights)", 1, 64)}


def build_model(name: str, assets: Path) -> RapidViTForImageClassification:
    if name == "deit-tiny":
        return load_rapid_model(str(assets / "deit-tiny-imagenet"))
    torch.manual_seed(0)
    config = ViTConfig(num_hidden_layers=12, patch_size=16, image_size=224, num_labels=1000,
                       **RANDOM_CONFIGS[name])
    return RapidViTForImageClassification(config).eval()


def markdown(records: list[dict], command: str) -> str:
    lines = [f"Produced by:\n\n```\n{command}\n```\n"]
    for model in dict.fromkeys(r["model"] for r in records):
        rows = [r for r in records if r["model"] == model]
        labels = [f"{r['label']} r={r['r']}" for r in rows if r["method"] != "none"]
        labels = list(dict.fromkeys(labels))
        lines += [f"## {model}\n", "Each cell: speed-up over the unreduced model / FLOP ratio (unreduced GFLOPs / "
                  "method's), median of the timed rounds; the unreduced row gives ms per batch.\n",
                  "| threads | batch | rounds | none ms | " + " | ".join(labels) + " |",
                  "|---|---|---|---|" + "---|" * len(labels)]
        for threads in dict.fromkeys(r["num_threads"] for r in rows):
            for batch in dict.fromkeys(r["batch_size"] for r in rows):
                cell = {f"{r['label']} r={r['r']}": r for r in rows
                        if r["num_threads"] == threads and r["batch_size"] == batch}
                if not cell:
                    lines.append(f"| {threads} | {batch} | not measured (see README: skipped or past the time limit) |")
                    continue
                none = cell[next(label for label, r in cell.items() if r["method"] == "none")]
                lines.append(f"| {threads} | {batch} | {none['repeats']} | {none['time_ms']:.1f} | " + " | ".join(
                    f"{cell[label]['speedup']:.2f} / {cell[label]['flop_ratio']:.2f}" for label in labels) + " |")
        lines += ["", "Peak memory at inference (MB of tensors allocated during one forward beyond weights and "
                  "input, CPU profiler), at the first thread count measured:\n",
                  "| batch | none | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
        for batch in dict.fromkeys(r["batch_size"] for r in rows):
            first_threads = next(r["num_threads"] for r in rows if r["batch_size"] == batch)
            cell = {f"{r['label']} r={r['r']}": r for r in rows
                    if r["num_threads"] == first_threads and r["batch_size"] == batch}
            none = next(r for r in cell.values() if r["method"] == "none")
            lines.append(f"| {batch} | {none['peak_memory_mb']:.1f} | "
                         + " | ".join(f"{cell[label]['peak_memory_mb']:.1f}" for label in labels) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    assets = Path(os.environ.get("RAPID_HF_ASSETS", REPO.parent / "shared" / "assets"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(REPEATS), choices=list(REPEATS))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=BATCH_SIZES)
    parser.add_argument("--threads", type=int, nargs="+", default=THREADS)
    parser.add_argument("--repeat-scale", type=float, default=1.0,
                        help="multiply every REPEATS entry (at least 1 round): < 1 for a quick trial")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results.json"))
    args = parser.parse_args()
    rows = grid_variants(METHODS, R_VALUES)
    records: list[dict] = []
    started = time.perf_counter()
    command = "RAPID_HF_ASSETS=../shared/assets python experiments/latency/run.py " + " ".join(sys.argv[1:])
    output = Path(args.output)
    # Cheapest cells first (DeiT-Tiny's whole grid, then the others by GFLOPs per batch), and the records are
    # rewritten after every cell: a run stopped at a time limit keeps every cell it finished.
    cells = [(name, threads, batch) for name in args.models for threads in args.threads for batch in args.batch_sizes
             if (name, threads, batch) not in SKIPPED]
    cells.sort(key=lambda cell: (cell[0] != "deit-tiny", COST[cell[0]] * cell[2], cell[1]))
    models: dict[str, RapidViTForImageClassification] = {}
    for name, threads, batch in cells:
        if name not in models:
            models[name] = build_model(name, assets)
        repeats = max(1, round(REPEATS[name][batch] * args.repeat_scale))
        cell_start = time.perf_counter()
        cell = latency_grid(models[name], rows, batch_sizes=[batch], threads=[threads], warmup=WARMUP[batch],
                            repeats=repeats, progress=False)
        records += [{"model": name, **run_info(), **record} for record in cell]
        summary = ", ".join(f"{r['label']}{r['r'] or ''} {r['speedup']:.2f}/{r['flop_ratio']:.2f}" for r in cell[1:])
        print(f"{name} threads {threads} batch {batch}: none {cell[0]['time_ms']:.1f} ms; {summary} "
              f"({time.perf_counter() - cell_start:.0f} s)", flush=True)
        ordered = sorted(records, key=lambda r: (list(REPEATS).index(r["model"]), r["num_threads"], r["batch_size"]))
        output.write_text(json.dumps({"command": command, "seconds": time.perf_counter() - started,
                                      "records": ordered}, indent=2) + "\n")
        output.with_suffix(".md").write_text(markdown(ordered, command.strip()))
    print(f"wrote {output} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
