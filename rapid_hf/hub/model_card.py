"""Model cards for reduced models, built with `huggingface_hub`'s `ModelCard`/`ModelCardData`.

The metadata (license, library, pipeline tag, base model, datasets, tags, `model-index`) comes from
`ModelCardData`; the body from `modelcard_template.md`. Every number on the card is copied from a measured
record (`rapid_hf.hub.results`); a quantity nobody measured is left out, never estimated. The card names the data
that was measured: a Hub dataset by its id, a local imagefolder as such (never as a Hub dataset it may sample),
and it holds no local path (the commands that made the records stay in `eval_results.json`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

import rapid_hf
from rapid_hf.hub.results import MeasuredResults, setting_text
from rapid_hf.reduction.config import RapidConfig

TEMPLATE_PATH = Path(__file__).with_name("modelcard_template.md")
LOCAL_DATASET_TYPE = "imagefolder"
LOCAL_DATASET_NAME = "local imagefolder"
TESTED_TRANSFORMERS = ">=5.24,<5.26"
"""The transformers versions rapid_hf is tested against (pyproject.toml pins the same range). A card names this
range, never the installed version, so it reads the same whichever version in the range built it."""

METHOD_TEXT: dict[str, tuple[str, str]] = {
    "rapid": ("RAPID", "redundancy-aware pruning in the shallow layers, then merging of unimportant tokens (guided by "
                       "the attention of the CLS token) in the deep layers."),
    "tome": ("ToMe", "bipartite merging of the most similar tokens in every layer (size-weighted average)."),
    "tofu": ("ToFu", "pruning of the most similar tokens in layers 0..L//2, then norm-preserving "
                     "(MLERP) merging."),
    "crucial": ("crucial-token merging", "the least important tokens (by the attention of the CLS token) are merged "
                                         "into the most important, crucial, ones."),
    "pitome": ("PiToMe", "the tokens with the highest energy (similarity to many others) are merged bipartitely, the "
                         "low-energy ones are protected (spectrum-preserving token merging)."),
    "topk": ("top-k fusion", "the most important tokens (by attention) are kept and the least important are fused "
                             "into one token, weighted by their attention (EViT-style, training-free)."),
    "none": ("no reduction", "the unreduced model, packaged with the same code."),
}

# (record key, model-index metric type, display name)
EVALUATION_METRICS = (
    ("top1", "accuracy", "Top-1 accuracy"),
    ("top5", "top_5_accuracy", "Top-5 accuracy"),
    ("output_tokens", "output_tokens", "Output tokens"),
)
BENCHMARK_METRICS = (("speedup", "throughput_ratio", "Throughput ratio vs unreduced"),)
TABLE_COLUMNS = (
    ("top1", "top-1"),
    ("top5", "top-5"),
    ("agreement", "top-1 agreement with unreduced"),
    ("kl", "KL(unreduced ‖ reduced)"),
    ("output_tokens", "output tokens"),
    ("speedup", "throughput ratio (vs unreduced)"),
    ("flop_ratio", "FLOP ratio (unreduced / this)"),
)
EVALUATION_CONTEXT_KEYS = ("dataset", "split", "subset", "precision")
BENCHMARK_CONTEXT_KEYS = ("device", "batch_size", "precision", "num_threads", "timer", "repeats")


@dataclass(frozen=True)
class CardInfo:
    """What a card says besides the numbers: where it lives and what it was built from.

    dataset_id / dataset_name: how the card names the evaluation data; None derives them from the evaluation
    record (`evaluation_dataset`). settings_source: "model" when `rapid` are the model's own saved settings
    (with `overrides` the fields the command line changed), "defaults" when they are the paper defaults.
    """

    repo_id: str
    base_model: str | None
    rapid: RapidConfig
    license: str = "apache-2.0"
    dataset_id: str | None = None
    dataset_name: str | None = None
    model_note: str | None = None
    settings_source: str = "defaults"
    overrides: Mapping[str, Any] | None = None
    speed: Mapping[str, Any] | None = None
    """`rapid_speed` of a model calibrated to a speed target (`rapid-hf calibrate --speedup`), or None."""

    def __post_init__(self) -> None:
        if self.rapid.method not in METHOD_TEXT:
            raise ValueError(f"no card text for method {self.rapid.method!r}: choose from {', '.join(METHOD_TEXT)}")
        if self.settings_source not in ("model", "defaults"):
            raise ValueError(f"settings_source {self.settings_source!r} is invalid: 'model' or 'defaults'")


def is_local_dataset(record: Mapping[str, Any]) -> bool:
    """Whether an evaluation record measured a local imagefolder (`data_source`, or a dataset no Hub id names)."""
    if record.get("data_source") is not None:
        return record["data_source"] == LOCAL_DATASET_TYPE
    dataset = str(record.get("dataset", ""))
    try:
        validate_repo_id(dataset)
    except HFValidationError:
        return True
    return Path(dataset).exists()


def evaluation_dataset(info: CardInfo, record: Mapping[str, Any] | None) -> tuple[str | None, str]:
    """(Hub dataset id or None, display name) of the data a card's accuracy was measured on."""
    if record is None or is_local_dataset(record):
        return info.dataset_id, info.dataset_name or info.dataset_id or LOCAL_DATASET_NAME
    dataset_id = info.dataset_id or str(record["dataset"])
    return dataset_id, info.dataset_name or dataset_id


