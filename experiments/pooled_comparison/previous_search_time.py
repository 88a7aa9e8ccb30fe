"""Time the earlier calibration search (the one README.md's calibrated rows came from) on this machine.

That search: `calibrate` with its default knobs (K, tau, lambda, merge rule), default grid (K in 0..12) and up to
three rounds, from `switch_layer="auto"`, on the first 100 calibration rows of the sample set, here at r = 16.
Run beside run.py's calibration stage so both are timed under the same load.

    python experiments/pooled_comparison/previous_search_time.py --model ../shared/assets/deit-tiny-imagenet \
        --data ../shared/assets/imagenet-sample-dev --r 16
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

from rapid_hf.calibration import calibrate  # noqa: E402
from rapid_hf.evaluation.loading import load_rapid_model  # noqa: E402
from rapid_hf.reduction.config import RapidConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--num-images", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoImageProcessor

    model = load_rapid_model(args.model)
    pixels, _, _ = pixel_rows([args.data], "calibration", AutoImageProcessor.from_pretrained(args.model), 50)
    pixels = pixels[: args.num_images]
    result = calibrate(model, pixels, RapidConfig(r=args.r, switch_layer="auto"), batch_size=50, progress=False)
    summary = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
               "r": args.r, "images": len(pixels), "num_trials": len(result.trials),
               "seconds": round(result.seconds, 1), "threads": args.threads, "chosen": result.rapid.to_dict()}
    print(json.dumps(summary), flush=True)
    (HERE / "previous_search_time.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
