"""Per-layer plan builders for each method (docs/METHOD.md): pure functions of the similarity scores.

Every builder takes the bipartite similarity `S` `(B, |A|, |B|)` from `bipartite_similarity` (protected rows and
columns already at -inf) and the number of tokens to remove, and returns a `ReductionPlan`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rapid_hf.reduction.config import ImportanceMode
from rapid_hf.reduction.matching import protected_source_rows, rank_descending
from rapid_hf.reduction.plan import ReductionPlan, SelectionPlan, gather_tokens, plan_from_ranking


@torch.no_grad()
def similarity_merge_plan(scores: Tensor, r: int, num_protected: int) -> ReductionPlan:
    """ToMe: merge the `r` sources with the highest `max_j S_ij` into their most similar destination."""
    best_score, best_destination = scores.max(dim=-1)
    return plan_from_ranking(rank_descending(best_score), r, num_protected, best_destination)


@torch.no_grad()
def similarity_prune_plan(scores: Tensor, r: int, num_protected: int) -> ReductionPlan:
    """ToFu's pruning stage: drop the `r` sources with the highest `max_j S_ij`."""
    best_score = scores.max(dim=-1).values
    return plan_from_ranking(rank_descending(best_score), r, num_protected, None)


def rank_descending_by(primary: Tensor, secondary: Tensor) -> Tensor:
    """Indices sorting `(B, n)` rows by `primary`, ties by `secondary` (both highest first), then by index.

    Two stable rankings: order by the tie-break key first, then stably by the main key, so equal main keys keep
    the tie-break order (and equal pairs keep index order, reproducible).
    """
    by_secondary = rank_descending(secondary)
    return by_secondary.gather(1, rank_descending(primary.gather(1, by_secondary)))


def redundancy_scores(scores: Tensor, threshold: float, num_protected: int) -> Tensor:
    """RAPID eq. (1): `score_i = sum_j max(0, S_ij - tau)`; protected source rows are -inf, never pruned."""
    redundancy = (scores - threshold).clamp_min(0).sum(dim=-1)
    if num_protected > 0:  # their rows of S are all -inf, which the clamp turned into 0
        redundancy.narrow(1, 0, protected_source_rows(num_protected)).fill_(-torch.inf)
    return redundancy


@torch.no_grad()
def redundancy_prune_plan(scores: Tensor, r: int, num_protected: int, threshold: float) -> ReductionPlan:
    """RAPID stage 1: prune the `r` sources most redundant with the destinations (eq. 1).

    Ties in eq. (1) (every source with no destination above tau scores 0) are broken by index, the stable order of
    every ranking here. Breaking them by each source's highest similarity instead was measured and not kept: the
    calibration photos favoured index order (docs/METHOD.md, "RAPID").
    """
    redundancy = redundancy_scores(scores, threshold, num_protected)
    return plan_from_ranking(rank_descending(redundancy), r, num_protected, None)


def importance_threshold(cls_attention: Tensor, num_protected: int, importance_ratio: float) -> Tensor:
    """`theta` `(B, 1)`: the k-th largest importance over patch tokens, `k = ceil(rho * N_patch)`."""
    patch_attention = cls_attention[:, num_protected:]
    k = min(patch_attention.shape[1], max(1, math.ceil(importance_ratio * patch_attention.shape[1])))
    return patch_attention.topk(k, dim=-1).values[:, -1:]


def importance_adjusted_scores(
    scores: Tensor, cls_attention: Tensor, num_protected: int, importance_ratio: float, importance_weight: float
) -> tuple[Tensor, Tensor]:
    """RAPID eq. (2)-(3): best destination of each source and its score `S'_{i j*(i)}`.

    `S'_ij = S_ij - lambda (a_i - theta)` shifts a whole row by a constant, so `j*(i) = argmax_j S_ij` and
    `S'_{i j*} = max_j S_ij - lambda (a_i - theta)`: the adjusted matrix is never materialised.
    """
    best_score, best_destination = scores.max(dim=-1)
    theta = importance_threshold(cls_attention, num_protected, importance_ratio)
    source_attention = cls_attention[:, 0::2].to(best_score.dtype)
    adjusted = best_score - importance_weight * (source_attention - theta.to(best_score.dtype))
    return adjusted, best_destination


def protected_sources(cls_attention: Tensor, num_protected: int, importance_ratio: float) -> Tensor:
    """`(B, |A|)` bool: sources among the top `k = ceil(rho * N_patch)` patch tokens by CLS attention.

    Exactly the k tokens `importance_threshold` ranks (ties by index), restricted to the sources (even indices).
    """
    patch_attention = cls_attention[:, num_protected:]
    k = min(patch_attention.shape[1], max(1, math.ceil(importance_ratio * patch_attention.shape[1])))
    top = rank_descending(patch_attention)[:, :k] + num_protected
    important = torch.zeros(cls_attention.shape, dtype=torch.bool, device=cls_attention.device)
    return important.scatter(1, top, True)[:, 0::2]


