"""ONNX Runtime vs PyTorch on the 1,130 dev photos: top-1 agreement, largest logit difference, batch-1 latency.

    RAPID_HF_ASSETS=../shared/assets python experiments/onnx_agreement/run.py

For each setting (none; ToMe, ToFu, RAPID and crucial-token merging at r=8 and 16) the model is
exported twice with `rapid_hf.export.export_onnx`: at batch 10 for the agreement check (the photos are run in
113 batches of 10 through both PyTorch eager and onnxruntime, preprocessed by the model's own image processor)
and at batch 1 for latency. Latency: batch 1, one synthetic input, PyTorch eager and onnxruntime at 1 and 2
threads, every (engine, setting) interleaved over the repeats in alternating order, median per row.
Writes results.json and results.md next to this file.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from rapid_hf import RapidConfig  # noqa: E402
from rapid_hf.evaluation.loading import load_rapid_model  # noqa: E402
from rapid_hf.evaluation.report import run_info  # noqa: E402
from rapid_hf.export import export_onnx  # noqa: E402

SETTINGS = [
    ("none", {"method": "none"}),
    ("tome r=8", {"method": "tome", "r": 8}),
    ("tome r=16", {"method": "tome", "r": 16}),
    ("tofu r=8", {"method": "tofu", "r": 8}),
    ("tofu r=16", {"method": "tofu", "r": 16}),
    ("rapid r=8", {"method": "rapid", "r": 8}),
    ("rapid r=16", {"method": "rapid", "r": 16}),
    ("crucial r=8", {"method": "crucial", "r": 8}),
    ("crucial r=16", {"method": "crucial", "r": 16}),
]
AGREEMENT_BATCH = 10


def load_photos(folders: list[Path], processor) -> tuple[torch.Tensor, list[str]]:
    """All photos of the imagefolder `folders` (metadata.csv order), preprocessed; and their names."""
    images, names = [], []
    for folder in folders:
        with open(folder / "metadata.csv") as handle:
            for row in csv.DictReader(handle):
                with Image.open(folder / row["file_name"]) as image:
                    images.append(processor(image.convert("RGB"), return_tensors="pt")["pixel_values"][0])
                names.append(f"{folder.name}/{row['file_name']}")
    return torch.stack(images), names


def session(path: Path, threads: int):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Idle onnxruntime workers spin by default, taking CPU from the PyTorch rows timed in between: no spinning.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def paired_logits(model, rapid: RapidConfig, path: Path, photos: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Logits of PyTorch eager and of onnxruntime running the file at `path`, over `photos` in the same batches
    of AGREEMENT_BATCH (onnxruntime on torch's current thread count)."""
    ort = session(path, torch.get_num_threads())
    torch_logits, ort_logits = [], []
    with torch.inference_mode():
        for start in range(0, len(photos), AGREEMENT_BATCH):
            batch = photos[start:start + AGREEMENT_BATCH]
            torch_logits.append(model(pixel_values=batch, rapid=rapid).logits.numpy())
            ort_logits.append(ort.run(None, {"pixel_values": batch.numpy()})[0])
    return np.concatenate(torch_logits), np.concatenate(ort_logits)


def photo_parser(description: str | None) -> argparse.ArgumentParser:
    """The studies' common flags: the model and the photo folders (default: the shared assets)."""
    assets = Path(os.environ.get("RAPID_HF_ASSETS", REPO.parent / "shared" / "assets"))
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(assets / "deit-tiny-imagenet"))
    parser.add_argument("--data-dirs", nargs="+",
                        default=[str(assets / "imagenet-sample-dev"), str(assets / "imagenet-val-dev")])
    return parser


def agreement(model, rapid: RapidConfig, path: Path, photos: torch.Tensor) -> dict:
    expected, actual = paired_logits(model, rapid, path, photos)
    same = expected.argmax(-1) == actual.argmax(-1)
    return {"images": len(photos), "top1_agreement": float(same.mean()), "top1_disagreements": int((~same).sum()),
            "max_abs_logit_diff": float(np.abs(expected - actual).max())}


def latency(model, exported: dict[str, Path], threads: list[int], repeats: int, number: int) -> list[dict]:
    """Batch-1 milliseconds per forward of every (threads, engine, setting), interleaved within a thread count."""
    pixel_values = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    feed = {"pixel_values": pixel_values.numpy()}
    records = []
    for thread_count in threads:
        torch.set_num_threads(thread_count)
        rows = []
        for label, settings in SETTINGS:
            if label not in exported:
                continue
            rapid = RapidConfig(**settings)
            ort = session(exported[label], thread_count)

            def eager(rapid=rapid):
                with torch.inference_mode():
                    model(pixel_values=pixel_values, rapid=rapid)

            def onnx(ort=ort):
                ort.run(None, feed)

            rows += [(label, "pytorch eager", eager), (label, "onnxruntime", onnx)]
        times = {(label, engine): [] for label, engine, _ in rows}
        for _, _, forward in rows:  # warm-up
            for _ in range(3):
                forward()
        for repeat in range(repeats):
            for label, engine, forward in rows if repeat % 2 == 0 else rows[::-1]:
                start = time.perf_counter()
                for _ in range(number):
                    forward()
                times[label, engine].append((time.perf_counter() - start) / number * 1e3)
        baseline = {engine: statistics.median(times["none", engine]) for engine in ("pytorch eager", "onnxruntime")}
        eager_none = baseline["pytorch eager"]
        for (label, engine), values in times.items():
            median = statistics.median(values)
            records.append({"threads": thread_count, "setting": label, "engine": engine, "batch_size": 1,
                            "time_ms": median, "time_ms_iqr": [float(q) for q in np.percentile(values, [25, 75])],
                            "speedup_over_same_engine_none": baseline[engine] / median,
                            "speedup_over_eager_none": eager_none / median, "repeats": repeats, "number": number})
    return records


