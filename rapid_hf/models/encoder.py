"""The reduced backbone forward shared by every family: embeddings, each layer through its own `__call__` with
its reduction step, the final norm; plus the checks at the model's boundary.

A family's backbone class mixes `ReducedBackboneMixin` into its stock backbone (e.g. `ViTModel`) and says how it
embeds pixels (`embed`) and finishes the sequence (`finish`). transformers' `capture_outputs` collects hidden
states and attention maps through hooks on the layer and attention modules, as for the stock model. All
per-forward state (settings, sizes, plans, traces) lives in local variables and the returned output, never on
modules, so one model object can serve several threads with different settings at once.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers.masking_utils import create_bidirectional_mask
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from rapid_hf.models.configuration_rapid import as_pair, as_rapid_config
from rapid_hf.models.layers import LayerReduction, swap_module_classes
from rapid_hf.models.outputs import RapidImageClassifierOutput, RapidModelOutput, reduction_fields
from rapid_hf.reduction.config import RapidConfig, static_ints
from rapid_hf.reduction.steps import layer_steps
from rapid_hf.reduction.tracing import (
    initial_assignment,
    initial_pruned_at,
    scatter_to_patches,
    sources_from_assignment,
    update_assignment,
)

FORWARD_OPTIONS = frozenset({"output_hidden_states", "output_attentions"})
"""Keyword arguments the reduced forward passes on to the layers (as the stock forward does)."""

FLOAT_BIAS_ATTENTION: tuple[str | None, ...] = (None, "eager", "sdpa")
"""Attention implementations that take proportional attention's additive float bias `(B, 1, 1, N)`."""


