"""ViT/DeiT family adapter and the drop-in Rapid classes: subclasses of the transformers classes.

Each class keeps the stock modules and weights (so `google/vit-*` and `facebook/deit-*` checkpoints load with no
missing or unexpected keys); its backbone, layers and attention modules become the Rapid subclasses below, which
add no parameters. What the adapter says about the family: CLS (and DeiT's distillation token) are protected, and
the layer splits into `layernorm_before -> attention -> dropout + residual` and
`layernorm_after -> mlp -> dropout + residual` (mirrors `ViTLayer.forward` / `DeiTLayer.forward` of
transformers 5.24; `tests/test_adapters.py` fails if the stock forwards compute something else).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from transformers import (
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTModel,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)
from transformers.models.deit.modeling_deit import DeiTAttention, DeiTLayer
from transformers.models.vit.modeling_vit import ViTAttention, ViTLayer
from transformers.utils.generic import can_return_tuple

from rapid_hf.models.configuration_rapid import RapidConfigMixin
from rapid_hf.models.encoder import RapidHeadMixin, ReducedBackboneMixin
from rapid_hf.models.family import AUTO_CLASSIFIER, AUTO_MODEL, Family, register_family
from rapid_hf.models.layers import ReducingAttentionMixin, ReducingLayerMixin, inherit_checkpoint_conversions
from rapid_hf.models.outputs import (
    RapidDeiTWithTeacherOutput,
    RapidImageClassifierOutput,
    reduction_fields,
)
from rapid_hf.reduction.config import RapidConfig


class RapidViTConfig(RapidConfigMixin, ViTConfig):
    """`ViTConfig` plus `rapid`: the `RapidConfig.to_dict()` of the reduction to run (None = no reduction)."""

    model_type = "rapid_vit"
    source_model_types = ("vit",)
    protected = 1
    rapid_class_hint = (
        "RapidViTForImageClassification loads `vit` checkpoints (google/vit-*, facebook/deit-*-patch16-224); "
        "use RapidDeiT* classes for `deit` (distilled) checkpoints"
    )

    rapid: dict | None = None


class RapidDeiTConfig(RapidConfigMixin, DeiTConfig):
    """`DeiTConfig` plus `rapid`; CLS and the distillation token are protected."""

    model_type = "rapid_deit"
    source_model_types = ("deit",)
    protected = 2
    rapid_class_hint = (
        "RapidDeiT* classes load `deit` checkpoints (facebook/deit-*-distilled-*); "
        "use RapidViTForImageClassification for `vit` checkpoints"
    )

    rapid: dict | None = None


class _ViTStyleLayerMixin(ReducingLayerMixin):
    """ViT and DeiT layers: pre-norm attention and MLP, dropout before each residual add."""

    def attention_residual(self, hidden_states: Tensor, attention_mask: Tensor | None, **kwargs: Any) -> Tensor:
        attended, _ = self.attention(self.layernorm_before(hidden_states), attention_mask, **kwargs)
        return self.dropout(attended) + hidden_states

    def mlp_residual(self, hidden_states: Tensor) -> Tensor:
        return self.dropout(self.mlp(self.layernorm_after(hidden_states))) + hidden_states


class RapidViTAttention(ReducingAttentionMixin, ViTAttention):
    """`ViTAttention` that also returns its keys and query."""


class RapidViTLayer(_ViTStyleLayerMixin, ViTLayer):
    """`ViTLayer` with a reduction step between attention and MLP."""


class RapidDeiTAttention(ReducingAttentionMixin, DeiTAttention):
    """`DeiTAttention` that also returns its keys and query."""


class RapidDeiTLayer(_ViTStyleLayerMixin, DeiTLayer):
    """`DeiTLayer` with a reduction step between attention and MLP."""


MODULE_CLASSES: dict[type, type] = {
    ViTAttention: RapidViTAttention,
    ViTLayer: RapidViTLayer,
    DeiTAttention: RapidDeiTAttention,
    DeiTLayer: RapidDeiTLayer,
}
"""Stock module class -> its Rapid subclass, for this family's layers and attention modules."""


class _ViTStyleBackboneMixin(ReducedBackboneMixin):
    """ViT and DeiT backbones: `embeddings`, `layers`, final `layernorm` and an optional `pooler`."""

    @property
    def reducing_layers(self) -> nn.ModuleList:
        return self.layers

    @property
    def embedding_dtype(self) -> torch.dtype:
        return self.embeddings.patch_embeddings.projection.weight.dtype

    def embed(self, pixel_values: Tensor, bool_masked_pos: Tensor | None, interpolate_pos_encoding: bool) -> Tensor:
        return self.embeddings(
            pixel_values, bool_masked_pos=bool_masked_pos, interpolate_pos_encoding=interpolate_pos_encoding
        )

    def finish(self, hidden_states: Tensor, sizes: Tensor | None) -> tuple[Tensor, Tensor | None]:
        sequence_output = self.layernorm(hidden_states)
        return sequence_output, self.pooler(sequence_output) if self.pooler is not None else None


