"""Regenerate the shipped results: the one thing a checkout offers that the `rapid-hf` command does not.

    python scripts/regenerate_results.py --list                 # what can be regenerated, and the command of each
    python scripts/regenerate_results.py model_cards best_baseline
    python scripts/regenerate_results.py --all --dry-run        # print every command, run none

Each entry runs the command recorded beside the files it writes (their README or the file's own header), from the
repository root, with the real assets found through `RAPID_HF_ASSETS` (default `../shared/assets`). Timing
entries (`deploy_*`, `compile_time`, `compiled_ceiling`, `few_points`, `latency_model*`, `equal_speed*`) take
minutes to tens of minutes on a 2-core CPU and measure the machine they run on; the accuracy entries reuse no
timing.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PHOTOS = "$ASSETS/imagenet-sample-dev $ASSETS/imagenet-val-dev"
MODEL = "$ASSETS/deit-tiny-imagenet"

ENTRIES: dict[str, tuple[str, str]] = {
    "best_baseline": (
        "results/best_baseline.md, results/pareto_methods.png and experiments/pooled_comparison/"
        "results_best_baseline.* from the stored per-photo predictions",
        f"python experiments/pooled_comparison/best_baseline.py --model {MODEL} --data {PHOTOS}",
    ),
    "pitome_faithfulness": (
        "experiments/pitome_faithfulness/results.* (PiToMe against ToMe at the PiToMe repository's DeiT-T budgets)",
        f"python experiments/pitome_faithfulness/run.py --model {MODEL} --data {PHOTOS} --threads 1",
    ),
    "compile_agreement": (
        "experiments/compile/agreement.json (compiled against eager top-1 on every dev photo)",
        f"python experiments/compile/study.py agreement --model {MODEL} --data {PHOTOS} "
        "--output experiments/compile/agreement.json",
    ),
    "compile_time": (
        "experiments/compile/compile_time.json (cold compile time beside the stock model's)",
        f"python experiments/compile/study.py compile-time --model {MODEL} --rounds 1 "
        "--output experiments/compile/compile_time.json",
    ),
    "deploy_b1": (
        "results/deploy_deit_tiny_b1.* (eager, compiled and ONNX Runtime at batch 1)",
        f"rapid-hf benchmark --model {MODEL} --methods none,tome,rapid --r 8,16 --batch-size 1 --threads 1,2 "
        "--runtime eager,compile,onnx --no-memory --repeats 20 --output results/deploy_deit_tiny_b1.json",
    ),
    "deploy_b16": (
        "results/deploy_deit_tiny_b16.* (eager, compiled and ONNX Runtime at batch 16)",
        f"rapid-hf benchmark --model {MODEL} --methods none,tome,rapid --r 8,16 --batch-size 16 --threads 1,2 "
        "--runtime eager,compile,onnx --no-memory --repeats 8 --output results/deploy_deit_tiny_b16.json",
    ),
    "deploy_larger": (
        "experiments/deploy/results.* (DeiT-S and ViT-B, random weights, every runtime at batch 1)",
        "python experiments/deploy/run.py --models deit-small vit-base --batch-sizes 1",
    ),
    "compiled_ceiling": (
        "experiments/latency/limit_compiled.* (each method against its free ceiling, eager and compiled)",
        "python experiments/latency/limit.py --models deit-tiny --runtime eager,compile --batch-sizes 1 "
        "--threads 1 2 --output experiments/latency/limit_compiled.json",
    ),
    "few_points": (
        "experiments/few_points/results.* (reduce_every against the every-layer schedule: accuracy and speed)",
        "python experiments/few_points/run.py --speed-runtimes eager,compile,onnx",
    ),
    "latency_model": (
        "experiments/latency_model/results.* (the cost model against measured latency, eager)",
        "python experiments/latency_model/run.py --repeats 1",
    ),
    "latency_model_onnx": (
        "experiments/latency_model/results_onnx.* (the cost model through ONNX Runtime)",
        "python experiments/latency_model/run.py --runtime onnx --repeats 1",
    ),
    "latency_model_compile": (
        "experiments/latency_model/results_compile.* (the cost model compiled)",
        "python experiments/latency_model/run.py --runtime compile --repeats 1",
    ),
    "equal_speed": (
        "experiments/equal_speed/results.* and equal_speed.png (methods at equal measured speed, eager)",
        "python experiments/equal_speed/run.py",
    ),
    "equal_speed_onnx": (
        "experiments/equal_speed/results_onnx.* and equal_speed_onnx.png (the same through ONNX Runtime; needs "
        "latency_model_onnx first)",
        "python experiments/equal_speed/run.py --runtime onnx --cost-model-from",
    ),
}


def model_cards_command() -> str:
    """The bash block of model_cards/COMMANDS.md (the cards are regenerated exactly as that file says)."""
    text = (REPO_ROOT / "model_cards" / "COMMANDS.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    if block is None:
        raise SystemExit("model_cards/COMMANDS.md has no ```bash block to run")
    return block.group(1).replace("../shared/assets", "$ASSETS")


def commands() -> dict[str, tuple[str, str]]:
    return {"model_cards": ("model_cards/* (README, eval_results.json)", model_cards_command()), **ENTRIES}


def main(argv: list[str] | None = None) -> int:
    known = commands()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"entries to regenerate: {', '.join(known)}")
    parser.add_argument("--all", action="store_true", help="every entry, in the order --list shows")
    parser.add_argument("--list", action="store_true", help="show each entry, what it writes and its command")
    parser.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in known]
    if unknown:
        parser.error(f"unknown entries {unknown}: choose from {', '.join(known)}")
    if args.list:
        for name, (writes, command) in known.items():
            print(f"{name}: writes {writes}\n    {command.strip()}\n")
        return 0
    names = list(known) if args.all else args.names
    if not names:
        parser.error("name the entries to regenerate, or pass --all or --list")
    assets = os.environ.get("RAPID_HF_ASSETS", str(REPO_ROOT.parent / "shared" / "assets"))
    if not args.dry_run and not Path(assets, "deit-tiny-imagenet").is_dir():
        parser.error(f"no DeiT-Tiny under {assets!r}: set RAPID_HF_ASSETS to the shared assets folder")
    environment = {**os.environ, "ASSETS": assets, "RAPID_HF_ASSETS": assets, "PYTHONPATH": str(REPO_ROOT)}
    for name in names:
        command = known[name][1]
        print(f"== {name}: {command.strip()}", flush=True)
        if args.dry_run:
            continue
        done = subprocess.run(["bash", "-ec", command], cwd=REPO_ROOT, env=environment, check=False)
        if done.returncode != 0:
            print(f"{name} failed with exit status {done.returncode}", file=sys.stderr)
            return done.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
