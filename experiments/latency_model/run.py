"""Check the cost model (`rapid_hf.evaluation.latency_model`) against measured whole-forward latency.

    RAPID_HF_ASSETS=../shared/assets python experiments/latency_model/run.py
    RAPID_HF_ASSETS=../shared/assets python experiments/latency_model/run.py --batch-sizes 1 --repeats 1 --timer wall
    RAPID_HF_ASSETS=../shared/assets python experiments/latency_model/run.py --runtime onnx --repeats 1

For each batch size and repeat: measure the cost model of DeiT-Tiny (1 thread; eager, or with `--runtime` compiled
by torch.compile or run by ONNX Runtime), then measure the whole forward of every method (tome, tofu, rapid,
crucial, pitome, topk) at r = 4, 8, 12, 16 (compile/onnx: r = 8, 16, each row compiled or exported once), plus
schedules that reduce at a few layers only, interleaved with the unreduced model, in the same runtime, and compare
with the prediction. Error = predicted /
measured - 1, for the latency and for the speed-up over the unreduced model (the ratio is measured within each
round, so it is steadier on a busy machine than the latency itself). Writes results.json and results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from rapid_hf import RapidViTForImageClassification  # noqa: E402
from rapid_hf.evaluation.latency_model import (  # noqa: E402
    LatencyModel,
    measure_latency_model,
    median_absolute_error,
    validate_latency_model,
)
from rapid_hf.reduction.config import RapidConfig  # noqa: E402

METHODS = ("tome", "tofu", "rapid", "crucial", "pitome", "topk")
R_VALUES = (4, 8, 12, 16)
SPARSE = {  # schedules that reduce at a few layers only (calibrate --speedup searches these too)
    "rapid every 2nd r=16": RapidConfig(method="rapid", r=[16, 0] * 6),
    "rapid every 3rd r=24": RapidConfig(method="rapid", r=[24, 0, 0] * 4),
    "tome every 3rd r=24": RapidConfig(method="tome", r=[24, 0, 0] * 4),
    "tome every 2nd from 1 r=20": RapidConfig(method="tome", r=[0, 20] * 6),
}
ROUNDS = {"model": {1: 15, 16: 16}, "validate": {1: 20, 16: 16}}


# Compiled and exported rows cost a compile or an export each: the benchmark grid's r values and two sparse rows.
COMPILED_R_VALUES = (8, 16)
COMPILED_SPARSE = ("rapid every 3rd r=24", "tome every 3rd r=24")


def rows(runtime: str = "eager") -> list[tuple[str, RapidConfig]]:
    r_values = R_VALUES if runtime == "eager" else COMPILED_R_VALUES
    sparse = SPARSE if runtime == "eager" else {label: SPARSE[label] for label in COMPILED_SPARSE}
    grid = [(f"{method} r={r}", RapidConfig(method=method, r=r)) for method in METHODS for r in r_values]
    return grid + list(sparse.items())


def rescore(result: dict, fit: str, anchors: bool = True) -> dict:
    """The same measurements with predictions of the cost model under `fit` (no new timing); `anchors=False`:
    with every method's steps as the pieces timed them (no anchor forwards)."""
    saved = result["latency_model"] if anchors else {**result["latency_model"], "anchor_ms": {}}
    latency_model = LatencyModel.from_dict(saved).refit(fit)
    stock = latency_model.predict_ms(RapidConfig(method="none"))
    records = []
    for record in result["records"]:
        predicted = latency_model.predict_ms(RapidConfig.from_dict(record["rapid"]))
        speedup = stock / predicted
        if "measured_ms_corrected" in record:
            record = {**record, "error_corrected": predicted / record["measured_ms_corrected"] - 1}
        records.append({**record, "predicted_ms": predicted, "error": predicted / record["measured_ms"] - 1,
                        "predicted_speedup": speedup, "speedup_error": speedup / record["measured_speedup"] - 1})
    return {**result, "fit": fit, "latency_model": latency_model.to_dict(), "records": records,
            **summary(records)}


def summary(records: list[dict]) -> dict:
    grid = [r for r in records if " every " not in r["label"]]
    corrected = "error_corrected" in records[0]
    return {"mae": median_absolute_error(records), "mae_grid": median_absolute_error(grid),
            "mae_corrected": median_absolute_error(records, "error_corrected") if corrected else None,
            "mae_speedup": median_absolute_error(records, "speedup_error")}


