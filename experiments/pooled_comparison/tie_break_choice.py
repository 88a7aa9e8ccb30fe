"""Eq. (1) ties: keep the rule the calibration photos favour, with the rule for choosing fixed before running.

The two rules (tie_break.py): the similarity rule (ties among redundancy scores broken by the highest raw
similarity `max_j S_ij`, then index; the library's when this first ran) and the index rule (index only: the
top-left of the image goes first; the library's since 9c43da2, which this decision chose). Both plans come from
tie_break.py, so the script measures the same two rules whatever the library's rule is.

Decision rule, written before this script first ran: on the 226 calibration photos (row % 5 == 0 of both dev
sets), RAPID with its paper defaults (tau = 0.7) at r = 8 and r = 16; the rule with the lower mean KL(unreduced ||
reduced), summed over the two settings, is kept. An exact tie (|difference| < 1e-7 nats) keeps the library's
similarity rule. The 904 report photos are then scored for the record only (paired-bootstrap intervals of
similarity-rule minus index-rule), never used to choose.

    python experiments/pooled_comparison/tie_break_choice.py --model ../shared/assets/deit-tiny-imagenet \
        --data ../shared/assets/imagenet-sample-dev ../shared/assets/imagenet-val-dev

Writes tie_break_choice.json (the decision, `--subset calibration` or `all`); `--subset report` scores only the
report photos and writes tie_break_report.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE)]  # this checkout's rapid_hf, then photos.py / tie_break.py

from photos import pixel_rows  # noqa: E402
from tie_break import index_tie_prune_plan, similarity_tie_prune_plan  # noqa: E402

import rapid_hf.reduction.steps as steps  # noqa: E402
from rapid_hf.calibration import predict_logits  # noqa: E402
from rapid_hf.evaluation.accuracy import paired_bootstrap_ci  # noqa: E402
from rapid_hf.evaluation.fidelity import kl_divergence  # noqa: E402
from rapid_hf.evaluation.loading import load_rapid_model  # noqa: E402
from rapid_hf.evaluation.splits import in_subset  # noqa: E402
from rapid_hf.reduction.config import RapidConfig  # noqa: E402

SETTINGS = (8, 16)
THRESHOLD = 0.7
EXACT_TIE = 1e-7


def relative(path: str) -> str:
    p = Path(path)
    return p.as_posix() if not p.is_absolute() else p.resolve().relative_to(HERE.parents[1]).as_posix()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", nargs="+", required=True)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--subset", choices=["all", "calibration", "report"], default="all",
                        help="calibration: only the photos the rule decides on (writes tie_break_choice.json); "
                             "report: only the report photos, for the record (writes tie_break_report.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoImageProcessor

    model = load_rapid_model(args.model)
    pixels, labels, where = pixel_rows(args.data, args.subset, AutoImageProcessor.from_pretrained(args.model),
                                       args.batch_size)
    calibration = np.array([in_subset(row, "calibration") for _, row in where])
    reference = predict_logits(model, pixels, RapidConfig(method="none"), args.batch_size)
    library_plan = steps.redundancy_prune_plan
    per_photo = {}
    for r in SETTINGS:
        config = RapidConfig(method="rapid", r=r, prune_threshold=THRESHOLD)
        for rule, plan in (("similarity", similarity_tie_prune_plan), ("index", index_tie_prune_plan)):
            steps.redundancy_prune_plan = plan
            try:
                logits = predict_logits(model, pixels, config, args.batch_size)
            finally:
                steps.redundancy_prune_plan = library_plan
            per_photo[(r, rule)] = {
                "kl": kl_divergence(reference, logits).numpy().astype(np.float64),
                "correct": (logits.argmax(-1) == labels).numpy(),
                "agrees": (logits.argmax(-1) == reference.argmax(-1)).numpy(),
            }
    subsets = {name: mask for name, mask in (("calibration", calibration), ("report", ~calibration)) if mask.any()}
    command = "python " + " ".join([relative(sys.argv[0]), *sys.argv[1:]])
    rows = []
    for r in SETTINGS:
        for name, mask in subsets.items():
            sim, idx = per_photo[(r, "similarity")], per_photo[(r, "index")]
            row = {"r": r, "subset": name, "photos": int(mask.sum()),
                   "photos_with_different_kl": int((sim["kl"][mask] != idx["kl"][mask]).sum())}
            for metric in ("kl", "correct", "agrees"):
                row[f"{metric}_similarity"] = float(sim[metric][mask].mean())
                row[f"{metric}_index"] = float(idx[metric][mask].mean())
                row[f"{metric}_similarity_minus_index_ci95"] = paired_bootstrap_ci(sim[metric][mask],
                                                                                   idx[metric][mask])
            rows.append(row)
            print(json.dumps(row), flush=True)
    if not calibration.any():
        (HERE / "tie_break_report.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
        return
    cal = {rule: sum(per_photo[(r, rule)]["kl"][calibration].mean() for r in SETTINGS)
           for rule in ("similarity", "index")}
    difference = cal["similarity"] - cal["index"]
    kept = "similarity" if difference <= EXACT_TIE else "index"
    result = {
        "command": command,
        "rule": "lower summed mean KL on the calibration photos at r = 8 and 16 (tau = 0.7); exact tie keeps "
                "the similarity rule",
        "calibration_kl_sum": cal,
        "calibration_kl_sum_similarity_minus_index": difference,
        "kept": kept,
        "rows": rows,
    }
    (HERE / "tie_break_choice.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"kept: {kept} (calibration KL sum similarity {cal['similarity']:.6f} vs index {cal['index']:.6f})")


if __name__ == "__main__":
    main()
