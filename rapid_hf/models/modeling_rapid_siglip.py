"""SigLIP family adapter: `SiglipVisionModel`, `SiglipModel` (vision tower reduced) and `SiglipForImageClassification`.

What the adapter says about the family: there is no CLS token, so no token is protected and RAPID's (and crucial
merging's, top-k's) importance is the attention each token receives, averaged over every query and head
(`importance_queries` returns every query row; docs/METHOD.md, "Families without a CLS token"). The layers are
`encoder.layers`, the last hidden state is `post_layernorm` of the last layer's output and the pooled output is
the attention-pooling head's (`SiglipMultiheadAttentionPoolingHead`: a learned probe attends to every token), which
under reduction weighs each token by its size: `log(size)` is added to the probe's attention logits, as
proportional attention does in the layers. `SiglipForImageClassification` pools the size-weighted mean of the
tokens. The attention names its parts `out_proj`/`scale`/`dropout`, and the layer splits into
`residual + self_attn(layer_norm1(x))` and `residual + mlp(layer_norm2(x))`.

Mirrors `SiglipEncoderLayer.forward`, `SiglipAttention.forward`, `SiglipMultiheadAttentionPoolingHead.forward`,
`SiglipVisionModel.forward`, `SiglipModel.forward` / `get_image_features` and
`SiglipForImageClassification.forward` of transformers 5.25; `tests/test_siglip.py` fails if the stock forwards
compute something else. In `RapidSiglipModel` only the vision tower reduces: the text tower (which uses the same
layer classes) keeps the stock classes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from transformers import (
    SiglipConfig,
    SiglipForImageClassification,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.models.siglip.modeling_siglip import (
    SiglipAttention,
    SiglipEncoderLayer,
    SiglipMultiheadAttentionPoolingHead,
    SiglipOutput,
)
from transformers.models.siglip.modeling_siglip import eager_attention_forward as siglip_eager_attention
from transformers.utils.generic import can_return_tuple

from rapid_hf.models.configuration_rapid import RapidConfigMixin, TowerConfigMixin
from rapid_hf.models.encoder import RapidHeadMixin, ReducedBackboneMixin
from rapid_hf.models.family import AUTO_CLASSIFIER, AUTO_MODEL, AUTO_ZERO_SHOT, Family, register_family
from rapid_hf.models.layers import (
    OutProjAttentionMixin,
    SelfAttnLayerMixin,
    inherit_checkpoint_conversions,
    swap_module_classes,
)
from rapid_hf.models.outputs import RapidImageClassifierOutput, RapidModelOutput, ReductionFields, reduction_fields
from rapid_hf.reduction.config import RapidConfig


class RapidSiglipVisionConfig(RapidConfigMixin, SiglipVisionConfig):
    """`SiglipVisionConfig` plus `rapid`; reads `siglip_vision_model` configs and the vision part of `siglip` ones.
    No token is protected (SigLIP has no CLS token)."""

    model_type = "rapid_siglip_vision_model"
    source_model_types = ("siglip_vision_model",)
    protected = 0
    rapid_class_hint = "RapidSiglipVisionModel loads `siglip` and `siglip_vision_model` checkpoints (google/siglip-*)"

    rapid: dict | None = None


class RapidSiglipConfig(TowerConfigMixin, SiglipConfig):
    """`SiglipConfig` plus `rapid`: the reduction of the vision tower (the text tower is never reduced)."""

    model_type = "rapid_siglip"
    source_model_types = ("siglip",)
    protected = 0
    rapid_class_hint = (
        "RapidSiglipModel / RapidSiglipForImageClassification load `siglip` checkpoints (google/siglip-*); "
        "use RapidSiglipVisionModel for `siglip_vision_model` checkpoints"
    )

    rapid: dict | None = None



class RapidSiglipAttention(OutProjAttentionMixin, SiglipAttention):
    """`SiglipAttention` that also records its keys and query (vision tower only)."""

    eager_attention = staticmethod(siglip_eager_attention)


class RapidSiglipEncoderLayer(SelfAttnLayerMixin, SiglipEncoderLayer):
    """`SiglipEncoderLayer` with a reduction step between attention and MLP."""



class RapidSiglipMultiheadAttentionPoolingHead(SiglipMultiheadAttentionPoolingHead):
    """The attention-pooling head, weighing merged tokens by their sizes.

    `sizes` `(B, N, 1)` (None: every token stands for one patch) adds `log(size)` to the probe's attention logits
    (as a float `key_padding_mask`, which `nn.MultiheadAttention` adds to the scaled logits), so a token standing
    for `s` patches gets the attention its `s` patches would have had: proportional attention. Without `sizes` it
    is the stock forward, call for call.
    """

    def forward(self, hidden_state: Tensor, sizes: Tensor | None = None) -> Tensor:
        batch_size = hidden_state.shape[0]
        probe = self.probe.repeat(batch_size, 1, 1)
        if sizes is None:
            hidden_state = self.attention(probe, hidden_state, hidden_state)[0]
        else:
            bias = sizes[..., 0].log().to(hidden_state.dtype)
            hidden_state = self.attention(probe, hidden_state, hidden_state, key_padding_mask=bias)[0]

        residual = hidden_state
        hidden_state = self.layernorm(hidden_state)
        hidden_state = residual + self.mlp(hidden_state)

        return hidden_state[:, 0]


MODULE_CLASSES: dict[type, type] = {
    SiglipAttention: RapidSiglipAttention,
    SiglipEncoderLayer: RapidSiglipEncoderLayer,
    SiglipMultiheadAttentionPoolingHead: RapidSiglipMultiheadAttentionPoolingHead,
}
"""Stock module class -> its Rapid subclass, for the vision tower's layers, attention and pooling head."""


