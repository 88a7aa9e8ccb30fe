"""Bipartite token matching shared by every method (ToMe's split, docs/METHOD.md "The bipartite split").

Tokens are split by index parity: even positions are *sources* (A), odd positions *destinations* (B). The `k`
protected tokens at the front (none for SigLIP; CLS; CLS and a distillation token; CLS and registers) are source
rows `0 .. ceil(k/2) - 1` and destination columns `0 .. floor(k/2) - 1`, all blocked: never removed, merged or
used as a destination. Which tokens are protected is the model adapter's to say; nothing here assumes a CLS token.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_num_protected(num_protected: int) -> None:
    """Protected tokens at the front: 0 (no CLS token, SigLIP), 1 (CLS), 2 (CLS + distillation token), ..."""
    if isinstance(num_protected, bool) or not isinstance(num_protected, int) or num_protected < 0:
        raise ValueError(f"num_protected must be an int >= 0 (tokens at the front never reduced), got {num_protected}")


def protected_source_rows(num_protected: int) -> int:
    """How many source rows (even positions) the protected tokens occupy: `ceil(k / 2)`."""
    return (num_protected + 1) // 2


def protected_destination_columns(num_protected: int) -> int:
    """How many destination columns (odd positions) the protected tokens occupy: `floor(k / 2)`."""
    return num_protected // 2


def removal_cap(num_tokens: int, num_protected: int) -> int:
    """Largest number of tokens one bipartite step can remove: `(N - protected) // 2`."""
    return max(0, (num_tokens - num_protected) // 2)


def matching_metric(keys: Tensor) -> Tensor:
    """Keys `(B, heads, N, d)` averaged over heads and L2-normalised: the similarity metric `(B, N, d)`.

    Computed in at least float32: in bfloat16/float16 the similarity scores of near-duplicate tokens tie or swap
    order, and a half-precision model would reduce different tokens than its float32 twin (see
    results/robustness.md). The metric is small (one head-averaged key per token), so this costs little.
    """
    per_token = keys.transpose(1, 2)  # (B, N, heads, d): the layout the key projection wrote, so a cheap reduce
    dtype = torch.promote_types(keys.dtype, torch.float32)
    metric = per_token.mean(dim=2) if keys.dtype == dtype else per_token.mean(dim=2, dtype=dtype)
    return metric / metric.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)


def bipartite_similarity(metric: Tensor, num_protected: int) -> Tensor:
    """Cosine similarity `S = A @ B^T` `(B, |A|, |B|)` with protected rows/columns set to -inf."""
    check_num_protected(num_protected)
    sources, destinations = metric[:, 0::2], metric[:, 1::2]
    scores = sources @ destinations.transpose(-1, -2)
    # narrow + fill_: two direct calls, a few times cheaper than slice assignment (a batch-1 step is overhead-bound)
    if num_protected > 0:
        scores.narrow(1, 0, protected_source_rows(num_protected)).fill_(-torch.inf)
    if num_protected > 1:
        scores.narrow(2, 0, protected_destination_columns(num_protected)).fill_(-torch.inf)
    return scores


def rank_descending(values: Tensor) -> Tensor:
    """Indices that sort `values` (B, n) from highest to lowest; ties keep index order (reproducible).

    Eager runs a stable sort. Under export (`torch.export`, which the ONNX exporter uses and whose ONNX conversion
    has no stable sort) the same order is found by counting (`rank_by_counting`): tie for tie the same indices.
    """
    if torch.compiler.is_exporting():
        return rank_by_counting(values)
    return torch.sort(values, dim=-1, descending=True, stable=True).indices


def rank_by_counting(values: Tensor) -> Tensor:
    """The stable descending order of `values` (B, n) from comparisons only (exports to any runtime).

    Entry i goes to position `#{j: v_j > v_i} + #{j < i: v_j == v_i}`, the number of entries a stable sort puts
    before it; scattering each index to its position gives the order. `O(n^2)` comparisons per row, cheap for
    the token counts of a ViT layer.
    """
    index = torch.arange(values.shape[-1], device=values.device)
    current, other = values.unsqueeze(-1), values.unsqueeze(-2)  # [b, i, j] compares v_i with v_j
    before = (other > current) | ((other == current) & (index.unsqueeze(0) < index.unsqueeze(1)))
    position = before.sum(dim=-1)
    return torch.zeros_like(position).scatter(-1, position, index.expand_as(position))
