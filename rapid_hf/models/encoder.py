"""The reduced encoder forward over a stock transformers `ViTModel`/`DeiTModel` backbone.

The backbone's own modules (embeddings, layers, final layer norm) do the work, so ordinary checkpoints load
unchanged; this loop only adds a reduction step between each layer's attention residual and its MLP. All
per-forward state (sizes, token counts) lives in local variables and the returned output, never on modules,
so one model object can serve several threads at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.vit.modeling_vit import eager_attention_forward

from rapid_hf.models.configuration_rapid import as_pair
from rapid_hf.reduction.attention import size_bias
from rapid_hf.reduction.config import RapidConfig
from rapid_hf.reduction.steps import LayerStep, layer_steps, reduce_tokens
from rapid_hf.reduction.tracing import (
    Plan,
    initial_assignment,
    initial_pruned_at,
    scatter_to_patches,
    sources_from_assignment,
    update_assignment,
)


@dataclass
class ReducedEncoderOutput:
    """What the reduced encoder returns to the model heads.

    With `output_sources` (P = patches of the input's grid, row-major; CLS/distillation tokens are not patches):
    `sources` `(B, N_out, P)` bool, which patches each output token stands for; `layer_sources` one
    `(B, N_l, P)` bool per layer, after its reduction. With `output_dense`: `dense_features` `(B, P, C)`, each
    patch given its output token's final feature (zeros for pruned patches). With either: `pruned_at` `(B, P)`
    long, the layer that pruned each patch (-1: never).
    """

    last_hidden_state: Tensor
    sizes: Tensor
    token_counts: tuple[int, ...]
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor | None, ...] | None = None
    sources: Tensor | None = None
    pruned_at: Tensor | None = None
    layer_sources: tuple[Tensor, ...] | None = None
    dense_features: Tensor | None = None


def check_pixel_values(
    pixel_values: Tensor | None,
    num_channels: int,
    patch_size: int | Sequence[int] | None = None,
    image_size: int | Sequence[int] | None = None,
) -> Tensor:
    """Reject inputs the encoder cannot reduce, with a message naming the problem.

    `patch_size`: the image must hold at least one patch. `image_size`: the size the model's position embeddings
    were trained for; pass None when interpolating them (`interpolate_pos_encoding=True`).

    NaN/inf pixels are refused (ValueError): they make similarity scores NaN, and token choices ranked by NaN
    are arbitrary. The test is one float32 sum over the input (0.04% of a DeiT-Tiny forward on CPU, see
    results/robustness.md; on a GPU it adds one device sync). Under `torch.compile` (and for meta tensors) it is
    skipped to keep the graph whole: a non-finite pixel then turns every logit of its image, and only of its
    image, into NaN.
    """
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
    height, width = pixel_values.shape[2:]
    if image_size is not None and (height, width) != as_pair(image_size):
        expected = "x".join(map(str, as_pair(image_size)))
        raise ValueError(
            f"pixel_values of {height}x{width} px do not match the model's {expected} px: resize the images, or "
            "pass interpolate_pos_encoding=True (token schedules adapt to the token count)"
        )
    if patch_size is not None and (height < as_pair(patch_size)[0] or width < as_pair(patch_size)[1]):
        patch = "x".join(map(str, as_pair(patch_size)))
        raise ValueError(f"pixel_values of {height}x{width} px is smaller than one {patch} patch")
    checkable = not torch.compiler.is_compiling() and pixel_values.device.type != "meta"
    if checkable and not torch.isfinite(pixel_values.sum(dtype=torch.float32)):
        _raise_not_finite(pixel_values)
    return pixel_values


def _raise_not_finite(pixel_values: Tensor) -> None:
    finite = torch.isfinite(pixel_values)
    if finite.all():
        raise ValueError(
            f"pixel_values are too large (largest |value| {pixel_values.abs().max().item():.3g}): their float32 "
            "sum overflows; preprocessed pixel values are normally within a few units of 0"
        )
    images = (~finite).flatten(1).any(dim=1).nonzero().flatten().tolist()
    raise ValueError(
        f"pixel_values has {int(pixel_values.isnan().sum())} NaN and {int(pixel_values.isinf().sum())} infinite "
        f"value(s) (batch index {images}): token reduction cannot rank tokens by NaN similarity scores"
    )


REDUCTION_RANGE = "rapid_hf.reduce_tokens"
"""Name of the profiler range around each layer's reduction step (`torch.profiler.record_function`)."""

FLOAT_BIAS_ATTENTION: tuple[str | None, ...] = (None, "eager", "sdpa")
"""Attention implementations that take proportional attention's additive float bias `(B, 1, 1, N)`."""


def check_attention_implementation(attn_implementation: str | None, rapid: RapidConfig) -> None:
    """Refuse proportional attention on kernels that cannot add a float bias (flash, flex), never drop it."""
    if rapid.prop_attn and rapid.reduces and attn_implementation not in FLOAT_BIAS_ATTENTION:
        raise ValueError(
            f"RapidConfig.prop_attn=True adds log(token size) to attention logits as a float bias, which "
            f"attn_implementation={attn_implementation!r} cannot take: use model.set_attn_implementation('sdpa') "
            "(or 'eager'), or RapidConfig(prop_attn=False)"
        )


def _attention_interface(attention: nn.Module) -> Callable:
    return ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation, eager_attention_forward)


