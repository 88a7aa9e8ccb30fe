"""Per-layer statistics of a model's own tokens on calibration images, and the `switch_layer="auto"` rule.

Measured on the unreduced model, layer by layer, from the keys each layer computes (the matching metric every
method uses) and the CLS attention row:

- `redundant_fraction`: share of patch sources whose RAPID eq. (1) redundancy is > 0 at tau, i.e. that have a
  destination with cosine similarity above tau (a near-duplicate on the other side of the bipartite split);
- `cls_entropy`: entropy of the CLS attention over patch tokens divided by log(N_patch) (1 = uniform).

The auto rule (`auto_switch_layer`): prune while most patch tokens are still distinct, merge from the first
layer in which at least `min_redundant_fraction` of them have a near-duplicate. Averaging two distinct
low-level tokens distorts both, while averaging near-duplicates loses almost nothing; where few tokens have a
near-duplicate, dropping the most redundant ones distorts less. `experiments/switch_layer/switch_layer_study.py`
compares the rule with the switch layer that minimises the divergence on the calibration images.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from rapid_hf.reduction.attention import attention_importance
from rapid_hf.reduction.config import AUTO, RapidConfig
from rapid_hf.reduction.matching import bipartite_similarity, matching_metric

MIN_REDUNDANT_FRACTION = 0.75


@dataclass(frozen=True)
class LayerStatistics:
    """Token statistics of every layer (lists of length L), averaged over the images, plus per-image values.

    `redundant_fraction_per_image` is `(images, L)`: it shows whether one switch layer fits every image.
    """

    prune_threshold: float
    redundant_fraction: list[float]
    cls_entropy: list[float]
    redundant_fraction_per_image: list[list[float]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def redundant_fraction(scores: Tensor, threshold: float) -> Tensor:
    """`(B,)` share of patch sources with a destination more similar than `threshold` (eq. 1 score > 0).

    `scores` is the bipartite similarity `(B, |A|, |B|)` with protected rows/columns at -inf (row 0 = CLS).
    """
    best = scores[:, 1:].max(dim=-1).values
    return (best > threshold).float().mean(dim=-1)


def normalised_entropy(attention: Tensor, num_protected: int) -> Tensor:
    """`(B,)` entropy of the CLS attention `(B, N)` restricted to patch tokens, over log(N_patch)."""
    patches = attention[:, num_protected:].float()
    patches = patches / patches.sum(dim=-1, keepdim=True)
    entropy = -(patches * patches.clamp_min(torch.finfo(patches.dtype).tiny).log()).sum(dim=-1)
    return entropy / math.log(patches.shape[-1])


@torch.inference_mode()
def layer_statistics(
    model: Any, pixel_values: Tensor, prune_threshold: float = 0.7, batch_size: int = 50
) -> LayerStatistics:
    """Token statistics of the unreduced `model` (a Rapid classifier) on `pixel_values`, layer by layer."""
    if not isinstance(pixel_values, Tensor) or pixel_values.ndim != 4 or len(pixel_values) == 0:
        raise ValueError("layer_statistics needs a non-empty (images, channels, height, width) pixel_values tensor")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    backbone = model.rapid_backbone
    layers = backbone.reducing_layers
    num_protected = model.num_protected_tokens
    fractions, entropies = [], []
    for start in range(0, len(pixel_values), batch_size):
        batch = pixel_values[start : start + batch_size]
        hidden_states = model(pixel_values=batch, rapid=RapidConfig(method="none"), output_hidden_states=True)
        batch_fractions, batch_entropies = [], []
        for layer, hidden in zip(layers, hidden_states.hidden_states[:-1], strict=True):
            arguments = backbone.layer_arguments(backbone.carried_tokens(batch, hidden))  # e.g. rotary positions
            keys, query = layer.keys_and_query(hidden, **arguments)  # the keys and query the layer computes
            scores = bipartite_similarity(matching_metric(keys), num_protected)
            batch_fractions.append(redundant_fraction(scores, prune_threshold))
            importance = attention_importance(backbone.importance_queries(query), keys, layer.attention_scaling, None)
            batch_entropies.append(normalised_entropy(importance, num_protected))
        fractions.append(torch.stack(batch_fractions, dim=1))
        entropies.append(torch.stack(batch_entropies, dim=1))
    per_image = torch.cat(fractions)
    return LayerStatistics(
        prune_threshold=prune_threshold,
        redundant_fraction=per_image.mean(dim=0).tolist(),
        cls_entropy=torch.cat(entropies).mean(dim=0).tolist(),
        redundant_fraction_per_image=per_image.tolist(),
    )


def auto_switch_layer(fractions: list[float], min_redundant_fraction: float = MIN_REDUNDANT_FRACTION) -> int:
    """The first layer whose redundant fraction reaches `min_redundant_fraction` (L when none does)."""
    if not 0.0 < min_redundant_fraction <= 1.0:
        raise ValueError(f"min_redundant_fraction must be in (0, 1], got {min_redundant_fraction}")
    return next((layer for layer, value in enumerate(fractions) if value >= min_redundant_fraction), len(fractions))


def resolve_auto_switch_layer(
    model: Any,
    pixel_values: Tensor,
    min_redundant_fraction: float = MIN_REDUNDANT_FRACTION,
    batch_size: int = 50,
) -> RapidConfig:
    """Resolve `switch_layer="auto"` of `model.rapid` on calibration images; sets and returns the new config.

    Deterministic: the same images give the same layer. A config without "auto" is returned unchanged.
    """
    rapid = model.rapid
    if rapid.switch_layer != AUTO:
        return rapid
    statistics = layer_statistics(model, pixel_values, rapid.prune_threshold, batch_size)
    resolved = rapid.replace(switch_layer=auto_switch_layer(statistics.redundant_fraction, min_redundant_fraction))
    model.set_rapid(resolved)
    return resolved
