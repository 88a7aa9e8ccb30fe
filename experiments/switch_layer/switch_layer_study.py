"""Where should RAPID switch from pruning to merging? Token statistics per layer vs the best K on calibration images.

    python experiments/switch_layer/switch_layer_study.py --model ../shared/assets/deit-tiny-imagenet \
        --data-dir ../shared/assets/imagenet-sample-dev --r 4,8,12,16,17

On the calibration rows only: the per-layer statistics behind `switch_layer="auto"` (share of patch tokens with
a near-duplicate at tau, CLS-attention entropy), the K the rule picks (for all images together and image by
image), and for each r the KL(unreduced || reduced) of every K in 0..L with the other knobs at the paper's
defaults, so the rule can be compared with the best K and with the paper's K = 4. Writes JSON and Markdown.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from rapid_hf.calibration import (
    MIN_REDUNDANT_FRACTION,
    auto_switch_layer,
    calibrate,
    layer_statistics,
    load_calibration_images,
)
from rapid_hf.cli.common import int_list
from rapid_hf.reduction.config import RapidConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--r", type=int_list, default="4,8,12,16,17", help="comma-separated r values")
    parser.add_argument("--num-images", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--output", default=str(Path(__file__).resolve().with_name("calibration_switch_layer.json")))
    args = parser.parse_args(argv)
    args.r_values = args.r
    return args


def markdown(study: dict) -> str:
    fractions, entropies = study["statistics"]["redundant_fraction"], study["statistics"]["cls_entropy"]
    lines = [
        "# Switch layer K: token statistics vs the best K (calibration rows only)",
        "",
        f"Command: `{study['command']}`",
        "",
        f"{study['num_images']} calibration images. Rule: K = first layer where at least "
        f"{study['min_redundant_fraction']:.0%} of patch tokens have a near-duplicate (eq. 1 score > 0 at "
        f"tau = {study['statistics']['prune_threshold']}) → **K = {study['auto_switch_layer']}**. "
        f"Per image the rule gives: {study['per_image_switch_layer']} (K: images).",
        "",
        "| layer | " + " | ".join(str(i) for i in range(len(fractions))) + " |",
        "|---|" + "---|" * len(fractions),
        "| near-duplicate share | " + " | ".join(f"{v:.2f}" for v in fractions) + " |",
        "| CLS-attention entropy / log N | " + " | ".join(f"{v:.3f}" for v in entropies) + " |",
        "",
        "KL(unreduced || reduced) per K (other knobs at the paper's defaults):",
        "",
        "| r | " + " | ".join(f"K={k}" for k in range(len(fractions) + 1)) + " | best K | auto K | KL auto / best "
        "| KL K=4 / best |",
        "|---|" + "---|" * (len(fractions) + 5),
    ]
    for row in study["per_r"]:
        kls = row["kl_by_switch_layer"]
        best = min(kls, key=kls.get)
        cells = " | ".join(f"**{kls[k]:.4f}**" if k == best else f"{kls[k]:.4f}" for k in kls)
        lines.append(
            f"| {row['r']} | {cells} | {best} | {study['auto_switch_layer']} | "
            f"{kls[str(study['auto_switch_layer'])] / kls[best]:.2f} | {kls['4'] / kls[best]:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoImageProcessor

    from rapid_hf.evaluation.loading import load_rapid_model

    args = parse_args(argv)
    model = load_rapid_model(args.model)
    processor = AutoImageProcessor.from_pretrained(args.model)
    pixel_values, rows = load_calibration_images(processor, data_dir=args.data_dir, num_images=args.num_images)
    statistics = layer_statistics(model, pixel_values, batch_size=args.batch_size)
    per_image = Counter(auto_switch_layer(values) for values in statistics.redundant_fraction_per_image)
    per_r = []
    for r in args.r_values:
        result = calibrate(model, pixel_values, RapidConfig(r=r, switch_layer="auto"), searched=["switch_layer"],
                           max_rounds=1, batch_size=args.batch_size)
        kl_by_k = {str(t.settings["switch_layer"]): t.kl for t in result.trials}
        agreement_by_k = {str(t.settings["switch_layer"]): t.agreement for t in result.trials}
        per_r.append({"r": r, "kl_by_switch_layer": dict(sorted(kl_by_k.items(), key=lambda kv: int(kv[0]))),
                      "agreement_by_switch_layer": dict(sorted(agreement_by_k.items(), key=lambda kv: int(kv[0])))})
        print(f"r={r}: best K {min(kl_by_k, key=kl_by_k.get)}, auto K {result.auto_switch_layer}", flush=True)
    statistics_dict = statistics.to_dict()
    statistics_dict.pop("redundant_fraction_per_image")
    study = {
        "model": args.model,
        "data": args.data_dir,
        "calibration_rows": rows,
        "num_images": len(pixel_values),
        "command": "python " + " ".join(sys.argv),
        "min_redundant_fraction": MIN_REDUNDANT_FRACTION,
        "auto_switch_layer": auto_switch_layer(statistics.redundant_fraction),
        "per_image_switch_layer": dict(sorted(per_image.items())),
        "statistics": statistics_dict,
        "per_r": per_r,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(study, indent=2) + "\n")
    output.with_suffix(".md").write_text(markdown(study))
    print(output.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