def reduced_layer_forward(
    layer: nn.Module,
    hidden: Tensor,
    sizes: Tensor | None,
    step: LayerStep,
    num_protected: int,
    prop_attn: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None, Plan | None]:
    """A ViT/DeiT layer with a reduction step after the attention residual (ToMe's placement).

    Mirrors the stock layer operation for operation, so with nothing to remove the result is bit-identical.
    Returns the new hidden states, sizes, the attention weights (None under SDPA) and the layer's reduction
    plan (None if nothing moved), which tracing applies to its patch map.
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

    with torch.profiler.record_function(REDUCTION_RANGE):  # lets profilers and the benchmark time the reduction
        hidden, sizes, plan = reduce_tokens(step, hidden, sizes, keys, query, attention.scaling, bias, num_protected)

    residual = hidden
    hidden = layer.dropout(layer.mlp(layer.layernorm_after(hidden)))
    return hidden + residual, sizes, weights, plan


def reduced_encoder_forward(
    backbone: nn.Module,
    pixel_values: Tensor,
    rapid: RapidConfig,
    num_protected: int,
    interpolate_pos_encoding: bool = False,
    output_hidden_states: bool = False,
    output_attentions: bool = False,
    output_sources: bool = False,
    output_dense: bool = False,
) -> ReducedEncoderOutput:
    """Embeddings, every layer with its reduction step, then the final layer norm of `backbone`.

    `output_sources` / `output_dense` trace which patches each token stands for (see `ReducedEncoderOutput`);
    when both are off no trace is computed at all.
    """
    embeddings = backbone.embeddings
    check_attention_implementation(backbone.config._attn_implementation, rapid)
    patch_embeddings = embeddings.patch_embeddings
    pixel_values = check_pixel_values(
        pixel_values,
        patch_embeddings.num_channels,
        patch_embeddings.patch_size,
        image_size=None if interpolate_pos_encoding else patch_embeddings.image_size,
    )
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
    trace = output_sources or output_dense
    if trace:
        assignment = initial_assignment(hidden.shape[0], hidden.shape[1] - num_protected, num_protected, hidden.device)
        pruned_at = initial_pruned_at(assignment)
    layer_sources: list[Tensor] = []
    for index, (layer, step) in enumerate(zip(layers, steps, strict=True)):
        num_tokens = hidden.shape[1]
        hidden, sizes, weights, plan = reduced_layer_forward(layer, hidden, sizes, step, num_protected, rapid.prop_attn)
        if trace and plan is not None:
            assignment, pruned_at = update_assignment(plan, assignment, pruned_at, num_tokens, index)
        if output_sources:
            layer_sources.append(sources_from_assignment(assignment, hidden.shape[1]))
        counts.append(hidden.shape[1])
        if output_hidden_states:
            all_hidden.append(hidden)
        if output_attentions:
            all_attentions.append(weights)

    if sizes is None:
        sizes = hidden.new_ones(*hidden.shape[:2], 1, dtype=torch.float32)
    last_hidden_state = backbone.layernorm(hidden)
    return ReducedEncoderOutput(
        last_hidden_state=last_hidden_state,
        sizes=sizes[..., 0],
        token_counts=tuple(counts),
        hidden_states=tuple(all_hidden) if output_hidden_states else None,
        attentions=tuple(all_attentions) if output_attentions else None,
        sources=sources_from_assignment(assignment, hidden.shape[1]) if output_sources else None,
        pruned_at=pruned_at if trace else None,
        layer_sources=tuple(layer_sources) if output_sources else None,
        dense_features=scatter_to_patches(last_hidden_state, assignment) if output_dense else None,
    )
