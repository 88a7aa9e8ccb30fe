"""Model outputs of the Rapid classes: the transformers outputs plus what the reduction did."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.models.deit.modeling_deit import DeiTForImageClassificationWithTeacherOutput


@dataclass
class ReductionFields:
    """What the reduction did, added after the fields of a transformers output.

    token_counts: tokens after each layer (the same for every image of the batch).
    sizes: `(batch, tokens)` how many input tokens each output token stands for.

    Only with `output_sources=True` (P = patches of the input's grid, row-major; protected tokens are not patches):
    sources: `(batch, tokens, P)` bool, the patches each output token stands for (protected rows all False).
    layer_sources: one `(batch, tokens_l, P)` bool per layer, the sources after that layer's reduction.

    Only with `output_dense=True`:
    dense_features: `(batch, P, hidden)` each patch's output-token feature (zeros where pruned), for dense heads.

    With either: pruned_at: `(batch, P)` long, the layer whose reduction pruned each patch; -1 if never pruned.

    These fields are attributes only: `to_tuple()` (what `return_dict=False` returns, and integer indexing) holds
    exactly the fields of the transformers output, in its order, so tuple-unpacking code works unchanged.
    """

    token_counts: tuple[int, ...] | None = None
    sizes: torch.FloatTensor | None = None
    sources: torch.BoolTensor | None = None
    pruned_at: torch.LongTensor | None = None
    layer_sources: tuple[torch.BoolTensor, ...] | None = None
    dense_features: torch.FloatTensor | None = None

    def to_tuple(self) -> tuple:
        """The transformers output's tuple: every field that is set, except the reduction fields."""
        return tuple(value for key, value in self.items() if key not in REDUCTION_FIELDS)


REDUCTION_FIELDS: tuple[str, ...] = tuple(ReductionFields.__dataclass_fields__)


def reduction_fields(output: ReductionFields) -> dict:
    """The reduction fields of a backbone output, to copy into a head's output."""
    return {name: getattr(output, name) for name in REDUCTION_FIELDS}


@dataclass
class RapidModelOutput(ReductionFields, BaseModelOutputWithPooling):
    """`BaseModelOutputWithPooling` of a reduced backbone plus `ReductionFields`."""


@dataclass
class RapidImageClassifierOutput(ReductionFields, ImageClassifierOutput):
    """`ImageClassifierOutput` plus `ReductionFields`."""


@dataclass
class RapidDeiTWithTeacherOutput(ReductionFields, DeiTForImageClassificationWithTeacherOutput):
    """`DeiTForImageClassificationWithTeacherOutput` plus `ReductionFields`."""