def check_pixel_values(
    pixel_values: Tensor | None,
    num_channels: int,
    patch_size: int | Sequence[int] | None = None,
    image_size: int | Sequence[int] | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Reject inputs the encoder cannot reduce, with a message naming the problem; return them in `dtype`.

    `patch_size`: the image must hold at least one patch. `image_size`: the size the model's position embeddings
    were trained for; pass None when interpolating them (`interpolate_pos_encoding=True`). `dtype`: the model's
    dtype; pixels are cast to it *before* the finiteness test, so a value that only overflows there (a float32
    7e4 fed to a float16 model) is refused too.

    NaN/inf pixels are refused (ValueError): they make similarity scores NaN, and token choices ranked by NaN
    are arbitrary. The test is one float32 sum over the input (0.04% of a DeiT-Tiny forward on CPU; on a GPU it
    adds one device sync). Under `torch.compile` (and for meta tensors) it is skipped to keep the graph whole: a
    non-finite pixel then turns every logit of its image, and only of its image, into NaN.
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
    cast = pixel_values if dtype is None or pixel_values.dtype == dtype else pixel_values.to(dtype)
    checkable = not torch.compiler.is_compiling() and pixel_values.device.type != "meta"
    if checkable and not torch.isfinite(cast.sum(dtype=torch.float32)):
        _raise_not_finite(pixel_values, cast)
    return cast


def _raise_not_finite(pixel_values: Tensor, cast: Tensor) -> None:
    if not torch.isfinite(pixel_values).all():
        images = (~torch.isfinite(pixel_values)).flatten(1).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(
            f"pixel_values has {int(pixel_values.isnan().sum())} NaN and {int(pixel_values.isinf().sum())} "
            f"infinite value(s) (batch index {images}): token reduction cannot rank tokens by NaN similarity scores"
        )
    largest = pixel_values.abs().max().item()
    if not torch.isfinite(cast).all():
        raise ValueError(
            f"pixel_values overflow the model's dtype {cast.dtype} (largest |value| {largest:.3g}, largest finite "
            f"{torch.finfo(cast.dtype).max:.3g}); preprocessed pixel values are normally within a few units of 0"
        )
    raise ValueError(
        f"pixel_values are too large (largest |value| {largest:.3g}): their float32 sum overflows; preprocessed "
        "pixel values are normally within a few units of 0"
    )


def check_attention_implementation(attn_implementation: str | None, rapid: RapidConfig) -> None:
    """Refuse proportional attention on kernels that cannot add a float bias (flash, flex), never drop it."""
    if rapid.prop_attn and rapid.reduces and attn_implementation not in FLOAT_BIAS_ATTENTION:
        raise ValueError(
            f"RapidConfig.prop_attn=True adds log(token size) to attention logits as a float bias, which "
            f"attn_implementation={attn_implementation!r} cannot take: use model.set_attn_implementation('sdpa') "
            "(or 'eager'), or RapidConfig(prop_attn=False)"
        )


def check_forward_options(kwargs: Mapping[str, Any]) -> None:
    """Refuse keyword arguments the reduced forward would otherwise silently ignore."""
    unsupported = sorted(set(kwargs) - FORWARD_OPTIONS)
    if unsupported:
        raise ValueError(
            f"unsupported forward argument(s) {unsupported}; Rapid models take pixel_values, labels, "
            f"interpolate_pos_encoding, rapid, output_sources, output_dense and {sorted(FORWARD_OPTIONS)}"
        )


class RapidSettingsMixin:
    """Reduction settings on a transformers model (backbone or head): `rapid`, `set_rapid`, `rapid=` at build.

    The model's own settings live in `config.rapid` (what the forward runs and `save_pretrained` writes);
    `forward(..., rapid=RapidConfig(...))` runs other settings for one call without touching them. Built from
    a family's plain config (e.g. `ViTConfig`), the model gets the Rapid config class, so it saves and reloads
    as a Rapid model. `module_classes` maps the family's stock submodule classes to their Rapid subclasses.
    """

    config_class: type
    module_classes: Mapping[type, type]

    def __init__(self, config: Any, *args: Any, rapid: RapidConfig | Mapping[str, Any] | None = None, **kwargs):
        super().__init__(self.config_class.for_model(config, rapid), *args, **kwargs)
        self.swap_modules()

    def swap_modules(self) -> None:
        """Give the stock submodules that reduce their Rapid classes (`module_classes`), in place."""
        swap_module_classes(self, self.module_classes)

    @property
    def rapid(self) -> RapidConfig:
        """The model's own reduction settings (`config.rapid` as a `RapidConfig`)."""
        return as_rapid_config(self.config.rapid)

    @rapid.setter
    def rapid(self, rapid: RapidConfig | Mapping[str, Any] | None) -> None:
        self.set_rapid(rapid)

    def set_rapid(self, rapid: RapidConfig | Mapping[str, Any] | None) -> None:
        """Change the model's own settings in place (no reload): sets `config.rapid`, validated for this model."""
        settings = as_rapid_config(rapid)
        check_attention_implementation(self.config._attn_implementation, settings)
        self.config.rapid = settings

    @classmethod
    def from_pretrained(cls, *args: Any, rapid: RapidConfig | Mapping[str, Any] | None = None, **kwargs: Any):
        """`PreTrainedModel.from_pretrained`, plus `rapid=RapidConfig(...)` to set the model's settings at load."""
        model = super().from_pretrained(*args, **kwargs)
        if rapid is not None:
            (model[0] if isinstance(model, tuple) else model).set_rapid(rapid)
        return model


class ReducedBackboneMixin(RapidSettingsMixin):
    """The reduced forward of a backbone (`ViTModel`, `SiglipVisionTransformer`, ...), shared by every family.

    A family's backbone provides the members below that have no default (the family protocol, see
    docs/ADDING_A_FAMILY.md): `reducing_layers`, `embedding_dtype`, `embed` and `finish`; and may override
    `pixel_geometry`, `importance_queries`, `always_interpolates_positions`, `carried_tokens` and
    `layer_arguments`. Which tokens are protected is its config's to say (`config_class.protected_tokens`).
    """

    always_interpolates_positions: bool = False
    """True for families whose embeddings resize position embeddings to any input size (DINOv2)."""

    @property
    def reducing_layers(self) -> nn.ModuleList:
        """The layers, in order, each a `ReducingLayerMixin`."""
        raise NotImplementedError(f"{type(self).__name__} must name its layers (reducing_layers)")

    def pixel_geometry(self) -> tuple[int, Any, Any]:
        """`(num_channels, patch_size, image_size)` the pixel values are checked against: the backbone config's
        (every supported family names them so); override where a family's config does not."""
        return self.config.num_channels, as_pair(self.config.patch_size), as_pair(self.config.image_size)

    @property
    def embedding_dtype(self) -> torch.dtype:
        """The dtype pixels are cast to (the patch projection's)."""
        raise NotImplementedError(f"{type(self).__name__} must implement embedding_dtype")

    def embed(self, pixel_values: Tensor, bool_masked_pos: Tensor | None, interpolate_pos_encoding: bool) -> Tensor:
        """The token sequence entering the first layer."""
        raise NotImplementedError(f"{type(self).__name__} must implement embed")

    def finish(self, hidden_states: Tensor, sizes: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """`(last_hidden_state, pooler_output)` from the last layer's output and its token sizes `(B, N, 1)`
        (a pooling head weighs merged tokens by them; None while no token has merged)."""
        raise NotImplementedError(f"{type(self).__name__} must implement finish")

    def importance_queries(self, query: Tensor) -> Tensor:
        """The query rows `(B, heads, Q, d)` whose attention ranks token importance: the CLS query (token 0) by
        default; a family without a CLS token returns every query (the attention each token receives)."""
        return query[:, :, :1]

    def carried_tokens(self, pixel_values: Tensor, hidden_states: Tensor) -> dict[str, Tensor]:
        """Per-token tensors `(B, N, ...)` that travel with their tokens through reduction (e.g. rotary positions)."""
        return {}

    def layer_arguments(self, carried: dict[str, Tensor]) -> dict[str, Any]:
        """Extra keyword arguments of one layer's call, from the carried tensors of its tokens."""
        return {}

    @property
    def num_protected_tokens(self) -> int:
        """Tokens at the front never removed, merged or used as merge destinations (the config says which)."""
        return self.config_class.protected_tokens(self.config)

    @property
    def num_input_tokens(self) -> int:
        """Tokens entering the encoder at the checkpoint's image size: patches plus protected tokens."""
        return self.config_class.input_tokens(self.config)

    def rapid_settings(self, rapid: RapidConfig | Mapping[str, Any] | None) -> RapidConfig:
        """The settings of one forward: `rapid` if given, else the model's own `config.rapid`.

        Under `torch.compile` their ints are specialised (`static_ints`): each distinct setting compiles once, to a
        graph with static token counts.
        """
        settings = as_rapid_config(getattr(self.config, "rapid", None) if rapid is None else rapid)
        return static_ints(settings) if torch.compiler.is_compiling() else settings

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        pixel_values: Tensor | None = None,
        bool_masked_pos: Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        attention_mask: Tensor | None = None,
        rapid: RapidConfig | Mapping[str, Any] | None = None,
        output_sources: bool = False,
        output_dense: bool = False,
        **kwargs: Any,
    ) -> RapidModelOutput:
        """The stock backbone forward with a reduction step in each layer (embeddings, layers through `__call__`,
        final norm and pooling, as the family's stock forward).

        `rapid`: settings for this call only (a `RapidConfig` or its dict); None runs the model's `config.rapid`.
        `output_sources` / `output_dense` trace which patches each token stands for (see `RapidModelOutput`);
        when both are off no trace is computed at all.
        """
        check_forward_options(kwargs)
        settings = self.rapid_settings(rapid)
        check_attention_implementation(self.config._attn_implementation, settings)
        if attention_mask is not None and settings.reduces:
            raise ValueError("attention_mask cannot be combined with token reduction (tokens merge and leave)")
        num_channels, patch_size, image_size = self.pixel_geometry()
        interpolates = interpolate_pos_encoding or self.always_interpolates_positions
        pixel_values = check_pixel_values(
            pixel_values, num_channels, patch_size, image_size=None if interpolates else image_size,
            dtype=self.embedding_dtype,
        )
        hidden = self.embed(pixel_values, bool_masked_pos, bool(interpolate_pos_encoding))
        # No mask given means none: under torch.export transformers would build an all-true (N x N) mask, which
        # masks nothing and no longer fits once layers remove tokens.
        if attention_mask is not None:
            attention_mask = create_bidirectional_mask(
                config=self.config, inputs_embeds=hidden, attention_mask=attention_mask
            )

        layers = self.reducing_layers
        num_protected = self.num_protected_tokens
        # A token count made symbolic by a new input size (dynamo's automatic dynamic shapes) is specialised, as
        # the settings are: every layer's token count stays static. In eager mode this is the int itself.
        num_input_tokens = operator.index(hidden.shape[1])
        settings.validate_for_model(num_layers=len(layers), num_tokens=num_input_tokens, num_protected=num_protected)
        steps = layer_steps(settings, num_input_tokens, len(layers), num_protected)
        sizes: Tensor | None = None
        carried = self.carried_tokens(pixel_values, hidden)
        counts: list[int] = []
        trace = output_sources or output_dense
        if trace:
            assignment = initial_assignment(
                hidden.shape[0], hidden.shape[1] - num_protected, num_protected, hidden.device
            )
            pruned_at = initial_pruned_at(assignment)
        layer_sources: list[Tensor] = []
        for index, (layer, step) in enumerate(zip(layers, steps, strict=True)):
            num_tokens = hidden.shape[1]
            reduction = LayerReduction(
                step=step, sizes=sizes, num_protected=num_protected, prop_attn=settings.prop_attn,
                importance_queries=self.importance_queries, carried=carried,
            )
            hidden = layer(hidden, attention_mask, reduction=reduction, **self.layer_arguments(carried), **kwargs)
            sizes, carried, plan = reduction.sizes_out, reduction.carried_out, reduction.plan
            if trace and plan is not None:
                assignment, pruned_at = update_assignment(plan, assignment, pruned_at, num_tokens, index)
            if output_sources:
                layer_sources.append(sources_from_assignment(assignment, hidden.shape[1]))
            counts.append(hidden.shape[1])

        last_hidden_state, pooler_output = self.finish(hidden, sizes)
        if sizes is None:
            sizes = hidden.new_ones(*hidden.shape[:2], 1, dtype=torch.float32)
        return RapidModelOutput(
            last_hidden_state=last_hidden_state,
            pooler_output=pooler_output,
            token_counts=tuple(counts),
            sizes=sizes[..., 0],
            sources=sources_from_assignment(assignment, hidden.shape[1]) if output_sources else None,
            pruned_at=pruned_at if trace else None,
            layer_sources=tuple(layer_sources) if output_sources else None,
            dense_features=scatter_to_patches(last_hidden_state, assignment) if output_dense else None,
        )


class RapidHeadMixin(RapidSettingsMixin):
    """A task head over a reduced backbone (`model.vit`, `model.deit`, ...)."""

    base_model_prefix: str

    @property
    def rapid_backbone(self) -> ReducedBackboneMixin:
        """The reduced backbone (e.g. `model.vit`)."""
        return getattr(self, self.base_model_prefix)

    @property
    def num_protected_tokens(self) -> int:
        """Tokens at the front that are never removed (CLS, distillation token, registers)."""
        return self.rapid_backbone.num_protected_tokens

    @property
    def num_input_tokens(self) -> int:
        """Tokens entering the encoder at the checkpoint's image size: patches plus protected tokens."""
        return self.rapid_backbone.num_input_tokens

    def pooled_patch_mean(self, outputs: Any) -> Tensor:
        """Mean of the patch tokens of the last hidden state, weighted by token size.

        Under reduction each remaining patch token stands for `size` patches (pruned patches are gone), so the
        mean over the remaining tokens is size-weighted: `sum(s x) / sum(s)`, computed as `mean(s x) / mean(s)`,
        which with every size 1 (no reduction) is bit-identical to the stock `patch_tokens.mean(dim=1)`.
        """
        start = self.num_protected_tokens
        patch_tokens = outputs.last_hidden_state[:, start:]
        sizes = outputs.sizes[:, start:, None].to(patch_tokens.dtype)
        return (patch_tokens * sizes).mean(dim=1) / sizes.mean(dim=1)

    def encode(
        self,
        pixel_values: Tensor | None,
        interpolate_pos_encoding: bool | None,
        attention_mask: Tensor | None,
        rapid: RapidConfig | Mapping[str, Any] | None,
        output_sources: bool,
        output_dense: bool,
        **kwargs: Any,
    ) -> RapidModelOutput:
        """The reduced backbone's output, for a head's forward (`rapid`: settings for this call only)."""
        return self.rapid_backbone(
            pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            attention_mask=attention_mask,
            rapid=rapid,
            output_sources=output_sources,
            output_dense=output_dense,
            **kwargs,
        )

    def classifier_output(
        self, outputs: RapidModelOutput, logits: Tensor, labels: Tensor | None
    ) -> RapidImageClassifierOutput:
        """A classifier head's output: the stock loss on `logits`, the backbone's hidden states, attentions and
        reduction fields."""
        loss = None if labels is None else self.loss_function(labels, logits, self.config)
        return RapidImageClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **reduction_fields(outputs),
        )