def markdown(results: dict) -> str:
    lines = [f"Produced by:\n\n```\n{results['command']}\n```\n",
             f"Model: {results['model']}; {results['images']} photos ({', '.join(results['data'])}).\n",
             "## Agreement (batch 10, onnxruntime vs PyTorch eager, float32)\n",
             "| setting | top-1 agreement | disagreements | max abs logit diff | export s |", "|---|---|---|---|---|"]
    for row in results["agreement"]:
        if "export_error" in row:
            lines.append(f"| {row['setting']} | export failed: {row['export_error']} | | | |")
        else:
            lines.append(f"| {row['setting']} | {row['top1_agreement']:.4f} | {row['top1_disagreements']} | "
                         f"{row['max_abs_logit_diff']:.2e} | {row['export_seconds']:.1f} |")
    timed_by = f"Timed again by `{results['latency_command']}`.\n" if "latency_command" in results else ""
    lines += ["", "## Latency, batch 1 (ms per image, median; speed-up over the unreduced model)\n", timed_by,
              "| threads | setting | PyTorch eager ms | onnxruntime ms | eager speed-up | onnxruntime speed-up "
              "(over its own none) | onnxruntime over eager none |", "|---|---|---|---|---|---|---|"]
    by_key = {(r["threads"], r["setting"], r["engine"]): r for r in results["latency"]}
    for threads, label, engine in by_key:
        if engine != "pytorch eager":
            continue
        eager, ort = by_key[threads, label, engine], by_key[threads, label, "onnxruntime"]
        lines.append(f"| {threads} | {label} | {eager['time_ms']:.2f} | {ort['time_ms']:.2f} | "
                     f"{eager['speedup_over_same_engine_none']:.2f} | {ort['speedup_over_same_engine_none']:.2f} | "
                     f"{ort['speedup_over_eager_none']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = photo_parser(__doc__)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="latency thread counts")
    parser.add_argument("--repeats", type=int, default=20, help="latency rounds (median)")
    parser.add_argument("--number", type=int, default=5, help="forwards per row per round")
    parser.add_argument("--max-images", type=int, help="first N photos only (a quick trial)")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results.json"))
    parser.add_argument("--latency-only", action="store_true",
                        help="export at batch 1 and time again; keep the agreement rows of the existing output")
    args = parser.parse_args()
    from transformers import AutoImageProcessor

    torch.set_num_threads(2)
    model = load_rapid_model(args.model)
    output = Path(args.output)
    if args.latency_only:
        previous = json.loads(output.read_text())
        photos, rows, exported = None, previous["agreement"], {}
    else:
        photos, _ = load_photos([Path(d) for d in args.data_dirs], AutoImageProcessor.from_pretrained(args.model))
        photos = photos[:args.max_images] if args.max_images else photos
        print(f"{len(photos)} photos", flush=True)
        rows, exported = [], {}
    workdir = Path(tempfile.mkdtemp(prefix="onnx_agreement_"))
    for label, settings in SETTINGS:
        rapid = RapidConfig(**settings)
        name = label.replace(" ", "_").replace("=", "")
        if args.latency_only:
            exported[label] = export_onnx(model, workdir / f"{name}_b1.onnx", rapid=rapid, batch_size=1)
            continue
        start = time.perf_counter()
        try:
            path = export_onnx(model, workdir / f"{name}_b{AGREEMENT_BATCH}.onnx", rapid=rapid,
                               batch_size=AGREEMENT_BATCH)
            exported[label] = export_onnx(model, workdir / f"{name}_b1.onnx", rapid=rapid, batch_size=1)
        except Exception as error:  # recorded, not hidden: the table says which setting does not export
            message = str(error).strip().splitlines()
            summary = next((line for line in message if "Error" in line or "guard" in line), message[-1])
            rows.append({"setting": label, "rapid": rapid.to_dict(), "export_error": summary[:300]})
            print(label, "export failed:", summary[:300], flush=True)
            continue
        seconds = (time.perf_counter() - start) / 2
        row = {"setting": label, "rapid": rapid.to_dict(), "export_seconds": seconds,
               **agreement(model, rapid, path, photos)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    latency_records = latency(model, exported, args.threads, args.repeats, args.number)
    command = "RAPID_HF_ASSETS=../shared/assets python experiments/onnx_agreement/run.py"
    results = {
        "command": command if not args.latency_only else previous["command"],
        "model": Path(args.model).name, "data": [Path(d).name for d in args.data_dirs],
        "images": len(photos) if photos is not None else previous["images"],
        "agreement": rows, "latency": latency_records, **run_info(),
        "onnxruntime_version": __import__("onnxruntime").__version__,
    }
    if args.latency_only:
        results["latency_command"] = " ".join([command, *sys.argv[1:]])
    output.write_text(json.dumps(results, indent=2) + "\n")
    output.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
