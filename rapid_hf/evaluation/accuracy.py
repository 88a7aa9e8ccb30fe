"""Accuracy and fidelity of token-reduction variants on labelled images, single- or multi-process.

Each batch is decoded once and run through the unreduced model first (its logits are the fidelity reference),
then through every variant. Per-image results are gathered across processes with `gather_for_metrics` (which
drops the samples `accelerate` repeats to even out the last batch) and put back in row order, so any number of
processes gives the numbers of a single one.

Record fields (stable; `rapid_hf.hub` model cards read them):
    model: model id or path as given. dataset, split, subset: where the images came from.
    label: the row name (method name, or the variant name for named variants). method: the RapidConfig method.
    r: the requested r (int, per-layer list or [r, inflection]); None when the row is set by an output-token target.
    output_tokens: tokens leaving the last layer, as the model reported (`out.token_counts[-1]`).
    token_counts: tokens after each layer. rapid: the full `RapidConfig.to_dict()` of the row.
    input_tokens, removed_per_layer, capped_layers, capped: tokens entering the encoder, tokens each layer actually
        removed, the layers that removed fewer than r asked (each removes at most half of its unprotected tokens),
        and whether r asks for more than any layer can remove (`rapid_hf.evaluation.variants.schedule_fields`).
    top1, top5: accuracy in [0, 1] against the dataset labels (shipped `top_k_accuracy` evaluate module).
    agreement: fraction of images whose top-1 class equals the unreduced model's.
    kl: mean KL(unreduced || reduced) of the softmax outputs, in nats.
    n_samples: images evaluated (each counted once, whatever the number of processes).
    delta_top1_vs_tome, delta_top1_vs_tome_ci95: top1 minus ToMe's top1 at the same r / output-token target on the
        same images, and its paired-bootstrap 95% interval [low, high]; None for ToMe itself or without a ToMe row.
    precision: fp32, fp16 or bf16 (autocast).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from rapid_hf.evaluation.fidelity import kl_divergence
from rapid_hf.evaluation.loading import autocast_for
from rapid_hf.evaluation.metrics import load_metric
from rapid_hf.evaluation.variants import REFERENCE, Variant, schedule_fields

BOOTSTRAP_RESAMPLES = 10_000


@dataclass
class Predictions:
    """Per-image outputs of an evaluation run, in row order.

    index, labels: `(n,)`. ranks: `(n, 1 + V, k)` top-k class indices of the unreduced model then each variant.
    kl: `(n, V)` KL(unreduced || variant). token_counts: per variant, tokens after each layer. input_tokens: tokens
    entering the encoder (the unreduced model's count), None if the model does not report token counts.
    """

    index: np.ndarray
    labels: np.ndarray
    ranks: np.ndarray
    kl: np.ndarray
    token_counts: list[tuple[int, ...]]
    input_tokens: int | None = None


def _check_labels(labels: torch.Tensor, num_labels: int) -> None:
    bad = labels[(labels < 0) | (labels >= num_labels)]
    if bad.numel():
        raise ValueError(
            f"dataset label {int(bad[0])} is outside the model's {num_labels} classes: the dataset must be labelled "
            "(no -1 test labels) with the model's class indices (config.id2label)"
        )


@torch.inference_mode()
def predict(
    model: Any,
    dataloader: torch.utils.data.DataLoader,
    variants: Sequence[Variant],
    accelerator: Any = None,
    precision: str = "fp32",
    top_k: int = 5,
) -> Predictions:
    """Run the unreduced model and every variant on each batch; gather per-image results in row order.

    `accelerator` (an `accelerate.Accelerator`, created if None) prepares the DataLoader, so the same call works
    under `accelerate launch`. Each variant runs as per-call settings: the model's own settings are untouched.
    """
    from accelerate import Accelerator

    accelerator = accelerator or Accelerator()
    model.to(accelerator.device)
    dataloader = accelerator.prepare(dataloader)
    num_labels = model.config.num_labels
    top_k = min(top_k, num_labels)
    token_counts: list[tuple[int, ...]] = [()] * len(variants)
    input_tokens = None
    gathered: list[dict[str, torch.Tensor]] = []
    progress = tqdm(dataloader, desc="evaluate", disable=not accelerator.is_local_main_process)
    for batch in progress:
        _check_labels(batch["labels"], num_labels)
        with autocast_for(accelerator.device, precision):
            unreduced = model(pixel_values=batch["pixel_values"], rapid=REFERENCE)
            reference = unreduced.logits.float()
            if getattr(unreduced, "token_counts", None):
                input_tokens = int(unreduced.token_counts[0])
            ranks, kls = [reference.topk(top_k, dim=-1).indices], []
            for position, variant in enumerate(variants):
                output = unreduced  # "none" rows are the reference itself: never run twice
                if variant.rapid.method != "none":
                    output = model(pixel_values=batch["pixel_values"], rapid=variant.rapid)
                logits = output.logits.float()
                token_counts[position] = tuple(output.token_counts)
                ranks.append(logits.topk(top_k, dim=-1).indices)
                kls.append(kl_divergence(reference, logits))
        local = {
            "index": batch["index"],
            "labels": batch["labels"],
            "ranks": torch.stack(ranks, dim=1),
            "kl": torch.stack(kls, dim=1) if kls else reference.new_zeros(len(reference), 0),
        }
        gathered.append({k: v.cpu() for k, v in accelerator.gather_for_metrics(local).items()})
    if not gathered:
        raise ValueError("the data loader yielded no images: check the dataset, split, subset and max_samples")
    merged = {key: torch.cat([part[key] for part in gathered]).numpy() for key in gathered[0]}
    order = np.argsort(merged["index"], kind="stable")
    merged = {key: value[order] for key, value in merged.items()}
    duplicated = merged["index"][1:][np.diff(merged["index"]) == 0]
    if duplicated.size:
        raise RuntimeError(f"rows {duplicated[:5].tolist()} were evaluated more than once (data sharding bug)")
    return Predictions(token_counts=token_counts, input_tokens=input_tokens, **merged)


def paired_bootstrap_ci(
    values: np.ndarray,
    baseline: np.ndarray,
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Mean of `values - baseline` (paired per image) and its percentile-bootstrap interval.

    Resampling images with replacement only changes how often each distinct difference occurs, so the bootstrap
    draws multinomial counts over the distinct values: exact, and cheap for 0/1 correctness differences.
    """
    differences = np.asarray(values, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    if differences.ndim != 1 or differences.size == 0:
        raise ValueError("paired_bootstrap_ci needs two equal-length, non-empty 1-D arrays")
    distinct, counts = np.unique(differences, return_counts=True)
    draws = np.random.default_rng(seed).multinomial(differences.size, counts / differences.size, size=resamples)
    means = draws @ distinct / differences.size
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(differences.mean()), float(low), float(high)


def summarize(predictions: Predictions, variants: Sequence[Variant], **context: Any) -> list[dict[str, Any]]:
    """One record per variant (fields in the module docstring); `context` (model, dataset, ...) is copied in."""
    metric = load_metric("top_k_accuracy")
    ks = [1, 5] if predictions.ranks.shape[-1] >= 5 else [1]
    labels = predictions.labels
    reference_top1 = predictions.ranks[:, 0, 0]
    correct = predictions.ranks[:, 1:, 0] == labels[:, None]
    tome_column = {v.setting: i for i, v in enumerate(variants) if v.label == "tome" and v.rapid.method == "tome"}
    records = []
    for position, variant in enumerate(variants):
        ranks = predictions.ranks[:, 1 + position]
        accuracy = metric.compute(predictions=ranks.tolist(), references=labels.tolist(), k=ks)
        agreement = metric.compute(predictions=ranks.tolist(), references=reference_top1.tolist(), k=[1])["top1"]
        delta, interval = None, None
        baseline = tome_column.get(variant.setting)
        if baseline is not None and baseline != position:
            delta, low, high = paired_bootstrap_ci(correct[:, position], correct[:, baseline])
            interval = [low, high]
        records.append(
            {
                **context,
                "label": variant.label,
                "method": variant.rapid.method,
                "r": variant.requested_r,
                "output_tokens": predictions.token_counts[position][-1],
                "token_counts": list(predictions.token_counts[position]),
                **schedule_fields(variant.rapid, predictions.input_tokens, predictions.token_counts[position]),
                "rapid": variant.rapid.to_dict(),
                "top1": accuracy["top1"],
                "top5": accuracy.get("top5"),
                "agreement": agreement,
                "kl": float(predictions.kl[:, position].mean()),
                "n_samples": int(labels.size),
                "delta_top1_vs_tome": delta,
                "delta_top1_vs_tome_ci95": interval,
            }
        )
    return records
