"""Every method on both dev sets, per set and pooled, with the calibration photos held apart from the reported ones.

    python experiments/pooled_comparison/run.py --model ../shared/assets/deit-tiny-imagenet \
        --data ../shared/assets/imagenet-sample-dev ../shared/assets/imagenet-val-dev --stage all

Rows with index % 5 == 0 of each set calibrate (100 + 126 = 226 photos), all the others report (400 + 504 = 904).
Stage "calibrate" chooses, on the calibration rows of both sets together, RAPID's `switch_layer="auto"` (the
token-statistics rule) and the calibrated configs (`rapid_hf.calibration.calibrate`, timed per setting), and writes
calibration.json; with `--objective agreement` the search maximises top-1 agreement instead of minimising KL and
writes calibration_agreement.json (its choice is the row "rapid-calibrated-agreement"), with `--objective top1_nll`
it minimises the cross-entropy against the unreduced top-1 class (calibration_top1_nll.json,
"rapid-calibrated-top1-nll"); with `--importance-source per_patch` the KL search runs with that source of
importance fixed and writes calibration_per_patch.json (rows "rapid-per-patch", paper defaults, and
"rapid-calibrated-per-patch").
Stage "evaluate" runs none, ToMe, ToFu, RAPID (defaults, auto K, calibrated by each search), crucial merging and
RAPID's "protect" reading of rho (defaults and calibrated) on the report rows with `rapid_hf.evaluation.accuracy`
(`predict`, `summarize`), at r = 4, 8, 12, 16, 17 and 8 output tokens, and writes results.json / results.md: top-1,
agreement with the unreduced model, KL(unreduced || reduced), and paired-bootstrap 95% intervals of each method's
difference from ToMe (top-1, agreement, KL) per set and pooled.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE)]  # this checkout's rapid_hf, then photos.py

from photos import pixel_rows, rows_of  # noqa: E402
from tie_break import similarity_tie_prune_plan  # noqa: E402

import rapid_hf.reduction.steps as steps  # noqa: E402
from rapid_hf.calibration import calibrate, layer_statistics  # noqa: E402
from rapid_hf.calibration.search import OBJECTIVES  # noqa: E402
from rapid_hf.calibration.statistics import auto_switch_layer  # noqa: E402
from rapid_hf.evaluation.accuracy import Predictions, paired_bootstrap_ci, predict, summarize  # noqa: E402
from rapid_hf.evaluation.data import make_dataloader  # noqa: E402
from rapid_hf.evaluation.fidelity import kl_divergence  # noqa: E402
from rapid_hf.evaluation.loading import load_rapid_model  # noqa: E402
from rapid_hf.evaluation.variants import Variant  # noqa: E402
from rapid_hf.reduction.config import RapidConfig  # noqa: E402

SETTINGS: list[dict[str, int]] = [{"r": 4}, {"r": 8}, {"r": 12}, {"r": 16}, {"r": 17}, {"output_tokens": 8}]
# Crucial merging's crucial fraction (chosen earlier on the sample set's calibration rows; results/README.md).
CRUCIAL_RATIO = 0.6
# The calibration search: one coordinate-search round minimising KL on the calibration rows, over the literal
# reading's knobs first (K, lambda, merge rule, tau), then the reading of rho (importance_mode) and rho. It starts
# from K = 2, lambda = 10, MLERP (what the earlier search chose at r = 16 and 17 on the sample set's calibration
# rows), and from ToMe when ToMe scores better. About 15 trials on 226 photos: less work than the earlier search
# (44 trials on 100 photos at r = 16), timed against it by search_time.py.
START: dict[str, Any] = {"switch_layer": 2, "importance_weight": 10.0, "merge_mode": "mlerp"}
SEARCH: dict[str, Any] = {
    "searched": ["switch_layer", "importance_weight", "merge_mode", "prune_threshold", "importance_mode",
                 "importance_ratio"],
    "grid": {
        "switch_layer": [0, 1, 2, 3, 4],
        "importance_weight": [0.0, 10.0, 25.0, 50.0],
        "merge_mode": ["mean", "mlerp"],
        "prune_threshold": [0.7, 0.8, 0.9],
        "importance_mode": ["shift", "protect"],
        "importance_ratio": [0.1, 0.2, 0.3],
    },
    "max_rounds": 1,
}
# The row of each search run with another objective than KL (same start, grid and photos).
OBJECTIVE_ROWS = {"agreement": "rapid-calibrated-agreement", "top1_nll": "rapid-calibrated-top1-nll"}
METHOD_ORDER = ["none", "tome", "tofu", "rapid", "rapid-auto", "rapid-calibrated", "rapid-calibrated-shift",
                "rapid-calibrated-protect", *OBJECTIVE_ROWS.values(), "rapid-per-patch",
                "rapid-calibrated-per-patch", "crucial", "rapid-protect", "pitome", "topk"]
# The training-free baselines added after the first passes (their own pass, "baselines"): PiToMe (paper form)
# and top-k fusion (EViT-style), library defaults (docs/METHOD.md, "PiToMe and top-k pruning").
BASELINE_ROWS = ("pitome", "topk")


def label_of(amount: dict[str, int]) -> str:
    return f"r={amount['r']}" if "r" in amount else f"out={amount['output_tokens']}"


def relative(path: str | Path) -> str:
    """A path as given on the command line, or relative to the repository root: no machine paths in outputs."""
    path = Path(path)
    return path.as_posix() if not path.is_absolute() else path.resolve().relative_to(HERE.parents[1]).as_posix()


def command_line() -> str:
    return "python " + " ".join([relative(Path(sys.argv[0]).resolve()), *sys.argv[1:]])


def calibration_path(variant: str) -> Path:
    """calibration.json for the KL search, calibration_<variant>.json for the others."""
    return HERE / ("calibration.json" if variant == "kl" else f"calibration_{variant}.json")


def search_variant(args: argparse.Namespace) -> str:
    """Which calibration search a calibrate stage runs: its objective, or "per_patch"."""
    if args.importance_source == "per_patch":
        if args.objective != "kl":
            raise SystemExit("--importance-source per_patch runs the KL search: drop --objective")
        return "per_patch"
    return args.objective


def run_calibration(model: Any, image_processor: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Auto K and the calibrated configs, all chosen on the calibration rows of every set (timed)."""
    pixels, _, where = pixel_rows(args.data, "calibration", image_processor, args.batch_size)
    started = time.perf_counter()
    statistics = layer_statistics(model, pixels, prune_threshold=0.7, batch_size=args.batch_size)
    auto_k = auto_switch_layer(statistics.redundant_fraction)
    log: dict[str, Any] = {
        "command": command_line(),
        "calibration_rows": {name: sum(1 for n, _ in where if n == name) for name in dict(where)},
        "auto_switch_layer": auto_k,
        "auto_seconds": round(time.perf_counter() - started, 1),
        "start": START,
        "search": SEARCH,
        "objective": args.objective,
        "torch_threads": torch.get_num_threads(),
        "settings": {},
    }
    for amount in SETTINGS:
        start = RapidConfig(method="rapid", **START, importance_source=args.importance_source, **amount)
        result = calibrate(model, pixels, start, batch_size=args.batch_size, progress=False,
                           objective=args.objective, **SEARCH)
        entry: dict[str, Any] = {"seconds": round(result.seconds, 1), "num_trials": len(result.trials),
                                 "images": len(pixels), "chosen": result.rapid.to_dict(),
                                 "kl": result.fidelity.kl, "agreement": result.fidelity.agreement}
        for mode in ("shift", "protect"):  # the best config of each reading of rho among the trials
            trials = [t for t in result.trials if t.settings["importance_mode"] == mode]
            best = min(trials, key=lambda t: t.fidelity.order_key(args.objective))
            entry[f"best_{mode}"] = {"rapid": start.replace(**best.settings).to_dict(), "kl": best.kl,
                                     "agreement": best.agreement}
        entry["chosen_reading"] = result.rapid.importance_mode
        log["settings"][label_of(amount)] = entry
        print(f"{label_of(amount)}: {json.dumps(entry)}", flush=True)
        calibration_path(search_variant(args)).write_text(json.dumps(log, indent=2) + "\n")
    return log