@dataclass
class RapidSiglipOutput(ReductionFields, SiglipOutput):
    """`SiglipOutput` plus the `ReductionFields` of the vision tower."""


class RapidSiglipVisionModel(ReducedBackboneMixin, SiglipVisionModel):
    """`SiglipVisionModel` with token reduction; returns `RapidModelOutput`. Nothing is protected (no CLS token).

    `pooler_output` is the attention-pooling head's output, with merged tokens weighed by their sizes.
    """

    config_class = RapidSiglipVisionConfig
    module_classes = MODULE_CLASSES

    @property
    def reducing_layers(self) -> nn.ModuleList:
        return self.encoder.layers

    @property
    def embedding_dtype(self) -> torch.dtype:
        return self.embeddings.patch_embedding.weight.dtype

    def embed(self, pixel_values: Tensor, bool_masked_pos: Tensor | None, interpolate_pos_encoding: bool) -> Tensor:
        if bool_masked_pos is not None:
            raise ValueError("SigLIP vision models take no bool_masked_pos (they have no mask token)")
        return self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)

    def importance_queries(self, query: Tensor) -> Tensor:
        """Every query row: with no CLS token, a token's importance is the attention it receives from all tokens."""
        return query

    def finish(self, hidden_states: Tensor, sizes: Tensor | None) -> tuple[Tensor, Tensor | None]:
        last_hidden_state = self.post_layernorm(hidden_states)
        pooler_output = self.head(last_hidden_state, sizes) if self.use_head else None
        return last_hidden_state, pooler_output


inherit_checkpoint_conversions(RapidSiglipVisionModel, SiglipVisionModel)


class _SiglipVisionTowerMixin(RapidHeadMixin):
    """A model holding the reduced tower as `vision_model` (built from `config.vision_config`, a plain vision config):
    `config.rapid` of this model is what the tower runs, passed to it on each call."""

    @property
    def rapid_backbone(self) -> RapidSiglipVisionModel:
        return self.vision_model

    def run_vision_tower(
        self,
        pixel_values: Tensor | None,
        interpolate_pos_encoding: bool,
        rapid: RapidConfig | Mapping[str, Any] | None,
        output_sources: bool,
        output_dense: bool,
        **kwargs: Any,
    ) -> RapidModelOutput:
        return self.vision_model(
            pixel_values=pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            rapid=self.config.rapid if rapid is None else rapid,
            output_sources=output_sources,
            output_dense=output_dense,
            **kwargs,
        )


