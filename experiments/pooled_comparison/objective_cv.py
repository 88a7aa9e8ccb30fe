"""Which calibration objective carries over to new photos: two-fold cross-validation on the calibration photos only.

    python experiments/pooled_comparison/objective_cv.py --objective kl --model ../shared/assets/deit-tiny-imagenet \
        --data ../shared/assets/imagenet-sample-dev ../shared/assets/imagenet-val-dev &
    python experiments/pooled_comparison/objective_cv.py --objective top1_nll --model ... --data ...
    python experiments/pooled_comparison/objective_cv.py --summarize

The 226 calibration photos of run.py (index % 5 == 0 of both sets) are split in two folds by position (even /
odd). For each setting of run.py and each fold, run.py's search (same start, grid and round) runs with the
objective on one fold, and its choice is scored on the other fold: held-out agreement, KL and top1_nll. No report
photo is touched, so the objective this picks can be applied to the report photos without selecting on them.

The rule, fixed before any of these runs: an objective is the candidate to replace `"kl"` (run.py's
`rapid-calibrated` row, the library's default) if, summed over the six settings and both folds, more held-out
photos agree with the unreduced model under its choices than under KL's; a tie keeps KL. A candidate is then
kept only if it holds up on the report photos (README.md: top1_nll was the candidate and did not).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE)]  # this checkout's rapid_hf, then photos.py and run.py

from photos import pixel_rows  # noqa: E402
from run import SEARCH, SETTINGS, START, command_line, label_of  # noqa: E402

from rapid_hf.calibration import calibrate, measure_fidelity, predict_logits  # noqa: E402
from rapid_hf.calibration.search import OBJECTIVES  # noqa: E402
from rapid_hf.evaluation.loading import load_rapid_model  # noqa: E402
from rapid_hf.reduction.config import RapidConfig  # noqa: E402

NUM_FOLDS = 2


def cv_path(objective: str) -> Path:
    return HERE / f"objective_cv_{objective}.json"


def run_folds(args: argparse.Namespace) -> None:
    from transformers import AutoImageProcessor

    model = load_rapid_model(args.model)
    processor = AutoImageProcessor.from_pretrained(args.model)
    pixels = pixel_rows(args.data, "calibration", processor, args.batch_size)[0]
    folds = [torch.arange(fold, len(pixels), NUM_FOLDS) for fold in range(NUM_FOLDS)]
    reference = predict_logits(model, pixels, RapidConfig(method="none"), args.batch_size)
    log = {"command": command_line(), "objective": args.objective, "images": len(pixels),
           "fold_sizes": [len(fold) for fold in folds], "torch_threads": torch.get_num_threads(), "settings": {}}
    for amount in SETTINGS:
        entries = []
        for fold, rows in enumerate(folds):
            held_out = torch.cat([other for index, other in enumerate(folds) if index != fold])
            start = RapidConfig(method="rapid", **START, **amount)
            result = calibrate(model, pixels[rows], start, batch_size=args.batch_size, progress=False,
                               objective=args.objective, **SEARCH)
            scored = measure_fidelity(model, pixels[held_out], reference[held_out], result.rapid, args.batch_size)
            entries.append({"search_fold": fold, "chosen": result.rapid.to_dict(), "seconds": round(result.seconds, 1),
                            "searched_on": vars(result.fidelity), "held_out": vars(scored),
                            "held_out_images": len(held_out),
                            "held_out_agreeing": round(scored.agreement * len(held_out))})
        log["settings"][label_of(amount)] = entries
        print(f"{label_of(amount)}: {json.dumps([e['held_out'] for e in entries])}", flush=True)
        cv_path(args.objective).write_text(json.dumps(log, indent=2) + "\n")


def summarize() -> None:
    logs = {objective: json.loads(cv_path(objective).read_text()) for objective in OBJECTIVES
            if cv_path(objective).is_file()}
    if "kl" not in logs or len(logs) < 2:
        raise SystemExit(f"need objective_cv_kl.json and another objective's file; have {sorted(logs)}")
    lines = ["# Calibration objective: two-fold cross-validation on the 226 calibration photos", "",
             "Held-out photos agreeing with the unreduced model (of 226 per setting: each fold's choice scored on "
             "the other fold), held-out mean KL and mean top1_nll (averaged over the two folds).", "",
             "| setting | " + " | ".join(f"{o}: agreeing / KL / top1_nll" for o in logs) + " |",
             "|---|" + "---|" * len(logs)]
    totals = dict.fromkeys(logs, 0)
    for label in logs["kl"]["settings"]:
        cells = []
        for objective, log in logs.items():
            entries = log["settings"][label]
            agreeing = sum(e["held_out_agreeing"] for e in entries)
            totals[objective] += agreeing
            kl = sum(e["held_out"]["kl"] for e in entries) / len(entries)
            nll = sum(e["held_out"]["top1_nll"] for e in entries) / len(entries)
            cells.append(f"{agreeing} / {kl:.4f} / {nll:.4f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| total agreeing | " + " | ".join(str(totals[o]) for o in logs) + " |")
    best = max(totals, key=lambda objective: (totals[objective], objective == "kl"))
    lines += ["", f"Rule (fixed before the runs: most held-out agreeing photos in total, ties keep KL): **{best}**.",
              "", "Commands: " + "; ".join(f"`{log['command']}`" for log in logs.values())]
    (HERE / "objective_cv.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objective", choices=OBJECTIVES, help="the search's objective (one per process)")
    parser.add_argument("--summarize", action="store_true", help="tabulate the saved folds and apply the rule")
    parser.add_argument("--model", help="local folder of the ViT/DeiT classifier")
    parser.add_argument("--data", nargs="+", help="imagefolder directories (metadata.csv)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    if args.summarize:
        return summarize()
    if not (args.objective and args.model and args.data):
        parser.error("--objective, --model and --data are needed unless --summarize")
    torch.set_num_threads(args.threads)
    run_folds(args)


if __name__ == "__main__":
    main()
