"""The exportable ranking (comparisons only) gives the stable sort's order, tie for tie."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rapid_hf.reduction import matching
from rapid_hf.reduction.matching import rank_by_counting, rank_descending

VALUES = st.sampled_from([-float("inf"), -1.0, 0.0, 0.0, 0.25, 0.5, 1.0, 3.0])


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 3).flatmap(lambda b: st.integers(1, 40).flatmap(
    lambda n: st.lists(st.lists(VALUES, min_size=n, max_size=n), min_size=b, max_size=b))))
def test_counting_rank_equals_the_stable_sort_with_ties_and_minus_inf(rows):
    values = torch.tensor(rows)
    expected = torch.sort(values, dim=-1, descending=True, stable=True).indices
    assert torch.equal(rank_by_counting(values), expected)


def test_random_scores_rank_alike_and_export_uses_counting(monkeypatch):
    values = torch.randn(4, 98).round(decimals=1)  # many ties
    expected = rank_descending(values)
    monkeypatch.setattr(matching.torch.compiler, "is_exporting", lambda: True)
    calls = []
    original = matching.rank_by_counting
    monkeypatch.setattr(matching, "rank_by_counting", lambda v: calls.append(1) or original(v))
    assert torch.equal(rank_descending(values), expected) and calls == [1]
