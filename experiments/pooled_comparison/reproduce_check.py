"""Do the stored per-photo predictions still reproduce with the current code? A sample of the report photos.

Runs the rows of the stored passes (default: "fixed" and "calibrated": none, ToMe, ToFu, RAPID defaults / auto /
protect, crucial, calibrated RAPID) on the first `--photos` report photos of each dev set and compares them with
predictions_<set>_<part>.npz: identical top-5 classes and the largest KL difference per row.

    python experiments/pooled_comparison/reproduce_check.py --model ../shared/assets/deit-tiny-imagenet \
        --data ../shared/assets/imagenet-sample-dev ../shared/assets/imagenet-val-dev --photos 16

Writes reproduce_check.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE)]

from photos import load_labelled_folder  # noqa: E402
from run import SEARCHES, calibration_path, load_predictions, predictions_path, relative, variants_for  # noqa: E402

from rapid_hf.evaluation.accuracy import predict  # noqa: E402
from rapid_hf.evaluation.data import IndexedRows, make_dataloader  # noqa: E402
from rapid_hf.evaluation.loading import load_rapid_model  # noqa: E402
from rapid_hf.evaluation.splits import subset_indices  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", nargs="+", required=True)
    parser.add_argument("--parts", nargs="+", default=["fixed", "calibrated"])
    parser.add_argument("--photos", type=int, default=16, help="report photos per set (the first ones)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoImageProcessor

    model = load_rapid_model(args.model)
    processor = AutoImageProcessor.from_pretrained(args.model)
    calibrations = {v: json.loads(calibration_path(v).read_text()) for v in SEARCHES}
    rows = []
    for folder in args.data:
        dataset = load_labelled_folder(folder)
        sample = subset_indices(len(dataset), "report")[: args.photos]
        loader = make_dataloader(IndexedRows(dataset, sample), processor, args.batch_size, num_workers=0)
        for part in args.parts:
            variants = variants_for(calibrations, part)
            now = predict(model, loader, variants)
            stored = load_predictions(predictions_path(folder, part))
            where = np.searchsorted(stored.index, now.index)
            if not np.array_equal(stored.index[where], now.index):
                raise ValueError(f"{folder} {part}: stored predictions miss some sampled photos")
            for position, variant in enumerate(variants):
                rows.append({
                    "set": Path(folder).name, "part": part, "label": variant.label,
                    "setting": variant.rapid.output_tokens or variant.rapid.to_dict()["r"],
                    "photos": len(sample),
                    "same_top5": bool(np.array_equal(now.ranks[:, 1 + position], stored.ranks[where, 1 + position])),
                    "same_top1": bool(np.array_equal(now.ranks[:, 1 + position, 0],
                                                     stored.ranks[where, 1 + position, 0])),
                    "max_kl_difference": float(np.abs(now.kl[:, position] - stored.kl[where, position]).max()),
                    "same_token_counts": list(now.token_counts[position]) == list(stored.token_counts[position]),
                })
            print(f"{Path(folder).name} {part}: {sum(r['same_top5'] for r in rows if r['part'] == part)} rows "
                  "with identical top-5 so far", flush=True)
    summary = {
        "rows_checked": len(rows),
        "rows_with_identical_top5": sum(r["same_top5"] for r in rows),
        "rows_with_identical_top1": sum(r["same_top1"] for r in rows),
        "largest_kl_difference": max(r["max_kl_difference"] for r in rows),
        "rows_with_identical_token_counts": sum(r["same_token_counts"] for r in rows),
    }
    command = "python " + " ".join([relative(Path(sys.argv[0]).resolve()), *sys.argv[1:]])
    (HERE / "reproduce_check.json").write_text(json.dumps({"command": command, "summary": summary, "rows": rows},
                                                          indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
