"""What every family adapter shares: attention that records its keys and query, a layer with a reduction point
between its attention residual and its MLP residual, and the class swap that turns stock modules into these.

A family adapter (one small file per model family) subclasses its stock attention and layer classes with these
mixins and says how its layer splits into `attention_residual` and `mlp_residual`. The backbone calls every layer
through the layer module's own `__call__`, so forward hooks, pre-hooks, gradient checkpointing
(`GradientCheckpointingLayer`) and transformers' output capture work as on the stock model, and every module
returns what its stock class returns. Per-forward state (token sizes, the layer's reduction step, its plan) travels
in a `LayerReduction` passed as a keyword argument, one per layer and forward, never stored on a module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.vit.modeling_vit import eager_attention_forward
from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY

from rapid_hf.reduction.attention import attention_importance, size_bias
from rapid_hf.reduction.plan import gather_tokens
from rapid_hf.reduction.steps import LayerStep, reduce_tokens
from rapid_hf.reduction.tracing import Plan

REDUCTION_RANGE = "rapid_hf.reduce_tokens"
"""Name of the profiler range around each layer's reduction step (`torch.profiler.record_function`)."""


@dataclass(eq=False)
class LayerReduction:
    """One layer's reduction state for one forward, passed to the layer as `reduction=` (never stored on a module).

    The backbone fills the inputs; the layer's attention module records the keys and query it computed, and the
    layer records what its step did. Layers and attention modules keep their stock outputs (a tensor; the
    `(output, weights)` pair), so hooks written for the stock model work unchanged. Under gradient checkpointing
    the layer runs again in backward and records the same values again (its inputs here are never changed).

    Inputs: `step` (None: no reduction in this layer), `sizes` `(B, N, 1)` float32 (None: every token stands for
    one patch), `num_protected` tokens at the front, `prop_attn` (add `log(size)` to attention logits),
    `importance_queries` (the query rows that judge importance: the family's, see `ReducedBackboneMixin`) and
    `carried`: per-token tensors `(B, N, ...)` that travel with their tokens (a merged token keeps its
    destination's row), e.g. rotary position embeddings.
    Outputs: `keys`, `query` `(B, heads, N, d)` (set by the attention module), `plan` (None: nothing moved),
    `sizes_out` and `carried_out` after the step.
    """

    step: LayerStep | None = None
    sizes: Tensor | None = None
    num_protected: int = 0
    prop_attn: bool = True
    importance_queries: Callable[[Tensor], Tensor] | None = None
    carried: dict[str, Tensor] = field(default_factory=dict)
    keys: Tensor | None = None
    query: Tensor | None = None
    plan: Plan | None = None
    sizes_out: Tensor | None = None
    carried_out: dict[str, Tensor] = field(default_factory=dict)

    def attention_bias(self, dtype: torch.dtype, attention_mask: Tensor | None) -> Tensor | None:
        """Proportional attention's bias once tokens have merged, else the mask given (the backbone refuses
        masks under reduction, so at most one of the two is set)."""
        if self.prop_attn and self.sizes is not None:
            return size_bias(self.sizes, dtype)
        return attention_mask

    def record_attention(self, keys: Tensor, query: Tensor) -> None:
        self.keys, self.query = keys, query

    def reduce(self, hidden_states: Tensor, scaling: float, bias: Tensor | None) -> Tensor:
        """Run this layer's step on `hidden_states` (after the attention residual), recording its results."""
        step = self.step
        self.sizes_out, self.carried_out = self.sizes, self.carried
        if step is None or step.operation is None:
            return hidden_states
        importance, num_tokens = None, hidden_states.shape[1]
        if step.needs_importance:
            queries = self.query if self.importance_queries is None else self.importance_queries(self.query)
            importance = attention_importance(queries, self.keys, scaling, bias)
        with _reduction_range():
            hidden_states, self.sizes_out, self.plan = reduce_tokens(
                step, hidden_states, self.sizes, self.keys, importance, self.num_protected
            )
        if self.plan is not None and self.carried:
            index = self.plan.output_tokens(num_tokens)
            self.carried_out = {name: gather_tokens(value, index) for name, value in self.carried.items()}
        return hidden_states


class ReducingAttentionMixin:
    """Self-attention that records its keys and query in `reduction` (a `LayerReduction`) when one is given.

    Mirrors `ViTAttention.forward` of transformers 5.25 (the same code as DeiT's and DINOv2's, and CLIP's with
    other names) operation for operation, so the output is bit-identical and the return value is the stock
    `(output, weights)` pair; `tests/test_adapters.py`, `tests/test_dinov2.py` and `tests/test_clip.py` check it
    against the stock forwards. Families whose attention names its parts differently set the class attributes
    below.
    """

    output_projection: str = "o_proj"
    scaling_attribute: str = "scaling"
    dropout_attribute: str = "attention_dropout"
    eager_attention: Callable = staticmethod(eager_attention_forward)
    """The family's own `eager_attention_forward` (used when `attn_implementation="eager"`)."""

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        *,
        reduction: LayerReduction | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        if reduction is not None:
            reduction.record_attention(key_states, query_states)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, self.eager_attention
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else getattr(self, self.dropout_attribute),
            scaling=self.attention_scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        attn_output = getattr(self, self.output_projection)(attn_output)
        return attn_output, attn_weights

    @property
    def attention_scaling(self) -> float:
        """The factor on `q k^T` (1 / sqrt(head_dim) for every supported family)."""
        return getattr(self, self.scaling_attribute)


