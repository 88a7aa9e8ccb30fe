"""Hypothesis properties of one reduction step (`reduce_tokens`) and of the r schedules, for every operation.

Random token tensors, keys, queries and sizes; the step is checked through its own plan applied to a one-hot
membership map (which input tokens each output token stands for), so the same properties hold for the
parity-split plans and the crucial-token selection plan alike.
"""

from __future__ import annotations

from typing import get_args

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rapid_hf.reduction.attention import attention_importance, per_patch_importance, size_bias
from rapid_hf.reduction.config import RapidConfig
from rapid_hf.reduction.matching import removal_cap
from rapid_hf.reduction.schedule import (
    expand_schedule,
    min_output_tokens,
    schedule_for_output_tokens,
    token_counts,
)
from rapid_hf.reduction.steps import LayerStep, Operation, build_plan, reduce_tokens

OPERATIONS = get_args(Operation)
PROPERTY_SETTINGS = settings(max_examples=50, deadline=None)


@st.composite
def steps(draw, identical_tokens: bool = False):
    """A random layer: tokens, keys, query, sizes, the operation and r (any size, also beyond the cap)."""
    protected = draw(st.sampled_from([0, 1, 2]))  # 0: a family without a CLS token (SigLIP)
    batch, num_tokens = draw(st.integers(1, 3)), draw(st.integers(protected + 1, 40))
    heads, head_dim, channels = draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 8))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    if identical_tokens:
        hidden = randn(batch, 1, channels).expand(batch, num_tokens, channels).contiguous()
    else:
        hidden = randn(batch, num_tokens, channels)
    sizes = None
    if draw(st.booleans()):
        sizes = torch.randint(1, 6, (batch, num_tokens, 1), generator=generator).float()
    settings = RapidConfig(
        merge_mode=draw(st.sampled_from(["mean", "mlerp"])),
        prune_threshold=draw(st.floats(-1.0, 1.0)),
        importance_ratio=draw(st.floats(0.01, 1.0)),
        importance_weight=draw(st.floats(0.0, 100.0)),
        importance_mode=draw(st.sampled_from(["shift", "protect"])),
        importance_source=draw(st.sampled_from(["attention", "per_patch"])),
    )
    step = LayerStep(draw(st.sampled_from(OPERATIONS)), draw(st.integers(0, num_tokens + 2)), settings)
    keys, query = randn(batch, heads, num_tokens, head_dim), randn(batch, heads, num_tokens, head_dim)
    rows = query[:, :, :1] if protected else query  # CLS query, or every query without a CLS token
    return {
        "step": step,
        "hidden": hidden,
        "sizes": sizes,
        "keys": keys,
        "importance": attention_importance(rows, keys, head_dim**-0.5, size_bias(sizes, dtype)),
        "num_protected": protected,
    }


def reduce(case: dict):
    return reduce_tokens(**case)


def membership(case: dict) -> torch.Tensor:
    """`(B, N_out, N_in)`: 1 where output token i stands for (contains) input token j."""
    plan = build_plan(**{key: value for key, value in case.items() if key != "hidden"})
    batch, num_tokens = case["hidden"].shape[:2]
    identity = torch.eye(num_tokens, dtype=torch.float64).expand(batch, -1, -1)
    return identity if plan is None else plan.sum_into_destinations(identity)


def input_sizes(case: dict) -> torch.Tensor:
    hidden = case["hidden"]
    return case["sizes"] if case["sizes"] is not None else torch.ones(*hidden.shape[:2], 1)


@PROPERTY_SETTINGS
@given(steps())
def test_a_step_removes_exactly_min_r_and_cap(case):
    hidden, sizes, _ = reduce(case)
    num_tokens = case["hidden"].shape[1]
    expected = num_tokens - min(case["step"].r, removal_cap(num_tokens, case["num_protected"]))
    assert hidden.shape == (case["hidden"].shape[0], expected, case["hidden"].shape[2])
    assert sizes is None or sizes.shape == (hidden.shape[0], expected, 1)
    assert membership(case).shape[1] == expected


@PROPERTY_SETTINGS
@given(steps())
def test_protected_tokens_keep_their_places_values_and_sizes(case):
    hidden, sizes, _ = reduce(case)
    protected = case["num_protected"]
    members = membership(case)
    identity = torch.eye(members.shape[2], dtype=members.dtype)[:protected]
    assert (members[:, :protected] == identity).all()  # output p stands for input p alone
    assert (members[:, protected:, :protected] == 0).all()  # and nothing else stands for a protected token
    assert torch.equal(hidden[:, :protected], case["hidden"][:, :protected])
    if sizes is not None:
        assert torch.equal(sizes[:, :protected], input_sizes(case)[:, :protected])


