"""CLIP family adapter: `CLIPVisionModel`, `CLIPVisionModelWithProjection` and `CLIPModel` (vision tower reduced).

What the adapter says about the family: CLS is protected, the layers are `encoder.layers`, the sequence is
`pre_layrnorm(embeddings)` and the pooled output is `post_layernorm(CLS)` (the last hidden state is not normed),
the attention names its parts `out_proj`/`scale`/`dropout`, and the layer splits into
`residual + self_attn(layer_norm1(x))` and `residual + mlp(layer_norm2(x))` (mirrors `CLIPEncoderLayer.forward`,
`CLIPAttention.forward`, `CLIPVisionModel.forward`, `CLIPModel.forward` / `get_image_features` of transformers
5.24; `tests/test_clip.py` fails if the stock forwards compute something else). In `RapidCLIPModel` only the
vision tower reduces: its layers become Rapid layers, the text tower keeps the stock classes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
)
from transformers.models.clip.modeling_clip import (
    CLIPAttention,
    CLIPEncoderLayer,
    CLIPOutput,
    CLIPVisionModelOutput,
    _get_vector_norm,
)
from transformers.models.clip.modeling_clip import eager_attention_forward as clip_eager_attention
from transformers.utils.generic import can_return_tuple

from rapid_hf.models.configuration_rapid import RapidConfigMixin, TowerConfigMixin
from rapid_hf.models.encoder import RapidHeadMixin, ReducedBackboneMixin
from rapid_hf.models.family import AUTO_MODEL, AUTO_ZERO_SHOT, Family, register_family
from rapid_hf.models.layers import (
    OutProjAttentionMixin,
    SelfAttnLayerMixin,
    inherit_checkpoint_conversions,
    swap_module_classes,
)
from rapid_hf.models.outputs import RapidModelOutput, ReductionFields, reduction_fields
from rapid_hf.reduction.config import RapidConfig


class RapidCLIPVisionConfig(RapidConfigMixin, CLIPVisionConfig):
    """`CLIPVisionConfig` plus `rapid`; reads `clip_vision_model` configs and the vision part of `clip` ones."""

    model_type = "rapid_clip_vision_model"
    source_model_types = ("clip_vision_model",)
    protected = 1
    rapid_class_hint = (
        "RapidCLIPVisionModel / RapidCLIPVisionModelWithProjection load `clip` and `clip_vision_model` checkpoints "
        "(openai/clip-vit-*)"
    )

    rapid: dict | None = None


class RapidCLIPConfig(TowerConfigMixin, CLIPConfig):
    """`CLIPConfig` plus `rapid`: the reduction of the vision tower (the text tower is never reduced)."""

    model_type = "rapid_clip"
    source_model_types = ("clip",)
    protected = 1
    rapid_class_hint = "RapidCLIPModel loads `clip` checkpoints (openai/clip-vit-*)"

    rapid: dict | None = None



class RapidCLIPAttention(OutProjAttentionMixin, CLIPAttention):
    """`CLIPAttention` that also returns its keys and query (vision tower only)."""

    eager_attention = staticmethod(clip_eager_attention)


class RapidCLIPEncoderLayer(SelfAttnLayerMixin, CLIPEncoderLayer):
    """`CLIPEncoderLayer` with a reduction step between attention and MLP."""



MODULE_CLASSES: dict[type, type] = {CLIPAttention: RapidCLIPAttention, CLIPEncoderLayer: RapidCLIPEncoderLayer}
"""Stock module class -> its Rapid subclass, for the vision tower's layers and attention modules."""


@dataclass
class RapidCLIPVisionModelOutput(ReductionFields, CLIPVisionModelOutput):
    """`CLIPVisionModelOutput` plus `ReductionFields`."""


@dataclass
class RapidCLIPOutput(ReductionFields, CLIPOutput):
    """`CLIPOutput` plus the `ReductionFields` of the vision tower."""


