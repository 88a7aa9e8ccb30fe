"""Hand-checkable cases for the pure reduction functions (docs/METHOD.md eq. 1-4, ToMe, ToFu, MLERP, schedules)."""

from __future__ import annotations

import math

import pytest
import torch

from rapid_hf.reduction.attention import attention_importance, size_bias
from rapid_hf.reduction.matching import bipartite_similarity, matching_metric, removal_cap
from rapid_hf.reduction.methods import (
    importance_adjusted_scores,
    importance_merge_plan,
    importance_threshold,
    redundancy_prune_plan,
    redundancy_scores,
    similarity_merge_plan,
    similarity_prune_plan,
)
from rapid_hf.reduction.plan import ReductionPlan, add_tokens, apply_plan, gather_tokens
from rapid_hf.reduction.schedule import (
    expand_schedule,
    min_output_tokens,
    schedule_for_output_tokens,
    token_counts,
)

NEG = -math.inf

# Seven tokens: CLS + 6 patches. Sources (even) = tokens 0, 2, 4, 6; destinations (odd) = tokens 1, 3, 5.
# Rows: CLS (protected), token 2, token 4, token 6. Columns: tokens 1, 3, 5.
SCORES = torch.tensor(
    [
        [
            [NEG, NEG, NEG],
            [0.90, 0.10, 0.20],
            [0.10, 0.50, 0.30],
            [0.20, 0.30, 0.60],
        ]
    ]
)
# CLS attention over the 7 tokens; patch attentions 0.05, 0.4, 0.05, 0.1, 0.05, 0.05 -> theta (top 20% of 6 = 2nd) = 0.1
CLS_ATTENTION = torch.tensor([[0.30, 0.05, 0.40, 0.05, 0.10, 0.05, 0.05]])
TOKENS = torch.arange(7, dtype=torch.float32).view(1, 7, 1)


def test_bipartite_similarity_splits_by_parity_and_protects_cls_and_distillation_token():
    metric = torch.eye(6).unsqueeze(0)  # token i is the unit vector e_i
    metric[0, 2] = metric[0, 1]  # token 2 equals token 1
    scores = bipartite_similarity(metric, num_protected=1)
    assert scores.shape == (1, 3, 3)
    assert torch.isinf(scores[0, 0]).all() and (scores[0, 0] < 0).all()
    assert scores[0, 1, 0] == 1.0  # token 2 vs token 1
    assert scores[0, 1, 1] == 0.0  # token 2 vs token 3
    with_distillation = bipartite_similarity(metric, num_protected=2)
    assert torch.isinf(with_distillation[0, :, 0]).all()  # token 1 can never be a destination


def test_matching_metric_averages_heads_and_normalises():
    keys = torch.tensor([[[[3.0, 0.0]], [[1.0, 0.0]]]])  # (B=1, heads=2, N=1, d=2)
    assert torch.allclose(matching_metric(keys), torch.tensor([[[1.0, 0.0]]]))


def test_removal_cap():
    assert removal_cap(197, 1) == 98
    assert removal_cap(198, 2) == 98
    assert removal_cap(3, 2) == 0


def test_eq1_redundancy_scores_sum_similarity_above_threshold():
    scores = redundancy_scores(SCORES, threshold=0.25, num_protected=1)
    # token 2: 0.65; token 4: 0.25 + 0.05; token 6: 0.05 + 0.35
    assert scores[0, 0] == NEG
    assert torch.allclose(scores[0, 1:], torch.tensor([0.65, 0.30, 0.40]))


def test_eq1_prunes_most_redundant_not_most_similar():
    # One very similar destination (token 2) versus several moderately similar ones (token 6 at tau=0.1)
    scores = torch.tensor([[[NEG, NEG, NEG], [0.95, 0.0, 0.0], [0.0, 0.0, 0.0], [0.6, 0.6, 0.6]]])
    redundancy = redundancy_prune_plan(scores, r=1, num_protected=1, threshold=0.1)
    similarity = similarity_prune_plan(scores, r=1, num_protected=1)
    assert redundancy.removed.tolist() == [[3]]  # token 6: 3 * 0.5 = 1.5 > 0.85
    assert similarity.removed.tolist() == [[1]]  # ToFu: highest max similarity (token 2)
    assert redundancy.is_pruning and similarity.is_pruning


def test_eq1_full_ties_fall_back_to_index():
    # Equal redundancy (all 0) and equal highest similarity (all 0): index order, reproducible.
    scores = torch.zeros(1, 4, 3)
    scores[:, 0] = NEG
    plan = redundancy_prune_plan(scores, r=2, num_protected=1, threshold=0.7)  # all scores 0
    assert plan.removed.tolist() == [[1, 2]]
    assert plan.kept.tolist() == [[0, 3]]


