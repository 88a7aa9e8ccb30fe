"""Attention pieces token reduction needs: the proportional-attention bias and each token's attention importance."""

from __future__ import annotations

import torch
from torch import Tensor


def size_bias(sizes: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Proportional attention as an additive bias `(B, 1, 1, N)`: `+log(size)` of each key token.

    Returns None while every token stands for one patch (the bias would be zero), so attention keeps its
    unmasked fast path until the first merge.
    """
    if sizes is None:
        return None
    return sizes.log().to(dtype)[:, None, None, :, 0]


def attention_importance(query: Tensor, keys: Tensor, scaling: float, bias: Tensor | None) -> Tensor:
    """Attention each token receives from the query rows given, averaged over heads and rows: `(B, N)` float32.

    `query` `(B, heads, Q, d)` holds the rows that judge importance, chosen by the model adapter: the CLS query
    alone (`Q = 1`) for families with a CLS token, every token's query for families without one (SigLIP);
    `keys` `(B, heads, N, d)`. `softmax(q K^T * scale + bias)` over the keys, so the proportional-attention bias
    counts as in the layer's own attention. With one row the logits are a broadcast multiply-and-sum, not a
    matmul: `keys` is a transposed view, which a matmul would first copy (on CPU 2-3x slower for one row).
    """
    if query.shape[2] == 1:
        products = keys * query
        summed = products.sum(-1) if products.dtype == torch.float32 else products.sum(-1, dtype=torch.float32)
        logits = summed.unsqueeze(2)  # (B, heads, 1, N)
    else:
        logits = query.float() @ keys.float().transpose(-1, -2)  # (B, heads, Q, N)
    logits = logits * scaling
    if bias is not None:
        logits = logits + bias.float()
    return logits.softmax(dim=-1).mean(dim=2).mean(dim=1)


def per_patch_importance(attention: Tensor, sizes: Tensor | None) -> Tensor:
    """`(B, N)` CLS attention divided by each token's size `(B, N, 1)` and renormalised to sum to 1 per image.

    Proportional attention adds `log(size)` to a token's logit, multiplying its attention by its size; dividing
    by the size gives the attention per patch it stands for. None (every size 1) returns `attention` unchanged.
    """
    if sizes is None:
        return attention
    per_patch = attention / sizes[..., 0].to(attention.dtype)
    return per_patch / per_patch.sum(dim=-1, keepdim=True)