PARTS = ("fixed", "calibrated", *OBJECTIVE_ROWS, "per_patch", "baselines")
SEARCHES = ("kl", *OBJECTIVE_ROWS, "per_patch")


def variants_for(calibrations: dict[str, dict[str, Any]], part: str) -> list[Variant]:
    """The rows of one part: "fixed" (need nothing but auto K), "calibrated" (the best config of each reading
    of rho found by the KL search), an objective of `OBJECTIVE_ROWS` (the choice of that search), "per_patch"
    or "baselines" (PiToMe and top-k fusion).
    The parts run as separate passes so the first can start while calibrating."""
    calibration = calibrations["kl"]
    auto_k = calibration["auto_switch_layer"]
    variants = [Variant("none", RapidConfig(method="none"))] if part == "fixed" else []
    for amount in SETTINGS:
        if part == "fixed":
            variants += [Variant(m, RapidConfig(method=m, **amount)) for m in ("tome", "tofu", "rapid")]
            variants += [
                Variant("rapid-auto", RapidConfig(method="rapid", switch_layer=auto_k, **amount)),
                Variant("crucial", RapidConfig(method="crucial", importance_ratio=CRUCIAL_RATIO, **amount)),
                Variant("rapid-protect", RapidConfig(method="rapid", importance_mode="protect", **amount)),
            ]
        elif part in OBJECTIVE_ROWS:
            chosen = calibrations[part]["settings"][label_of(amount)]["chosen"]
            variants.append(Variant(OBJECTIVE_ROWS[part], RapidConfig.from_dict(chosen)))
        elif part == "baselines":
            variants += [Variant(m, RapidConfig(method=m, **amount)) for m in BASELINE_ROWS]
        elif part == "per_patch":
            chosen = calibrations["per_patch"]["settings"][label_of(amount)]["chosen"]
            variants += [
                Variant("rapid-per-patch", RapidConfig(method="rapid", importance_source="per_patch", **amount)),
                Variant("rapid-calibrated-per-patch", RapidConfig.from_dict(chosen)),
            ]
        else:
            chosen = calibration["settings"][label_of(amount)]
            variants += [
                Variant("rapid-calibrated-shift", RapidConfig.from_dict(chosen["best_shift"]["rapid"])),
                Variant("rapid-calibrated-protect", RapidConfig.from_dict(chosen["best_protect"]["rapid"])),
            ]
    return variants


