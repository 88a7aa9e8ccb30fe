"""DINOv2 family adapter: `Dinov2Model`, `Dinov2ForImageClassification` and their with-registers versions.

What the adapter says about the family: CLS is protected (with registers: CLS and every register token), the
encoder's layers are `model.encoder.layer`, position embeddings are always resized to the input, the pooled output
is the normed CLS token, and the layer splits into `norm1 -> attention -> layer_scale1 -> drop_path + residual` and
`norm2 -> mlp -> layer_scale2 -> drop_path + residual` (mirrors `Dinov2Layer.forward` /
`Dinov2WithRegistersLayer.forward` of transformers 5.24; `tests/test_dinov2.py` fails if the stock forwards compute
something else). Attention is `ReducingAttentionMixin` as is (same code as ViT's).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from transformers import (
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersForImageClassification,
    Dinov2WithRegistersModel,
)
from transformers.models.dinov2.modeling_dinov2 import Dinov2Attention, Dinov2Layer
from transformers.models.dinov2.modeling_dinov2 import eager_attention_forward as dinov2_eager_attention
from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import (
    Dinov2WithRegistersAttention,
    Dinov2WithRegistersLayer,
)
from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import (
    eager_attention_forward as registers_eager_attention,
)
from transformers.utils.generic import can_return_tuple

from rapid_hf.models.configuration_rapid import RapidConfigMixin
from rapid_hf.models.encoder import RapidHeadMixin, ReducedBackboneMixin
from rapid_hf.models.family import AUTO_CLASSIFIER, AUTO_MODEL, Family, register_family
from rapid_hf.models.layers import ReducingAttentionMixin, ReducingLayerMixin, inherit_checkpoint_conversions
from rapid_hf.models.outputs import RapidImageClassifierOutput
from rapid_hf.reduction.config import RapidConfig


class RapidDinov2Config(RapidConfigMixin, Dinov2Config):
    """`Dinov2Config` plus `rapid`: the `RapidConfig.to_dict()` of the reduction to run (None = no reduction)."""

    model_type = "rapid_dinov2"
    source_model_types = ("dinov2",)
    protected = 1
    rapid_class_hint = (
        "RapidDinov2Model / RapidDinov2ForImageClassification load `dinov2` checkpoints (facebook/dinov2-*); "
        "use RapidDinov2WithRegistersModel for `dinov2_with_registers` checkpoints"
    )

    rapid: dict | None = None


class RapidDinov2WithRegistersConfig(RapidConfigMixin, Dinov2WithRegistersConfig):
    """`Dinov2WithRegistersConfig` plus `rapid`; CLS and every register token are protected."""

    model_type = "rapid_dinov2_with_registers"
    source_model_types = ("dinov2_with_registers",)
    rapid_class_hint = (
        "RapidDinov2WithRegistersModel loads `dinov2_with_registers` checkpoints (facebook/dinov2-with-registers-*); "
        "use RapidDinov2Model for `dinov2` checkpoints"
    )

    rapid: dict | None = None

    @classmethod
    def protected_tokens(cls, encoder_config: Any) -> int:
        """CLS plus the register tokens."""
        return 1 + encoder_config.num_register_tokens


class _Dinov2StyleLayerMixin(ReducingLayerMixin):
    """DINOv2 layers: pre-norm attention and MLP, each scaled by its layer scale before the residual add."""

    def attention_residual(self, hidden_states: Tensor, attention_mask: Tensor | None, **kwargs: Any) -> Tensor:
        attended, _ = self.attention(self.norm1(hidden_states), attention_mask, **kwargs)
        return self.drop_path(self.layer_scale1(attended)) + hidden_states

    def mlp_residual(self, hidden_states: Tensor) -> Tensor:
        return self.drop_path(self.layer_scale2(self.mlp(self.norm2(hidden_states)))) + hidden_states


class RapidDinov2Attention(ReducingAttentionMixin, Dinov2Attention):
    """`Dinov2Attention` that also returns its keys and query."""

    eager_attention = staticmethod(dinov2_eager_attention)


class RapidDinov2Layer(_Dinov2StyleLayerMixin, Dinov2Layer):
    """`Dinov2Layer` with a reduction step between attention and MLP."""


class RapidDinov2WithRegistersAttention(ReducingAttentionMixin, Dinov2WithRegistersAttention):
    """`Dinov2WithRegistersAttention` that also returns its keys and query."""

    eager_attention = staticmethod(registers_eager_attention)


class RapidDinov2WithRegistersLayer(_Dinov2StyleLayerMixin, Dinov2WithRegistersLayer):
    """`Dinov2WithRegistersLayer` with a reduction step between attention and MLP."""


MODULE_CLASSES: dict[type, type] = {
    Dinov2Attention: RapidDinov2Attention,
    Dinov2Layer: RapidDinov2Layer,
    Dinov2WithRegistersAttention: RapidDinov2WithRegistersAttention,
    Dinov2WithRegistersLayer: RapidDinov2WithRegistersLayer,
}
"""Stock module class -> its Rapid subclass, for this family's layers and attention modules."""


