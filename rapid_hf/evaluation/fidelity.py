"""Fidelity of a reduced model to the unreduced one on the same images (less noisy than accuracy)."""

from __future__ import annotations

import torch
from torch import Tensor


def top1_agreement(reference_logits: Tensor, logits: Tensor) -> Tensor:
    """Per-image bool: does the reduced model predict the unreduced model's top-1 class?"""
    return reference_logits.argmax(dim=-1) == logits.argmax(dim=-1)


def kl_divergence(reference_logits: Tensor, logits: Tensor) -> Tensor:
    """Per-image KL(unreduced || reduced) of the softmax distributions, in nats (float32)."""
    reference = torch.log_softmax(reference_logits.float(), dim=-1)
    reduced = torch.log_softmax(logits.float(), dim=-1)
    return (reference.exp() * (reference - reduced)).sum(dim=-1)


def top1_nll(reference_logits: Tensor, logits: Tensor) -> Tensor:
    """Per-image -log p_reduced(unreduced top-1 class), in nats (float32): a smooth stand-in for agreement."""
    reduced = torch.log_softmax(logits.float(), dim=-1)
    return -reduced.gather(-1, reference_logits.argmax(dim=-1, keepdim=True)).squeeze(-1)