class RapidSiglipModel(_SiglipVisionTowerMixin, SiglipModel):
    """`SiglipModel` whose image embeddings come from the reduced vision tower; the text tower is untouched.

    Works with `pipeline("zero-shot-image-classification", model=...)` (which uses the sigmoid and max-length
    padding of SigLIP: its `model_type` "rapid_siglip" contains "siglip"). `config.rapid` (of the `SiglipModel`) is
    what the vision tower runs; `model.vision_model` called on its own takes settings only through `rapid=`.
    """

    config_class = RapidSiglipConfig
    config: RapidSiglipConfig
    module_classes: ClassVar[Mapping[type, type]] = {**MODULE_CLASSES, SiglipVisionModel: RapidSiglipVisionModel}

    def swap_modules(self) -> None:
        swap_module_classes(self.vision_model, self.module_classes)  # the text tower keeps its stock classes

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: Tensor,
        interpolate_pos_encoding: bool = False,
        rapid: RapidConfig | Mapping[str, Any] | None = None,
        output_sources: bool = False,
        output_dense: bool = False,
        **kwargs: Any,
    ) -> RapidModelOutput:
        """The stock method (mirrors transformers 5.25), reduced: `pooler_output` is the pooled image embedding."""
        return self.run_vision_tower(
            pixel_values, interpolate_pos_encoding, rapid, output_sources, output_dense, **kwargs
        )

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        return_loss: bool | None = None,
        interpolate_pos_encoding: bool = False,
        rapid: RapidConfig | Mapping[str, Any] | None = None,
        output_sources: bool = False,
        output_dense: bool = False,
        **kwargs: Any,
    ) -> RapidSiglipOutput:
        """The stock forward (mirrors `SiglipModel.forward` of transformers 5.25) with the reduced image tower.

        Also takes images alone (`input_ids=None`, where the stock forward fails): then only `image_embeds` (and
        the vision outputs) are set, which is what throughput benchmarks of the image tower run.
        """
        vision_outputs = self.run_vision_tower(
            pixel_values, interpolate_pos_encoding, rapid, output_sources, output_dense, **kwargs
        )
        image_embeds = vision_outputs.pooler_output
        image_embeds = image_embeds / image_embeds.norm(p=2, dim=-1, keepdim=True)
        if input_ids is None:
            if return_loss:
                raise ValueError("return_loss needs input_ids: the sigmoid loss pairs images with texts")
            return RapidSiglipOutput(
                image_embeds=image_embeds, vision_model_output=vision_outputs, **reduction_fields(vision_outputs)
            )
        text_outputs = self.text_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        )
        text_embeds = text_outputs.pooler_output
        text_embeds = text_embeds / text_embeds.norm(p=2, dim=-1, keepdim=True)
        logits_per_text = torch.matmul(text_embeds, image_embeds.t().to(text_embeds.device))
        logit_scale, logit_bias = self.logit_scale.to(text_embeds.device), self.logit_bias.to(text_embeds.device)
        logits_per_text = logits_per_text * logit_scale.exp() + logit_bias
        logits_per_image = logits_per_text.t()
        loss = None
        if return_loss:  # SigLIP's pairwise sigmoid loss, as the stock forward computes it
            eye = torch.eye(logits_per_text.size(0), device=logits_per_text.device)
            m1_diag1 = -torch.ones_like(logits_per_text) + 2 * eye
            loglik = torch.nn.functional.logsigmoid(m1_diag1 * logits_per_text)
            loss = (-torch.sum(loglik, dim=-1)).mean()
        return RapidSiglipOutput(
            loss=loss,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text_outputs,
            vision_model_output=vision_outputs,
            **reduction_fields(vision_outputs),
        )


class RapidSiglipForImageClassification(_SiglipVisionTowerMixin, SiglipForImageClassification):
    """`SiglipForImageClassification` with token reduction: the classifier reads the size-weighted mean of the
    remaining tokens (every token is a patch token), the best estimate of the stock mean over all patches; with
    reduction off it is the stock mean exactly."""

    config_class = RapidSiglipConfig
    config: RapidSiglipConfig
    module_classes: ClassVar[Mapping[type, type]] = {**MODULE_CLASSES, SiglipVisionModel: RapidSiglipVisionModel}

    @can_return_tuple
    def forward(
        self,
        pixel_values: Tensor | None = None,
        labels: Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        rapid: RapidConfig | Mapping[str, Any] | None = None,
        output_sources: bool = False,
        output_dense: bool = False,
        **kwargs: Any,
    ) -> RapidImageClassifierOutput:
        """The stock forward (mirrors transformers 5.25); `rapid` runs other settings for this call only."""
        outputs = self.run_vision_tower(
            pixel_values, interpolate_pos_encoding, rapid, output_sources, output_dense, **kwargs
        )
        logits = self.classifier(self.pooled_patch_mean(outputs))
        return self.classifier_output(outputs, logits, labels)


inherit_checkpoint_conversions(RapidSiglipModel, SiglipModel)
inherit_checkpoint_conversions(RapidSiglipForImageClassification, SiglipForImageClassification)

FAMILY = Family(
    name="siglip",
    configs=(RapidSiglipVisionConfig, RapidSiglipConfig),
    module_classes=MODULE_CLASSES,
    model_classes={
        SiglipVisionModel: RapidSiglipVisionModel,
        SiglipModel: RapidSiglipModel,
        SiglipForImageClassification: RapidSiglipForImageClassification,
    },
    auto_classes={
        RapidSiglipVisionModel: (AUTO_MODEL,),
        RapidSiglipModel: (AUTO_MODEL, AUTO_ZERO_SHOT),
        RapidSiglipForImageClassification: (AUTO_CLASSIFIER,),
    },
    exports=("RapidSiglipOutput",),
)

if __name__.startswith("rapid_hf."):  # the installed package only, never Hub remote code (trust_remote_code only)
    register_family(FAMILY)

__all__ = [
    "FAMILY",
    "RapidSiglipConfig",
    "RapidSiglipForImageClassification",
    "RapidSiglipModel",
    "RapidSiglipOutput",
    "RapidSiglipVisionConfig",
    "RapidSiglipVisionModel",
]