@torch.no_grad()
def importance_merge_plan(
    scores: Tensor,
    r: int,
    num_protected: int,
    cls_attention: Tensor,
    importance_ratio: float,
    importance_weight: float,
    importance_mode: ImportanceMode = "shift",
) -> ReductionPlan:
    """RAPID stage 2 (eq. 2-4): merge the `r` sources with the highest importance-adjusted similarity.

    `importance_mode="shift"` is eq. (2) as written. `"protect"` also keeps the top-rho patch tokens by CLS
    attention (`protected_sources`) from leaving: every other source is ranked first (by the same adjusted
    score), so a protected source leaves only when a layer must remove more tokens than there are unprotected
    patch sources (late layers of the most aggressive schedules), keeping the schedule's token counts exact.
    Protected tokens can still receive merges.
    """
    if importance_mode not in ("shift", "protect"):
        raise ValueError(f"importance_mode must be 'shift' or 'protect', got {importance_mode!r}")
    adjusted, best_destination = importance_adjusted_scores(
        scores, cls_attention, num_protected, importance_ratio, importance_weight
    )
    if importance_mode == "shift":
        return plan_from_ranking(rank_descending(adjusted), r, num_protected, best_destination)
    eligible = (~protected_sources(cls_attention, num_protected, importance_ratio)).to(adjusted.dtype)
    # CLS and other protected tokens (score -inf) rank after every patch source, important or not
    eligible[:, : protected_source_rows(num_protected)] = -1.0
    order = rank_descending_by(eligible, adjusted)
    return plan_from_ranking(order, r, num_protected, best_destination)


def crucial_count(num_patches: int, r: int, importance_ratio: float) -> int:
    """How many crucial tokens: `ceil(rho * N_patch)`, at least 1 and at most `N_patch - r` (the r leaving)."""
    if not 0 < r < num_patches:
        raise ValueError(f"crucial merging removes 0 < r < N_patch tokens, got r={r} with {num_patches} patch tokens")
    return max(1, min(math.ceil(importance_ratio * num_patches), num_patches - r))


@torch.no_grad()
def crucial_merge_plan(
    metric: Tensor, r: int, num_protected: int, cls_attention: Tensor, importance_ratio: float
) -> SelectionPlan:
    """Crucial-token merging (training-free part): `r` non-crucial tokens merge into their most similar crucial one.

    Patch tokens are ranked by CLS attention `(B, N)` (ties by index); the top `crucial_count` are *crucial*,
    the rest non-crucial. Each non-crucial token's best match is the crucial token most similar to it (cosine of
    the L2-normalised `metric` `(B, N, d)`); the `r` non-crucial tokens with the most similar best match leave,
    merging into it. So exactly `r` tokens leave per layer, only crucial tokens receive merges, and crucial tokens
    never leave. Protected tokens are neither. With `rho = 1` the `r` least important tokens leave.
    """
    num_patches = metric.shape[1] - num_protected
    num_crucial = crucial_count(num_patches, r, importance_ratio)
    order = rank_descending(cls_attention[:, num_protected:]) + num_protected
    crucial, non_crucial = order[:, :num_crucial], order[:, num_crucial:]
    similarity = gather_tokens(metric, non_crucial) @ gather_tokens(metric, crucial).transpose(-1, -2)
    best_similarity, best_crucial = similarity.max(dim=-1)
    leaving = rank_descending(best_similarity)[:, :r]
    removed = non_crucial.gather(1, leaving)
    destination = crucial.gather(1, best_crucial.gather(1, leaving))

    keep = torch.ones(metric.shape[:2], dtype=torch.bool, device=metric.device).scatter(1, removed, False)
    # Kept tokens in ascending order, found with fixed shapes (exports): each goes to its position among the kept,
    # the removed ones to one spare slot that is cut off.
    position_in_kept = keep.long().cumsum(dim=-1) - 1
    num_kept = metric.shape[1] - removed.shape[1]
    slot = torch.where(keep, position_in_kept, num_kept)
    index = torch.arange(metric.shape[1], device=metric.device).expand_as(keep)
    kept = index.new_zeros(keep.shape[0], num_kept + 1).scatter(1, slot, index)[:, :num_kept]
    return SelectionPlan(
        kept=kept,
        removed=removed,
        destinations=position_in_kept.gather(1, destination),
        num_protected=num_protected,
    )