class _Dinov2BackboneMixin(ReducedBackboneMixin):
    """What the DINOv2 backbones share: layers under `encoder.layer`, positions always resized, CLS pooling."""

    always_interpolates_positions = True

    @property
    def reducing_layers(self) -> nn.ModuleList:
        return self.encoder.layer

    @property
    def embedding_dtype(self) -> torch.dtype:
        return self.embeddings.patch_embeddings.projection.weight.dtype

    def embed(self, pixel_values: Tensor, bool_masked_pos: Tensor | None, interpolate_pos_encoding: bool) -> Tensor:
        return self.embeddings(pixel_values, bool_masked_pos=bool_masked_pos)

    def finish(self, hidden_states: Tensor, sizes: Tensor | None) -> tuple[Tensor, Tensor | None]:
        sequence_output = self.layernorm(hidden_states)
        return sequence_output, sequence_output[:, 0, :]


class RapidDinov2Model(_Dinov2BackboneMixin, Dinov2Model):
    """`Dinov2Model` with token reduction; returns `RapidModelOutput`. Protected: CLS."""

    config_class = RapidDinov2Config
    module_classes = MODULE_CLASSES


class RapidDinov2WithRegistersModel(_Dinov2BackboneMixin, Dinov2WithRegistersModel):
    """`Dinov2WithRegistersModel` with token reduction. Protected: CLS and the register tokens."""

    config_class = RapidDinov2WithRegistersConfig
    module_classes = MODULE_CLASSES


inherit_checkpoint_conversions(RapidDinov2Model, Dinov2Model)
inherit_checkpoint_conversions(RapidDinov2WithRegistersModel, Dinov2WithRegistersModel)


class _Dinov2ClassifierMixin(RapidHeadMixin):
    """Forward of the DINOv2 classifiers: `cat(CLS, mean of patch tokens)` -> classifier.

    Under reduction the mean is over the remaining patch tokens weighted by their sizes (the patches each stands
    for), the best estimate of the stock mean over all patches; with reduction off it is the stock mean exactly.
    Registers (with registers) are left out of the mean, as in the stock class.
    """

    @can_return_tuple
    def forward(
        self,
        pixel_values: Tensor | None = None,
        labels: Tensor | None = None,
        attention_mask: Tensor | None = None,
        rapid: RapidConfig | Mapping[str, Any] | None = None,
        output_sources: bool = False,
        output_dense: bool = False,
        interpolate_pos_encoding: bool | None = None,
        **kwargs: Any,
    ) -> RapidImageClassifierOutput:
        """The stock classifier forward (mirrors transformers 5.25); `rapid` runs other settings for this call only.

        `interpolate_pos_encoding` is accepted as the stock forward accepts it; DINOv2 always resizes its position
        embeddings to the input, so it changes nothing.
        """
        outputs = self.encode(
            pixel_values, interpolate_pos_encoding, attention_mask, rapid, output_sources, output_dense, **kwargs
        )
        cls_token = outputs.last_hidden_state[:, 0]
        logits = self.classifier(torch.cat([cls_token, self.pooled_patch_mean(outputs)], dim=1))
        return self.classifier_output(outputs, logits, labels)


class RapidDinov2ForImageClassification(_Dinov2ClassifierMixin, Dinov2ForImageClassification):
    """`Dinov2ForImageClassification` with token reduction (size-weighted patch mean, see the mixin)."""

    config_class = RapidDinov2Config
    config: RapidDinov2Config
    module_classes: ClassVar[Mapping[type, type]] = {**MODULE_CLASSES, Dinov2Model: RapidDinov2Model}


class RapidDinov2WithRegistersForImageClassification(
    _Dinov2ClassifierMixin, Dinov2WithRegistersForImageClassification
):
    """`Dinov2WithRegistersForImageClassification` with token reduction; CLS and registers are protected."""

    config_class = RapidDinov2WithRegistersConfig
    config: RapidDinov2WithRegistersConfig
    module_classes: ClassVar[Mapping[type, type]] = {
        **MODULE_CLASSES,
        Dinov2WithRegistersModel: RapidDinov2WithRegistersModel,
    }


FAMILY = Family(
    name="dinov2",
    configs=(RapidDinov2Config, RapidDinov2WithRegistersConfig),
    module_classes=MODULE_CLASSES,
    model_classes={
        Dinov2Model: RapidDinov2Model,
        Dinov2ForImageClassification: RapidDinov2ForImageClassification,
        Dinov2WithRegistersModel: RapidDinov2WithRegistersModel,
        Dinov2WithRegistersForImageClassification: RapidDinov2WithRegistersForImageClassification,
    },
    auto_classes={
        RapidDinov2Model: (AUTO_MODEL,),
        RapidDinov2WithRegistersModel: (AUTO_MODEL,),
        RapidDinov2ForImageClassification: (AUTO_CLASSIFIER,),
        RapidDinov2WithRegistersForImageClassification: (AUTO_CLASSIFIER,),
    },
)

if __name__.startswith("rapid_hf."):  # the installed package only, never Hub remote code (trust_remote_code only)
    register_family(FAMILY)

__all__ = [
    "FAMILY",
    "RapidDinov2Config",
    "RapidDinov2ForImageClassification",
    "RapidDinov2Model",
    "RapidDinov2WithRegistersConfig",
    "RapidDinov2WithRegistersForImageClassification",
    "RapidDinov2WithRegistersModel",
]
