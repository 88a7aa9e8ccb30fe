"""DINOv3 ViT family adapter: `DINOv3ViTModel` and `DINOv3ViTBackbone`.

What the adapter says about the family: CLS and the register tokens are protected; the layers are
`model.layer` (the encoder is a submodel, `model.model`); the final norm is `norm` and the pooled output the normed
CLS token. Position is not added to the tokens but applied inside attention: rotary embeddings `(cos, sin)` of the
patch grid rotate the queries and keys of the patch tokens (the last `num_patches` tokens). Under reduction each
token carries its own rotary row (`carried_tokens`: `(cos, sin)` of its patch, one `(B, N, 2 x head_dim)` tensor
that the shared layer gathers with every plan), so a kept token keeps its position and a merged token keeps its
destination's; each layer gets `position_embeddings=(cos, sin)` of its remaining patch tokens as `(B, 1, n, d)`
(`layer_arguments`). The keys the methods match on, and the query of the importance, are the attention's
*post-rotary* keys and CLS query, the ones its softmax uses (docs/METHOD.md, "Rotary positions (DINOv3)").
Any image size works (the rotary grid is computed per input, as in the stock model). The layer splits into
`norm1 -> attention -> layer_scale1 -> drop_path + residual` and `norm2 -> mlp -> layer_scale2 -> drop_path +
residual`.

Mirrors `DINOv3ViTAttention.forward`, `DINOv3ViTLayer.forward`, `DINOv3ViTModel.forward` and
`DINOv3ViTBackbone.forward` of transformers 5.25; `tests/test_dinov3.py` fails if the stock forwards compute
something else. The backbone's feature maps under reduction put each patch's token feature at the patch's place on
the grid (zeros where the patch was pruned), stage by stage.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import DINOv3ViTBackbone, DINOv3ViTConfig, DINOv3ViTModel
from transformers.backbone_utils import filter_output_hidden_states
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.dinov3_vit.modeling_dinov3_vit import (
    DINOv3ViTAttention,
    DINOv3ViTBackboneOutput,
    DINOv3ViTLayer,
    apply_rotary_pos_emb,
)
from transformers.models.dinov3_vit.modeling_dinov3_vit import eager_attention_forward as dinov3_eager_attention
from transformers.utils.generic import can_return_tuple

from rapid_hf.models.configuration_rapid import RapidConfigMixin, as_pair
from rapid_hf.models.encoder import ReducedBackboneMixin
from rapid_hf.models.family import AUTO_MODEL, Family, register_family
from rapid_hf.models.layers import (
    LayerReduction,
    ReducingAttentionMixin,
    ReducingLayerMixin,
    inherit_checkpoint_conversions,
)
from rapid_hf.models.outputs import RapidModelOutput, ReductionFields, reduction_fields
from rapid_hf.reduction.config import RapidConfig
from rapid_hf.reduction.tracing import assignment_from_sources, scatter_to_patches

AUTO_BACKBONE = "AutoBackbone"
ROTARY = "rotary"
"""Name of the carried per-token tensor: `cat(cos, sin)` of each token's patch, `(B, N, 2 x head_dim)`."""


class RapidDINOv3ViTConfig(RapidConfigMixin, DINOv3ViTConfig):
    """`DINOv3ViTConfig` plus `rapid`; CLS and every register token are protected."""

    model_type = "rapid_dinov3_vit"
    source_model_types = ("dinov3_vit",)
    rapid_class_hint = (
        "RapidDINOv3ViTModel / RapidDINOv3ViTBackbone load `dinov3_vit` checkpoints (facebook/dinov3-vit*); "
        "ConvNeXt DINOv3 checkpoints (`dinov3_convnext`) have no tokens to reduce"
    )

    rapid: dict | None = None

    @classmethod
    def protected_tokens(cls, encoder_config: Any) -> int:
        """CLS plus the register tokens."""
        return 1 + encoder_config.num_register_tokens


