"""What each layer does for a given `RapidConfig`, and one reduction step as a pure tensor function.

The model adapter calls `layer_steps` once per forward (schedules depend on the input's token count) and
`reduce_tokens` inside each layer, after the attention residual and before the MLP. The adapter also says which
tokens are protected (`num_protected`, 0 included) and how important each token is (`importance`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from rapid_hf.reduction.attention import per_patch_importance
from rapid_hf.reduction.baselines import FusePlan, pitome_margin, pitome_merge_plan, topk_fuse_plan
from rapid_hf.reduction.config import MergeMode, RapidConfig, reducing_layers
from rapid_hf.reduction.matching import bipartite_similarity, matching_metric, removal_cap
from rapid_hf.reduction.methods import (
    crucial_merge_plan,
    importance_merge_plan,
    redundancy_prune_plan,
    similarity_merge_plan,
    similarity_prune_plan,
)
from rapid_hf.reduction.plan import ReductionPlan, SelectionPlan, apply_plan
from rapid_hf.reduction.schedule import expand_schedule, schedule_for_output_tokens

Operation = Literal[
    "prune_redundant", "merge_important", "prune_similar", "merge_similar", "merge_crucial", "merge_energy", "fuse_topk"
]
IMPORTANCE_OPERATIONS: frozenset[str] = frozenset({"merge_important", "merge_crucial", "fuse_topk"})
METHOD_OPERATIONS: dict[str, Operation] = {
    "tome": "merge_similar", "crucial": "merge_crucial", "pitome": "merge_energy", "topk": "fuse_topk"
}
"""Methods that run one operation in every layer; RAPID and ToFu switch from pruning to merging."""


@dataclass(frozen=True)
class LayerStep:
    """One layer's reduction: the operation, the requested r (capped at run time), the merge mode it resolves to,
    and the settings it came from (the method's knobs are read from them, never restated here)."""

    operation: Operation | None
    r: int
    settings: RapidConfig
    layer: int = 0
    num_layers: int = 1

    @property
    def merge_mode(self) -> MergeMode:
        return self.settings.resolved_merge_mode()

    @property
    def needs_importance(self) -> bool:
        """Whether the plan ranks tokens by attention importance (RAPID's merging stage, crucial merging)."""
        return self.operation in IMPORTANCE_OPERATIONS


def requested_schedule(config: RapidConfig, num_tokens: int, num_layers: int, num_protected: int) -> list[int]:
    """Per-layer requested r for an input of `num_tokens` tokens (before caps)."""
    if config.method == "none":
        return [0] * num_layers
    reducing = reducing_layers(num_layers, config.reduce_every)
    if config.output_tokens is not None:
        values = schedule_for_output_tokens(num_tokens, len(reducing), num_protected, config.output_tokens)
    else:
        values = expand_schedule(config.r, len(reducing))
    schedule = [0] * num_layers
    for layer, value in zip(reducing, values, strict=True):
        schedule[layer] = value
    return schedule


def layer_operation(config: RapidConfig, layer: int, num_layers: int) -> Operation | None:
    """The method's operation at `layer` (docs/METHOD.md): RAPID and ToFu switch from pruning to merging."""
    if config.method == "none":
        return None
    if config.method in METHOD_OPERATIONS:
        return METHOD_OPERATIONS[config.method]
    before_switch = layer < config.resolved_switch_layer(num_layers)
    if config.method == "rapid":
        return "prune_redundant" if before_switch else "merge_important"
    return "prune_similar" if before_switch else "merge_similar"


def layer_steps(config: RapidConfig, num_tokens: int, num_layers: int, num_protected: int) -> tuple[LayerStep, ...]:
    """Every layer's step for an input of `num_tokens` tokens.

    Cached in eager mode (configs and steps are immutable; building them is ~80 us, a few percent of a batch-1
    forward). Under `torch.compile` they are built afresh: the compiler runs this Python once per graph and
    guards on the settings, so a cache would only be traced through.
    """
    if torch.compiler.is_compiling():
        return _layer_steps(config, num_tokens, num_layers, num_protected)
    return _cached_layer_steps(config, num_tokens, num_layers, num_protected)


def _layer_steps(config: RapidConfig, num_tokens: int, num_layers: int, num_protected: int) -> tuple[LayerStep, ...]:
    schedule = requested_schedule(config, num_tokens, num_layers, num_protected)
    return tuple(
        LayerStep(
            operation=layer_operation(config, layer, num_layers) if r > 0 else None, r=r, settings=config,
            layer=layer, num_layers=num_layers,
        )
        for layer, r in enumerate(schedule)
    )


_cached_layer_steps = functools.lru_cache(maxsize=512)(_layer_steps)


def build_plan(
    step: LayerStep, keys: Tensor, importance: Tensor | None, num_protected: int, sizes: Tensor | None
) -> ReductionPlan | SelectionPlan | FusePlan | None:
    """The plan for one layer from its keys `(B, heads, N, d)`, the importance of each token `(B, N)` (given by
    the model adapter, see `attention_importance`; needed when `step.needs_importance`) and the token sizes
    `(B, N, 1)` (None = all 1)."""
    r = min(step.r, removal_cap(keys.shape[2], num_protected))
    if step.operation is None or r == 0:
        return None
    settings = step.settings
    if step.needs_importance:
        if importance is None:
            raise ValueError(f"{step.operation} ranks tokens by importance: the model adapter must pass it")
        if settings.importance_source == "per_patch":
            importance = per_patch_importance(importance, sizes)
    if step.operation == "merge_crucial":
        return crucial_merge_plan(matching_metric(keys), r, num_protected, importance, settings.importance_ratio)
    if step.operation == "fuse_topk":
        return topk_fuse_plan(importance, r, num_protected)
    if step.operation == "merge_energy":
        margin = pitome_margin(step.layer, step.num_layers)
        return pitome_merge_plan(matching_metric(keys), r, num_protected, margin)
    scores = bipartite_similarity(matching_metric(keys), num_protected)
    if step.operation == "merge_similar":
        return similarity_merge_plan(scores, r, num_protected)
    if step.operation == "prune_similar":
        return similarity_prune_plan(scores, r, num_protected)
    if step.operation == "prune_redundant":
        return redundancy_prune_plan(scores, r, num_protected, settings.prune_threshold)
    return importance_merge_plan(
        scores, r, num_protected, importance, settings.importance_ratio, settings.importance_weight,
        settings.importance_mode,
    )


def reduce_tokens(
    step: LayerStep,
    hidden: Tensor,
    sizes: Tensor | None,
    keys: Tensor,
    importance: Tensor | None,
    num_protected: int,
) -> tuple[Tensor, Tensor | None, ReductionPlan | SelectionPlan | FusePlan | None]:
    """One reduction step: returns the reduced hidden states, sizes and the plan (None if nothing moved)."""
    plan = build_plan(step, keys, importance, num_protected, sizes)
    if plan is None:
        return hidden, sizes, None
    if isinstance(plan, FusePlan):  # fused with importance weights, not sizes
        hidden, sizes = plan.apply(hidden, sizes, step.merge_mode)
    else:
        hidden, sizes = apply_plan(plan, hidden, sizes, step.merge_mode)
    return hidden, sizes, plan