def _number(value: Any) -> float | int:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"measured value {value!r} is not a finite number")
    return value


def _measured(record: Mapping[str, Any] | None, key: str) -> bool:
    """Whether `record` holds a value for `key` (the harness writes None for what it could not measure)."""
    return record is not None and record.get(key) is not None


def _context(record: Mapping[str, Any], keys: tuple[str, ...]) -> str:
    return ", ".join(f"{key}={record[key]}" for key in keys if _measured(record, key))


def _format(value: Any) -> str:
    value = _number(value)
    return str(value) if isinstance(value, int) else f"{value:.4f}".rstrip("0").rstrip(".")


def eval_results(info: CardInfo, results: MeasuredResults) -> list[EvalResult]:
    """`model-index` entries: one per measured metric of this model (none when nothing was measured)."""
    entries = []
    dataset_id, dataset_name = evaluation_dataset(info, results.evaluation)
    datasets = (
        (results.evaluation, EVALUATION_METRICS, dataset_id or LOCAL_DATASET_TYPE, dataset_name),
        (results.benchmark, BENCHMARK_METRICS, "synthetic", "synthetic input batch (rapid_hf benchmark)"),
    )
    for record, metrics, dataset_type, dataset_name in datasets:
        if record is None:
            continue
        # A split name only means something for a Hub dataset (a local imagefolder's is always "train").
        split = record.get("split") if dataset_type not in ("synthetic", LOCAL_DATASET_TYPE) else None
        for key, metric_type, metric_name in metrics:
            if not _measured(record, key):
                continue
            entries.append(
                EvalResult(
                    task_type="image-classification",
                    dataset_type=dataset_type,
                    dataset_name=dataset_name,
                    dataset_split=split,
                    metric_type=metric_type,
                    metric_name=metric_name,
                    metric_value=round(_number(record[key]), 4),
                )
            )
    return entries


def results_table(results: MeasuredResults, info: CardInfo) -> str:
    """Markdown table of the measured numbers (this model and, if measured, the unreduced model)."""
    measured = {**(results.benchmark or {}), **(results.evaluation or {})}
    columns = [(key, title) for key, title in TABLE_COLUMNS if _measured(measured, key)]
    if not columns:
        return ""
    rows = [f"| model | {' | '.join(title for _, title in columns)} |", f"|---|{'---|' * len(columns)}"]
    if results.reference is not None:
        reference = [_format(results.reference[key]) if _measured(results.reference, key) else "" for key, _ in columns]
        rows.append(f"| unreduced (measured in the same run) | {' | '.join(reference)} |")
    this = [_format(measured[key]) for key, _ in columns]
    rows.append(f"| {METHOD_TEXT[info.rapid.method][0]} ({setting_text(info.rapid)}) | {' | '.join(this)} |")
    return "\n".join(rows)


def _results_note(results: MeasuredResults) -> str:
    notes = []
    if results.evaluation is None:
        notes.append("Accuracy was not measured for this card (no evaluation results were given).")
    if results.benchmark is None:
        notes.append("Speed was not measured for this card (no benchmark results were given).")
    else:
        notes.append("The throughput ratio is this model's images per second divided by the unreduced model's, "
                     "both measured in the same benchmark run; absolute speed depends on the hardware, so only "
                     "ratios are quoted.")
    return " ".join(notes)


