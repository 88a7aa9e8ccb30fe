"""Deployment grid: stock and reduced models in eager PyTorch, compiled (torch.compile, inductor) and ONNX Runtime,
interleaved per (model, threads, batch) cell, for models the command line cannot load here (random-weight DeiT-S
and ViT-B built from their configurations; DeiT-Tiny with its real weights for reference).

    RAPID_HF_ASSETS=../shared/assets python experiments/deploy/run.py --models deit-small vit-base --batch-sizes 1

The same measurement as `rapid-hf benchmark --runtime eager,compile,onnx` (`rapid_hf.evaluation.throughput`):
every row's speed-up over the same runtime's unreduced model and over eager stock. Records are rewritten after
every cell (a run stopped at a time limit keeps the cells it finished). Writes results.json and results.md (or
--output).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parent / "latency")]

from run import RANDOM_CONFIGS, build_model  # noqa: E402

from rapid_hf.cli.benchmark import columns  # noqa: E402
from rapid_hf.evaluation.report import markdown_table, run_info  # noqa: E402
from rapid_hf.evaluation.throughput import latency_grid, spread_warning  # noqa: E402
from rapid_hf.evaluation.variants import grid_variants  # noqa: E402

MODELS = {"deit-tiny": "deit-tiny", "deit-small": "deit-small (random weights)",
          "vit-base": "vit-base (random weights)"}
assert set(MODELS.values()) - {"deit-tiny"} == set(RANDOM_CONFIGS)


def main() -> None:
    assets = Path(os.environ.get("RAPID_HF_ASSETS", HERE.parents[1].parent / "shared" / "assets"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--methods", default="none,tome,rapid")
    parser.add_argument("--r", default="8,16")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runtime", default="eager,compile,onnx")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--output", default=str(HERE / "results.json"))
    args = parser.parse_args()
    command = "RAPID_HF_ASSETS=../shared/assets python experiments/deploy/run.py " + " ".join(sys.argv[1:])
    rows = grid_variants(args.methods.split(","), [int(r) for r in args.r.split(",")])
    runtimes = args.runtime.split(",")
    table_columns = columns(argparse.Namespace(runtime=runtimes, measure_memory=False, threads=args.threads,
                                               batch_size=args.batch_sizes))
    table_columns.insert(0, ("model", lambda record: record["model"]))
    output = Path(args.output)
    records: list[dict] = []
    started = time.perf_counter()
    for name in args.models:
        model = build_model(MODELS[name], assets)
        for threads in args.threads:
            for batch in args.batch_sizes:
                cell = latency_grid(model, rows, batch_sizes=[batch], threads=[threads], repeats=args.repeats,
                                    measure_memory=False, progress=False, runtimes=runtimes)
                records += [{"model": MODELS[name], **run_info(), **record} for record in cell]
                print(f"{name} threads {threads} batch {batch}: " + ", ".join(
                    f"{r['label']}{r['r'] or ''}/{r['runtime']} {r['speedup']:.2f}" for r in cell if r.get("speedup")),
                    flush=True)
                output.write_text(json.dumps({"command": command, "seconds": round(time.perf_counter() - started),
                                              "records": records}, indent=2) + "\n")
                warning = spread_warning(records)
                output.with_suffix(".md").write_text(
                    f"Produced by:\n\n```\n{command}\n```\n\n" + markdown_table(records, table_columns) + "\n"
                    + (f"\n{warning}\n" if warning else ""))


if __name__ == "__main__":
    main()
