"""Source tracing: which original patches each token stands for, as pure functions of reduction plans.

The traced state is an *assignment* `(B, P)` long: for each of the `P` image patches (row-major over the patch
grid; CLS and distillation tokens are not patches) the index of the token that currently stands for it, or -1
once the patch was pruned. It is small whatever the depth, and is turned into the richer views only when asked:

- `sources_from_assignment`: membership `(B, N, P)` bool, row t = the patches token t stands for (the rows of
  protected tokens are all False, so a patch token's size is its row sum);
- `pruned_at` `(B, P)` long, kept beside the assignment: the layer whose reduction pruned the patch, -1 if never;
- `scatter_to_patches`: dense per-patch features `(B, P, C)`, each patch getting its token's feature.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

PRUNED = -1


class Plan(Protocol):
    """What tracing needs from a reduction plan (`ReductionPlan` or any other plan type)."""

    removed: Tensor

    def sum_into_destinations(self, tokens: Tensor) -> Tensor: ...


def initial_assignment(batch_size: int, num_patches: int, num_protected: int, device: torch.device) -> Tensor:
    """Before any reduction patch p is token `num_protected + p`: `(B, P)` long."""
    if batch_size < 1 or num_patches < 1:
        raise ValueError(f"source tracing needs a batch and patches, got batch {batch_size}, {num_patches} patches")
    patches = torch.arange(num_protected, num_protected + num_patches, device=device)
    return patches.expand(batch_size, -1).clone()


def initial_pruned_at(assignment: Tensor) -> Tensor:
    """No patch pruned yet: `(B, P)` filled with -1."""
    return torch.full_like(assignment, PRUNED)


def token_moves(plan: Plan, num_tokens: int) -> Tensor:
    """Where each of the `num_tokens` tokens entering a step goes: `(B, N)` index after the step, -1 if pruned.

    Found by applying the plan's own `sum_into_destinations` (the operation that moves sizes) to one-hot token
    identities, so it holds for any plan type (bipartite or not) without restating its output order. Costs
    `B * N^2` per reducing layer, about `1 / hidden_size` of that layer's attention.
    """
    batch_size = plan.removed.shape[0]
    identity = torch.eye(num_tokens, device=plan.removed.device).expand(batch_size, -1, -1)
    membership = plan.sum_into_destinations(identity)  # (B, N_out, N_in): 1 where input token went
    found, new_index = membership.max(dim=1)
    return torch.where(found > 0, new_index, PRUNED)


def update_assignment(
    plan: Plan, assignment: Tensor, pruned_at: Tensor, num_tokens: int, layer: int
) -> tuple[Tensor, Tensor]:
    """Apply one step to the trace: patches follow their token; those of pruned tokens get `pruned_at = layer`."""
    moves = token_moves(plan, num_tokens)
    alive = assignment >= 0
    moved = torch.where(alive, moves.gather(1, assignment.clamp_min(0)), PRUNED)
    newly_pruned = alive & (moved < 0)
    return moved, torch.where(newly_pruned, layer, pruned_at)


def sources_from_assignment(assignment: Tensor, num_tokens: int) -> Tensor:
    """Membership `(B, num_tokens, P)` bool: `sources[b, t, p]` is True when token t stands for patch p."""
    tokens = torch.arange(num_tokens, device=assignment.device)
    return assignment.unsqueeze(1) == tokens[None, :, None]


def assignment_from_sources(sources: Tensor) -> Tensor:
    """Inverse of `sources_from_assignment` for a partition: `(B, P)` token index, -1 where no token has p."""
    if sources.ndim != 3:
        raise ValueError(f"sources must have shape (batch, tokens, patches), got {tuple(sources.shape)}")
    owners = sources.sum(dim=1)
    if (owners > 1).any():
        raise ValueError("sources is not a partition: some patch belongs to more than one token")
    return torch.where(owners > 0, sources.to(torch.uint8).argmax(dim=1), PRUNED)


def scatter_to_patches(tokens: Tensor, assignment: Tensor, fill: float = 0.0) -> Tensor:
    """Dense `(B, P, C)` features from `(B, N, C)` tokens: each patch gets its token's row; pruned ones `fill`.

    Lets a dense head (segmentation, detection) consume a reduced encoder's output on the full patch grid.
    """
    if tokens.ndim != 3 or assignment.ndim != 2 or tokens.shape[0] != assignment.shape[0]:
        raise ValueError(
            f"scatter_to_patches needs tokens (B, N, C) and an assignment (B, P) with the same batch, got "
            f"{tuple(tokens.shape)} and {tuple(assignment.shape)}"
        )
    if assignment.numel() and int(assignment.max()) >= tokens.shape[1]:
        raise ValueError(f"assignment points at token {int(assignment.max())} but there are {tokens.shape[1]}")
    index = assignment.clamp_min(0).unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
    dense = tokens.gather(1, index)
    return dense.masked_fill((assignment < 0).unsqueeze(-1), fill)


__all__ = [
    "PRUNED",
    "Plan",
    "assignment_from_sources",
    "initial_assignment",
    "initial_pruned_at",
    "scatter_to_patches",
    "sources_from_assignment",
    "token_moves",
    "update_assignment",
]