def _provenance(results: MeasuredResults, info: CardInfo) -> list[str]:
    lines = []
    if info.model_note:
        lines.append(info.model_note)
    if info.settings_source == "model":
        changed = f", with {', '.join(f'{k}={v!r}' for k, v in info.overrides.items())} set on the command line" \
            if info.overrides else ""
        lines.append(f"Reduction settings: the model's own saved settings (config.json `rapid`){changed}.")
    if results.sources:
        names = ", ".join(f"`{source.path.name}`" for source in results.sources)
        lines.append(f"Records: {names} (copied into `eval_results.json` with the commands that produced them).")
    if results.evaluation is not None:
        shown = {**results.evaluation, "dataset": evaluation_dataset(info, results.evaluation)[1]}
        if is_local_dataset(results.evaluation):
            shown.pop("split", None)  # an imagefolder's split is always "train": it says nothing
        context = _context(shown, EVALUATION_CONTEXT_KEYS)
        lines.append(f"Accuracy: {results.evaluation['n_samples']} labelled images"
                     + (f" ({context})" if context else "")
                     + ", by the rapid_hf evaluation harness (`rapid_hf.evaluation.accuracy`). Top-1 agreement "
                     "and KL compare with the unreduced model on the same images.")
    if results.benchmark is not None:
        context = _context(results.benchmark, BENCHMARK_CONTEXT_KEYS)
        lines.append("Speed: the rapid_hf benchmark (`rapid_hf.evaluation.throughput`), timing a synthetic batch at "
                     "the model's resolution" + (f"; {context}." if context else "."))
    if not results.sources:
        lines.append("Nothing was measured for this card.")
    lines.append("The numbers are self-reported by the rapid_hf harness, not verified by the Hub.")
    return lines


def build_model_card(info: CardInfo, results: MeasuredResults, template_path: Path = TEMPLATE_PATH) -> ModelCard:
    """The model card of a reduced model: metadata via `ModelCardData`, body from the template."""
    method_title, method_summary = METHOD_TEXT[info.rapid.method]
    model_name = info.repo_id.split("/")[-1]
    entries = eval_results(info, results)
    dataset_id = evaluation_dataset(info, results.evaluation)[0]
    card_data = ModelCardData(
        license=info.license,
        library_name="transformers",
        pipeline_tag="image-classification",
        base_model=info.base_model,
        datasets=[dataset_id] if dataset_id else None,
        tags=["vision", "image-classification", "token-reduction", "rapid_hf", info.rapid.method, "custom_code"],
        model_name=model_name if entries else None,
        eval_results=entries or None,
    )
    base_text = f"[{info.base_model}](https://huggingface.co/{info.base_model})" if info.base_model else "A ViT"
    table = results_table(results, info)
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        model_name=model_name,
        base_model_text=base_text,
        method_title=method_title,
        method_summary=method_summary,
        setting=setting_text(info.rapid) + speed_text(info.speed),
        results_table=table,
        results_note=_results_note(results) if table else "",
        provenance=_provenance(results, info),
        repo_id=info.repo_id,
        version=rapid_hf.__version__,
        transformers_range=TESTED_TRANSFORMERS,
        rapid_json=json.dumps(info.rapid.to_dict(), indent=2),
    )


def speed_text(speed: Mapping[str, Any] | None) -> str:
    """The card's sentence on a speed-calibrated model: the target, where it was measured and what was measured."""
    if not speed:
        return ""
    machine = speed.get("machine") or {}
    labels = (("processor", "on"), ("runtime", "runtime"), ("batch_size", "batch"), ("threads", "threads"))
    where = ", ".join(f"{label} {machine[key]}" for key, label in labels if machine.get(key))
    measured = speed.get("measured_speedup")
    outcome = "not measured" if measured is None else f"measured {_format(measured)}x"
    return (f" Calibrated to a speed-up of {_format(speed.get('speed_target'))}x over the unreduced model "
            f"({where}): {outcome}, predicted {_format(speed.get('predicted_speedup'))}x by the cost model; "
            "speed-ups hold for that machine and runtime only.")


def card_metrics(card: ModelCard) -> dict[str, Any]:
    """`{metric type: value}` of a card's `model-index` (for checks and tests)."""
    data: Mapping[str, Any] = card.data.to_dict()
    metrics: dict[str, Any] = {}
    for model in data.get("model-index", []):
        for result in model["results"]:
            for metric in result["metrics"]:
                metrics[metric["type"]] = metric["value"]
    return metrics


__all__ = [
    "LOCAL_DATASET_NAME",
    "TEMPLATE_PATH",
    "TESTED_TRANSFORMERS",
    "CardInfo",
    "build_model_card",
    "card_metrics",
    "eval_results",
    "evaluation_dataset",
    "is_local_dataset",
]