class RapidDINOv3ViTAttention(ReducingAttentionMixin, DINOv3ViTAttention):
    """`DINOv3ViTAttention` that also records its keys and query, *after* the rotary embedding (what its softmax
    uses: the methods match post-rotary keys and RAPID's importance is the attention the layer computes).

    Mirrors `DINOv3ViTAttention.forward` of transformers 5.25 operation for operation.
    """

    output_projection = "o_proj"
    scaling_attribute = "scaling"
    dropout_attribute = "dropout"
    eager_attention = staticmethod(dinov3_eager_attention)

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
        *,
        reduction: LayerReduction | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor | None]:
        batch_size, patches, _ = hidden_states.size()
        query_states = self.q_proj(hidden_states)
        key_states = self.k_proj(hidden_states)
        value_states = self.v_proj(hidden_states)
        query_states = query_states.view(batch_size, patches, self.num_heads, self.head_dim).transpose(1, 2)
        key_states = key_states.view(batch_size, patches, self.num_heads, self.head_dim).transpose(1, 2)
        value_states = value_states.view(batch_size, patches, self.num_heads, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if reduction is not None:
            reduction.record_attention(key_states, query_states)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, self.eager_attention
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(batch_size, patches, -1).contiguous()
        attn_output = self.o_proj(attn_output)
        return attn_output, attn_weights


class RapidDINOv3ViTLayer(ReducingLayerMixin, DINOv3ViTLayer):
    """`DINOv3ViTLayer` with a reduction step between attention and MLP; `position_embeddings` is passed on to
    the attention (keyword argument, as the stock encoder passes it)."""

    def attention_residual(self, hidden_states: Tensor, attention_mask: Tensor | None, **kwargs: Any) -> Tensor:
        attended, _ = self.attention(self.norm1(hidden_states), attention_mask=attention_mask, **kwargs)
        return self.drop_path(self.layer_scale1(attended)) + hidden_states

    def mlp_residual(self, hidden_states: Tensor) -> Tensor:
        return self.drop_path(self.layer_scale2(self.mlp(self.norm2(hidden_states)))) + hidden_states


MODULE_CLASSES: dict[type, type] = {DINOv3ViTAttention: RapidDINOv3ViTAttention, DINOv3ViTLayer: RapidDINOv3ViTLayer}
"""Stock module class -> its Rapid subclass, for this family's layers and attention modules."""


class _DINOv3BackboneMixin(ReducedBackboneMixin):
    """What the DINOv3 ViT classes share: layers under `model.layer`, rotary positions carried with the tokens,
    the final `norm`, CLS pooling."""

    always_interpolates_positions = True  # the rotary grid is computed for the input's size

    @property
    def reducing_layers(self) -> nn.ModuleList:
        return self.model.layer

    @property
    def embedding_dtype(self) -> torch.dtype:
        return self.embeddings.patch_embeddings.weight.dtype

    def embed(self, pixel_values: Tensor, bool_masked_pos: Tensor | None, interpolate_pos_encoding: bool) -> Tensor:
        return self.embeddings(pixel_values, bool_masked_pos=bool_masked_pos)

    def carried_tokens(self, pixel_values: Tensor, hidden_states: Tensor) -> dict[str, Tensor]:
        """Each token's rotary row `cat(cos, sin)` `(B, N, 2 x head_dim)`, computed as the stock forward does (in
        training with its random augmentation); the rows of CLS and registers are zeros and never read."""
        cos, sin = self.rope_embeddings(pixel_values)
        rotary = torch.cat([cos, sin], dim=-1)
        prefix = rotary.new_zeros(hidden_states.shape[1] - rotary.shape[0], rotary.shape[1])
        return {ROTARY: torch.cat([prefix, rotary]).expand(hidden_states.shape[0], -1, -1)}

    def layer_arguments(self, carried: dict[str, Tensor]) -> dict[str, Any]:
        """`position_embeddings=(cos, sin)` of the layer's patch tokens, `(B, 1, n, head_dim)` each (broadcast over
        heads; `apply_rotary_pos_emb` rotates the last `n` tokens)."""
        rotary = carried[ROTARY][:, None, self.num_protected_tokens :]
        cos, sin = rotary.chunk(2, dim=-1)
        return {"position_embeddings": (cos, sin)}

    def finish(self, hidden_states: Tensor, sizes: Tensor | None) -> tuple[Tensor, Tensor | None]:
        sequence_output = self.norm(hidden_states)
        return sequence_output, sequence_output[:, 0, :]


class RapidDINOv3ViTModel(_DINOv3BackboneMixin, DINOv3ViTModel):
    """`DINOv3ViTModel` with token reduction; returns `RapidModelOutput`. Protected: CLS and the registers."""

    config_class = RapidDINOv3ViTConfig
    module_classes = MODULE_CLASSES


@dataclass
class RapidDINOv3ViTBackboneOutput(ReductionFields, DINOv3ViTBackboneOutput):
    """`DINOv3ViTBackboneOutput` plus `ReductionFields`."""


class RapidDINOv3ViTBackbone(_DINOv3BackboneMixin, DINOv3ViTBackbone):
    """`DINOv3ViTBackbone` with token reduction: per-stage feature maps on the full patch grid.

    Under reduction stage `i`'s feature map puts each patch's token feature (the token that stands for it after
    layer `i`) at the patch's place, zeros where the patch was pruned; with reduction off it is the stock
    feature map exactly. Forward mirrors `DINOv3ViTBackbone.forward` of transformers 5.25.
    """

    config_class = RapidDINOv3ViTConfig
    module_classes = MODULE_CLASSES

    @can_return_tuple
    @filter_output_hidden_states
    def forward(
        self,
        pixel_values: Tensor,
        rapid: RapidConfig | Mapping[str, Any] | None = None,
        output_sources: bool = False,
        output_dense: bool = False,
        **kwargs: Any,
    ) -> RapidDINOv3ViTBackboneOutput:
        """The stock backbone forward over the reduced encoder; `rapid` runs other settings for this call only."""
        reduces = self.rapid_settings(rapid).reduces
        kwargs["output_hidden_states"] = True  # required to extract per-stage feature maps from hidden_states
        output: RapidModelOutput = super().forward(
            pixel_values, rapid=rapid, output_sources=output_sources or reduces, output_dense=output_dense, **kwargs
        )
        stage_hidden_states = output.hidden_states
        # Each stage's sources (the patches of each token) after its layer; none before the first layer and
        # without reduction, where patch p is token `num_prefix + p` (the stock slicing).
        num_prefix = 1 + getattr(self.config, "num_register_tokens", 0)
        stage_sources = [None, *output.layer_sources] if reduces else [None] * len(stage_hidden_states)

        batch_size, _, image_height, image_width = pixel_values.shape
        patch_height, patch_width = as_pair(self.config.patch_size)
        num_patches_height = image_height // patch_height
        num_patches_width = image_width // patch_width
        return_class_token = getattr(self.config, "return_class_token", False)

        feature_maps, cls_tokens = [], []
        last_stage_idx = len(self.stage_names) - 1
        for idx, (stage_name, hidden_state, sources) in enumerate(
            zip(self.stage_names, stage_hidden_states, stage_sources, strict=True)
        ):
            if idx == last_stage_idx or self.config.apply_layernorm:
                hidden_state = self.norm(hidden_state)
            if stage_name in self.out_features:
                if return_class_token:
                    cls_tokens.append(hidden_state[:, 0, :])
                if sources is None:
                    patch_tokens = hidden_state[:, num_prefix:, :]
                else:  # each patch gets its token's feature, zeros where it was pruned
                    patch_tokens = scatter_to_patches(hidden_state, assignment_from_sources(sources))
                if self.config.reshape_hidden_states:
                    fmap = (
                        patch_tokens.reshape(batch_size, num_patches_height, num_patches_width, patch_tokens.shape[-1])
                        .permute(0, 3, 1, 2)
                        .contiguous()
                    )
                else:
                    fmap = patch_tokens
                feature_maps.append(fmap)

        fields = reduction_fields(output)
        if not output_sources:
            fields.update(sources=None, layer_sources=None, pruned_at=None if not output_dense else fields["pruned_at"])
        result = RapidDINOv3ViTBackboneOutput(
            feature_maps=tuple(feature_maps),
            cls_tokens=tuple(cls_tokens) if return_class_token else None,
            hidden_states=output.hidden_states,
            attentions=output.attentions,
            **fields,
        )
        result.last_hidden_state = output.last_hidden_state
        return result


inherit_checkpoint_conversions(RapidDINOv3ViTModel, DINOv3ViTModel)
inherit_checkpoint_conversions(RapidDINOv3ViTBackbone, DINOv3ViTBackbone)

FAMILY = Family(
    name="dinov3",
    configs=(RapidDINOv3ViTConfig,),
    module_classes=MODULE_CLASSES,
    model_classes={DINOv3ViTModel: RapidDINOv3ViTModel, DINOv3ViTBackbone: RapidDINOv3ViTBackbone},
    auto_classes={RapidDINOv3ViTModel: (AUTO_MODEL,), RapidDINOv3ViTBackbone: (AUTO_BACKBONE,)},
    exports=("RapidDINOv3ViTBackboneOutput",),
)

if __name__.startswith("rapid_hf."):  # the installed package only, never Hub remote code (trust_remote_code only)
    register_family(FAMILY)

__all__ = [
    "FAMILY",
    "RapidDINOv3ViTBackbone",
    "RapidDINOv3ViTBackboneOutput",
    "RapidDINOv3ViTConfig",
    "RapidDINOv3ViTModel",
]
