"""Attention pieces token reduction needs: the proportional-attention bias and the CLS attention row."""

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


def cls_attention(query: Tensor, keys: Tensor, scaling: float, bias: Tensor | None) -> Tensor:
    """Attention the CLS query pays to every token, averaged over heads: `(B, N)` in float32.

    Computes only the CLS row, `softmax(q_cls K^T * scale + bias)`, in O(N d) per head, never the N x N map.
    `query` and `keys` are `(B, heads, N, d)`. The row is a broadcast multiply-and-sum, not a matmul: `keys` is
    a transposed view, which a matmul would first copy (on CPU 2-3x slower for this one row).
    """
    products = keys * query[:, :, :1]
    summed = products.sum(dim=-1) if products.dtype == torch.float32 else products.sum(dim=-1, dtype=torch.float32)
    logits = summed * scaling
    if bias is not None:
        logits = logits + bias[:, :, 0].float()
    return logits.softmax(dim=-1).mean(dim=1)


def per_patch_importance(attention: Tensor, sizes: Tensor | None) -> Tensor:
    """`(B, N)` CLS attention divided by each token's size `(B, N, 1)` and renormalised to sum to 1 per image.

    Proportional attention adds `log(size)` to a token's logit, multiplying its attention by its size; dividing
    by the size gives the attention per patch it stands for. None (every size 1) returns `attention` unchanged.
    """
    if sizes is None:
        return attention
    per_patch = attention / sizes[..., 0].to(attention.dtype)
    return per_patch / per_patch.sum(dim=-1, keepdim=True)
