"""RAPID against the best training-free baseline at each setting, from the stored per-photo predictions.

    python experiments/pooled_comparison/best_baseline.py --model ../shared/assets/deit-tiny-imagenet \
        --data ../shared/assets/imagenet-sample-dev ../shared/assets/imagenet-val-dev

Reads predictions_<set>_<part>.npz of the "fixed", "calibrated" and "baselines" passes (run.py; nothing is run
again, the model is loaded only for its FLOP count) and pools the 904 report photos of both sets. At each setting
the best baseline is the one with the lowest mean KL(unreduced || reduced) among ToMe, ToFu, crucial merging,
PiToMe and top-k fusion on those photos; each RAPID row (paper defaults, auto K, calibrated: the KL search's
choice on the calibration photos) is compared with it by paired-bootstrap 95% intervals (10,000 resamples) of
the per-photo differences in top-1, agreement with the unreduced model and KL.

Writes results_best_baseline.md / .json here, and results/best_baseline.md (the short table) and
results/pareto_methods.png (top-1 and agreement against GFLOPs, one line per method) at the repository root.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT), str(HERE)]

from run import (  # noqa: E402
    SETTINGS,
    calibration_path,
    joined,
    label_of,
    load_predictions,
    pooled,
    predictions_path,
    relative,
    setting_of,
    variants_for,
)

from rapid_hf.evaluation.accuracy import paired_bootstrap_ci, summarize  # noqa: E402
from rapid_hf.evaluation.flops import model_flops  # noqa: E402
from rapid_hf.evaluation.loading import load_rapid_model  # noqa: E402
from rapid_hf.evaluation.pareto import pareto_points  # noqa: E402
from rapid_hf.visualization import METHOD_COLOURS  # noqa: E402

PARTS_USED = ("fixed", "calibrated", "baselines")
BASELINES = ("tome", "tofu", "crucial", "pitome", "topk")
RAPID_ROWS = ("rapid", "rapid-auto", "rapid-calibrated")
# rapid_hf.visualization has no colour for the two new methods yet: PiToMe red, top-k brown (matplotlib's tab10,
# after the package's blue / orange / green / purple).
COLOURS = {**METHOD_COLOURS, "pitome": "#d62728", "topk": "#8c564b"}
PROPOSAL = "## Proposed README paragraph"
NAMES = {"tome": "ToMe", "tofu": "ToFu", "crucial": "crucial", "pitome": "PiToMe", "topk": "top-k",
         "rapid": "RAPID (defaults)", "rapid-auto": "RAPID auto K", "rapid-calibrated": "RAPID calibrated"}


def interval(values: tuple[float, float, float], scale: float, digits: int) -> str:
    delta, low, high = (scale * v for v in values)
    tie = " (tie)" if low <= 0 <= high else ""
    return f"{delta:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]{tie}"


def verdict(name: str, values: tuple[float, float, float]) -> str:
    """Who wins on this measure: RAPID, the baseline, or nobody (interval contains 0)."""
    _, low, high = values
    better_when_higher = name != "kl"
    if low > 0:
        return "RAPID" if better_when_higher else "baseline"
    if high < 0:
        return "baseline" if better_when_higher else "RAPID"
    return "tie"


def figure(records: list[dict[str, Any]], path: Path) -> None:
    """Top-1 and agreement against GFLOPs (2 per multiply-add), one line per method, the unreduced model a point."""
    from matplotlib.figure import Figure

    shown = [r for r in records if r["setting"] != "out=8" and r["label"] in ("none", *BASELINES, *RAPID_ROWS)]
    bench = [{**r, "throughput": 0.0} for r in shown]
    figure = Figure(figsize=(12, 5), layout="constrained")
    axes = figure.subplots(1, 2)
    for axis, key, title in ((axes[0], "top1", "top-1 accuracy (%)"),
                             (axes[1], "agreement", "agreement with the unreduced model (%)")):
        curves = pareto_points([{**r, "top1": r[key]} for r in shown], bench)
        for label in (*BASELINES, *RAPID_ROWS):
            points = [p for p in curves[label] if p["setting"] != "full"]
            style = {"rapid": "-", "rapid-auto": ":", "rapid-calibrated": "--"}.get(label, "-")
            axis.plot([p["gflops"] for p in points], [p["top1"] for p in points], marker="o", markersize=4,
                      linestyle=style, color=COLOURS["rapid" if label.startswith("rapid") else label],
                      label=NAMES[label], linewidth=2.2 if label == "rapid-calibrated" else 1.4)
        full = next(p for points in curves.values() for p in points if p["setting"] == "full")
        axis.plot([full["gflops"]], [full["top1"]], marker="*", markersize=14, color=COLOURS["none"],
                  linestyle="none", label="unreduced")
        for p in curves["tome"]:
            if p["setting"] != "full":
                axis.annotate(p["setting"], (p["gflops"], p["top1"]), fontsize=7, xytext=(2, -10),
                              textcoords="offset points", color="#666666")
        axis.set_xlabel("GFLOPs per image (2 per multiply-add)")
        axis.set_ylabel(title)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    figure.suptitle("DeiT-Tiny, 904 report photos (two ImageNet dev sets); r = 4, 8, 12, 16, 17 per layer")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", nargs="+", required=True)
    args = parser.parse_args()
    calibrations = {"kl": json.loads(calibration_path("kl").read_text())}
    chosen = {label: "rapid-calibrated-" + entry["chosen_reading"]
              for label, entry in calibrations["kl"]["settings"].items()}
    variants = [v for part in PARTS_USED for v in variants_for(calibrations, part)]
    sets = [joined([load_predictions(predictions_path(folder, part)) for part in PARTS_USED]) for folder in args.data]
    predictions = pooled(sets)
    records = summarize(predictions, variants, dataset="pooled", subset="report")
    model = load_rapid_model(args.model)
    columns: dict[tuple[str, str], int] = {}
    for position, (variant, record) in enumerate(zip(variants, records, strict=True)):
        record["setting"] = setting_of(variant)
        record["gflops"] = model_flops(model, record["token_counts"], variant.rapid).total / 1e9
        columns[(record["label"], record["setting"])] = position
    for label, reading in chosen.items():  # the calibrated row: the reading the search chose at that setting
        columns[("rapid-calibrated", label)] = columns[(reading, label)]
        records.append({**records[columns[(reading, label)]], "label": "rapid-calibrated", "same_as": reading})
    per_photo = {
        "top1": predictions.ranks[:, 1:, 0] == predictions.labels[:, None],
        "agreement": predictions.ranks[:, 1:, 0] == predictions.ranks[:, :1, 0],
        "kl": predictions.kl,
    }
    by = {(r["label"], r["setting"]): r for r in records}
    comparisons = []
    for amount in SETTINGS:
        setting = label_of(amount)
        best = min(BASELINES, key=lambda b: by[(b, setting)]["kl"])
        for row in RAPID_ROWS:
            entry = {"setting": setting, "rapid_row": row, "best_baseline": best,
                     "rapid_config": by[(row, setting)]["rapid"]}
            for name, values in per_photo.items():
                ci = paired_bootstrap_ci(values[:, columns[(row, setting)]], values[:, columns[(best, setting)]])
                entry[name] = {"rapid": by[(row, setting)][name], "baseline": by[(best, setting)][name],
                               "difference_ci95": list(ci), "winner": verdict(name, ci)}
            comparisons.append(entry)
    command = "python " + " ".join([relative(Path(sys.argv[0]).resolve()), *sys.argv[1:]])
    keep = ("label", "method", "setting", "output_tokens", "gflops", "top1", "agreement", "kl", "rapid", "same_as")
    results = {"command": command, "photos": int(predictions.labels.size), "baselines": list(BASELINES),
               "records": [{k: r[k] for k in keep if k in r} for r in records], "comparisons": comparisons}
    (HERE / "results_best_baseline.json").write_text(json.dumps(results, indent=2) + "\n")
    write_tables(results, by)
    figure(records, ROOT / "results" / "pareto_methods.png")


def write_tables(results: dict[str, Any], by: dict[tuple[str, str], dict[str, Any]]) -> None:
    unreduced = by[("none", "none")]
    intro = (f"DeiT-Tiny on the 904 report photos of the two dev sets (pooled; the 226 calibration photos chose the "
             f"calibrated configs and nothing else). Unreduced: top-1 {100 * unreduced['top1']:.2f}%, "
             f"{unreduced['gflops']:.2f} GFLOPs (2 per multiply-add). Best baseline = lowest KL among "
             f"{', '.join(NAMES[b] for b in BASELINES)} at that setting; differences are RAPID minus it, with "
             "paired-bootstrap 95% intervals; (tie) = the interval contains 0.")
    lines = ["# RAPID against the best training-free baseline at each setting", "", f"Command: `{results['command']}`",
             "", intro, "", "## Every baseline (pooled report photos)", "",
             "| setting | out tokens | " + " | ".join(f"{NAMES[b]} top-1 / agr. / KL" for b in BASELINES)
             + " | best (lowest KL) |", "|---|---|" + "---|" * (len(BASELINES) + 1)]
    for amount in SETTINGS:
        setting = label_of(amount)
        best = min(BASELINES, key=lambda b: by[(b, setting)]["kl"])
        cells = [f"{100 * by[(b, setting)]['top1']:.2f} / {100 * by[(b, setting)]['agreement']:.2f} / "
                 f"{by[(b, setting)]['kl']:.4f}" for b in BASELINES]
        lines.append(f"| {setting} | {by[('tome', setting)]['output_tokens']} | " + " | ".join(cells)
                     + f" | {NAMES[best]} |")
    lines += ["", "## Each RAPID row against the best baseline", "",
              "| setting | best baseline | RAPID row | RAPID top-1 / agr. / KL | Δ top-1 (pts) | Δ agreement (pts) | "
              "Δ KL |", "|---|---|---|---|---|---|---|"]
    for c in results["comparisons"]:
        lines.append(
            f"| {c['setting']} | {NAMES[c['best_baseline']]} | {NAMES[c['rapid_row']]} | "
            f"{100 * c['top1']['rapid']:.2f} / {100 * c['agreement']['rapid']:.2f} / {c['kl']['rapid']:.4f} | "
            f"{interval(c['top1']['difference_ci95'], 100, 2)} | {interval(c['agreement']['difference_ci95'], 100, 2)}"
            f" | {interval(c['kl']['difference_ci95'], 1, 4)} |")
    wins = [f"{c['setting']} {NAMES[c['rapid_row']]}: {NAMES[c['best_baseline']]} ahead on {name}"
            for c in results["comparisons"] for name in ("top1", "agreement", "kl")
            if c[name]["winner"] == "baseline"]
    lines += ["", "## Where a baseline wins (interval entirely on the baseline's side)", ""]
    lines += [f"- {w}" for w in wins] or ["- nowhere"]
    (HERE / "results_best_baseline.md").write_text("\n".join(lines) + "\n")

    short = ["# Calibrated RAPID against the best training-free baseline", "", intro, "",
             "| setting | out tokens | best baseline: top-1 / agreement / KL | calibrated RAPID: top-1 / agreement / "
             "KL | Δ top-1 (pts) | Δ agreement (pts) | Δ KL |", "|---|---|---|---|---|---|---|"]
    for c in results["comparisons"]:
        if c["rapid_row"] != "rapid-calibrated":
            continue
        short.append(
            f"| {c['setting']} | {by[('tome', c['setting'])]['output_tokens']} | {NAMES[c['best_baseline']]}: "
            f"{100 * c['top1']['baseline']:.2f} / {100 * c['agreement']['baseline']:.2f} / "
            f"{c['kl']['baseline']:.4f} | {100 * c['top1']['rapid']:.2f} / {100 * c['agreement']['rapid']:.2f} / "
            f"{c['kl']['rapid']:.4f} | {interval(c['top1']['difference_ci95'], 100, 2)} | "
            f"{interval(c['agreement']['difference_ci95'], 100, 2)} | {interval(c['kl']['difference_ci95'], 1, 4)} |")
    short += ["", "![top-1 and agreement against GFLOPs](pareto_methods.png)", "",
              "Picture (`pareto_methods.png`): colours as in `rapid_hf/visualization.py` (RAPID blue: defaults solid, "
              "auto K dotted, calibrated dashed; ToMe orange; ToFu green; crucial purple), PiToMe red (#d62728) and "
              "top-k brown (#8c564b); the unreduced model is the grey star; the 8-output-token schedule (`out=8`) "
              "is left out of the lines (same GFLOPs as r = 17). Full tables: "
              "`experiments/pooled_comparison/results_best_baseline.md` and `results.md`.", "",
              "Command (from the stored per-photo predictions; the `baselines` pass first, see "
              "`experiments/pooled_comparison/README.md`):", "", "```bash", results["command"], "```"]
    path = ROOT / "results" / "best_baseline.md"
    kept = ""  # the hand-written proposal below the tables survives a re-run
    if path.is_file() and PROPOSAL in path.read_text():
        kept = "\n" + path.read_text()[path.read_text().index(PROPOSAL):]
    path.write_text("\n".join(short) + "\n" + kept)


if __name__ == "__main__":
    main()