def test_pruning_drops_tokens_and_keeps_sizes():
    plan = similarity_prune_plan(SCORES, r=1, num_protected=1)  # token 2 has the highest max similarity
    hidden, sizes = apply_plan(plan, TOKENS, None)
    assert hidden.flatten().tolist() == [0, 4, 6, 1, 3, 5]
    assert sizes is None


def test_theta_is_kth_largest_patch_attention():
    assert importance_threshold(CLS_ATTENTION, num_protected=1, importance_ratio=0.2).item() == pytest.approx(0.1)
    assert importance_threshold(CLS_ATTENTION, num_protected=1, importance_ratio=1.0).item() == pytest.approx(0.05)


def test_eq2_eq3_adjusted_scores_and_best_destinations():
    adjusted, best = importance_adjusted_scores(SCORES, CLS_ATTENTION, 1, importance_ratio=0.2, importance_weight=1.0)
    # S'_{i j*} = max_j S_ij - lambda (a_i - theta): token 2: 0.9 - 0.3; token 4: 0.5 - 0; token 6: 0.6 + 0.05
    assert torch.allclose(adjusted[0, 1:], torch.tensor([0.60, 0.50, 0.65]))
    assert best[0, 1:].tolist() == [0, 1, 2]


def test_eq4_importance_protects_attended_tokens_where_tome_merges_them():
    tome = similarity_merge_plan(SCORES, r=1, num_protected=1)
    rapid = importance_merge_plan(SCORES, 1, 1, CLS_ATTENTION, importance_ratio=0.2, importance_weight=1.0)
    no_weight = importance_merge_plan(SCORES, 1, 1, CLS_ATTENTION, importance_ratio=0.2, importance_weight=0.0)
    assert tome.removed.tolist() == [[1]] and tome.destinations.tolist() == [[0]]  # token 2 -> token 1
    assert rapid.removed.tolist() == [[3]] and rapid.destinations.tolist() == [[2]]  # token 6 -> token 5
    assert no_weight.removed.tolist() == tome.removed.tolist()  # lambda = 0 is ToMe


def test_tome_merge_is_size_weighted_mean_and_sizes_add():
    plan = similarity_merge_plan(SCORES, r=1, num_protected=1)  # token 2 -> token 1
    sizes = torch.tensor([[1.0, 3.0, 1.0, 1.0, 1.0, 1.0, 1.0]]).unsqueeze(-1)
    hidden, new_sizes = apply_plan(plan, TOKENS, sizes)
    # order: kept sources (0, 4, 6) then destinations (1 merged with 2, 3, 5)
    assert hidden.flatten().tolist() == pytest.approx([0, 4, 6, (3 * 1 + 1 * 2) / 4, 3, 5])
    assert new_sizes.flatten().tolist() == [1, 1, 1, 4, 1, 1]


def test_mlerp_rescales_mean_to_largest_norm():
    plan = ReductionPlan(
        kept=torch.tensor([[0]]), removed=torch.tensor([[1]]), destinations=torch.tensor([[0]]), num_protected=1
    )
    tokens = torch.tensor([[[9.0, 9.0], [3.0, 4.0], [1.0, 0.0], [5.0, 5.0]]])  # CLS, dst, src, dst
    mean, _ = apply_plan(plan, tokens, None, mode="mean")
    mlerp, sizes = apply_plan(plan, tokens, None, mode="mlerp")
    assert mean[0, 1].tolist() == [2.0, 2.0]
    assert mlerp[0, 1].norm().item() == pytest.approx(5.0)  # largest of ||(3, 4)|| and ||(1, 0)||
    assert torch.allclose(mlerp[0, 1] / mlerp[0, 1].norm(), mean[0, 1] / mean[0, 1].norm())
    assert torch.equal(mlerp[0, [0, 2]], tokens[0, [0, 3]])  # untouched tokens are bit-exact
    assert sizes.flatten().tolist() == [1, 2, 1]


