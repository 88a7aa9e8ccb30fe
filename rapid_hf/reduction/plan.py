"""A reduction plan: which source tokens leave a layer and, when merged, where they go.

A plan is computed once per layer from the similarity metric and then applied to every per-token tensor
(hidden states, sizes, source maps), the way ToMe's `merge` closures are, but as an explicit immutable value.

Token order after a step is `[kept sources (ascending), destinations]`, except that protected tokens sitting in
the destinations (a distillation token, every other register) are moved back to the front in their input order,
so the `k` protected tokens stay the first `k` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rapid_hf.reduction.config import MergeMode


def flat_token_index(index: Tensor, num_tokens: int) -> Tensor:
    """`(B, n)` per-image token indices as indices into the `(B * N)` rows of the flattened batch."""
    offsets = torch.arange(0, index.shape[0] * num_tokens, num_tokens, device=index.device).unsqueeze(1)
    return (index + offsets).flatten()


def gather_tokens(tokens: Tensor, index: Tensor) -> Tensor:
    """`tokens[b, index[b, i], :]` for `(B, N, C)` tokens and `(B, n)` indices.

    One `index_select` of whole rows of the flattened batch: on CPU several times faster than `gather` with an
    index expanded over the channels (the hot spot of every reduction step), and the same values.
    """
    batch, num_tokens = tokens.shape[:2]
    if batch == 1:  # no batch offsets: one index_select along the tokens (a batch-1 step is overhead-bound)
        return tokens.index_select(1, index.reshape(-1))
    rows = tokens.reshape(batch * num_tokens, -1).index_select(0, flat_token_index(index, num_tokens))
    return rows.view(*index.shape, tokens.shape[-1])


def add_tokens(tokens: Tensor, index: Tensor, rows: Tensor) -> Tensor:
    """`tokens` `(B, N, C)` with each row `rows[b, i]` added to token `index[b, i]` (sums in order of i).

    One `index_add` of whole rows (of the flattened batch when B > 1): the same sums in the same order as
    `scatter_add` with an index expanded over the channels, and on CPU half its time at batch 1 (equal at 4).
    """
    batch, num_tokens, channels = tokens.shape
    if batch == 1:
        return tokens.index_add(1, index.reshape(-1), rows)
    flat = tokens.reshape(batch * num_tokens, channels)
    return flat.index_add(0, flat_token_index(index, num_tokens), rows.reshape(-1, channels)).view(tokens.shape)


def gather_sources(tokens: Tensor, index: Tensor) -> Tensor:
    """`gather_tokens(tokens[:, 0::2], index)` read straight from `tokens` (source i is token 2i): no strided copy."""
    return gather_tokens(tokens, 2 * index)


@dataclass(frozen=True)
class PlanIndices:
    """Which tokens stay and leave in one step, and where merged ones go (None: they are pruned)."""

    kept: Tensor
    removed: Tensor
    destinations: Tensor | None
    num_protected: int

    @property
    def r(self) -> int:
        return self.removed.shape[1]

    @property
    def is_pruning(self) -> bool:
        return self.destinations is None


@dataclass(frozen=True)
class ReductionPlan(PlanIndices):
    """Indices describing one token-reduction step for a batch.

    Attributes:
        kept: `(B, |A| - r)` indices of the sources that stay, ascending (CLS first).
        removed: `(B, r)` indices of the sources that leave.
        destinations: `(B, r)` destination index (into B) of each removed source, or None when they are pruned.
        num_protected: protected tokens at the front (1: CLS, 2: + distillation token, 1 + registers, ...).
    """

    def assemble(self, kept: Tensor, destinations: Tensor) -> Tensor:
        num_destinations = self.num_protected // 2  # protected tokens at odd positions are destinations 0..
        if num_destinations == 0:
            return torch.cat([kept, destinations], dim=1)
        if num_destinations == 1:
            return torch.cat([kept[:, :1], destinations[:, :1], kept[:, 1:], destinations[:, 1:]], dim=1)
        # Protected tokens 0..k-1 alternate source/destination: interleave them back in their input order.
        protected = torch.stack([kept[:, :num_destinations], destinations[:, :num_destinations]], dim=2)
        return torch.cat([protected.flatten(1, 2), kept[:, num_destinations:], destinations[:, num_destinations:]], 1)

    def output_tokens(self, num_tokens: int) -> Tensor:
        """`(B, N - r)`: the input index of each token the step outputs, in output order."""
        destinations = torch.arange(1, num_tokens, 2, device=self.kept.device).expand(self.kept.shape[0], -1)
        return self.assemble(2 * self.kept, destinations)

    @property
    def merge_positions(self) -> Tensor:
        """`(B, r)`: where each removed source's destination sits in the output (destinations follow the kept
        sources; protected destinations, moved to the front, never receive merges)."""
        return self.destinations + self.kept.shape[1]

    def sum_into_destinations(self, tokens: Tensor) -> Tensor:
        """Apply the plan to `(B, N, C)` tokens, adding each merged source into its destination.

        For a pruning plan the removed sources are simply dropped. Used for sizes and source maps.
        """
        output = gather_tokens(tokens, self.output_tokens(tokens.shape[1]))  # one row copy, in output order
        if self.destinations is None:
            return output
        return add_tokens(output, self.merge_positions, gather_sources(tokens, self.removed))


@dataclass(frozen=True)
class SelectionPlan(PlanIndices):
    """A reduction step not tied to the parity split: any patch tokens leave, each merging into a kept token.

    Used by crucial-token merging, whose destinations (the most important tokens) can sit at any index.
    Token order after the step is the kept tokens in ascending index order, so protected tokens stay first.

    Attributes:
        kept: `(B, N - r)` indices of the tokens that stay, ascending (protected tokens first).
        removed: `(B, r)` indices of the tokens that leave.
        destinations: `(B, r)` position *in `kept`* that each removed token merges into, or None when pruned.
        num_protected: protected tokens at the front, never removed.
    """

    def output_tokens(self, num_tokens: int) -> Tensor:
        """`(B, N - r)`: the input index of each token the step outputs, in output order (the kept tokens)."""
        return self.kept

    def sum_into_destinations(self, tokens: Tensor) -> Tensor:
        """Apply the plan to `(B, N, C)` tokens, adding each merged token into its destination."""
        kept = gather_tokens(tokens, self.kept)
        if self.destinations is None:
            return kept
        return add_tokens(kept, self.destinations, gather_tokens(tokens, self.removed))


def plan_from_ranking(
    order: Tensor, r: int, num_protected: int, best_destination: Tensor | None
) -> ReductionPlan:
    """Build a plan removing the first `r` sources of `order` (a per-row ranking of source indices)."""
    removed = order[:, :r]
    kept = order[:, r:].sort(dim=-1).values
    destinations = None if best_destination is None else best_destination.gather(1, removed)
    return ReductionPlan(kept=kept, removed=removed, destinations=destinations, num_protected=num_protected)


def apply_plan(
    plan: ReductionPlan | SelectionPlan, hidden: Tensor, sizes: Tensor | None, mode: MergeMode = "mean"
) -> tuple[Tensor, Tensor | None]:
    """Reduce `hidden` `(B, N, C)` and float32 `sizes` `(B, N, 1)` (None = all ones) with `plan`.

    Pruning drops tokens and leaves sizes alone. Merging is ToMe's size-weighted average
    (`x_dst = (s_dst x_dst + s_src x_src) / (s_dst + s_src)`, sizes add), computed with weights
    `size / group size` so half precision never overflows and untouched tokens stay bit-exact. With
    `mode="mlerp"` (ToFu) each merged token is rescaled to the largest norm among the tokens it combines.
    """
    if mode not in ("mean", "mlerp"):
        raise ValueError(f"merge mode must be 'mean' or 'mlerp', got {mode!r}")
    if plan.destinations is None:
        return plan.sum_into_destinations(hidden), None if sizes is None else plan.sum_into_destinations(sizes)
    if sizes is None:
        sizes = hidden.new_ones(*hidden.shape[:2], 1, dtype=torch.float32)
    if isinstance(plan, SelectionPlan):
        kept, removed = gather_tokens(hidden, plan.kept), gather_tokens(hidden, plan.removed)
        kept_sizes, removed_sizes = gather_tokens(sizes, plan.kept), gather_tokens(sizes, plan.removed)
        return merge_weighted(kept, kept_sizes, removed, removed_sizes, plan.destinations, mode)
    # One gather of the output tokens (kept sources and destinations, in output order), then the merge into the
    # destinations' positions: the kept sources take part with weight size/size = 1, exactly unchanged.
    output, removed_tokens = plan.output_tokens(hidden.shape[1]), 2 * plan.removed  # source i is token 2i
    removed, removed_sizes = gather_tokens(hidden, removed_tokens), gather_tokens(sizes, removed_tokens)
    return merge_weighted(
        gather_tokens(hidden, output), gather_tokens(sizes, output), removed, removed_sizes, plan.merge_positions, mode
    )


def merge_weighted(
    destinations: Tensor,
    destination_sizes: Tensor,
    removed: Tensor,
    removed_sizes: Tensor,
    index: Tensor,
    mode: MergeMode,
) -> tuple[Tensor, Tensor]:
    """Merge `removed` `(B, r, C)` into `destinations` `(B, M, C)` at positions `index` `(B, r)`, as `apply_plan`.

    Returns the merged destinations and their sizes (destination sizes plus the sizes merged into them).
    """
    size_index = index.unsqueeze(-1)
    totals = destination_sizes.scatter_add(1, size_index, removed_sizes)
    removed_weights = removed_sizes / totals.gather(1, size_index)
    merged = add_tokens(
        destinations * (destination_sizes / totals).to(destinations.dtype),
        index,
        removed * removed_weights.to(destinations.dtype),
    )
    if mode == "mlerp":
        max_norms = destinations.norm(dim=-1, keepdim=True).scatter_reduce(
            1, size_index, removed.norm(dim=-1, keepdim=True), reduce="amax", include_self=True
        )
        merged_norms = merged.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(merged.dtype).tiny)
        merged = torch.where(totals > destination_sizes, merged * (max_norms / merged_norms), merged)
    return merged, totals
