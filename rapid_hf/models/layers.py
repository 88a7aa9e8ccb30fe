"""What every family adapter shares: attention that also hands back its keys and query, a layer with a reduction
point between its attention residual and its MLP residual, and the class swap that turns stock modules into these.

A family adapter (one small file per model family) subclasses its stock attention and layer classes with these
mixins and says how its layer splits into `attention_residual` and `mlp_residual`. The backbone calls every layer
through the layer module's own `__call__`, so forward hooks, pre-hooks, gradient checkpointing
(`GradientCheckpointingLayer`) and transformers' output capture work as on the stock model. Per-forward state
(token sizes, the layer's reduction step, its plan) goes in as arguments and comes back as return values.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.vit.modeling_vit import eager_attention_forward
from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY

from rapid_hf.reduction.attention import size_bias
from rapid_hf.reduction.steps import LayerStep, reduce_tokens
from rapid_hf.reduction.tracing import Plan

REDUCTION_RANGE = "rapid_hf.reduce_tokens"
"""Name of the profiler range around each layer's reduction step (`torch.profiler.record_function`)."""

LayerOutput = tuple[Tensor, Tensor | None, Plan | None]
"""What a reducing layer returns: hidden states, token sizes `(B, N, 1)` (None: all 1) and its plan (None: nothing
moved). The hidden states come first, so transformers' output capture records them as the layer's output."""


class ReducingAttentionMixin:
    """Self-attention that returns `(output, weights, keys, query)`: the stock pair plus what reduction reads.

    Mirrors `ViTAttention.forward` of transformers 5.24 (the same code as DeiT's and DINOv2's, and CLIP's with
    other names) operation for operation, so with no bias the output is bit-identical; `tests/test_adapters.py`,
    `tests/test_dinov2.py` and `tests/test_clip.py` check it against the stock forwards. Families whose attention
    names its parts differently set the class attributes below.
    """

    output_projection: str = "o_proj"
    scaling_attribute: str = "scaling"
    dropout_attribute: str = "attention_dropout"
    eager_attention: Callable = staticmethod(eager_attention_forward)
    """The family's own `eager_attention_forward` (used when `attn_implementation="eager"`)."""

    def forward(
        self, hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs: Any
    ) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
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
        return attn_output, attn_weights, key_states, query_states

    @property
    def attention_scaling(self) -> float:
        """The factor on `q k^T` (1 / sqrt(head_dim) for every supported family)."""
        return getattr(self, self.scaling_attribute)


class ReducingLayerMixin:
    """A transformer layer with ToMe's reduction point: attention residual, reduction step, MLP residual.

    Family adapters implement `attention_residual` and `mlp_residual` and name their attention module in
    `attention_module`; this `forward` is shared. With `step=None` the layer computes exactly what the stock
    layer computes.
    """

    attention_module_name: str = "attention"

    def attention_residual(self, hidden_states: Tensor, attention_bias: Tensor | None, **kwargs: Any):
        """`(hidden after the attention residual, keys, query)`; the attention module is called by `__call__`."""
        raise NotImplementedError(f"{type(self).__name__} must implement attention_residual")

    def mlp_residual(self, hidden_states: Tensor) -> Tensor:
        """The hidden states after the layer's MLP residual."""
        raise NotImplementedError(f"{type(self).__name__} must implement mlp_residual")

    def forward(
        self,
        hidden_states: Tensor,
        sizes: Tensor | None = None,
        attention_mask: Tensor | None = None,
        step: LayerStep | None = None,
        num_protected: int = 1,
        prop_attn: bool = True,
        **kwargs: Any,
    ) -> LayerOutput:
        # The backbone refuses attention masks under reduction, so at most one of the two is set.
        bias = size_bias(sizes, hidden_states.dtype) if prop_attn and sizes is not None else attention_mask
        hidden_states, keys, query = self.attention_residual(hidden_states, bias, **kwargs)
        plan = None
        if step is not None and step.operation is not None:
            scaling = getattr(self, self.attention_module_name).attention_scaling
            with _reduction_range():
                hidden_states, sizes, plan = reduce_tokens(
                    step, hidden_states, sizes, keys, query, scaling, bias, num_protected
                )
        return self.mlp_residual(hidden_states), sizes, plan


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