def test_distillation_token_stays_second_and_cls_first():
    metric = torch.nn.functional.normalize(torch.randn(2, 12, 8), dim=-1)
    scores = bipartite_similarity(metric, num_protected=2)
    plan = similarity_merge_plan(scores, r=5, num_protected=2)
    tokens = torch.arange(12, dtype=torch.float32).view(1, 12, 1).expand(2, -1, -1)
    hidden, sizes = apply_plan(plan, tokens, None)
    assert hidden.shape == (2, 7, 1)
    assert torch.equal(hidden[:, :2, 0], torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    assert torch.equal(sizes[:, :2, 0], torch.ones(2, 2))
    assert (plan.destinations != 0).all()


def test_attention_importance_is_the_mean_of_the_given_rows_of_full_attention():
    torch.manual_seed(0)
    query, keys = torch.randn(2, 3, 10, 4), torch.randn(2, 3, 10, 4)
    bias = size_bias(torch.rand(2, 10, 1) * 5 + 1, torch.float32)
    full = ((query @ keys.transpose(-1, -2)) * 0.5 + bias).softmax(-1)
    cls_row = attention_importance(query[:, :, :1], keys, 0.5, bias)  # a CLS family: the CLS query's row
    assert torch.allclose(cls_row, full[:, :, 0].mean(1), atol=1e-6)
    received = attention_importance(query, keys, 0.5, bias)  # no CLS token: what each token receives
    assert torch.allclose(received, full.mean(dim=(1, 2)), atol=1e-6)
    torch.testing.assert_close(received.sum(-1), torch.ones(2))


def test_size_bias_is_log_size_of_keys_and_none_without_merges():
    assert size_bias(None, torch.float32) is None
    bias = size_bias(torch.tensor([[[1.0], [4.0]]]), torch.float32)
    assert bias.shape == (1, 1, 1, 2)
    assert torch.allclose(bias.flatten(), torch.tensor([0.0, math.log(4.0)]))


def test_schedules():
    assert expand_schedule(3, 4) == [3, 3, 3, 3]
    assert expand_schedule([1, 2, 3, 4], 4) == [1, 2, 3, 4]
    assert expand_schedule((8, 0.0), 4) == [8, 8, 8, 8]
    assert expand_schedule((8, 1.0), 3) == [0, 8, 16]
    with pytest.raises(ValueError, match="one value per layer"):
        expand_schedule([1, 2], 4)


def test_token_counts_apply_caps():
    counts = token_counts(197, [16] * 12, num_protected=1)
    assert counts == [181, 165, 149, 133, 117, 101, 85, 69, 53, 37, 21, 11]
    assert token_counts(198, [100] * 3, num_protected=2) == [100, 51, 27]


@pytest.mark.parametrize("target", [197, 101, 65, 29, 11, 8, 4, 2])
def test_schedule_for_output_tokens_reaches_target_exactly(target):
    schedule = schedule_for_output_tokens(197, 12, 1, target)
    assert token_counts(197, schedule, 1)[-1] == target
    assert max(schedule) - min(schedule) <= 1  # as even as possible, larger values first
    assert schedule == sorted(schedule, reverse=True)


def test_schedule_for_output_tokens_matches_constant_r_when_one_exists():
    for r, target in [(16, 11), (8, 101), (11, 65), (14, 29)]:
        schedule = schedule_for_output_tokens(197, 12, 1, target)
        assert token_counts(197, schedule, 1) == token_counts(197, [r] * 12, 1)


def test_schedule_for_output_tokens_rejects_unreachable_targets():
    assert min_output_tokens(197, 12, 1) == 2
    with pytest.raises(ValueError, match=r"output_tokens=300 cannot be reached.*\[2, 197\]"):
        schedule_for_output_tokens(197, 12, 1, 300)
    with pytest.raises(ValueError, match="cannot be reached"):
        schedule_for_output_tokens(197, 2, 1, 10)


@pytest.mark.parametrize("batch", [1, 3])
def test_row_gather_and_add_match_a_plain_loop(batch):
    # The batch-1 and flattened-batch fast paths must equal the obvious per-image loop exactly, repeated
    # destinations included (each row is added in index order, as scatter_add does).
    generator = torch.Generator().manual_seed(batch)
    tokens = torch.randn(batch, 9, 5, generator=generator)
    index = torch.tensor([[4, 1, 4, 8, 1, 4]] * batch)
    index[-1] = torch.tensor([0, 0, 2, 3, 2, 7])
    rows = torch.randn(batch, 6, 5, generator=generator)
    expected_gather = torch.stack([tokens[b, index[b]] for b in range(batch)])
    expected_sum = tokens.clone()
    for b in range(batch):
        for i in range(index.shape[1]):
            expected_sum[b, index[b, i]] += rows[b, i]
    assert torch.equal(gather_tokens(tokens, index), expected_gather)
    assert torch.equal(add_tokens(tokens, index, rows), expected_sum)
    assert torch.equal(add_tokens(tokens, index, rows),
                       tokens.scatter_add(1, index.unsqueeze(-1).expand(-1, -1, 5), rows))