def with_calibrated_rows(records: list[dict[str, Any]], calibration: dict[str, Any]) -> list[dict[str, Any]]:
    """Add "rapid-calibrated": the row of the reading the KL search chose (on the calibration photos)."""
    added = []
    for record in records:
        added.append(record)
        label = record["setting"]
        if label in calibration["settings"] and record["label"] == "rapid-calibrated-" + calibration[
                "settings"][label]["chosen_reading"]:
            added.append({**record, "label": "rapid-calibrated", "same_as": record["label"]})
    return added


def setting_of(variant: Variant) -> str:
    rapid = variant.rapid
    return "none" if rapid.method == "none" else label_of(
        {"output_tokens": rapid.output_tokens} if rapid.output_tokens is not None else {"r": rapid.r})


def predictions_path(folder: str, part: str) -> Path:
    return HERE / f"predictions_{Path(folder).name}_{part}.npz"


def load_predictions(path: Path) -> Predictions:
    saved = np.load(path, allow_pickle=False)
    return Predictions(index=saved["index"], labels=saved["labels"], ranks=saved["ranks"], kl=saved["kl"],
                       token_counts=[tuple(row[row >= 0].tolist()) for row in saved["token_counts"]])


def predict_part(model: Any, image_processor: Any, folder: str, variants: list[Variant], part: str, args) -> None:
    """Per-image outputs of `variants` on the report rows of one set, saved for the tables."""
    loader = make_dataloader(rows_of(folder, "report"), image_processor, args.batch_size, num_workers=0)
    started = time.perf_counter()
    result = predict(model, loader, variants)
    width = max(len(counts) for counts in result.token_counts)
    counts = np.array([list(c) + [-1] * (width - len(c)) for c in result.token_counts])
    np.savez_compressed(predictions_path(folder, part), index=result.index, labels=result.labels,
                        ranks=result.ranks, kl=result.kl, token_counts=counts)
    print(f"{Path(folder).name} {part}: {len(result.index)} photos in {time.perf_counter() - started:.0f} s",
          flush=True)


