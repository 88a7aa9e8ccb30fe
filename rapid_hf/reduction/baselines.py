"""Two more training-free baselines as pure tensor functions: PiToMe and top-k pruning with fusion (EViT-style).

- PiToMe (Tran et al., NeurIPS 2024): each patch token gets an *energy* from its cosine similarities to the other
  patch tokens; the `2r` highest-energy tokens (large clusters of near-duplicates) are split alternately into
  sources and destinations and every source merges into its most similar destination. Low-energy (isolated,
  informative) tokens are protected. Returns a `SelectionPlan`, applied by `apply_plan` (size-weighted mean).
- Top-k fusion (EViT, Liang et al., ICLR 2022, used without training): the `r + 1` least important patch tokens
  are fused into one token, weighted by their importance. Returns a `FusePlan`, applied by its own `apply`.

Both keep the `num_protected` tokens at the front (CLS, distillation token, registers; 0 for models with none)
out of every score: never removed, merged nor used as a destination. Shapes depend only on `r` and the input
shape, so both trace under `torch.compile(fullgraph=True)` and `torch.export`. docs/METHOD.md, "PiToMe and top-k
pruning", gives the equations, defaults and where they differ from the public code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from rapid_hf.reduction.matching import rank_descending
from rapid_hf.reduction.plan import MergeMode, PlanIndices, SelectionPlan, add_tokens, gather_tokens

EnergyForm = Literal["paper", "elu"]

PITOME_MARGIN_BASE = 0.9
"""`m_l = 0.9 (1 - l / L)`: the margin schedule of the PiToMe paper and of its public code at publication."""
PITOME_ALPHA = 1.0
"""`alpha` of the energy kernel below the margin (paper and public code)."""
PITOME_TOME_MARGIN = 0.45
"""The public code at publication ran ToMe's parity-split matching in layers whose margin is at least this."""


def check_protected_count(num_protected: int) -> None:
    """`num_protected` is an int >= 0: tokens at the front never reduced (0 for models without a CLS token)."""
    if isinstance(num_protected, bool) or not isinstance(num_protected, int) or num_protected < 0:
        raise ValueError(f"num_protected must be an int >= 0, got {num_protected!r}")


def pitome_margin(layer: int, num_layers: int, base: float = PITOME_MARGIN_BASE) -> float:
    """PiToMe's margin at `layer` (0-based) of `num_layers`: `base - base * l / L`, falling to near 0 at the top.

    Deep layers get a lower margin, so more neighbours count as similar and more tokens look mergeable. The
    expression is evaluated as the public code does (`.9 - .9 * (i / L)`), so layer `L/2` lands exactly on 0.45.
    """
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer must be in [0, {num_layers}), got {layer}")
    return base - base * (layer / num_layers)


def pitome_runs_tome(layer: int, num_layers: int, base: float = PITOME_MARGIN_BASE) -> bool:
    """Whether the public PiToMe code at publication ran plain ToMe at `layer` (margin >= 0.45): layers 0-6 of 12.

    An integrator reproducing the published numbers uses ToMe's `similarity_merge_plan` there and
    `pitome_merge_plan` in the other layers; PiToMe as the paper's equations state it runs in every layer.
    """
    return pitome_margin(layer, num_layers, base) >= PITOME_TOME_MARGIN


