"""Drop-in token-reduced ViT/DeiT image classifiers: subclasses of the transformers classes.

Each class keeps the stock backbone and heads (so `google/vit-*` and `facebook/deit-*` checkpoints load with
no missing or unexpected keys) and replaces only the forward pass with the reduced encoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    ViTForImageClassification,
)
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.models.deit.modeling_deit import DeiTForImageClassificationWithTeacherOutput
from transformers.utils.generic import can_return_tuple

from rapid_hf.models.configuration_rapid import RapidDeiTConfig, RapidViTConfig
from rapid_hf.models.encoder import ReducedEncoderOutput, check_attention_implementation, reduced_encoder_forward
from rapid_hf.reduction.config import RapidConfig


@dataclass
class RapidImageClassifierOutput(ImageClassifierOutput):
    """`ImageClassifierOutput` plus what the reduction did.

    token_counts: tokens after each layer (same for every image of the batch).
    sizes: `(batch, tokens)` how many input tokens each output token stands for.

    Only with `output_sources=True` (P = patches of the input's grid, row-major; CLS/distillation are not patches):
    sources: `(batch, tokens, P)` bool, the patches each output token stands for (protected rows all False).
    layer_sources: one `(batch, tokens_l, P)` bool per layer, the sources after that layer's reduction.

    Only with `output_dense=True`:
    dense_features: `(batch, P, hidden)` each patch's output-token feature (zeros where pruned), for dense heads.

    With either: pruned_at: `(batch, P)` long, the layer whose reduction pruned each patch; -1 if never pruned.
    """

    token_counts: tuple[int, ...] | None = None
    sizes: torch.FloatTensor | None = None
    sources: torch.BoolTensor | None = None
    pruned_at: torch.LongTensor | None = None
    layer_sources: tuple[torch.BoolTensor, ...] | None = None
    dense_features: torch.FloatTensor | None = None


@dataclass
class RapidDeiTWithTeacherOutput(DeiTForImageClassificationWithTeacherOutput):
    """`DeiTForImageClassificationWithTeacherOutput` plus the fields of `RapidImageClassifierOutput`."""

    token_counts: tuple[int, ...] | None = None
    sizes: torch.FloatTensor | None = None
    sources: torch.BoolTensor | None = None
    pruned_at: torch.LongTensor | None = None
    layer_sources: tuple[torch.BoolTensor, ...] | None = None
    dense_features: torch.FloatTensor | None = None


FORWARD_OPTIONS = frozenset(
    {"output_hidden_states", "output_attentions", "return_dict", "output_sources", "output_dense"}
)
"""Keyword arguments the Rapid forwards accept besides pixel_values, labels, interpolate_pos_encoding."""


class RapidModelMixin:
    """Reduction settings on a transformers classifier: `rapid`, `set_rapid`, `from_pretrained(rapid=...)`."""

    num_protected_tokens: int = 1

    def __init__(self, config: RapidViTConfig | RapidDeiTConfig) -> None:
        super().__init__(config)
        settings = getattr(self.config, "rapid", None)
        self.set_rapid(RapidConfig() if settings is None else RapidConfig.from_dict(settings))

    @property
    def rapid(self) -> RapidConfig:
        """The active reduction settings."""
        return self._rapid

    def set_rapid(self, rapid: RapidConfig) -> None:
        """Switch method / r in place (no reload); stored in `config.rapid` so `save_pretrained` keeps it."""
        if not isinstance(rapid, RapidConfig):
            raise ValueError(f"set_rapid expects a RapidConfig, got {type(rapid).__name__}")
        rapid.validate_for_model(
            num_layers=self.config.num_hidden_layers,
            num_tokens=self.num_input_tokens,
            num_protected=self.num_protected_tokens,
        )
        check_attention_implementation(self.config._attn_implementation, rapid)
        self._rapid = rapid
        self.config.rapid = rapid.to_dict()

    @property
    def num_input_tokens(self) -> int:
        """Tokens entering the encoder at the checkpoint's image size: patches plus protected tokens."""
        return self._backbone.embeddings.patch_embeddings.num_patches + self.num_protected_tokens

    @property
    def _backbone(self) -> torch.nn.Module:
        return getattr(self, self.base_model_prefix)

    @classmethod
    def from_pretrained(cls, *args: Any, rapid: RapidConfig | None = None, **kwargs: Any):
        """`PreTrainedModel.from_pretrained`, plus `rapid=RapidConfig(...)` to set the reduction at load."""
        model = super().from_pretrained(*args, **kwargs)
        loaded = model[0] if isinstance(model, tuple) else model
        if rapid is not None:
            loaded.set_rapid(rapid)
        return model

    def _encode(
        self,
        pixel_values: torch.Tensor | None,
        interpolate_pos_encoding: bool | None,
        attention_mask: torch.Tensor | None,
        kwargs: dict[str, Any],
    ) -> ReducedEncoderOutput:
        if attention_mask is not None:
            raise ValueError("attention_mask is not supported by Rapid models: ViT attends to every patch token")
        unsupported = sorted(set(kwargs) - FORWARD_OPTIONS)
        if unsupported:
            raise ValueError(f"unsupported forward argument(s) {unsupported}")
        return reduced_encoder_forward(
            self._backbone,
            pixel_values,
            self._rapid,
            self.num_protected_tokens,
            interpolate_pos_encoding=bool(interpolate_pos_encoding),
            output_hidden_states=bool(kwargs.get("output_hidden_states", self.config.output_hidden_states)),
            output_attentions=bool(kwargs.get("output_attentions", self.config.output_attentions)),
            output_sources=bool(kwargs.get("output_sources", False)),
            output_dense=bool(kwargs.get("output_dense", False)),
        )

    @staticmethod
    def _reduction_fields(encoded: ReducedEncoderOutput) -> dict[str, Any]:
        """The output fields that describe the reduction (trace fields are None unless requested)."""
        return {
            "token_counts": encoded.token_counts,
            "sizes": encoded.sizes,
            "sources": encoded.sources,
            "pruned_at": encoded.pruned_at,
            "layer_sources": encoded.layer_sources,
            "dense_features": encoded.dense_features,
        }


class _RapidSingleHeadMixin(RapidModelMixin):
    """Forward of the single-head classifiers (ViT, DeiT): CLS token -> classifier."""

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> RapidImageClassifierOutput:
        encoded = self._encode(pixel_values, interpolate_pos_encoding, attention_mask, kwargs)
        logits = self.classifier(encoded.last_hidden_state[:, 0, :])
        loss = None if labels is None else self.loss_function(labels, logits, self.config)
        return RapidImageClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=encoded.hidden_states,
            attentions=encoded.attentions,
            **self._reduction_fields(encoded),
        )