class _PruningDone(Exception):
    """Raised before the first merging layer: every eq. (1) plan of the forward has been built."""


def tie_rule_moved(model: Any, pixels: torch.Tensor, rapid: RapidConfig, batch_size: int) -> np.ndarray:
    """Per photo: does the eq. (1) tie rule change any pruning plan of `rapid` on it?

    Runs only RAPID's pruning layers (0..K-1, stopped before layer K) with the library's plan (ties by index) and,
    at each of them, also builds the plan of the rule the stored predictions were made with (ties by highest
    similarity, then index; tie_break.py). Where the two remove the same tokens in every pruning layer, the whole
    forward is the one the stored predictions came from."""
    switch = rapid.resolved_switch_layer(len(model.vit.layers))
    moved = np.zeros(len(pixels), dtype=bool)
    if switch == 0:
        return moved
    library_plan = steps.redundancy_prune_plan
    flags: list[torch.Tensor] = []

    def both_rules(scores: torch.Tensor, r: int, num_protected: int, threshold: float) -> Any:
        plan = library_plan(scores, r, num_protected, threshold)
        old = similarity_tie_prune_plan(scores, r, num_protected, threshold)
        flags.append((plan.removed.sort(dim=-1).values != old.removed.sort(dim=-1).values).any(dim=-1))
        return plan

    def stop(*_: Any) -> None:
        raise _PruningDone

    hook = model.vit.layers[switch].register_forward_pre_hook(stop) if switch < len(model.vit.layers) else None
    steps.redundancy_prune_plan = both_rules
    try:
        with torch.inference_mode():
            for first in range(0, len(pixels), batch_size):
                flags.clear()
                with contextlib.suppress(_PruningDone):
                    model(pixel_values=pixels[first:first + batch_size], rapid=rapid)
                if flags:
                    moved[first:first + batch_size] = torch.stack(flags).any(dim=0).numpy()
    finally:
        steps.redundancy_prune_plan = library_plan
        if hook is not None:
            hook.remove()
    return moved


def rerun_rapid_rows(model: Any, image_processor: Any, folder: str, calibrations: dict[str, dict[str, Any]],
                     args: argparse.Namespace) -> dict[str, Any]:
    """Part "rapid": every RAPID row of every saved part (method "rapid": defaults, auto K, protect, the calibrated
    configs of each stored search, per patch) with the current eq. (1) tie rule, on the report rows of one set,
    written in place of its saved columns; the other rows keep their saved predictions, and the stored
    calibration choices are used as they are (no search). The tie rule acts only in RAPID's pruning layers, so
    each row first runs those layers on every photo (`tie_rule_moved`); the photos where the rule changes a plan
    are run again in full (top-5 and KL against the unreduced model), the others keep their saved outputs, which
    are the current code's. Returns, per row, the photos run again and how many changed."""
    started = time.perf_counter()
    pixels, _, where = pixel_rows([folder], "report", image_processor, args.batch_size)
    rows = np.array([row for _, row in where])
    reference: dict[int, torch.Tensor] = {}
    summary: dict[str, Any] = {}
    for part in PARTS:
        variants = variants_for(calibrations, part)
        columns = [i for i, v in enumerate(variants) if v.rapid.method == "rapid"]
        if not columns:
            continue
        path = predictions_path(folder, part)
        saved = {key: value.copy() for key, value in np.load(path, allow_pickle=False).items()}
        if not np.array_equal(saved["index"], rows):
            raise ValueError(f"{path.name} covers other photos than this pass")
        for column in columns:
            variant = variants[column]
            moved = np.flatnonzero(tie_rule_moved(model, pixels, variant.rapid, args.batch_size))
            entry = {"switch_layer": variant.rapid.resolved_switch_layer(len(model.vit.layers)),
                     "photos_run_again": len(moved), "photos_top1_changed": 0, "photos_top5_changed": 0,
                     "kl_mean_before": float(saved["kl"][:, column].mean())}
            with torch.inference_mode():
                for first in range(0, len(moved), args.batch_size):
                    chunk = moved[first:first + args.batch_size]
                    missing = [int(i) for i in chunk if int(i) not in reference]
                    if missing:
                        logits = model(pixel_values=pixels[missing], rapid=RapidConfig(method="none")).logits.float()
                        reference.update(zip(missing, logits, strict=True))
                    unreduced = torch.stack([reference[int(i)] for i in chunk])
                    output = model(pixel_values=pixels[chunk], rapid=variant.rapid)
                    logits = output.logits.float()
                    counts = list(output.token_counts)
                    if counts != [c for c in saved["token_counts"][column].tolist() if c >= 0]:
                        raise RuntimeError(f"{variant.label} {setting_of(variant)}: token counts differ")
                    ranks = logits.topk(saved["ranks"].shape[2], dim=-1).indices.numpy()
                    if not np.array_equal(unreduced.topk(ranks.shape[1], dim=-1).indices.numpy(),
                                          saved["ranks"][chunk, 0]):
                        raise RuntimeError(f"{path.name}: the unreduced model's top-5 moved")
                    entry["photos_top1_changed"] += int((saved["ranks"][chunk, 1 + column, 0] != ranks[:, 0]).sum())
                    entry["photos_top5_changed"] += int((saved["ranks"][chunk, 1 + column] != ranks).any(-1).sum())
                    saved["ranks"][chunk, 1 + column] = ranks
                    saved["kl"][chunk, column] = kl_divergence(unreduced, logits).numpy()
            entry["kl_mean_after"] = float(saved["kl"][:, column].mean())
            summary[f"{part}: {variant.label} {setting_of(variant)}"] = entry
            print(f"{Path(folder).name} {part} {variant.label} {setting_of(variant)}: {json.dumps(entry)}", flush=True)
        np.savez_compressed(path, **saved)
    return {"seconds": round(time.perf_counter() - started, 1), "photos": len(rows), "rows": summary}


