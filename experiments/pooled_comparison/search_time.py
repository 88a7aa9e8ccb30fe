"""Time the earlier calibration search and this study's search side by side at one reduction amount.

"previous": the search README.md's calibrated rows came from: `calibrate` with its default knobs (K, tau,
lambda, merge rule), default grid (K in 0..12) and up to three rounds, from `switch_layer="auto"`, on the first 100
calibration rows of the sample set. "pooled": run.py's search (one round, 6 knobs, from K = 2, lambda = 10,
MLERP) on the calibration rows of both sets (226 photos). Start both at once so they share the machine's load:

    python experiments/pooled_comparison/search_time.py --search previous --model ../shared/assets/deit-tiny-imagenet \
        --data ../shared/assets/imagenet-sample-dev --r 16 &
    python experiments/pooled_comparison/search_time.py --search pooled --model ../shared/assets/deit-tiny-imagenet \
        --data ../shared/assets/imagenet-sample-dev ../shared/assets/imagenet-val-dev --r 16
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
from run import SEARCH, START  # noqa: E402

from rapid_hf.calibration import calibrate  # noqa: E402
from rapid_hf.evaluation.loading import load_rapid_model  # noqa: E402
from rapid_hf.reduction.config import RapidConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--search", choices=["previous", "pooled"], required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", nargs="+", required=True)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoImageProcessor

    model = load_rapid_model(args.model)
    processor = AutoImageProcessor.from_pretrained(args.model)
    if args.search == "previous":
        pixels = pixel_rows(args.data[:1], "calibration", processor, 50)[0][:100]
        result = calibrate(model, pixels, RapidConfig(r=args.r, switch_layer="auto"), batch_size=50, progress=False)
    else:
        pixels = pixel_rows(args.data, "calibration", processor, 64)[0]
        result = calibrate(model, pixels, RapidConfig(r=args.r, **START), batch_size=64, progress=False, **SEARCH)
    summary = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
               "search": args.search, "r": args.r, "images": len(pixels), "num_trials": len(result.trials),
               "image_passes": len(result.trials) * len(pixels), "seconds": round(result.seconds, 1),
               "threads": args.threads, "chosen": result.rapid.to_dict()}
    print(json.dumps(summary), flush=True)
    (HERE / f"search_time_{args.search}.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