class ReducingLayerMixin:
    """A transformer layer with ToMe's reduction point: attention residual, reduction step, MLP residual.

    Family adapters implement `attention_residual` (calling their attention module through `__call__` with the
    keyword arguments given, `reduction` among them) and `mlp_residual`, and name their attention module in
    `attention_module_name`; this `forward` is shared. It takes the stock arguments plus `reduction` (keyword
    only) and returns what the stock layer returns, the hidden states; without `reduction` it computes exactly
    what the stock layer computes.
    """

    attention_module_name: str = "attention"

    def attention_residual(self, hidden_states: Tensor, attention_mask: Tensor | None, **kwargs: Any) -> Tensor:
        """The hidden states after the attention residual."""
        raise NotImplementedError(f"{type(self).__name__} must implement attention_residual")

    def mlp_residual(self, hidden_states: Tensor) -> Tensor:
        """The hidden states after the layer's MLP residual."""
        raise NotImplementedError(f"{type(self).__name__} must implement mlp_residual")

    @property
    def attention_scaling(self) -> float:
        return getattr(self, self.attention_module_name).attention_scaling

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        *,
        reduction: LayerReduction | None = None,
        **kwargs: Any,
    ) -> Tensor:
        if reduction is None:
            return self.mlp_residual(self.attention_residual(hidden_states, attention_mask, **kwargs))
        bias = reduction.attention_bias(hidden_states.dtype, attention_mask)
        hidden_states = self.attention_residual(hidden_states, bias, reduction=reduction, **kwargs)
        hidden_states = reduction.reduce(hidden_states, self.attention_scaling, bias)
        return self.mlp_residual(hidden_states)

    def keys_and_query(self, hidden_states: Tensor, **layer_arguments: Any) -> tuple[Tensor, Tensor]:
        """The keys and query `(B, heads, N, d)` this layer's attention computes on `hidden_states` (no reduction);
        `layer_arguments`: what the backbone hands this layer besides the hidden states (its `layer_arguments`)."""
        probe = LayerReduction()
        self.attention_residual(hidden_states, None, reduction=probe, **layer_arguments)
        return probe.keys, probe.query


class OutProjAttentionMixin(ReducingAttentionMixin):
    """`ReducingAttentionMixin` for attention that names its parts `out_proj`, `scale` and `dropout` (CLIP, SigLIP)."""

    output_projection = "out_proj"
    scaling_attribute = "scale"
    dropout_attribute = "dropout"


class SelfAttnLayerMixin(ReducingLayerMixin):
    """Layers computed as `x + self_attn(layer_norm1(x))`, then `x + mlp(layer_norm2(x))` (CLIP, SigLIP)."""

    attention_module_name = "self_attn"

    def attention_residual(self, hidden_states: Tensor, attention_mask: Tensor | None, **kwargs: Any) -> Tensor:
        attended, _ = self.self_attn(self.layer_norm1(hidden_states), attention_mask, **kwargs)
        return hidden_states + attended

    def mlp_residual(self, hidden_states: Tensor) -> Tensor:
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


def _reduction_range() -> contextlib.AbstractContextManager:
    """A profiler range around the reduction step while a profiler records (opening one costs ~10-20 us, a few
    percent of a batch-1 forward); never under `torch.compile`, which would only warn about it."""
    if torch.compiler.is_compiling() or not torch.autograd._profiler_enabled():
        return contextlib.nullcontext()
    return torch.profiler.record_function(REDUCTION_RANGE)


def swap_module_classes(root: nn.Module, classes: Mapping[type[nn.Module], type[nn.Module]]) -> None:
    """Give every submodule of `root` whose exact class is a key of `classes` the mapped class, in place.

    The mapped classes are subclasses that add no parameters or buffers, so weights, devices, dtypes and hooks
    already registered stay as they are (nothing is copied). transformers keeps each model's output-capture
    specification in a registry keyed by class name; swapped models are entered under their new class.
    """
    for module in root.modules():
        new_class = classes.get(type(module))
        if new_class is None:
            continue
        if not issubclass(new_class, type(module)):
            raise TypeError(f"{new_class.__name__} is not a subclass of {type(module).__name__}")
        module.__class__ = new_class
        if isinstance(module, PreTrainedModel):
            _CAN_RECORD_REGISTRY[module] = module._can_record_outputs


def inherit_checkpoint_conversions(rapid_class: type[PreTrainedModel], stock_class: type[PreTrainedModel]) -> None:
    """Let `rapid_class` load checkpoints as `stock_class` does (e.g. legacy key names of Hub checkpoints).

    transformers looks weight renamings up by class name, then `model_type`; a Rapid class has neither of the
    stock ones, so it registers the stock class's renamings under its own name (transformers' extension point).
    """
    conversions = get_checkpoint_conversion_mapping(stock_class.__name__)
    if conversions is not None:
        register_checkpoint_conversion_mapping(rapid_class.__name__, conversions, overwrite=True)
