"""Bipartite token matching shared by every method (ToMe's split, DESIGN.md "Bipartite split").

Tokens are split by index parity: even positions are *sources* (A), odd positions *destinations* (B). The CLS
token (index 0) is source row 0 and is never chosen; a DeiT distillation token (index 1) is destination column 0
and is never removed nor used as a destination.
"""

from __future__ import annotations

import torch
from torch import Tensor

SUPPORTED_PROTECTED = (1, 2)


def check_num_protected(num_protected: int) -> None:
    """Only CLS (1) or CLS + distillation token (2) layouts are supported."""
    if num_protected not in SUPPORTED_PROTECTED:
        raise ValueError(f"num_protected must be 1 (CLS) or 2 (CLS + distillation token), got {num_protected}")


def removal_cap(num_tokens: int, num_protected: int) -> int:
    """Largest number of tokens one bipartite step can remove: `(N - protected) // 2`."""
    return max(0, (num_tokens - num_protected) // 2)


def matching_metric(keys: Tensor) -> Tensor:
    """Keys `(B, heads, N, d)` averaged over heads and L2-normalised: the similarity metric `(B, N, d)`.

    Computed in at least float32: in bfloat16/float16 the similarity scores of near-duplicate tokens tie or swap
    order, and a half-precision model would reduce different tokens than its float32 twin (see
    results/robustness.md). The metric is small (one head-averaged key per token), so this costs little.
    """
    metric = keys.mean(dim=1, dtype=torch.promote_types(keys.dtype, torch.float32))
    return metric / metric.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(metric.dtype).tiny)


def bipartite_similarity(metric: Tensor, num_protected: int) -> Tensor:
    """Cosine similarity `S = A @ B^T` `(B, |A|, |B|)` with protected rows/columns set to -inf."""
    check_num_protected(num_protected)
    sources, destinations = metric[:, 0::2], metric[:, 1::2]
    scores = sources @ destinations.transpose(-1, -2)
    scores[:, 0, :] = -torch.inf
    if num_protected == 2:
        scores[:, :, 0] = -torch.inf
    return scores


def rank_descending(values: Tensor) -> Tensor:
    """Indices that sort `values` (B, n) from highest to lowest; ties keep index order (reproducible)."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices
