"""Top-k accuracy as an `evaluate` metric module, shipped inside rapid_hf so it loads offline by path.

Load it with `evaluate.load(path_to_this_folder)` (or `rapid_hf.evaluation.metrics.load_metric("top_k_accuracy")`):
the Hub's `accuracy` metric has no top-k and needs network access to fetch.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Top-k accuracy: the fraction of examples whose reference label is among the first k ranked predictions.
Predictions are ranked class indices (best first), e.g. `logits.topk(5).indices`; every requested k must be at
most the number of ranked predictions given. Top-1 agreement with another model is the same metric with that
model's top-1 classes as references.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `int`): ranked predicted class indices per example, best first.
    references (`list` of `int`): the true class index of each example.
    k (`int` or `list` of `int`, default `[1, 5]`): which top-k accuracies to return.
Returns:
    `dict`: `{"top{k}": float}` for each requested k, e.g. `{"top1": 0.79, "top5": 0.94}`.
Examples:
    >>> metric = evaluate.load("rapid_hf/evaluation/metrics/top_k_accuracy")
    >>> metric.compute(predictions=[[3, 1], [0, 2]], references=[1, 2], k=[1, 2])
    {'top1': 0.0, 'top2': 1.0}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopKAccuracy(evaluate.Metric):
    """Top-k accuracy from ranked class predictions."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("int64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, k=(1, 5)) -> dict[str, float]:
        ks = [k] if isinstance(k, int) else list(k)
        ranked = np.asarray(predictions, dtype=np.int64)
        labels = np.asarray(references, dtype=np.int64)
        if ranked.ndim != 2 or ranked.shape[0] != labels.shape[0] or labels.shape[0] == 0:
            raise ValueError(
                f"predictions must be one equal-length ranked list per reference, got {ranked.shape[0]} lists "
                f"for {labels.shape[0]} references"
            )
        for value in ks:
            if not isinstance(value, int) or not 1 <= value <= ranked.shape[1]:
                raise ValueError(f"k={value!r} is invalid: expected an int in [1, {ranked.shape[1]}] (ranks given)")
        hits = ranked == labels[:, None]
        return {f"top{value}": float(hits[:, :value].any(axis=1).mean()) for value in ks}
