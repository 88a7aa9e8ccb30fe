"""What each layer does for a given `RapidConfig`, and one reduction step as a pure tensor function.

The model adapter calls `layer_steps` once per forward (schedules depend on the input's token count) and
`reduce_tokens` inside each layer, after the attention residual and before the MLP.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from rapid_hf.reduction.attention import cls_attention, per_patch_importance
from rapid_hf.reduction.config import ImportanceMode, ImportanceSource, RapidConfig
from rapid_hf.reduction.matching import bipartite_similarity, matching_metric, removal_cap
from rapid_hf.reduction.methods import (
    crucial_merge_plan,
    importance_merge_plan,
    redundancy_prune_plan,
    similarity_merge_plan,
    similarity_prune_plan,
)
from rapid_hf.reduction.plan import MergeMode, ReductionPlan, SelectionPlan, apply_plan
from rapid_hf.reduction.schedule import expand_schedule, schedule_for_output_tokens

Operation = Literal["prune_redundant", "merge_important", "prune_similar", "merge_similar", "merge_crucial"]


@dataclass(frozen=True)
class LayerStep:
    """One layer's reduction: the operation, the requested r (capped at run time) and the merge mode."""

    operation: Operation | None
    r: int
    merge_mode: MergeMode = "mean"
    prune_threshold: float = 0.7
    importance_ratio: float = 0.2
    importance_weight: float = 50.0
    importance_mode: ImportanceMode = "shift"
    importance_source: ImportanceSource = "attention"


def requested_schedule(config: RapidConfig, num_tokens: int, num_layers: int, num_protected: int) -> list[int]:
    """Per-layer requested r for an input of `num_tokens` tokens (before caps)."""
    if config.method == "none":
        return [0] * num_layers
    if config.output_tokens is not None:
        return schedule_for_output_tokens(num_tokens, num_layers, num_protected, config.output_tokens)
    return expand_schedule(config.r, num_layers)


def layer_operation(config: RapidConfig, layer: int, num_layers: int) -> Operation | None:
    """The method's operation at `layer` (DESIGN.md): RAPID and ToFu switch from pruning to merging."""
    if config.method == "none":
        return None
    if config.method == "tome":
        return "merge_similar"
    if config.method == "crucial":
        return "merge_crucial"
    before_switch = layer < config.resolved_switch_layer(num_layers)
    if config.method == "rapid":
        return "prune_redundant" if before_switch else "merge_important"
    return "prune_similar" if before_switch else "merge_similar"


@functools.lru_cache(maxsize=512)
def layer_steps(config: RapidConfig, num_tokens: int, num_layers: int, num_protected: int) -> tuple[LayerStep, ...]:
    """Every layer's step for an input of `num_tokens` tokens.

    Cached (configs and steps are immutable): a forward asks for the same steps as the last one with the same
    settings and input size, and building them is ~80 us, a few percent of a batch-1 forward.
    """
    schedule = requested_schedule(config, num_tokens, num_layers, num_protected)
    mode = config.resolved_merge_mode()
    return tuple(
        LayerStep(
            operation=layer_operation(config, layer, num_layers) if r > 0 else None,
            r=r,
            merge_mode=mode,
            prune_threshold=config.prune_threshold,
            importance_ratio=config.importance_ratio,
            importance_weight=config.importance_weight,
            importance_mode=config.importance_mode,
            importance_source=config.importance_source,
        )
        for layer, r in enumerate(schedule)
    )


def build_plan(
    step: LayerStep,
    keys: Tensor,
    query: Tensor,
    scaling: float,
    attention_bias: Tensor | None,
    num_protected: int,
    sizes: Tensor | None,
) -> ReductionPlan | SelectionPlan | None:
    """The plan for one layer from its keys `(B, heads, N, d)` (and the CLS query and token sizes `(B, N, 1)`,
    None = all 1, when importance is used)."""
    r = min(step.r, removal_cap(keys.shape[2], num_protected))
    if step.operation is None or r == 0:
        return None
    if step.operation in ("merge_crucial", "merge_important"):
        attention = cls_attention(query, keys, scaling, attention_bias)
        if step.importance_source == "per_patch":
            attention = per_patch_importance(attention, sizes)
    if step.operation == "merge_crucial":
        return crucial_merge_plan(matching_metric(keys), r, num_protected, attention, step.importance_ratio)
    scores = bipartite_similarity(matching_metric(keys), num_protected)
    if step.operation == "merge_similar":
        return similarity_merge_plan(scores, r, num_protected)
    if step.operation == "prune_similar":
        return similarity_prune_plan(scores, r, num_protected)
    if step.operation == "prune_redundant":
        return redundancy_prune_plan(scores, r, num_protected, step.prune_threshold)
    return importance_merge_plan(
        scores, r, num_protected, attention, step.importance_ratio, step.importance_weight, step.importance_mode
    )


def reduce_tokens(
    step: LayerStep,
    hidden: Tensor,
    sizes: Tensor | None,
    keys: Tensor,
    query: Tensor,
    scaling: float,
    attention_bias: Tensor | None,
    num_protected: int,
) -> tuple[Tensor, Tensor | None, ReductionPlan | SelectionPlan | None]:
    """One reduction step: returns the reduced hidden states, sizes and the plan (None if nothing moved)."""
    plan = build_plan(step, keys, query, scaling, attention_bias, num_protected, sizes)
    if plan is None:
        return hidden, sizes, None
    hidden, sizes = apply_plan(plan, hidden, sizes, step.merge_mode)
    return hidden, sizes, plan