def pitome_ratio_schedule(num_tokens: int, num_layers: int, ratio: float, num_protected: int) -> list[int]:
    """Per-layer `r` of the public code's `ratio` budget: each layer removes `floor(T - T * ratio)` of its `T`
    unprotected tokens (its evaluation script runs ratios 0.9, 0.925, 0.95, 0.975)."""
    check_protected_count(num_protected)
    if not 0.5 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0.5, 1] (a bipartite step removes at most half), got {ratio}")
    remaining, schedule = num_tokens - num_protected, []
    for _ in range(num_layers):
        r = min(math.floor(remaining - remaining * ratio), remaining // 2)
        schedule.append(r)
        remaining -= r
    return schedule


def energy_kernel(
    similarity: Tensor, margin: float, alpha: float = PITOME_ALPHA, form: EnergyForm = "paper", temperature: float = 1.0
) -> Tensor:
    """PiToMe's `f_m` applied elementwise to cosine similarities.

    `form="paper"` (Eq. 4): `x` where `x >= m`, else `alpha (exp(x - m) - 1)`. `form="elu"`: the public code's
    `ELU((x - m) / temperature, alpha)` (temperature 0.01 at publication, 1 at the latest commit), which subtracts
    `m` above the margin; the two rank tokens differently only through the count of neighbours above it.
    """
    if form == "paper":
        if temperature != 1.0:
            raise ValueError("temperature applies to form='elu' only (the paper's kernel has none)")
        return torch.where(similarity >= margin, similarity, alpha * torch.expm1(similarity - margin))
    if form == "elu":
        return torch.nn.functional.elu((similarity - margin) / temperature, alpha=alpha)
    raise ValueError(f"energy form must be 'paper' or 'elu', got {form!r}")


def pitome_energy(
    metric: Tensor,
    num_protected: int,
    margin: float,
    alpha: float = PITOME_ALPHA,
    form: EnergyForm = "paper",
    temperature: float = 1.0,
) -> Tensor:
    """Energy `E_i = mean_j f_m(cos(x_i, x_j))` `(B, N - num_protected)` of each patch token.

    `metric` `(B, N, d)` is L2-normalised (`matching_metric`). The mean runs over the patch tokens, the token
    itself included (a constant shift, as in the public code); protected tokens are left out of it.
    """
    check_protected_count(num_protected)
    patches = metric[:, num_protected:]
    return energy_kernel(patches @ patches.transpose(-1, -2), margin, alpha, form, temperature).mean(dim=-1)


def selection_plan(
    removed: Tensor, destination_tokens: Tensor | None, num_tokens: int, num_protected: int
) -> SelectionPlan:
    """A `SelectionPlan` from the `(B, r)` removed token indices and the token each merges into (None: pruned).

    Kept tokens come out in ascending order, found with fixed shapes (no data-dependent sizes): each kept token
    goes to its position among the kept, every removed one to a spare slot that is cut off.
    """
    batch = removed.shape[0]
    keep = torch.ones(batch, num_tokens, dtype=torch.bool, device=removed.device).scatter(1, removed, False)
    position_in_kept = keep.long().cumsum(dim=-1) - 1
    num_kept = num_tokens - removed.shape[1]
    slot = torch.where(keep, position_in_kept, num_kept)
    index = torch.arange(num_tokens, device=removed.device).expand_as(keep)
    kept = index.new_zeros(batch, num_kept + 1).scatter(1, slot, index)[:, :num_kept]
    destinations = None if destination_tokens is None else position_in_kept.gather(1, destination_tokens)
    return SelectionPlan(kept=kept, removed=removed, destinations=destinations, num_protected=num_protected)


@torch.no_grad()
def pitome_merge_plan(
    metric: Tensor,
    r: int,
    num_protected: int,
    margin: float,
    alpha: float = PITOME_ALPHA,
    energy_form: EnergyForm = "paper",
    temperature: float = 1.0,
) -> SelectionPlan:
    """PiToMe's step: the `2r` highest-energy patch tokens merge pairwise-bipartitely, `r` of them leave.

    Patch tokens are ranked by `pitome_energy` (ties by index). Ranks `0, 2, .., 2r-2` are sources, ranks
    `1, 3, .., 2r-1` destinations; every source merges into its most similar destination (cosine of `metric`
    `(B, N, d)`, L2-normalised; ties to the higher-energy destination). The other `N - p - 2r` patch tokens and
    the `p` protected ones stay untouched. Apply with `apply_plan` (size-weighted mean, sizes add).
    """
    check_protected_count(num_protected)
    num_patches = metric.shape[1] - num_protected
    if not 1 <= r <= num_patches // 2:
        raise ValueError(f"PiToMe removes 1 <= r <= N_patch // 2 tokens, got r={r} with {num_patches} patch tokens")
    patches = metric[:, num_protected:]
    similarity = patches @ patches.transpose(-1, -2)
    energy = energy_kernel(similarity, margin, alpha, energy_form, temperature).mean(dim=-1)
    mergeable = rank_descending(energy)[:, : 2 * r]
    sources, destinations = mergeable[:, 0::2], mergeable[:, 1::2]
    rows = similarity.gather(1, sources.unsqueeze(-1).expand(-1, -1, num_patches))
    pair_similarity = rows.gather(2, destinations.unsqueeze(1).expand(-1, r, -1))  # (B, r sources, r destinations)
    best = pair_similarity.argmax(dim=-1)  # first maximum: ties go to the higher-energy destination
    return selection_plan(
        sources + num_protected, destinations.gather(1, best) + num_protected, metric.shape[1], num_protected
    )


@dataclass(frozen=True)
class FusePlan(PlanIndices):
    """Top-k fusion: `r + 1` tokens become one, weighted by importance; the fused token keeps one member's slot.

    The fused token takes the place of its group's most important member (the *representative*), so the output
    is the kept tokens in ascending input order with protected tokens first, as for a `SelectionPlan`. Its value
    is an importance-weighted mean, which `apply_plan` cannot express: apply it with `FusePlan.apply`.

    Attributes:
        kept: `(B, N - r)` indices of the tokens that stay, ascending (the representative among them).
        removed: `(B, r)` indices of the other fused tokens, which leave.
        destinations: `(B, r)` position in `kept` of the representative (one value per row, repeated).
        num_protected: protected tokens at the front, never fused.
        weights: `(B, r + 1)` fusion weights, summing to 1: column 0 the representative's, then `removed`'s.
    """

    weights: Tensor

    def output_tokens(self, num_tokens: int) -> Tensor:
        """`(B, N - r)`: the input index of each output token (the fused token at its representative's index)."""
        return self.kept

    def sum_into_destinations(self, tokens: Tensor) -> Tensor:
        """Apply the plan to `(B, N, C)` tokens by plain sums (sizes, source maps, tracing): fused sizes add."""
        return add_tokens(gather_tokens(tokens, self.kept), self.destinations, gather_tokens(tokens, self.removed))

    def apply(self, hidden: Tensor, sizes: Tensor | None, mode: MergeMode = "mean") -> tuple[Tensor, Tensor]:
        """Reduce `hidden` `(B, N, C)` and float32 `sizes` `(B, N, 1)` (None = all ones); returns both reduced.

        The fused token is `sum_k w_k x_k` over its group (computed in at least float32), its size the sum of
        the group's sizes, so proportional attention stays right. `mode="mlerp"` rescales it to the largest norm
        in the group (as ToFu's MLERP). Every other token is copied unchanged (bit-exact).
        """
        if mode not in ("mean", "mlerp"):
            raise ValueError(f"merge mode must be 'mean' or 'mlerp', got {mode!r}")
        if sizes is None:
            sizes = hidden.new_ones(*hidden.shape[:2], 1, dtype=torch.float32)
        position = self.destinations[:, :1]
        group = torch.cat([self.kept.gather(1, position), self.removed], dim=1)
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        members = gather_tokens(hidden, group).to(dtype)
        fused = (members * self.weights.to(dtype).unsqueeze(-1)).sum(dim=1, keepdim=True)
        if mode == "mlerp":
            largest = members.norm(dim=-1, keepdim=True).amax(dim=1, keepdim=True)
            fused = fused * (largest / fused.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny))
        output = gather_tokens(hidden, self.kept).scatter(
            1, position.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]), fused.to(hidden.dtype)
        )
        return output, self.sum_into_destinations(sizes)