def joined(parts: list[Predictions]) -> Predictions:
    """The variants of several passes over the same photos side by side (one reference column)."""
    first = parts[0]
    if any(not np.array_equal(part.index, first.index) for part in parts):
        raise ValueError("the saved passes cover different photos")
    return Predictions(
        index=first.index,
        labels=first.labels,
        ranks=np.concatenate([first.ranks] + [part.ranks[:, 1:] for part in parts[1:]], axis=1),
        kl=np.concatenate([part.kl for part in parts], axis=1),
        token_counts=[counts for part in parts for counts in part.token_counts],
    )


def pooled(parts: list[Predictions]) -> Predictions:
    """Both sets as one set of photos (row indices offset so they stay distinct)."""
    offsets = np.cumsum([0] + [int(part.index.max()) + 1 for part in parts[:-1]])
    return Predictions(
        index=np.concatenate([part.index + offset for part, offset in zip(parts, offsets, strict=True)]),
        labels=np.concatenate([part.labels for part in parts]),
        ranks=np.concatenate([part.ranks for part in parts]),
        kl=np.concatenate([part.kl for part in parts]),
        token_counts=parts[0].token_counts,
    )


def records_with_deltas(predictions: Predictions, variants: list[Variant], **context: Any) -> list[dict[str, Any]]:
    """`summarize` records plus paired-bootstrap intervals of the agreement and KL differences from ToMe."""
    records = summarize(predictions, variants, **context)
    correct = predictions.ranks[:, 1:, 0] == predictions.labels[:, None]
    agrees = predictions.ranks[:, 1:, 0] == predictions.ranks[:, :1, 0]
    tome = {v.setting: i for i, v in enumerate(variants) if v.label == "tome"}
    for position, (variant, record) in enumerate(zip(variants, records, strict=True)):
        record["setting"] = setting_of(variant)
        baseline = tome.get(variant.setting)
        for name, values in (("top1", correct), ("agreement", agrees), ("kl", predictions.kl)):
            if baseline is None or baseline == position:
                record[f"delta_{name}_vs_tome"], record[f"delta_{name}_vs_tome_ci95"] = None, None
                continue
            delta, low, high = paired_bootstrap_ci(values[:, position], values[:, baseline])
            record[f"delta_{name}_vs_tome"], record[f"delta_{name}_vs_tome_ci95"] = delta, [low, high]
    return records