def markdown(results: list[dict], command: str) -> str:
    lines = [f"Produced by:\n\n```\n{command}\n```\n"]
    for result in results:
        machine = result["machine"]
        records = result["records"]
        corrected = result.get("mae_corrected") is not None
        lines += [f"### batch {machine['batch_size']}, {machine['threads']} thread(s), {machine['runtime']}, "
                  f"{result['timer']} clock, repeat {result['repeat']}, {result.get('fit', 'linear')} fit\n",
                  f"Cost model measured in {result['model_seconds']:.0f} s ({result['model_rounds']} rounds); "
                  f"validation {result['validate_rounds']} interleaved rounds. Median absolute error over the "
                  f"{len(records) - 1} reduced rows: latency **{result['mae']:.1%}** (grid only "
                  f"{result['mae_grid']:.1%})"
                  + (f", drift-corrected latency **{result['mae_corrected']:.1%}**" if corrected else "")
                  + f", speed-up **{result['mae_speedup']:.1%}**.\n",
                  "| row | tokens out | predicted ms | measured ms | error | "
                  + ("corrected ms | corrected error | " if corrected else "")
                  + "predicted speed-up | measured speed-up | speed-up error |",
                  "|---|---|---|---|---|" + ("---|---|" if corrected else "") + "---|---|---|"]
        for r in records:
            extra = (f"{r['measured_ms_corrected']:.2f} | {r['error_corrected']:+.1%} | " if corrected else "")
            lines.append(f"| {r['label']} | {r['token_counts'][-1]} | {r['predicted_ms']:.2f} | {r['measured_ms']:.2f} "
                         f"| {r['error']:+.1%} | {extra}{r['predicted_speedup']:.3f} | {r['measured_speedup']:.3f} | "
                         f"{r['speedup_error']:+.1%} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    assets = Path(os.environ.get("RAPID_HF_ASSETS", HERE.parents[1].parent / "shared" / "assets"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=2, help="cost model + validation repeats per batch size")
    parser.add_argument("--timer", choices=["wall", "process"], default="process")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runtime", choices=["eager", "compile", "onnx"], default="eager",
                        help="where pieces and forwards run (compile/onnx: fewer rows, see COMPILED_R_VALUES)")
    parser.add_argument("--output", help="default: results.json (eager) or results_RUNTIME.json")
    parser.add_argument("--rescore", choices=["quadratic", "linear"],
                        help="no timing: recompute the predictions of --output's measurements under this fit")
    parser.add_argument("--without-anchors", action="store_true",
                        help="with --rescore: print the errors without the anchor forwards, write nothing")
    args = parser.parse_args()
    if args.without_anchors and not args.rescore:
        parser.error("--without-anchors only applies with --rescore")
    if args.output is None:
        args.output = str(HERE / ("results.json" if args.runtime == "eager" else f"results_{args.runtime}.json"))
    if args.rescore:
        output = Path(args.output)
        saved = json.loads(output.read_text())
        saved["results"] = [rescore(result, args.rescore, not args.without_anchors) for result in saved["results"]]
        if not args.without_anchors:
            output.write_text(json.dumps(saved, indent=2) + "\n")
            output.with_suffix(".md").write_text(markdown(saved["results"], saved["command"]))
        for result in saved["results"]:
            print(f"batch {result['machine']['batch_size']} repeat {result['repeat']} ({args.rescore}): MAE latency "
                  f"{result['mae']:.1%}, speed-up {result['mae_speedup']:.1%}")
        return
    command = "RAPID_HF_ASSETS=../shared/assets python experiments/latency_model/run.py " + " ".join(sys.argv[1:])
    model = RapidViTForImageClassification.from_pretrained(assets / "deit-tiny-imagenet").eval()
    results = []
    for repeat in range(args.repeats):
        for batch in args.batch_sizes:
            started = time.perf_counter()
            latency_model = measure_latency_model(model, batch, args.threads, args.runtime,
                                                  rounds=ROUNDS["model"][batch], timer=args.timer, progress=True)
            model_seconds = time.perf_counter() - started
            records = validate_latency_model(model, latency_model, rows(args.runtime), ROUNDS["validate"][batch])
            results.append({
                "repeat": repeat + 1, "machine": latency_model.machine, "timer": args.timer,
                "model_rounds": ROUNDS["model"][batch], "validate_rounds": ROUNDS["validate"][batch],
                "model_seconds": model_seconds, "load_average": os.getloadavg()[0],
                "fit": latency_model.fit, **summary(records),
                "latency_model": latency_model.to_dict(), "records": records,
            })
            print(f"batch {batch} repeat {repeat + 1}: MAE latency {results[-1]['mae']:.1%} (drift-corrected "
                  f"{results[-1]['mae_corrected']:.1%}), speed-up "
                  f"{results[-1]['mae_speedup']:.1%}, stock {statistics.median([records[0]['measured_ms']]):.1f} ms",
                  flush=True)
            output = Path(args.output)
            output.write_text(json.dumps({"command": command, "results": results}, indent=2) + "\n")
            output.with_suffix(".md").write_text(markdown(results, command))


if __name__ == "__main__":
    main()
