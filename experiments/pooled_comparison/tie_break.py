"""Does breaking eq. (1) ties by highest similarity change RAPID at the default tau = 0.7?

Runs RAPID (defaults) on every dev photo twice: with the similarity tie-break (highest `max_j S_ij`, then index;
the library's rule from 0c7afcd until 9c43da2) and with the index-only one (the library's rule before and after),
and counts the images whose logits or top-1 class differ. Also reports, per pruning layer, how often the r-th and
(r+1)-th most redundant sources tie (the only case the rule matters). Both plans are defined here, for the
current `redundancy_scores` (protected source rows at -inf, never pruned); tie_break_choice.py uses them too.

    python experiments/pooled_comparison/tie_break.py --model ../shared/assets/deit-tiny-imagenet \
        --data ../shared/assets/imagenet-sample-dev ../shared/assets/imagenet-val-dev --r 8 16
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE)]  # this checkout's rapid_hf, then photos.py

from photos import pixel_rows  # noqa: E402

import rapid_hf.reduction.steps as steps  # noqa: E402
from rapid_hf.calibration import predict_logits  # noqa: E402
from rapid_hf.evaluation.loading import load_rapid_model  # noqa: E402
from rapid_hf.reduction.config import RapidConfig  # noqa: E402
from rapid_hf.reduction.matching import rank_descending  # noqa: E402
from rapid_hf.reduction.methods import rank_descending_by, redundancy_scores  # noqa: E402
from rapid_hf.reduction.plan import ReductionPlan, plan_from_ranking  # noqa: E402


def index_tie_prune_plan(scores: torch.Tensor, r: int, num_protected: int, threshold: float) -> ReductionPlan:
    """Eq. (1) with ties by token index only (the library's rule since 9c43da2)."""
    return plan_from_ranking(rank_descending(redundancy_scores(scores, threshold, num_protected)), r, num_protected,
                             None)


def similarity_tie_prune_plan(scores: torch.Tensor, r: int, num_protected: int, threshold: float) -> ReductionPlan:
    """Eq. (1) with ties by each source's highest similarity `max_j S_ij`, then index (measured, not kept)."""
    redundancy = redundancy_scores(scores, threshold, num_protected)
    return plan_from_ranking(rank_descending_by(redundancy, scores.max(dim=-1).values), r, num_protected, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", nargs="+", required=True)
    parser.add_argument("--r", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--threshold", type=float, default=0.7)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--output", default=str(HERE / "tie_break.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_rapid_model(args.model)
    from transformers import AutoImageProcessor

    pixels, labels, _ = pixel_rows(args.data, "all", AutoImageProcessor.from_pretrained(args.model), args.batch_size)
    reference = predict_logits(model, pixels, RapidConfig(method="none"), args.batch_size).argmax(-1)
    library_plan = steps.redundancy_prune_plan
    ties = {"calls": 0, "tied_at_cut": 0}

    def counting_plan(scores: torch.Tensor, r: int, num_protected: int, threshold: float) -> ReductionPlan:
        ranked = redundancy_scores(scores, threshold, num_protected).sort(dim=-1, descending=True).values
        ties["calls"] += scores.shape[0]
        ties["tied_at_cut"] += int((ranked[:, r - 1] == ranked[:, r]).sum()) if r < ranked.shape[1] else 0
        return similarity_tie_prune_plan(scores, r, num_protected, threshold)

    rows = []
    for r in args.r:
        config = RapidConfig(method="rapid", r=r, prune_threshold=args.threshold)
        ties.update(calls=0, tied_at_cut=0)
        steps.redundancy_prune_plan = counting_plan
        try:
            similarity_ties = predict_logits(model, pixels, config, args.batch_size)
        finally:
            steps.redundancy_prune_plan = library_plan
        tie_counts = dict(ties)
        steps.redundancy_prune_plan = index_tie_prune_plan
        try:
            index_ties = predict_logits(model, pixels, config, args.batch_size)
        finally:
            steps.redundancy_prune_plan = library_plan
        rows.append({
            "r": r,
            "prune_threshold": args.threshold,
            "images": len(pixels),
            "pruning_steps": tie_counts["calls"],
            "pruning_steps_with_a_tie_at_the_cut": tie_counts["tied_at_cut"],
            "images_with_different_logits": int((similarity_ties != index_ties).any(dim=-1).sum()),
            "images_with_different_top1": int((similarity_ties.argmax(-1) != index_ties.argmax(-1)).sum()),
            "max_abs_logit_difference": float((similarity_ties - index_ties).abs().max()),
            "top1_similarity_ties": float((similarity_ties.argmax(-1) == labels).float().mean()),
            "top1_index_ties": float((index_ties.argmax(-1) == labels).float().mean()),
            "agreement_similarity_ties": float((similarity_ties.argmax(-1) == reference).float().mean()),
            "agreement_index_ties": float((index_ties.argmax(-1) == reference).float().mean()),
        })
        print(json.dumps(rows[-1]), flush=True)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    Path(args.output).write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