class RapidViTModel(_ViTStyleBackboneMixin, ViTModel):
    """`ViTModel` with token reduction; returns `RapidModelOutput`. Protected: CLS."""

    config_class = RapidViTConfig
    module_classes = MODULE_CLASSES


class RapidDeiTModel(_ViTStyleBackboneMixin, DeiTModel):
    """`DeiTModel` with token reduction. Protected: CLS and the distillation token."""

    config_class = RapidDeiTConfig
    module_classes = MODULE_CLASSES


inherit_checkpoint_conversions(RapidViTModel, ViTModel)
inherit_checkpoint_conversions(RapidDeiTModel, DeiTModel)


class _RapidSingleHeadMixin(RapidHeadMixin):
    """Forward of the single-head classifiers (ViT, DeiT): CLS token -> classifier."""

    @can_return_tuple
    def forward(
        self,
        pixel_values: Tensor | None = None,
        labels: Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        attention_mask: Tensor | None = None,
        rapid: RapidConfig | Mapping[str, Any] | None = None,
        output_sources: bool = False,
        output_dense: bool = False,
        **kwargs: Any,
    ) -> RapidImageClassifierOutput:
        """The stock classifier forward (mirrors transformers 5.24); `rapid` runs other settings for this call only."""
        outputs = self.encode(
            pixel_values, interpolate_pos_encoding, attention_mask, rapid, output_sources, output_dense, **kwargs
        )
        return self.classifier_output(outputs, self.classifier(outputs.last_hidden_state[:, 0, :]), labels)


class RapidViTForImageClassification(_RapidSingleHeadMixin, ViTForImageClassification):
    """`ViTForImageClassification` with token reduction; loads any `vit` image-classification checkpoint."""

    config_class = RapidViTConfig
    config: RapidViTConfig
    module_classes: ClassVar[Mapping[type, type]] = {**MODULE_CLASSES, ViTModel: RapidViTModel}


class RapidDeiTForImageClassification(_RapidSingleHeadMixin, DeiTForImageClassification):
    """`DeiTForImageClassification` with token reduction; the distillation token is always kept."""

    config_class = RapidDeiTConfig
    config: RapidDeiTConfig
    module_classes: ClassVar[Mapping[type, type]] = {**MODULE_CLASSES, DeiTModel: RapidDeiTModel}


class RapidDeiTForImageClassificationWithTeacher(RapidHeadMixin, DeiTForImageClassificationWithTeacher):
    """Distilled DeiT (CLS + distillation heads) with token reduction; the distillation token is always kept."""

    config_class = RapidDeiTConfig
    config: RapidDeiTConfig
    module_classes: ClassVar[Mapping[type, type]] = {**MODULE_CLASSES, DeiTModel: RapidDeiTModel}

    @can_return_tuple
    def forward(
        self,
        pixel_values: Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        attention_mask: Tensor | None = None,
        rapid: RapidConfig | Mapping[str, Any] | None = None,
        output_sources: bool = False,
        output_dense: bool = False,
        **kwargs: Any,
    ) -> RapidDeiTWithTeacherOutput:
        """The stock forward (mirrors transformers 5.24: mean of the two heads' logits); `rapid` as above."""
        outputs = self.encode(
            pixel_values, interpolate_pos_encoding, attention_mask, rapid, output_sources, output_dense, **kwargs
        )
        cls_logits = self.cls_classifier(outputs.last_hidden_state[:, 0, :])
        distillation_logits = self.distillation_classifier(outputs.last_hidden_state[:, 1, :])
        return RapidDeiTWithTeacherOutput(
            logits=(cls_logits + distillation_logits) / 2,
            cls_logits=cls_logits,
            distillation_logits=distillation_logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **reduction_fields(outputs),
        )


FAMILY = Family(
    name="vit",
    configs=(RapidViTConfig, RapidDeiTConfig),
    module_classes=MODULE_CLASSES,
    model_classes={
        ViTModel: RapidViTModel,
        DeiTModel: RapidDeiTModel,
        ViTForImageClassification: RapidViTForImageClassification,
        DeiTForImageClassification: RapidDeiTForImageClassification,
        DeiTForImageClassificationWithTeacher: RapidDeiTForImageClassificationWithTeacher,
    },
    auto_classes={
        RapidViTModel: (AUTO_MODEL,),
        RapidDeiTModel: (AUTO_MODEL,),
        RapidViTForImageClassification: (AUTO_CLASSIFIER,),
        RapidDeiTForImageClassification: (AUTO_CLASSIFIER,),
        RapidDeiTForImageClassificationWithTeacher: (AUTO_CLASSIFIER,),
    },
)

if __name__.startswith("rapid_hf."):  # the installed package only, never Hub remote code (trust_remote_code only)
    register_family(FAMILY)

__all__ = [
    "FAMILY",
    "RapidDeiTConfig",
    "RapidDeiTForImageClassification",
    "RapidDeiTForImageClassificationWithTeacher",
    "RapidDeiTModel",
    "RapidViTConfig",
    "RapidViTForImageClassification",
    "RapidViTModel",
]
