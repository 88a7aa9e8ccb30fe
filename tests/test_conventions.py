"""Baseline conventions and the two readings of rho: ToFu's split, ToMe's r forms, eq. (1) ties, "protect"."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rapid_hf.reduction.attention import attention_importance, per_patch_importance, size_bias
from rapid_hf.reduction.config import RapidConfig
from rapid_hf.reduction.matching import bipartite_similarity, matching_metric
from rapid_hf.reduction.methods import (
    importance_merge_plan,
    protected_sources,
    rank_descending_by,
    redundancy_prune_plan,
)
from rapid_hf.reduction.schedule import expand_schedule, token_counts
from rapid_hf.reduction.steps import LayerStep, build_plan, layer_operation, layer_steps, requested_schedule

NEG = -math.inf


# --- ToFu's split: prune in layers 0 .. L//2, merge after -------------------------------------------------------


@pytest.mark.parametrize(("num_layers", "num_pruning"), [(12, 7), (6, 4), (24, 13)])
def test_tofu_prunes_in_layers_0_to_half_and_merges_after(num_layers, num_pruning):
    config = RapidConfig(method="tofu", r=1)
    operations = [layer_operation(config, layer, num_layers) for layer in range(num_layers)]
    assert operations == ["prune_similar"] * num_pruning + ["merge_similar"] * (num_layers - num_pruning)
    assert {step.merge_mode for step in layer_steps(config, 197, num_layers, 1)} == {"mlerp"}


def test_tofu_switch_layer_still_overrides_the_default():
    config = RapidConfig(method="tofu", r=1, switch_layer=3)
    assert [layer_operation(config, layer, 12) for layer in range(4)] == ["prune_similar"] * 3 + ["merge_similar"]


def test_rapid_default_switch_layer_is_unchanged():
    assert RapidConfig(method="rapid").resolved_switch_layer(12) == 4


# --- ToMe's r conventions: a tuple is always the linear schedule, a list is per layer ----------------------------


def test_reduce_every_places_r_on_every_nth_layer_from_the_first():
    assert requested_schedule(RapidConfig(r=24, reduce_every=3), 197, 12, 1) == [24, 0, 0] * 4
    linear = requested_schedule(RapidConfig(r=(8, 1.0), reduce_every=4), 197, 12, 1)
    assert linear == [0, 0, 0, 0, 8, 0, 0, 0, 16, 0, 0, 0]  # ToMe's linear schedule over layers 0, 4, 8
    steps = layer_steps(RapidConfig(r=24, reduce_every=3), 197, 12, 1)
    assert [step.operation is not None for step in steps] == [True, False, False] * 4
    assert [step.operation for step in steps if step.operation] == ["prune_redundant"] * 2 + ["merge_important"] * 2


@pytest.mark.parametrize("every", [1, 2, 3, 4])
@pytest.mark.parametrize("target", [101, 53, 30])
def test_reduce_every_solves_output_tokens_over_the_reducing_layers_only(every, target):
    schedule = requested_schedule(RapidConfig(output_tokens=target, reduce_every=every), 197, 12, 1)
    assert token_counts(197, schedule, 1)[-1] == target
    assert all(r == 0 for layer, r in enumerate(schedule) if layer % every)


def test_tuple_with_int_inflection_is_the_linear_schedule():
    assert RapidConfig(r=(4, 1)).r == (4, 1.0)
    assert RapidConfig(r=(4, 1)) == RapidConfig(r=(4, 1.0))
    assert expand_schedule((4, 1), 2) == [0, 8]  # not the per-layer [4, 1]
    assert expand_schedule((8, 1), 12) == expand_schedule((8, 1.0), 12)


def test_linear_schedule_directions_follow_tome_parse_r():
    # tome.utils.parse_r: min = int(r (1 - inflection)), max = 2r - min, linear from min to max.
    assert expand_schedule((8, 1.0), 3) == [0, 8, 16]  # +1: increasing
    assert expand_schedule((8, -1.0), 3) == [16, 8, 0]  # -1: decreasing
    assert expand_schedule((8, 0), 3) == [8, 8, 8]
    assert expand_schedule((8, 0.5), 5) == [4, 6, 8, 10, 12]


def test_list_is_per_layer_even_with_two_entries():
    assert RapidConfig(r=[4, 1]).r == [4, 1]
    assert RapidConfig(r=[4, 1]) != RapidConfig(r=(4, 1))
    assert expand_schedule([4, 1], 2) == [4, 1]


@pytest.mark.parametrize("r", [(4, 1), (4, 1.0), (8, -1), (0, 0), [4, 1], [0, 1, 2, 3], 6], ids=repr)
def test_json_round_trip_keeps_list_and_tuple_apart(r):
    rapid = RapidConfig(r=r)
    restored = RapidConfig.from_dict(json.loads(json.dumps(rapid.to_dict())))
    assert restored == rapid
    assert type(restored.r) is type(rapid.r)


def test_linear_schedule_is_saved_as_an_unambiguous_mapping():
    assert RapidConfig(r=(8, 1)).to_dict()["r"] == {"r": 8, "inflection": 1.0}
    assert RapidConfig(r=[8, 1]).to_dict()["r"] == [8, 1]


def test_the_older_saved_form_still_reads_as_the_linear_schedule():
    assert RapidConfig.from_dict({"method": "tome", "r": [8, 1.0]}).r == (8, 1.0)
    assert RapidConfig.from_dict({"method": "tome", "r": [8, -0.5]}).r == (8, -0.5)


@pytest.mark.parametrize(
    "r",
    [(1, 2, 3), (4,), (4, True), (4, "1"), (4.0, 1), (-1, 0), (4, 2), {"r": 4}, {"r": 4, "inflection": 0, "x": 1}],
    ids=repr,
)
def test_malformed_linear_schedules_fail_naming_r(r):
    with pytest.raises(ValueError, match=r"RapidConfig\.r="):
        RapidConfig(r=r)


def test_expand_schedule_rejects_tuples_that_are_not_r_and_inflection():
    with pytest.raises(ValueError, match="give per-layer values as a list"):
        expand_schedule((1, 2, 3), 3)


@pytest.mark.parametrize("r", [4, [4, 1], [0, 1, 2, 3], (4, 1), (4, -0.5)], ids=repr)
def test_config_is_hashable_whatever_r_is(r):
    rapid = RapidConfig(r=r)
    assert hash(rapid) == hash(RapidConfig(r=r))
    assert {rapid: 1}[RapidConfig.from_dict(json.loads(json.dumps(rapid.to_dict())))] == 1


def test_equal_configs_hash_equal_and_list_differs_from_tuple():
    assert hash(RapidConfig(r=(4, 1))) == hash(RapidConfig(r=(4, 1.0)))
    assert len({RapidConfig(r=[4, 1]), RapidConfig(r=(4, 1))}) == 2


# --- eq. (1) ties: broken by each source's highest similarity ---------------------------------------------------


def test_eq1_ties_are_broken_by_index_not_by_similarity():
    # tau = 0.95: every redundancy score is 0; the earliest sources go first although token 6 (source 3) has a
    # near-duplicate (the similarity key was measured and not kept, docs/METHOD.md)
    scores = torch.tensor([[[NEG, NEG, NEG], [0.5, 0.1, 0.2], [0.1, 0.3, 0.3], [0.2, 0.9, 0.1], [0.1, 0.5, 0.0]]])
    plan = redundancy_prune_plan(scores, r=3, num_protected=1, threshold=0.95)
    assert plan.removed.tolist() == [[1, 2, 3]]
    assert plan.kept.tolist() == [[0, 4]]


def test_eq1_positive_scores_still_rank_first():
    # token 4 (index 2) has a positive score at tau = 0.7 although token 6 has the higher single similarity
    scores = torch.tensor([[[NEG, NEG, NEG], [0.1, 0.1, 0.1], [0.75, 0.75, 0.0], [0.0, 0.0, 0.78]]])
    plan = redundancy_prune_plan(scores, r=2, num_protected=1, threshold=0.7)
    assert plan.removed.tolist() == [[2, 3]]  # 0.10 > 0.08 > 0 (token 2)


def test_eq1_never_prunes_cls_even_when_every_row_ties():
    plan = redundancy_prune_plan(bipartite_similarity(torch.zeros(2, 9, 4), 1), r=4, num_protected=1, threshold=0.9)
    assert (plan.removed != 0).all() and (plan.kept[:, 0] == 0).all()


@settings(max_examples=50, deadline=None)
@given(primary=st.lists(st.integers(0, 3), min_size=1, max_size=12), seed=st.integers(0, 2**16))
def test_rank_descending_by_is_lexicographic_then_by_index(primary, seed):
    secondary = torch.randint(0, 3, (len(primary),), generator=torch.Generator().manual_seed(seed))
    order = rank_descending_by(torch.tensor([primary], dtype=torch.float32), secondary[None].float())
    expected = sorted(range(len(primary)), key=lambda i: (-primary[i], -secondary[i].item(), i))
    assert order[0].tolist() == expected


# --- rho's second reading: the top-rho tokens by CLS attention are protected from merging ------------------------

# Nine tokens: CLS + 8 patches. Sources: tokens 0, 2, 4, 6, 8 (rows); destinations: tokens 1, 3, 5, 7 (columns).
SCORES = torch.tensor(
    [[[NEG, NEG, NEG, NEG], [0.9, 0.1, 0.1, 0.1], [0.1, 0.8, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1], [0.1, 0.1, 0.1, 0.6]]]
)
# Patch attention: token 2 highest (0.30), token 4 next (0.20); rho = 0.25 of 8 patches -> tokens 2 and 4.
CLS_ATTENTION = torch.tensor([[0.10, 0.05, 0.30, 0.05, 0.20, 0.05, 0.10, 0.05, 0.10]])


def test_protected_sources_are_the_top_rho_patch_tokens():
    protected = protected_sources(CLS_ATTENTION, num_protected=1, importance_ratio=0.25)
    assert protected.tolist() == [[False, True, True, False, False]]  # sources: tokens 0, 2, 4, 6, 8


def test_protect_mode_never_merges_protected_tokens():
    # lambda = 0: "shift" is ToMe (tokens 2 and 4 are the most similar sources); "protect" keeps them.
    shift = importance_merge_plan(SCORES, 2, 1, CLS_ATTENTION, 0.25, 0.0, "shift")
    protect = importance_merge_plan(SCORES, 2, 1, CLS_ATTENTION, 0.25, 0.0, "protect")
    assert shift.removed.tolist() == [[1, 2]]
    assert protect.removed.tolist() == [[3, 4]] and protect.destinations.tolist() == [[2, 3]]
    assert protect.kept.tolist() == [[0, 1, 2]]


def test_protected_tokens_can_still_receive_merges():
    scores = SCORES.clone()
    scores[0, 3] = torch.tensor([0.95, 0.1, 0.1, 0.1])  # token 6's best destination is token 1
    attention = torch.tensor([[0.10, 0.30, 0.05, 0.05, 0.05, 0.05, 0.20, 0.05, 0.15]])  # token 1 protected
    plan = importance_merge_plan(scores, 1, 1, attention, 0.25, 0.0, "protect")
    assert plan.removed.tolist() == [[1]] and plan.destinations.tolist() == [[0]]  # token 2 -> token 1
    # token 6 (attention 0.20) is protected with rho = 0.25, so the next most similar source leaves instead.


def test_protect_mode_ranks_protected_sources_last_but_never_cls():
    # r = 4 = every patch source: the two protected ones leave last, CLS stays.
    plan = importance_merge_plan(SCORES, 4, 1, CLS_ATTENTION, 0.25, 0.0, "protect")
    assert plan.removed.tolist() == [[3, 4, 1, 2]] and plan.kept.tolist() == [[0]]


def test_rho_changes_the_plan_only_in_protect_mode():
    torch.manual_seed(0)
    scores = bipartite_similarity(matching_metric(torch.randn(4, 3, 41, 8)), 1)
    attention = torch.rand(4, 41).softmax(-1)
    plans = {
        (mode, rho): importance_merge_plan(scores, 5, 1, attention, rho, 0.0, mode).removed
        for mode in ("shift", "protect")
        for rho in (0.1, 0.6)
    }
    assert torch.equal(plans["shift", 0.1], plans["shift", 0.6])
    assert not torch.equal(plans["protect", 0.1], plans["protect", 0.6])
    for rho in (0.1, 0.6):
        protected = protected_sources(attention, 1, rho)
        assert not protected.gather(1, plans["protect", rho]).any()


def test_shift_mode_is_the_literal_reading_bit_for_bit():
    torch.manual_seed(1)
    scores = bipartite_similarity(matching_metric(torch.randn(3, 3, 51, 8)), 1)
    attention = torch.rand(3, 51).softmax(-1)
    literal = importance_merge_plan(scores, 10, 1, attention, 0.2, 50.0)
    shift = importance_merge_plan(scores, 10, 1, attention, 0.2, 50.0, "shift")
    assert torch.equal(literal.removed, shift.removed) and torch.equal(literal.destinations, shift.destinations)


def test_importance_mode_is_validated_and_reaches_the_layer_steps():
    with pytest.raises(ValueError, match=r"RapidConfig\.importance_mode='keep' is invalid"):
        RapidConfig(importance_mode="keep")
    with pytest.raises(ValueError, match="importance_mode must be"):
        importance_merge_plan(SCORES, 1, 1, CLS_ATTENTION, 0.25, 0.0, "keep")
    steps = layer_steps(RapidConfig(r=4, importance_mode="protect"), 197, 12, 1)
    assert {step.settings.importance_mode for step in steps} == {"protect"}
    assert RapidConfig(importance_mode="protect").replace(r=2).importance_mode == "protect"


def test_per_patch_importance_divides_by_size_and_renormalises():
    attention = torch.tensor([[0.5, 0.3, 0.2]])
    sizes = torch.tensor([[[1.0], [3.0], [1.0]]])
    expected = torch.tensor([[0.5, 0.1, 0.2]]) / 0.8
    torch.testing.assert_close(per_patch_importance(attention, sizes), expected)
    assert per_patch_importance(attention, None) is attention  # every token one patch: nothing to undo


def test_importance_source_reaches_the_steps_and_changes_plans_only_after_a_merge():
    steps = layer_steps(RapidConfig(r=4, importance_source="per_patch"), 197, 12, 1)
    assert {step.settings.importance_source for step in steps} == {"per_patch"}
    generator = torch.Generator().manual_seed(0)
    keys, query = torch.randn(2, 3, 17, 8, generator=generator), torch.randn(2, 3, 17, 8, generator=generator)
    ones = torch.ones(2, 17, 1)
    sizes = torch.randint(1, 9, (2, 17, 1), generator=generator).float()
    for operation in ("merge_important", "merge_crucial"):
        literal = LayerStep(operation, 5, RapidConfig(importance_weight=100.0, importance_ratio=0.3))
        per_patch = LayerStep(operation, 5, literal.settings.replace(importance_source="per_patch"))
        # all sizes 1: the same plan; unequal sizes: the importance (and here the plan) differs
        importance = attention_importance(query[:, :, :1], keys, 0.35, None)
        same = [build_plan(step, keys, importance, 1, ones) for step in (literal, per_patch)]
        assert torch.equal(same[0].removed, same[1].removed)
        importance = attention_importance(query[:, :, :1], keys, 0.35, size_bias(sizes, torch.float32))
        differ = [build_plan(step, keys, importance, 1, sizes) for step in (literal, per_patch)]
        assert not torch.equal(differ[0].removed, differ[1].removed)