class RapidCLIPVisionModel(ReducedBackboneMixin, CLIPVisionModel):
    """`CLIPVisionModel` with token reduction; returns `RapidModelOutput`. Protected: CLS."""

    config_class = RapidCLIPVisionConfig
    module_classes = MODULE_CLASSES

    @property
    def reducing_layers(self) -> nn.ModuleList:
        return self.encoder.layers

    @property
    def embedding_dtype(self) -> torch.dtype:
        return self.embeddings.patch_embedding.weight.dtype

    def embed(self, pixel_values: Tensor, bool_masked_pos: Tensor | None, interpolate_pos_encoding: bool) -> Tensor:
        if bool_masked_pos is not None:
            raise ValueError("CLIP vision models take no bool_masked_pos (they have no mask token)")
        embeddings = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        return self.pre_layrnorm(embeddings)

    def finish(self, hidden_states: Tensor, sizes: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return hidden_states, self.post_layernorm(hidden_states[:, 0, :])


inherit_checkpoint_conversions(RapidCLIPVisionModel, CLIPVisionModel)


class RapidCLIPVisionModelWithProjection(RapidHeadMixin, CLIPVisionModelWithProjection):
    """`CLIPVisionModelWithProjection` with token reduction: image embeddings from the reduced tower."""

    config_class = RapidCLIPVisionConfig
    config: RapidCLIPVisionConfig
    module_classes: ClassVar[Mapping[type, type]] = {**MODULE_CLASSES, CLIPVisionModel: RapidCLIPVisionModel}

    def swap_modules(self) -> None:
        super().swap_modules()
        self.vision_model.config = self.config  # one config, so `config.rapid` is what the tower runs

    @can_return_tuple
    def forward(
        self,
        pixel_values: Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        rapid: RapidConfig | Mapping[str, Any] | None = None,
        output_sources: bool = False,
        output_dense: bool = False,
        **kwargs: Any,
    ) -> RapidCLIPVisionModelOutput:
        """The stock forward (mirrors transformers 5.24); `rapid` runs other settings for this call only."""
        vision_outputs: RapidModelOutput = self.vision_model(
            pixel_values=pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            rapid=rapid,
            output_sources=output_sources,
            output_dense=output_dense,
            **kwargs,
        )
        return RapidCLIPVisionModelOutput(
            image_embeds=self.visual_projection(vision_outputs.pooler_output),
            last_hidden_state=vision_outputs.last_hidden_state,
            hidden_states=vision_outputs.hidden_states,
            attentions=vision_outputs.attentions,
            **reduction_fields(vision_outputs),
        )


class RapidCLIPModel(RapidHeadMixin, CLIPModel):
    """`CLIPModel` whose image embeddings come from the reduced vision tower; the text tower is untouched.

    Works with `pipeline("zero-shot-image-classification", model=...)`. `config.rapid` (of the `CLIPModel`) is
    what the vision tower runs; `model.vision_model` called on its own takes settings only through `rapid=`.
    """

    config_class = RapidCLIPConfig
    config: RapidCLIPConfig
    module_classes: ClassVar[Mapping[type, type]] = {**MODULE_CLASSES, CLIPVisionModel: RapidCLIPVisionModel}

    @property
    def rapid_backbone(self) -> RapidCLIPVisionModel:
        return self.vision_model

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
        """The stock method (mirrors transformers 5.24), reduced: `pooler_output` is the projected image embedding."""
        vision_outputs: RapidModelOutput = self.vision_model(
            pixel_values=pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            rapid=self.config.rapid if rapid is None else rapid,
            output_sources=output_sources,
            output_dense=output_dense,
            **kwargs,
        )
        vision_outputs.pooler_output = self.visual_projection(vision_outputs.pooler_output)
        return vision_outputs

    def get_text_features(
        self,
        *args: Any,
        rapid: RapidConfig | Mapping[str, Any] | None = None,
        output_sources: bool = False,
        output_dense: bool = False,
        **kwargs: Any,
    ) -> Any:
        """The stock method; the reduction arguments the stock `forward` hands both towers are the image tower's."""
        return super().get_text_features(*args, **kwargs)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: Tensor | None = None,
        *args: Any,
        return_loss: bool | None = None,
        interpolate_pos_encoding: bool = False,
        rapid: RapidConfig | Mapping[str, Any] | None = None,
        output_sources: bool = False,
        output_dense: bool = False,
        **kwargs: Any,
    ) -> RapidCLIPOutput:
        """The stock forward (it calls the reduced `get_image_features`), plus the vision tower's reduction fields.

        Also takes images alone (`input_ids=None`, where the stock forward fails): then only `image_embeds` (and
        the vision outputs) are set, which is what throughput benchmarks of the image tower run.
        """
        reduction = {"rapid": rapid, "output_sources": output_sources, "output_dense": output_dense}
        if input_ids is None:
            if return_loss:
                raise ValueError("return_loss needs input_ids: the contrastive loss pairs images with texts")
            vision_outputs = self.get_image_features(pixel_values, interpolate_pos_encoding, **reduction, **kwargs)
            image_embeds = vision_outputs.pooler_output / _get_vector_norm(vision_outputs.pooler_output)
            return RapidCLIPOutput(
                image_embeds=image_embeds, vision_model_output=vision_outputs, **reduction_fields(vision_outputs)
            )
        output = super().forward(
            input_ids, pixel_values, *args, return_loss=return_loss, interpolate_pos_encoding=interpolate_pos_encoding,
            **reduction, **kwargs,
        )
        return RapidCLIPOutput(**output, **reduction_fields(output.vision_model_output))


inherit_checkpoint_conversions(RapidCLIPVisionModelWithProjection, CLIPVisionModelWithProjection)
inherit_checkpoint_conversions(RapidCLIPModel, CLIPModel)

FAMILY = Family(
    name="clip",
    configs=(RapidCLIPVisionConfig, RapidCLIPConfig),
    module_classes=MODULE_CLASSES,
    model_classes={
        CLIPVisionModel: RapidCLIPVisionModel,
        CLIPVisionModelWithProjection: RapidCLIPVisionModelWithProjection,
        CLIPModel: RapidCLIPModel,
    },
    auto_classes={
        RapidCLIPVisionModel: (AUTO_MODEL,),
        RapidCLIPVisionModelWithProjection: (AUTO_MODEL,),
        RapidCLIPModel: (AUTO_MODEL, AUTO_ZERO_SHOT),
    },
    exports=("RapidCLIPOutput", "RapidCLIPVisionModelOutput"),
)

if __name__.startswith("rapid_hf."):  # the installed package only, never Hub remote code (trust_remote_code only)
    register_family(FAMILY)

__all__ = [
    "FAMILY",
    "RapidCLIPConfig",
    "RapidCLIPModel",
    "RapidCLIPOutput",
    "RapidCLIPVisionConfig",
    "RapidCLIPVisionModel",
    "RapidCLIPVisionModelOutput",
    "RapidCLIPVisionModelWithProjection",
]
