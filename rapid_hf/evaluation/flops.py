"""FLOPs of a (reduced) ViT/DeiT forward from the token counts it actually ran with.

Counted as `torch.utils.flop_counter` counts (2 FLOPs per multiply-add; papers' "GFLOPs" for ViTs are usually
multiply-adds, i.e. half these numbers): the patch-embedding convolution, per layer the q/k/v/output projections
and QK^T / AV on the tokens entering the layer, the MLP on the tokens left after its reduction step, the
classifier head(s), and the reduction's own matmul (the similarity of the matched tokens: `|A| x |B| x head_dim`
for the bipartite split, `non-crucial x crucial x head_dim` for crucial merging). Element-wise work (softmax,
norms, GELU, sorting, gathers, and the CLS attention row RAPID computes as a multiply-and-sum, `N x hidden`
multiply-adds) is not counted, by either this count or the flop counter: under 0.01% of the total.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from rapid_hf.reduction.config import RapidConfig
from rapid_hf.reduction.matching import removal_cap
from rapid_hf.reduction.methods import crucial_count
from rapid_hf.reduction.steps import LayerStep, layer_steps


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one image's forward, by part."""

    embedding: int
    attention_projections: int
    attention_matmuls: int
    mlp: int
    reduction: int
    head: int

    @property
    def total(self) -> int:
        return sum(asdict(self).values())


def vit_flops(
    config: Any,
    token_counts: Sequence[int],
    num_input_tokens: int,
    steps: Sequence[LayerStep],
    num_protected: int = 1,
    num_heads: int = 1,
    mlp_size: int | None = None,
    head: int | None = None,
) -> FlopCount:
    """FLOPs per image of a ViT with `config` (a ViT/DeiT config) whose layers leave `token_counts` tokens.

    `steps` are the layers' reduction steps (`layer_steps`); `num_heads` the classifier heads (2 for DeiT with
    teacher).
    """
    if len(token_counts) != config.num_hidden_layers or len(steps) != config.num_hidden_layers:
        raise ValueError(
            f"need one token count and one step per layer ({config.num_hidden_layers}), "
            f"got {len(token_counts)} and {len(steps)}"
        )
    hidden, inner = config.hidden_size, mlp_size if mlp_size is not None else config.intermediate_size
    head_dim = hidden // config.num_attention_heads
    num_patches = (config.image_size // config.patch_size) ** 2
    embedding = 2 * num_patches * config.num_channels * config.patch_size**2 * hidden
    projections = matmuls = mlp = reduction = 0
    entering = num_input_tokens
    for leaving, step in zip(token_counts, steps, strict=True):
        projections += 2 * 4 * entering * hidden * hidden
        matmuls += 2 * 2 * entering * entering * hidden
        mlp += 2 * 2 * leaving * hidden * inner
        if step.operation == "merge_crucial" and leaving < entering:
            num_patches = entering - num_protected
            r = min(step.r, removal_cap(entering, num_protected))
            crucial = crucial_count(num_patches, r, step.settings.importance_ratio)
            reduction += 2 * (num_patches - crucial) * crucial * head_dim
        elif step.operation == "merge_energy" and leaving < entering:  # PiToMe: all patch pairs, then 2r matched
            removed = entering - leaving
            reduction += 2 * (entering - num_protected) ** 2 * head_dim + 2 * removed * removed * head_dim
        elif step.operation == "fuse_topk":  # ranks by the attention it already has: no products
            pass
        elif leaving < entering:
            reduction += 2 * ((entering + 1) // 2) * (entering // 2) * head_dim
        entering = leaving
    head = 2 * num_heads * hidden * config.num_labels if head is None else head
    return FlopCount(embedding, projections, matmuls, mlp, reduction, head)


def model_flops(model: Any, token_counts: Sequence[int], rapid: RapidConfig | None = None) -> FlopCount:
    """FLOPs per image of a Rapid model running `rapid` (default: its own settings), given the `token_counts` its
    forward reported."""
    config = getattr(model.config, "encoder_config", model.config)  # CLIPModel: its vision config
    num_input_tokens = model.num_input_tokens
    settings = model.rapid if rapid is None else rapid
    steps = layer_steps(settings, num_input_tokens, config.num_hidden_layers, model.num_protected_tokens)
    return vit_flops(
        config, token_counts, num_input_tokens, steps, model.num_protected_tokens,
        mlp_size=getattr(model.config, "mlp_size", None), head=head_flops(model),
    )


def head_flops(model: Any) -> int:
    """FLOPs per image of the linear layers after the encoder: classifier(s), CLIP's projection, ViT's pooler."""
    names = ("classifier", "cls_classifier", "distillation_classifier", "visual_projection")
    linears = [getattr(model, name) for name in names if isinstance(getattr(model, name, None), torch.nn.Linear)]
    pooler = getattr(getattr(model, "pooler", None), "dense", None)
    if isinstance(pooler, torch.nn.Linear):
        linears.append(pooler)
    return sum(2 * linear.in_features * linear.out_features for linear in linears)


def _cpu_flash_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# The flop counter has no formula for the CPU flash-attention kernel SDPA dispatches to; count it as SDPA.
_EXTRA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flops}


@torch.inference_mode()
def counted_flops(
    model: Any, pixel_values: torch.Tensor, rapid: RapidConfig | None = None
) -> tuple[int, tuple[int, ...]]:
    """FLOPs per image measured by `torch.utils.flop_counter` on a real forward running `rapid` (default: the
    model's own settings), and its token counts."""
    with FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
        output = model(pixel_values=pixel_values, rapid=rapid)
    return counter.get_total_flops() // pixel_values.shape[0], tuple(output.token_counts)
