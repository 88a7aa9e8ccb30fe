"""Does calibrated RAPID beat ToMe? Calibrate per reduction amount, then measure every method on held-apart images.

    python experiments/calibrated_vs_tome/compare_calibrated.py --model ../shared/assets/deit-tiny-imagenet \
        --data-dir ../shared/assets/imagenet-sample-dev --r 4,8,12,16,17
    python experiments/calibrated_vs_tome/compare_calibrated.py --replot   # redraw the picture from the records

For each r (and each matching output-token target whose solved schedule differs from the constant r) RAPID is
calibrated on the calibration rows (index % 5 == 0, first --num-images), then none / ToMe / ToFu /
RAPID defaults / RAPID with `switch_layer="auto"` / RAPID calibrated / crucial merging are evaluated on the
report rows (all the others) with the evaluation harness (`rapid_hf.evaluation.accuracy`). Writes the records
and checks as JSON, a Markdown table and a picture next to it, and the calibration logs to --calibration-log
(re-used on a later run with --reuse-calibration, so the table can be rebuilt without searching again).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rapid_hf.calibration import calibrate, layer_statistics, load_calibration_images
from rapid_hf.calibration.statistics import auto_switch_layer
from rapid_hf.evaluation.variants import Variant
from rapid_hf.reduction.config import RapidConfig
from rapid_hf.reduction.schedule import schedule_for_output_tokens, token_counts

HERE = Path(__file__).resolve().parent  # results are written beside this script
METHOD_COLUMNS = ("tome", "tofu", "rapid", "rapid-auto", "rapid-calibrated", "crucial")
# Crucial merging's crucial fraction, from an exploratory sweep of 0.05..1.0 on the calibration rows (r = 4, 8, 16).
CRUCIAL_RATIO = 0.6


def int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return values


def reduction_settings(r_values: list[int], num_tokens: int, num_layers: int, num_protected: int) -> list[dict]:
    """`{"r": r}` for each r, plus `{"output_tokens": n}` for its final token count when that target solves to
    different per-layer token counts (capped layers); identical counts would only repeat the same numbers."""
    settings: list[dict[str, int]] = []
    for r in r_values:
        settings.append({"r": r})
        counts = token_counts(num_tokens, [r] * num_layers, num_protected)
        target_schedule = schedule_for_output_tokens(num_tokens, num_layers, num_protected, counts[-1])
        if token_counts(num_tokens, target_schedule, num_protected) != counts:
            settings.append({"output_tokens": counts[-1]})
    return settings


def label_of(amount: dict[str, int]) -> str:
    return f"r={amount['r']}" if "r" in amount else f"out={amount['output_tokens']}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Hub id or local folder of a ViT/DeiT image classifier")
    parser.add_argument("--data-dir", help="imagefolder directory (images + metadata.csv)")
    parser.add_argument("--r", type=int_list, default=[4, 8, 12, 16, 17], help="tokens removed per layer")
    parser.add_argument("--num-images", type=int, default=100, help="calibration images (first N calibration rows)")
    parser.add_argument("--max-report-images", type=int, help="only the first N report rows (smoke runs)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--output", default=str(HERE / "beat_tome_deit_tiny.json"))
    parser.add_argument("--calibration-log", default=str(HERE / "calibration_deit_tiny.json"))
    parser.add_argument("--replot", action="store_true", help="only redraw the picture from --output's records")
    parser.add_argument("--reuse-calibration", action="store_true",
                        help="take the calibrated configs from --calibration-log instead of searching again")
    args = parser.parse_args(argv)
    if not args.replot and (args.model is None or args.data_dir is None):
        parser.error("--model and --data-dir are required (except with --replot)")
    return args


def calibrate_all(model: Any, pixel_values: Any, settings: list[dict], args: argparse.Namespace) -> dict[str, Any]:
    """Calibration logs per setting label (searched now, or read back with --reuse-calibration)."""
    path = Path(args.calibration_log)
    if args.reuse_calibration:
        logs = json.loads(path.read_text())["settings"]
        missing = [label_of(a) for a in settings if label_of(a) not in logs]
        if missing:
            raise SystemExit(f"{path} has no calibration for {missing}; run without --reuse-calibration")
        return logs
    logs = {}
    for amount in settings:
        result = calibrate(model, pixel_values, RapidConfig(method="rapid", switch_layer="auto", **amount),
                           batch_size=args.batch_size)
        logs[label_of(amount)] = result.to_dict()
        print(f"{label_of(amount)}: {json.dumps(result.rapid.to_dict())} calibration KL {result.fidelity.kl:.4f}",
              flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model": args.model, "data": args.data_dir, "num_images": len(pixel_values),
                                "command": "python " + " ".join(sys.argv), "settings": logs}, indent=2) + "\n")
    return logs


def variants_for(settings: list[dict], logs: dict[str, Any], auto_k: int) -> list[Variant]:
    variants = [Variant("none", RapidConfig(method="none"))]
    for amount in settings:
        variants += [Variant(method, RapidConfig(method=method, **amount)) for method in ("tome", "tofu", "rapid")]
        variants.append(Variant("rapid-auto", RapidConfig(method="rapid", switch_layer=auto_k, **amount)))
        variants.append(Variant("rapid-calibrated", RapidConfig.from_dict(logs[label_of(amount)]["rapid"])))
        variants.append(Variant("crucial", RapidConfig(method="crucial", importance_ratio=CRUCIAL_RATIO, **amount)))
    return variants


def agreement_delta_ci(predictions: Any, variants: list[Variant]) -> dict[str, list[float]]:
    """Per setting: paired-bootstrap 95% interval of calibrated RAPID's agreement minus ToMe's (same images)."""
    from rapid_hf.evaluation.accuracy import paired_bootstrap_ci

    agrees = predictions.ranks[:, 1:, 0] == predictions.ranks[:, :1, 0]
    tome = {v.setting: i for i, v in enumerate(variants) if v.label == "tome"}
    intervals = {}
    for position, variant in enumerate(variants):
        if variant.label == "rapid-calibrated":
            amount = {"r": variant.rapid.r} if variant.rapid.output_tokens is None else {
                "output_tokens": variant.rapid.output_tokens}
            _, low, high = paired_bootstrap_ci(agrees[:, position], agrees[:, tome[variant.setting]])
            intervals[label_of(amount)] = [low, high]
    return intervals


def checks(records: list[dict], settings: list[dict], agreement_ci: dict[str, list[float]]) -> dict[str, Any]:
    """Calibrated RAPID vs ToMe per setting, and the +3 top-1 check at the most aggressive setting ToMe passes."""
    by = {(rec["label"], rec["setting"]): rec for rec in records}
    per_setting = {}
    for amount in settings:
        label = label_of(amount)
        tome, calibrated = by[("tome", label)], by[("rapid-calibrated", label)]
        per_setting[label] = {
            "agreement_at_or_above_tome": calibrated["agreement"] >= tome["agreement"],
            "kl_at_or_below_tome": calibrated["kl"] <= tome["kl"],
            "delta_agreement": calibrated["agreement"] - tome["agreement"],
            "delta_agreement_ci95": agreement_ci[label],
            "delta_kl": calibrated["kl"] - tome["kl"],
            "delta_top1": calibrated["top1"] - tome["top1"],
            "delta_top1_ci95": calibrated["delta_top1_vs_tome_ci95"],
        }
    passing = [label_of(a) for a in settings if by[("tome", label_of(a))]["top1"] > 0.5]
    fewest = min(by[("tome", label)]["output_tokens"] for label in passing)
    aggressive = [label for label in passing if by[("tome", label)]["output_tokens"] == fewest]
    return {
        "per_setting": per_setting,
        "wins_everywhere": all(c["agreement_at_or_above_tome"] and c["kl_at_or_below_tome"]
                               for c in per_setting.values()),
        "most_aggressive_with_tome_above_50": aggressive,
        "plus_3_top1_there": {label: per_setting[label]["delta_top1"] >= 0.03 for label in aggressive},
    }


def markdown(records: list[dict], settings: list[dict], logs: dict[str, Any], result_checks: dict, meta: dict) -> str:
    by = {(rec["label"], rec["setting"]): rec for rec in records}
    none = by[("none", "-")]
    lines = [
        f"# Calibrated RAPID vs ToMe, ToFu, crucial merging — {meta['model']}",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Report rows: {none['n_samples']} images (index % 5 != 0) of `{meta['data']}`; calibration: the first "
        f"{meta['num_images']} calibration rows (index % 5 == 0), never reported. Unreduced top-1 "
        f"{100 * none['top1']:.2f}%. rapid = paper defaults (K=4, tau 0.7, rho 0.2, lambda 50); rapid-auto = "
        f"defaults with `switch_layer=\"auto\"` (resolved to K={meta['auto_switch_layer']}); rapid-calibrated = "
        "`rapid-hf calibrate` search per row; crucial = crucial-token merging (crucial fraction "
        f"{CRUCIAL_RATIO}).",
        "",
    ]
    for metric, title, fmt in (
        ("top1", "Top-1 accuracy (%)", lambda v: f"{100 * v:.2f}"),
        ("agreement", "Top-1 agreement with the unreduced model (%)", lambda v: f"{100 * v:.2f}"),
        ("kl", "KL(unreduced || reduced), nats (lower is better)", lambda v: f"{v:.4f}"),
    ):
        columns = list(METHOD_COLUMNS)
        lines += [f"## {title}", "", "| setting | out tokens | " + " | ".join(columns) + " |",
                  "|---|---|" + "---|" * len(columns)]
        for amount in settings:
            label = label_of(amount)
            cells = [fmt(by[(m, label)][metric]) for m in columns]
            lines.append(f"| {label} | {by[('tome', label)]['output_tokens']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Calibrated RAPID vs ToMe on the report rows", "",
              "| setting | K | tau | lambda | merge | calibration KL: start → chosen | Δ agreement [95% CI] | Δ KL "
              "| Δ top-1 [95% CI] |",
              "|---|---|---|---|---|---|---|---|---|"]
    for amount in settings:
        label = label_of(amount)
        log, check = logs[label], result_checks["per_setting"][label]
        chosen = log["rapid"]
        low, high = check["delta_top1_ci95"]
        agreement_low, agreement_high = check["delta_agreement_ci95"]
        lines.append(
            f"| {label} | {chosen['switch_layer']} | {chosen['prune_threshold']} | {chosen['importance_weight']} | "
            f"{chosen['merge_mode'] or 'mean'} | {log['start_fidelity']['kl']:.4f} → {log['fidelity']['kl']:.4f} | "
            f"{100 * check['delta_agreement']:+.2f} [{100 * agreement_low:+.2f}, {100 * agreement_high:+.2f}] | "
            f"{check['delta_kl']:+.4f} | "
            f"{100 * check['delta_top1']:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}] |"
        )
    aggressive = result_checks["most_aggressive_with_tome_above_50"]
    lines += [
        "",
        f"- Calibrated RAPID at or above ToMe on agreement and KL at every setting: "
        f"**{'yes' if result_checks['wins_everywhere'] else 'no'}**"
        + ("" if result_checks["wins_everywhere"] else " (rows with Δ agreement < 0 or Δ KL > 0 above)") + ".",
        f"- Most aggressive setting(s) where ToMe keeps top-1 > 50%: {', '.join(aggressive)}; calibrated RAPID "
        "+3 points of top-1 there: "
        + ", ".join(f"{label} **{'yes' if ok else 'no'}** "
                    f"({100 * result_checks['per_setting'][label]['delta_top1']:+.2f})"
                    for label, ok in result_checks["plus_3_top1_there"].items()) + ".",
        "",
    ]
    return "\n".join(lines)


def plot(records: list[dict], settings: list[dict], path: Path) -> None:
    """Top-1, agreement and KL against r, one line per row label in its method's colour (the package's map)."""
    import matplotlib

    from rapid_hf.visualization import method_colour

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(rec["label"], rec["setting"]): rec for rec in records}
    r_settings = [a for a in settings if "r" in a]
    xs = [a["r"] for a in r_settings]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for axis, (metric, title) in zip(axes, (("top1", "top-1 accuracy (%)"), ("agreement", "agreement (%)"),
                                            ("kl", "KL(unreduced || reduced)")), strict=True):
        for method in METHOD_COLUMNS:
            values = [by[(method, label_of(a))][metric] for a in r_settings]
            values = values if metric == "kl" else [100 * v for v in values]
            base_method, _, variant = method.partition("-")  # rapid-auto / rapid-calibrated: RAPID's colour, dashed
            axis.plot(xs, values, marker="o", label=method, color=method_colour(base_method),
                      linestyle={"": "-", "auto": ":", "calibrated": "--"}[variant],
                      linewidth=2.2 if method == "rapid-calibrated" else 1.2)
        if metric == "kl":
            axis.set_yscale("log")
        axis.set(xlabel="r (tokens removed per layer)", title=title, xticks=xs)
        axis.grid(alpha=0.3)
    axes[0].axhline(100 * by[("none", "-")]["top1"], color=method_colour("none"), linestyle="--",
                    label="none (unreduced)")
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def replot(output: Path) -> None:
    """Redraw the picture from the records saved in `output` (no model run)."""
    records = json.loads(output.read_text())["records"]
    settings = [{"r": int(label[2:])} for label in dict.fromkeys(rec["setting"] for rec in records)
                if label.startswith("r=")]
    plot(records, settings, output.with_suffix(".png"))


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoImageProcessor

    from rapid_hf.evaluation.accuracy import predict, summarize
    from rapid_hf.evaluation.data import DataSpec, load_rows, make_dataloader
    from rapid_hf.evaluation.loading import load_rapid_model
    from rapid_hf.evaluation.metrics import load_metric
    from rapid_hf.evaluation.report import setting

    args = parse_args(argv)
    if args.replot:
        replot(Path(args.output))
        return
    load_metric("top_k_accuracy")  # fail now, not after the long runs, if the harness cannot score
    model = load_rapid_model(args.model)
    processor = AutoImageProcessor.from_pretrained(args.model)
    settings = reduction_settings(
        args.r, model.num_input_tokens, model.config.num_hidden_layers, model.num_protected_tokens
    )

    pixel_values, _ = load_calibration_images(processor, data_dir=args.data_dir, num_images=args.num_images)
    logs = calibrate_all(model, pixel_values, settings, args)
    auto_k = auto_switch_layer(layer_statistics(model, pixel_values).redundant_fraction)

    rows = load_rows(DataSpec(data_dir=args.data_dir, subset="report", max_samples=args.max_report_images))
    loader = make_dataloader(rows, processor, args.batch_size, num_workers=0)
    variants = variants_for(settings, logs, auto_k)
    predictions = predict(model, loader, variants)
    context = {"model": args.model, "dataset": args.data_dir, "split": "train", "subset": "report"}
    records = [{**rec, "setting": setting(rec)} for rec in summarize(predictions, variants, **context)]
    result_checks = checks(records, settings, agreement_delta_ci(predictions, variants))
    meta = {"model": args.model, "data": args.data_dir, "num_images": len(pixel_values),
            "auto_switch_layer": auto_k, "command": "python " + " ".join(sys.argv)}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({**meta, "checks": result_checks, "records": records}, indent=2) + "\n")
    output.with_suffix(".md").write_text(markdown(records, settings, logs, result_checks, meta))
    plot(records, settings, output.with_suffix(".png"))
    print(output.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
