"""The reduced encoder forward over a stock transformers `ViTModel`/`DeiTModel` backbone.

The backbone's own modules (embeddings, layers, final layer norm) do the work, so ordinary checkpoints load
unchanged; this loop only adds a reduction step between each layer's attention residual and its MLP. All
per-forward state (sizes, token counts) lives in local variables and the returned output, never on modules,
so one model object can serve several threads at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.vit.modeling_vit import eager_attention_forward

from rapid_hf.reduction.attention import size_bias
from rapid_hf.reduction.config import RapidConfig
from rapid_hf.reduction.steps import LayerStep, layer_steps, reduce_tokens


@dataclass
class ReducedEncoderOutput:
    """What the reduced encoder returns to the model heads."""

    last_hidden_state: Tensor
    sizes: Tensor
    token_counts: tuple[int, ...]
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor | None, ...] | None = None


def check_pixel_values(pixel_values: Tensor | None, num_channels: int) -> Tensor:
    """Reject inputs the encoder cannot reduce, with a message naming the problem."""
    if pixel_values is None:
        raise ValueError("pixel_values is required (a float tensor of shape (batch, channels, height, width))")
    if not isinstance(pixel_values, Tensor):
        raise ValueError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
    if pixel_values.ndim != 4:
        raise ValueError(
            f"pixel_values must have shape (batch, channels, height, width), got shape {tuple(pixel_values.shape)}"
        )
    if pixel_values.shape[1] != num_channels:
        raise ValueError(
            f"pixel_values has {pixel_values.shape[1]} channels but the model expects {num_channels} "
            f"(shape {tuple(pixel_values.shape)})"
        )
    if pixel_values.shape[0] == 0:
        raise ValueError("pixel_values is an empty batch (batch size 0)")
    if not pixel_values.is_floating_point():
        raise ValueError(f"pixel_values must be a floating-point tensor, got dtype {pixel_values.dtype}")
    return pixel_values


def _attention_interface(attention: nn.Module) -> Callable:
    return ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation, eager_attention_forward)


def reduced_layer_forward(
    layer: nn.Module,
    hidden: Tensor,
    sizes: Tensor | None,
    step: LayerStep,
    num_protected: int,
    prop_attn: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """A ViT/DeiT layer with a reduction step after the attention residual (ToMe's placement).

    Mirrors the stock layer operation for operation, so with nothing to remove the result is bit-identical.
    Returns the new hidden states, sizes and the attention weights (None under SDPA).
    """
    attention = layer.attention
    normed = layer.layernorm_before(hidden)
    head_shape = (*normed.shape[:-1], -1, attention.head_dim)
    query = attention.q_proj(normed).view(head_shape).transpose(1, 2)
    keys = attention.k_proj(normed).view(head_shape).transpose(1, 2)
    values = attention.v_proj(normed).view(head_shape).transpose(1, 2)
    bias = size_bias(sizes, query.dtype) if prop_attn else None
    attended, weights = _attention_interface(attention)(
        attention,
        query,
        keys,
        values,
        bias,
        dropout=0.0 if not attention.training else attention.attention_dropout,
        scaling=attention.scaling,
    )
    attended = attention.o_proj(attended.reshape(*normed.shape[:-1], -1).contiguous())
    hidden = layer.dropout(attended) + hidden

    hidden, sizes, _ = reduce_tokens(step, hidden, sizes, keys, query, attention.scaling, bias, num_protected)

    residual = hidden
    hidden = layer.dropout(layer.mlp(layer.layernorm_after(hidden)))
    return hidden + residual, sizes, weights


def reduced_encoder_forward(
    backbone: nn.Module,
    pixel_values: Tensor,
    rapid: RapidConfig,
    num_protected: int,
    interpolate_pos_encoding: bool = False,
    output_hidden_states: bool = False,
    output_attentions: bool = False,
) -> ReducedEncoderOutput:
    """Embeddings, every layer with its reduction step, then the final layer norm of `backbone`."""
    embeddings = backbone.embeddings
    pixel_values = check_pixel_values(pixel_values, embeddings.patch_embeddings.num_channels)
    expected_dtype = embeddings.patch_embeddings.projection.weight.dtype
    if pixel_values.dtype != expected_dtype:
        pixel_values = pixel_values.to(expected_dtype)
    hidden = embeddings(pixel_values, interpolate_pos_encoding=bool(interpolate_pos_encoding))

    layers = backbone.layers
    steps = layer_steps(rapid, hidden.shape[1], len(layers), num_protected)
    sizes: Tensor | None = None
    counts: list[int] = []
    all_hidden: list[Tensor] = [hidden] if output_hidden_states else []
    all_attentions: list[Tensor | None] = []
    for layer, step in zip(layers, steps, strict=True):
        hidden, sizes, weights = reduced_layer_forward(layer, hidden, sizes, step, num_protected, rapid.prop_attn)
        counts.append(hidden.shape[1])
        if output_hidden_states:
            all_hidden.append(hidden)
        if output_attentions:
            all_attentions.append(weights)

    if sizes is None:
        sizes = hidden.new_ones(*hidden.shape[:2], 1, dtype=torch.float32)
    return ReducedEncoderOutput(
        last_hidden_state=backbone.layernorm(hidden),
        sizes=sizes[..., 0],
        token_counts=tuple(counts),
        hidden_states=tuple(all_hidden) if output_hidden_states else None,
        attentions=tuple(all_attentions) if output_attentions else None,
    )