@torch.no_grad()
def topk_fuse_plan(importance: Tensor, r: int, num_protected: int) -> FusePlan:
    """Keep the most important patch tokens; fuse the `r + 1` least important into one (`r` leave net).

    `importance` `(B, N)` (e.g. CLS attention averaged over heads; non-negative) ranks the patch tokens, ties by
    index (the later token counts as less important). The fused group's weights are its importances
    renormalised to sum to 1 (uniform if they are all 0). Protected tokens are never ranked nor fused.
    """
    check_protected_count(num_protected)
    num_patches = importance.shape[1] - num_protected
    if not 1 <= r <= num_patches - 1:
        raise ValueError(f"top-k fusion removes 1 <= r < N_patch tokens, got r={r} with {num_patches} patch tokens")
    order = rank_descending(importance[:, num_protected:]) + num_protected
    group = order[:, num_patches - r - 1 :]  # the r + 1 least important, most important (representative) first
    scores = importance.gather(1, group).to(torch.promote_types(importance.dtype, torch.float32)).clamp_min(0)
    total = scores.sum(dim=-1, keepdim=True)
    weights = torch.where(total > 0, scores / total.clamp_min(torch.finfo(scores.dtype).tiny), 1.0 / (r + 1))
    plan = selection_plan(group[:, 1:], group[:, :1].expand(-1, r), importance.shape[1], num_protected)
    return FusePlan(
        kept=plan.kept, removed=plan.removed, destinations=plan.destinations, num_protected=num_protected,
        weights=weights,
    )


__all__ = [
    "PITOME_ALPHA",
    "PITOME_MARGIN_BASE",
    "PITOME_TOME_MARGIN",
    "EnergyForm",
    "FusePlan",
    "check_protected_count",
    "energy_kernel",
    "pitome_energy",
    "pitome_margin",
    "pitome_merge_plan",
    "pitome_ratio_schedule",
    "pitome_runs_tome",
    "selection_plan",
    "topk_fuse_plan",
]