class RapidViTForImageClassification(_RapidSingleHeadMixin, ViTForImageClassification):
    """`ViTForImageClassification` with token reduction; loads any `vit` image-classification checkpoint."""

    config_class = RapidViTConfig
    config: RapidViTConfig
    num_protected_tokens = 1


class RapidDeiTForImageClassification(_RapidSingleHeadMixin, DeiTForImageClassification):
    """`DeiTForImageClassification` with token reduction; the distillation token is always kept."""

    config_class = RapidDeiTConfig
    config: RapidDeiTConfig
    num_protected_tokens = 2


class RapidDeiTForImageClassificationWithTeacher(RapidModelMixin, DeiTForImageClassificationWithTeacher):
    """Distilled DeiT (CLS + distillation heads) with token reduction; the distillation token is always kept."""

    config_class = RapidDeiTConfig
    config: RapidDeiTConfig
    num_protected_tokens = 2

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> RapidDeiTWithTeacherOutput:
        encoded = self._encode(pixel_values, interpolate_pos_encoding, attention_mask, kwargs)
        cls_logits = self.cls_classifier(encoded.last_hidden_state[:, 0, :])
        distillation_logits = self.distillation_classifier(encoded.last_hidden_state[:, 1, :])
        return RapidDeiTWithTeacherOutput(
            logits=(cls_logits + distillation_logits) / 2,
            cls_logits=cls_logits,
            distillation_logits=distillation_logits,
            hidden_states=encoded.hidden_states,
            attentions=encoded.attentions,
            **self._reduction_fields(encoded),
        )