@PROPERTY_SETTINGS
@given(steps())
def test_sizes_are_conserved_by_merging_and_drop_by_the_pruned_sizes(case):
    _, sizes, plan = reduce(case)
    members = membership(case)
    before = input_sizes(case)
    covered = members.sum(dim=1)  # how many output tokens contain each input token
    assert ((covered == 0) | (covered == 1)).all()
    if plan is not None and not plan.is_pruning:
        assert (covered == 1).all()  # merging loses nothing
        assert torch.equal(sizes.sum(dim=1), before.sum(dim=1))
    pruned = (covered == 0).unsqueeze(-1)
    if plan is not None and plan.is_pruning:
        assert (pruned.sum(dim=(1, 2)) == case["hidden"].shape[1] - members.shape[1]).all()
    after = sizes if sizes is not None else torch.ones(*members.shape[:2], 1)
    assert torch.equal(after.sum(dim=1), before.sum(dim=1) - (before * pruned).sum(dim=1))
    assert torch.equal(after, members.float() @ before)  # each output's size is the sum of its members'


@PROPERTY_SETTINGS
@given(steps())
def test_merged_tokens_are_size_weighted_means_and_untouched_tokens_stay_bit_exact(case):
    hidden, _, _ = reduce(case)
    members = membership(case).to(case["hidden"].dtype)
    weights = members * input_sizes(case).to(members.dtype).transpose(1, 2)
    if case["step"].operation == "fuse_topk":  # EViT's fusion weighs its members by importance, not size
        importance = case["importance"]
        if case["step"].settings.importance_source == "per_patch":
            importance = per_patch_importance(importance, case["sizes"])
        weights = members * importance.clamp_min(0).to(members.dtype).unsqueeze(1)
        weights = torch.where(weights.sum(dim=-1, keepdim=True) > 0, weights, members)  # all 0: uniform
    mean = (weights @ case["hidden"]) / weights.sum(dim=-1, keepdim=True)
    single = members.sum(dim=-1) == 1
    assert torch.equal(hidden[single], (members @ case["hidden"])[single])
    group = ~single
    if case["step"].merge_mode == "mean":
        torch.testing.assert_close(hidden[group], mean[group])
    else:  # MLERP: the mean's direction at the largest norm among the members
        norms = (members * case["hidden"].norm(dim=-1).unsqueeze(1)).amax(dim=-1)
        torch.testing.assert_close(hidden.norm(dim=-1)[group], norms[group])
        cosine = torch.nn.functional.cosine_similarity(hidden, mean, dim=-1)
        assert torch.all(cosine[group] > 1 - 1e-4)


@PROPERTY_SETTINGS
@given(steps(identical_tokens=True))
def test_merging_identical_tokens_changes_nothing(case):
    hidden, _, _ = reduce(case)
    torch.testing.assert_close(hidden, case["hidden"][:, : hidden.shape[1]])


@PROPERTY_SETTINGS
@given(steps())
def test_results_are_deterministic_and_independent_of_batch_mates(case):
    hidden, sizes, _ = reduce(case)
    again, again_sizes, _ = reduce(case)
    assert torch.equal(hidden, again)
    assert (sizes is None and again_sizes is None) or torch.equal(sizes, again_sizes)
    for index in range(hidden.shape[0]):
        alone = {
            key: value[index : index + 1] if isinstance(value, torch.Tensor) else value for key, value in case.items()
        }
        single, single_sizes, _ = reduce(alone)
        torch.testing.assert_close(single, hidden[index : index + 1], rtol=0, atol=0)
        assert (sizes is None and single_sizes is None) or torch.equal(single_sizes, sizes[index : index + 1])


@PROPERTY_SETTINGS
@given(
    num_tokens=st.integers(2, 600),
    num_layers=st.integers(1, 24),
    protected=st.sampled_from([1, 2]),
    fraction=st.floats(0.0, 1.0),
)
def test_output_token_targets_are_reached_exactly_within_the_caps(num_tokens, num_layers, protected, fraction):
    num_tokens = max(num_tokens, protected)
    lowest = min_output_tokens(num_tokens, num_layers, protected)
    target = lowest + round(fraction * (num_tokens - lowest))
    schedule = schedule_for_output_tokens(num_tokens, num_layers, protected, target)
    counts = token_counts(num_tokens, schedule, protected)
    assert len(schedule) == num_layers and counts[-1] == target
    for before, after, r in zip([num_tokens, *counts[:-1]], counts, schedule, strict=True):
        assert before - after == min(r, removal_cap(before, protected))
    for unreachable in (lowest - 1, num_tokens + 1):
        if unreachable >= 0:
            try:
                schedule_for_output_tokens(num_tokens, num_layers, protected, unreachable)
            except ValueError as error:
                assert f"output_tokens={unreachable} cannot be reached" in str(error)
            else:
                raise AssertionError(f"output_tokens={unreachable} was accepted")


@PROPERTY_SETTINGS
@given(r=st.integers(0, 64), inflection=st.floats(-1.0, 1.0), num_layers=st.integers(1, 24))
def test_linear_schedules_have_one_non_negative_r_per_layer(r, inflection, num_layers):
    schedule = expand_schedule((r, inflection), num_layers)
    assert len(schedule) == num_layers and all(isinstance(v, int) and 0 <= v <= 2 * r for v in schedule)