def targets(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets for calibrated RAPID against ToMe on one table (pooled report photos)."""
    by = {(rec["label"], rec["setting"]): rec for rec in records}
    checks = {}
    for amount in SETTINGS:
        label = label_of(amount)
        tome, calibrated = by[("tome", label)], by[("rapid-calibrated", label)]
        aggressive = amount.get("r", 99) >= 12
        checks[label] = {
            "agreement_at_or_above_tome": calibrated["agreement"] >= tome["agreement"],
            "kl_at_or_below_tome": calibrated["kl"] <= tome["kl"],
            "top1_at_or_above_tome": calibrated["top1"] >= tome["top1"],
            "agreement_interval_above_0": (calibrated["delta_agreement_vs_tome_ci95"][0] > 0) if aggressive else None,
        }
    return checks


def interval(record: dict[str, Any], name: str, scale: float, digits: int) -> str:
    delta = record[f"delta_{name}_vs_tome"]
    if delta is None:
        return ""
    low, high = record[f"delta_{name}_vs_tome_ci95"]
    tie = " (tie)" if low <= 0 <= high else ""
    return f"{delta * scale:+.{digits}f} [{low * scale:+.{digits}f}, {high * scale:+.{digits}f}]{tie}"


def markdown_table(records: list[dict[str, Any]]) -> list[str]:
    lines = ["| setting | method | out tokens | top-1 % | agreement % | KL | Δ top-1 vs ToMe (pts, 95% CI) | "
             "Δ agreement (pts) | Δ KL |", "|---|---|---|---|---|---|---|---|---|"]
    order = {name: i for i, name in enumerate(METHOD_ORDER)}
    settings = ["none"] + [label_of(a) for a in SETTINGS]
    for rec in sorted(records, key=lambda r: (settings.index(r["setting"]), order[r["label"]])):
        lines.append(
            f"| {rec['setting']} | {rec['label']} | {rec['output_tokens']} | {100 * rec['top1']:.2f} | "
            f"{100 * rec['agreement']:.2f} | {rec['kl']:.4f} | {interval(rec, 'top1', 100, 2)} | "
            f"{interval(rec, 'agreement', 100, 2)} | {interval(rec, 'kl', 1, 4)} |"
        )
    return lines


def counts(rows: dict[str, int]) -> str:
    return " + ".join(f"{n} ({name})" for name, n in rows.items()) + f" = {sum(rows.values())}"


def write_report(results: dict[str, Any], calibrations: dict[str, dict[str, Any]]) -> None:
    calibration = calibrations["kl"]
    lines = [
        "# Pooled comparison: every method on both dev sets, calibration photos held apart",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Report photos: {counts(results['report_rows'])} (index % 5 != 0 of each set); calibration photos: "
        f"{counts(calibration['calibration_rows'])} (index % 5 == 0), both sets together. RAPID auto K = "
        f"{calibration['auto_switch_layer']}. Intervals: paired bootstrap (10,000 resamples) of the per-photo "
        "difference from ToMe at the same setting; an interval containing 0 is marked (tie).",
        "",
        "## Pooled report photos",
        "",
        *markdown_table(results["pooled"]),
        "",
        "## Calibrated RAPID vs ToMe on the pooled report photos (the issue's targets)",
        "",
        "| setting | agreement >= ToMe | KL <= ToMe | top-1 >= ToMe | agreement interval > 0 (r >= 12) |",
        "|---|---|---|---|---|",
    ]
    for label, check in results["targets"].items():
        cells = [check["agreement_at_or_above_tome"], check["kl_at_or_below_tome"], check["top1_at_or_above_tome"],
                 check["agreement_interval_above_0"]]
        lines.append(f"| {label} | " + " | ".join("-" if c is None else ("yes" if c else "no") for c in cells) + " |")
    lines += ["", "## Calibrated configs (chosen on the calibration photos) and search time", "",
              "`rapid-calibrated` is the KL search's choice: its best config of each reading of rho are the rows "
              "`rapid-calibrated-shift` / `-protect`; the other searches' choices are their own rows.", "",
              "| setting | search | variant | config | trials | seconds |", "|---|---|---|---|---|---|"]
    defaults = RapidConfig().to_dict()
    for search, log in calibrations.items():
        for label, entry in log["settings"].items():
            chosen = {name: value["rapid"] for name, value in entry.items() if name.startswith("best_")}
            if search != "kl":
                chosen = {"chosen": entry["chosen"]}
            for name, rapid in chosen.items():
                changed = {k: v for k, v in rapid.items() if v != defaults.get(k) and k not in ("r", "output_tokens")}
                picked = " (chosen)" if name == f"best_{entry['chosen_reading']}" else ""
                lines.append(f"| {label} | {search} | {name}{picked} | `{json.dumps(changed)}` | "
                             f"{entry['num_trials']} | {entry['seconds']} |")
    for name, records in results["per_set"].items():
        lines += ["", f"## {name} report photos", "", *markdown_table(records)]
    (HERE / "results.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="local folder of the ViT/DeiT classifier")
    parser.add_argument("--data", nargs="+", required=True, help="imagefolder directories (metadata.csv)")
    parser.add_argument("--stage", choices=["calibrate", "evaluate", "all"], default="all")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--part", choices=[*PARTS, "all", "rapid"], default="all",
                        help="evaluate only the fixed rows or only the calibrated rows (tables need both saved); "
                        "rapid: every RAPID row of every part again, in place in the saved predictions")
    parser.add_argument("--objective", choices=OBJECTIVES, default="kl",
                        help="the calibration search's objective (stage calibrate)")
    parser.add_argument("--importance-source", choices=["attention", "per_patch"], default="attention",
                        help="RAPID's source of importance, fixed during the search (stage calibrate)")
    parser.add_argument("--reuse-predictions", action="store_true",
                        help="rebuild the tables from the saved per-photo predictions instead of running again")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoImageProcessor

    model = load_rapid_model(args.model)
    image_processor = AutoImageProcessor.from_pretrained(args.model)
    if args.stage in ("calibrate", "all"):
        run_calibration(model, image_processor, args)
    if args.stage == "calibrate":
        return
    calibrations = {variant: json.loads(calibration_path(variant).read_text())
                    for variant in SEARCHES}
    calibration = calibrations["kl"]
    if args.part == "rapid":  # RAPID rows again, the stored calibration choices as they are; tables left to
        log_path = HERE / "rerun_rapid.json"  # --reuse-predictions (each set can run in its own process)
        for folder in args.data:
            entry = {"command": command_line(), "torch_threads": torch.get_num_threads(),
                     **rerun_rapid_rows(model, image_processor, folder, calibrations, args)}
            log = json.loads(log_path.read_text()) if log_path.is_file() else {}
            log[Path(folder).name] = entry
            log_path.write_text(json.dumps(dict(sorted(log.items())), indent=2) + "\n")
        print("RAPID rows replaced; rebuild the tables with --reuse-predictions", flush=True)
        return
    parts_to_run = PARTS if args.part == "all" else (args.part,)
    if not args.reuse_predictions:
        for part in parts_to_run:
            for folder in args.data:
                predict_part(model, image_processor, folder, variants_for(calibrations, part), part, args)
    missing = [predictions_path(f, p).name for f in args.data for p in PARTS if not predictions_path(f, p).is_file()]
    if missing:
        print(f"tables not written yet: {missing} still to run", flush=True)
        return
    variants = [variant for part in PARTS for variant in variants_for(calibrations, part)]
    per_set, sets = {}, []
    for folder in args.data:
        predictions = joined([load_predictions(predictions_path(folder, part)) for part in PARTS])
        name = Path(folder).name
        per_set[name] = with_calibrated_rows(
            records_with_deltas(predictions, variants, dataset=name, subset="report"), calibration)
        sets.append(predictions)
    pooled_records = with_calibrated_rows(
        records_with_deltas(pooled(sets), variants, dataset="pooled", subset="report"), calibration)
    results = {
        "command": command_line(),
        "model": relative(args.model),
        "data": [relative(folder) for folder in args.data],
        "report_rows": {Path(folder).name: len(part.index) for folder, part in zip(args.data, sets, strict=True)},
        "pooled": pooled_records,
        "targets": targets(pooled_records),
        "per_set": per_set,
    }
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    # The pooled rows as harness records (what `rapid-hf push --results` reads for the model cards)
    records = [{**record, "model": relative(args.model), "data_source": "imagefolder"} for record in pooled_records]
    (HERE / "records.json").write_text(json.dumps({"command": command_line(), "records": records}, indent=2) + "\n")
    write_report(results, calibrations)


if __name__ == "__main__":
    main()
