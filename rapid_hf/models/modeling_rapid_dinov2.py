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
    AutoModel,
    AutoModelForImageClassification,
    Dinov2ForImageClassification,
    Dinov2Model,
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

from rapid_hf.models.configuration_rapid import RapidDinov2Config, RapidDinov2WithRegistersConfig
from rapid_hf.models.encoder import RapidHeadMixin, ReducedBackboneMixin
from rapid_hf.models.layers import ReducingAttentionMixin, ReducingLayerMixin, inherit_checkpoint_conversions
from rapid_hf.models.outputs import RapidImageClassifierOutput
from rapid_hf.reduction.config import RapidConfig


class _Dinov2StyleLayerMixin(ReducingLayerMixin):
    """DINOv2 layers: pre-norm attention and MLP, each scaled by its layer scale before the residual add."""

    def attention_residual(self, hidden_states: Tensor, attention_bias: Tensor | None, **kwargs: Any):
        attended, _, keys, query = self.attention(self.norm1(hidden_states), attention_bias, **kwargs)
        return self.drop_path(self.layer_scale1(attended)) + hidden_states, keys, query

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

    def embed(self, pixel_values: Tensor, bool_masked_pos: Tensor | None, interpolate_pos_encoding: bool) -> Tensor:
        return self.embeddings(pixel_values, bool_masked_pos=bool_masked_pos)

    def finish(self, hidden_states: Tensor) -> tuple[Tensor, Tensor | None]:
        sequence_output = self.layernorm(hidden_states)
        return sequence_output, sequence_output[:, 0, :]


class RapidDinov2Model(_Dinov2BackboneMixin, Dinov2Model):
    """`Dinov2Model` with token reduction; returns `RapidModelOutput`. Protected: CLS."""

    config_class = RapidDinov2Config
    module_classes = MODULE_CLASSES
    num_protected_tokens = 1


class RapidDinov2WithRegistersModel(_Dinov2BackboneMixin, Dinov2WithRegistersModel):
    """`Dinov2WithRegistersModel` with token reduction. Protected: CLS and the register tokens."""

    config_class = RapidDinov2WithRegistersConfig
    module_classes = MODULE_CLASSES

    @property
    def num_protected_tokens(self) -> int:
        """CLS plus `config.num_register_tokens` registers: never removed, merged or used as destinations."""
        return 1 + self.config.num_register_tokens


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
        **kwargs: Any,
    ) -> RapidImageClassifierOutput:
        """The stock classifier forward (mirrors transformers 5.24); `rapid` runs other settings for this call only."""
        outputs = self.encode(pixel_values, None, attention_mask, rapid, output_sources, output_dense, **kwargs)
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


if __name__.startswith("rapid_hf."):  # the installed package only, never Hub remote code (see configuration_rapid)
    AutoModel.register(RapidDinov2Config, RapidDinov2Model, exist_ok=True)
    AutoModel.register(RapidDinov2WithRegistersConfig, RapidDinov2WithRegistersModel, exist_ok=True)
    AutoModelForImageClassification.register(RapidDinov2Config, RapidDinov2ForImageClassification, exist_ok=True)
    AutoModelForImageClassification.register(
        RapidDinov2WithRegistersConfig, RapidDinov2WithRegistersForImageClassification, exist_ok=True
    )

RAPID_CLASSES: dict[type, type] = {
    Dinov2Model: RapidDinov2Model,
    Dinov2ForImageClassification: RapidDinov2ForImageClassification,
    Dinov2WithRegistersModel: RapidDinov2WithRegistersModel,
    Dinov2WithRegistersForImageClassification: RapidDinov2WithRegistersForImageClassification,
}
"""Stock model class -> Rapid class, for `rapid_hf.get_rapid_model`."""

__all__ = [
    "RapidDinov2ForImageClassification",
    "RapidDinov2Model",
    "RapidDinov2WithRegistersForImageClassification",
    "RapidDinov2WithRegistersModel",
]
