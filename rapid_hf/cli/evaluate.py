"""Top-1/top-5 accuracy and fidelity to the unreduced model of token-reduction methods on labelled images.

    rapid-hf evaluate --model facebook/deit-small-patch16-224 --dataset imagenet-1k --split validation \\
        --methods none,tome,tofu,rapid --r 8,13,16 --output eval.json
    rapid-hf evaluate --model ./calibrated --data-dir ./photos --subset report --methods none,rapid
    rapid-hf evaluate --model openai/clip-vit-base-patch32 --class-names ./classes.txt --data-dir ./photos \\
        --methods none,tome --r 8

`--data-dir` is a folder of images with a metadata.csv (file_name,label: the model's class index per image).

Runs unchanged under `accelerate launch --num_processes N -m rapid_hf.cli evaluate ...` (same numbers as one
process). Writes a JSON list of records (fields: `rapid_hf.evaluation.accuracy`, plus `settings_source` and
`overrides`) and a Markdown table next to it.
"""

from __future__ import annotations

import argparse
from typing import Any

from rapid_hf.cli import common

NAME = "evaluate"
HELP = "accuracy, agreement and KL vs the unreduced model on labelled images"
REQUIRES = {"eval": ("datasets", "evaluate", "accelerate")}
OUTPUT = "file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_model_argument(parser)
    common.add_processor_argument(parser)
    common.add_data_arguments(parser)
    common.add_variant_arguments(parser)
    common.add_precision_arguments(parser)
    common.add_device_arguments(parser)
    parser.add_argument("--output", default="eval.json", help="JSON path; the Markdown table goes next to it")
    common.add_class_names_argument(parser)


def check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Every flag and path, the model's config and its image processor, before any weight or image is read."""
    from pathlib import Path

    common.check_data_dir(args, parser)
    class_names = getattr(args, "class_names", None)
    if class_names is not None and not Path(class_names).is_file():
        parser.error(f"--class-names {class_names!r} is not a file")
    common.check_device(args, parser)
    common.resolve_rows(args, parser)
    args.image_processor = common.load_processor(args, parser)


def evaluate(args: argparse.Namespace, accelerator: Any = None) -> list[dict[str, Any]] | None:
    """Accuracy records of `args.variant_rows` (None on non-main processes of a distributed run)."""
    from accelerate import Accelerator

    from rapid_hf.evaluation.accuracy import predict, summarize
    from rapid_hf.evaluation.data import DataSpec, load_rows, make_dataloader
    from rapid_hf.evaluation.loading import load_rapid_model
    from rapid_hf.evaluation.report import run_info
    from rapid_hf.evaluation.variants import annotate_records

    common.set_threads(args)
    owns_accelerator = accelerator is None
    accelerator = accelerator or Accelerator(cpu=args.device == "cpu")
    spec = DataSpec(
        dataset=args.dataset,
        data_dir=args.data_dir,
        split=args.split,
        subset=args.subset,
        max_samples=args.max_samples,
        streaming=args.streaming,
        image_column=args.image_column,
        label_column=args.label_column,
    )
    rows = load_rows(spec)  # the dataset's columns are checked before the weights load
    model = load_rapid_model(args.model, accelerator.device)
    if args.class_names is not None:
        model = zero_shot_model(model, args.model, args.class_names)
    loader = make_dataloader(rows, args.image_processor, args.batch_size, args.num_workers, args.image_column,
                             args.label_column)
    predictions = predict(model, loader, args.variant_rows, accelerator, args.precision)
    accelerator.wait_for_everyone()
    if owns_accelerator:  # tear the process group down before exit, or a rank can abort while shutting down
        accelerator.end_training()
    if not accelerator.is_main_process:
        return None
    records = summarize(
        predictions,
        args.variant_rows,
        model=args.model,
        dataset=spec.name,
        data_source=common.data_source(args),
        split=spec.resolved_split,
        subset=spec.subset,
        precision=args.precision,
    )
    return [{**record, **run_info()} for record in annotate_records(records, args.variant_rows)]


def zero_shot_model(model: Any, name_or_path: str, class_names_path: str) -> Any:
    """The CLIP checkpoint as a zero-shot classifier over the class names of the file (one per line)."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from rapid_hf.evaluation.zero_shot import ZeroShotClassifier
    from rapid_hf.models.modeling_rapid_clip import RapidCLIPModel

    if not isinstance(model, RapidCLIPModel):
        raise ValueError(
            f"--class-names needs a CLIP checkpoint (CLIPModel); {name_or_path!r} loads as {type(model).__name__}"
        )
    names = [line.strip() for line in Path(class_names_path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return ZeroShotClassifier(model, AutoTokenizer.from_pretrained(name_or_path), names)


def run(args: argparse.Namespace) -> None:
    from rapid_hf.evaluation.report import ACCURACY_COLUMNS

    records = evaluate(args)
    if records is not None:
        print(common.write_outputs(records, args.output, ACCURACY_COLUMNS, common.command_line(NAME, args.argv)))
