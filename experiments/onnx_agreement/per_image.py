"""Per-photo logit differences of one exported setting: how many photos exceed a tolerance, and which.

    RAPID_HF_ASSETS=../shared/assets python experiments/onnx_agreement/per_image.py --method tome --r 8

A large max |logit diff| with full top-1 agreement means a few photos took a different discrete decision (a
merge or prune choice between two nearly tied tokens flips under onnxruntime's different float rounding), not
a general drift; this counts them. Writes per_image_<method>_r<r>.json next to this file.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).parent))

from run import AGREEMENT_BATCH, load_photos, paired_logits, photo_parser  # noqa: E402

from rapid_hf import RapidConfig  # noqa: E402
from rapid_hf.evaluation.loading import load_rapid_model  # noqa: E402
from rapid_hf.export import export_onnx  # noqa: E402


def main() -> None:
    parser = photo_parser(__doc__)
    parser.add_argument("--method", default="tome")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--tolerance", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    from transformers import AutoImageProcessor

    torch.set_num_threads(args.threads)
    model = load_rapid_model(args.model)
    photos, names = load_photos([Path(d) for d in args.data_dirs], AutoImageProcessor.from_pretrained(args.model))
    rapid = RapidConfig(method=args.method, r=args.r)
    path = export_onnx(model, Path(tempfile.mkdtemp()) / "model.onnx", rapid=rapid, batch_size=AGREEMENT_BATCH)
    expected, actual = paired_logits(model, rapid, path, photos)
    per_photo = np.abs(expected - actual).max(axis=-1)
    over = np.flatnonzero(per_photo > args.tolerance)
    result = {
        "command": "RAPID_HF_ASSETS=../shared/assets python experiments/onnx_agreement/per_image.py "
                   + " ".join(sys.argv[1:]),
        "rapid": rapid.to_dict(), "images": len(photos), "tolerance": args.tolerance,
        "photos_over_tolerance": len(over), "median_max_abs_diff": float(np.median(per_photo)),
        "p99_max_abs_diff": float(np.percentile(per_photo, 99)), "max_abs_diff": float(per_photo.max()),
        "over": [{"photo": names[i], "max_abs_diff": float(per_photo[i])} for i in over],
    }
    output = Path(__file__).parent / f"per_image_{args.method}_r{args.r}.json"
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
