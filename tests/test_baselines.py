"""PiToMe and top-k fusion plans: hand-checked small cases, a loop-based reference, invariants, and tracing."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rapid_hf.reduction.baselines import (
    FusePlan,
    energy_kernel,
    pitome_energy,
    pitome_margin,
    pitome_merge_plan,
    pitome_ratio_schedule,
    pitome_runs_tome,
    topk_fuse_plan,
)
from rapid_hf.reduction.plan import SelectionPlan, apply_plan
from rapid_hf.reduction.tracing import initial_assignment, initial_pruned_at, update_assignment

# Exact 2-D directions: every cosine below is exactly 1, 0 or -1.
RIGHT, UP, LEFT, DOWN = (1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.0, -1.0)


def metric_of(*vectors: tuple[float, float]) -> torch.Tensor:
    return torch.tensor([vectors])


def token_values(num_tokens: int, channels: int = 2) -> torch.Tensor:
    """Hidden states whose every channel is the token's index: merged values are readable by hand."""
    return torch.arange(num_tokens, dtype=torch.float32).view(1, num_tokens, 1).expand(1, num_tokens, channels)


# ----------------------------------------------------------------------------------------------------- PiToMe


def test_margin_schedule_and_tome_layers_match_the_public_code():
    assert [round(pitome_margin(layer, 12), 4) for layer in (0, 6, 11)] == [0.9, 0.45, 0.075]
    assert [pitome_runs_tome(layer, 12) for layer in range(12)] == [True] * 7 + [False] * 5
    assert pitome_margin(3, 12, base=0.75) == pytest.approx(0.5625)
    with pytest.raises(ValueError, match="layer must be"):
        pitome_margin(12, 12)


def test_ratio_schedule_hand_checked():
    # 196 patch tokens at ratio 0.9: floor(196 - 176.4) = 19, then floor(177 - 159.3) = 17, ...
    schedule = pitome_ratio_schedule(197, 12, 0.9, num_protected=1)
    assert schedule[:3] == [19, 17, 16]
    remaining = 196
    for r in schedule:
        assert r == math.floor(remaining - remaining * 0.9)
        remaining -= r


def test_energy_kernel_hand_checked():
    x = torch.tensor([1.0, 0.5, 0.0, -1.0])
    below = [math.expm1(0.0 - 0.5), math.expm1(-1.0 - 0.5)]
    torch.testing.assert_close(energy_kernel(x, 0.5), torch.tensor([1.0, 0.5, *below]))
    torch.testing.assert_close(energy_kernel(x, 0.5, form="elu"), torch.tensor([0.5, 0.0, *below]))
    torch.testing.assert_close(energy_kernel(x, 0.5, alpha=2.0)[2:], 2 * torch.tensor(below))
    torch.testing.assert_close(energy_kernel(x, 0.5, form="elu", temperature=0.5)[:2], torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="temperature"):
        energy_kernel(x, 0.5, temperature=0.01)


# CLS (down) + patches: three identical (right), two identical (up), one isolated (left). Margin 0.5:
# f(1) = 1, f(0) = e^-0.5 - 1, f(-1) = e^-1.5 - 1.
PITOME_METRIC = metric_of(DOWN, RIGHT, RIGHT, RIGHT, UP, UP, LEFT)


def test_pitome_energy_hand_checked():
    f0, f_minus = math.expm1(-0.5), math.expm1(-1.5)
    right = (3 + 2 * f0 + f_minus) / 6
    up = (2 + 4 * f0) / 6
    left = (1 + 2 * f0 + 3 * f_minus) / 6
    energy = pitome_energy(PITOME_METRIC, num_protected=1, margin=0.5)
    torch.testing.assert_close(energy, torch.tensor([[right, right, right, up, up, left]]))


def test_pitome_plan_hand_checked():
    # Energy ranks 1, 2, 3 (tied, by index), 4, 5, 6. r=2: the top 4 are mergeable; sources ranks 0, 2 (tokens
    # 1, 3), destinations ranks 1, 3 (tokens 2, 4). Both sources are identical to token 2: they merge into it.
    plan = pitome_merge_plan(PITOME_METRIC, r=2, num_protected=1, margin=0.5)
    assert isinstance(plan, SelectionPlan)
    assert plan.kept.tolist() == [[0, 2, 4, 5, 6]]
    assert plan.removed.tolist() == [[1, 3]]
    assert plan.kept.gather(1, plan.destinations).tolist() == [[2, 2]]
    hidden, sizes = apply_plan(plan, token_values(7), torch.tensor([[[1.0], [2.0], [1.0], [3.0], [1.0], [1.0], [1.0]]]))
    assert sizes[0, :, 0].tolist() == [1, 6, 1, 1, 1]  # 2 + 1 + 3
    torch.testing.assert_close(hidden[0, :, 0], torch.tensor([0, (2 * 1 + 1 * 2 + 3 * 3) / 6, 4, 5, 6]))


def test_pitome_protects_isolated_tokens_and_protected_tokens():
    # CLS and a distillation token identical to the right-pointing patches: left out of the energy and of the
    # matching, they stay first. Among the 5 patches the up pair has the higher energy, (2 + 3 f(0)) / 5, over
    # the right pair's (2 + 2 f(0) + f(-1)) / 5: ranks 4, 5, 2, 3, 6, so sources 4, 2 and destinations 5, 3.
    metric = metric_of(RIGHT, RIGHT, RIGHT, RIGHT, UP, UP, LEFT)
    plan = pitome_merge_plan(metric, r=2, num_protected=2, margin=0.5)
    assert plan.kept.tolist() == [[0, 1, 3, 5, 6]]  # the isolated token 6 is never touched
    assert plan.removed.tolist() == [[4, 2]]
    assert plan.kept.gather(1, plan.destinations).tolist() == [[5, 3]]


def test_pitome_without_protected_tokens():
    metric = metric_of(LEFT, RIGHT, UP, RIGHT)
    # Energies: right tokens (1, 3) highest, then up (2), then left (0). r=1: source 1 merges into 3.
    plan = pitome_merge_plan(metric, r=1, num_protected=0, margin=0.5)
    assert plan.removed.tolist() == [[1]]
    assert plan.kept.tolist() == [[0, 2, 3]]
    assert plan.kept.gather(1, plan.destinations).tolist() == [[3]]


def test_pitome_rejects_budgets_past_half_the_patches():
    with pytest.raises(ValueError, match="N_patch // 2"):
        pitome_merge_plan(PITOME_METRIC, r=4, num_protected=1, margin=0.5)
    with pytest.raises(ValueError, match="num_protected"):
        pitome_merge_plan(PITOME_METRIC, r=1, num_protected=-1, margin=0.5)


def reference_pitome(metric: list[list[float]], r: int, protected: int, margin: float, alpha: float, form: str):
    """PiToMe with plain loops: (kept indices, {removed: destination})."""
    patches = list(range(protected, len(metric)))

    def cosine(i: int, j: int) -> float:
        return sum(a * b for a, b in zip(metric[i], metric[j], strict=True))

    def kernel(x: float) -> float:
        if x >= margin:
            return x if form == "paper" else x - margin
        return alpha * math.expm1(x - margin)

    energy = {i: sum(kernel(cosine(i, j)) for j in patches) / len(patches) for i in patches}
    ranked = sorted(patches, key=lambda i: (-energy[i], i))
    sources, destinations = ranked[0 : 2 * r : 2], ranked[1 : 2 * r : 2]
    merges = {}
    for source in sources:
        best = destinations[0]
        for destination in destinations[1:]:
            if cosine(source, destination) > cosine(source, best):
                best = destination
        merges[source] = best
    return [i for i in range(len(metric)) if i not in merges], merges


def reference_merge(hidden: list[list[float]], sizes: list[float], kept: list[int], merges: dict[int, int]):
    """Size-weighted means of each kept token and the tokens merged into it; sizes add."""
    out_hidden, out_sizes = [], []
    for token in kept:
        group = [token] + [source for source, destination in merges.items() if destination == token]
        total = sum(sizes[i] for i in group)
        out_hidden.append([sum(sizes[i] * hidden[i][c] for i in group) / total for c in range(len(hidden[token]))])
        out_sizes.append(total)
    return out_hidden, out_sizes


@settings(max_examples=30, deadline=None)
@given(
    protected=st.sampled_from([0, 1, 2, 5]),
    patches=st.integers(2, 12),
    r_fraction=st.floats(0.0, 1.0),
    margin=st.sampled_from([0.9, 0.45, 0.075, -0.2]),
    form=st.sampled_from(["paper", "elu"]),
    seed=st.integers(0, 10_000),
)
def test_pitome_matches_loop_reference(protected, patches, r_fraction, margin, form, seed):
    generator = torch.Generator().manual_seed(seed)
    batch, tokens = 2, protected + patches
    r = max(1, min(patches // 2, round(r_fraction * patches / 2)))
    metric = torch.randn(batch, tokens, 3, generator=generator, dtype=torch.float64)
    metric = torch.nn.functional.normalize(metric, dim=-1)
    hidden = torch.randn(batch, tokens, 4, generator=generator, dtype=torch.float64)
    sizes = torch.randint(1, 4, (batch, tokens, 1), generator=generator).float()
    plan = pitome_merge_plan(metric, r, protected, margin, alpha=1.0, energy_form=form)
    merged, new_sizes = apply_plan(plan, hidden, sizes)

    for row in range(batch):
        kept, merges = reference_pitome(metric[row].tolist(), r, protected, margin, 1.0, form)
        assert plan.kept[row].tolist() == kept
        destinations = plan.kept[row, plan.destinations[row]].tolist()
        assert dict(zip(plan.removed[row].tolist(), destinations, strict=True)) == merges
        expected, expected_sizes = reference_merge(hidden[row].tolist(), sizes[row, :, 0].tolist(), kept, merges)
        torch.testing.assert_close(merged[row], torch.tensor(expected, dtype=torch.float64))
        assert new_sizes[row, :, 0].tolist() == expected_sizes
    check_invariants(plan, hidden, sizes, merged, new_sizes, r, protected)


# ----------------------------------------------------------------------------------------------- top-k fusion

# CLS + 6 patches. Patch importance ranks 5 > 2 > 3 > 1 > 6 > 4: the 3 least important are 1, 6, 4.
IMPORTANCE = torch.tensor([[0.34, 0.06, 0.2, 0.1, 0.02, 0.25, 0.03]])


def test_topk_plan_hand_checked():
    plan = topk_fuse_plan(IMPORTANCE, r=2, num_protected=1)
    assert isinstance(plan, FusePlan)
    assert plan.kept.tolist() == [[0, 1, 2, 3, 5]]  # the fused token sits at its most important member, 1
    assert plan.removed.tolist() == [[6, 4]]
    assert plan.destinations.tolist() == [[1, 1]]
    torch.testing.assert_close(plan.weights, torch.tensor([[6 / 11, 3 / 11, 2 / 11]]))

    sizes = torch.tensor([[[1.0], [2.0], [1.0], [1.0], [1.0], [1.0], [3.0]]])
    hidden, new_sizes = plan.apply(token_values(7), sizes)
    torch.testing.assert_close(hidden[0, :, 0], torch.tensor([0, (6 * 1 + 3 * 6 + 2 * 4) / 11, 2, 3, 5]))
    assert new_sizes[0, :, 0].tolist() == [1, 6, 1, 1, 1]  # 2 + 3 + 1
    _, unit_sizes = plan.apply(token_values(7), None)
    assert unit_sizes[0, :, 0].tolist() == [1, 3, 1, 1, 1]


def test_topk_ties_go_by_index_and_zero_importance_fuses_uniformly():
    # All patches equally (un)important: the later tokens count as less important and fuse, uniformly.
    importance = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    plan = topk_fuse_plan(importance, r=2, num_protected=1)
    assert plan.kept.tolist() == [[0, 1, 2, 3]]
    assert plan.removed.tolist() == [[4, 5]]
    torch.testing.assert_close(plan.weights, torch.full((1, 3), 1 / 3))
    hidden, _ = plan.apply(token_values(6), None)
    torch.testing.assert_close(hidden[0, :, 0], torch.tensor([0.0, 1.0, 2.0, 4.0]))


def test_topk_never_ranks_protected_tokens_and_works_without_them():
    # Protected tokens with the lowest importance still stay; with none protected every token competes.
    importance = torch.tensor([[0.0, 0.0, 0.5, 0.1, 0.3, 0.1]])
    plan = topk_fuse_plan(importance, r=1, num_protected=2)
    assert plan.kept.tolist() == [[0, 1, 2, 3, 4]] and plan.removed.tolist() == [[5]]
    plan = topk_fuse_plan(importance, r=1, num_protected=0)
    assert plan.kept.tolist() == [[0, 2, 3, 4, 5]] and plan.removed.tolist() == [[1]]  # tokens 0, 1 fuse
    assert plan.kept.gather(1, plan.destinations).tolist() == [[0]]
    with pytest.raises(ValueError, match="r < N_patch"):
        topk_fuse_plan(importance, r=4, num_protected=2)


def test_topk_mlerp_keeps_the_largest_norm():
    importance = torch.tensor([[0.5, 0.3, 0.1, 0.1]])
    hidden = torch.tensor([[[0.0, 1.0], [5.0, 0.0], [3.0, 0.0], [0.0, 4.0]]])
    plan = topk_fuse_plan(importance, r=1, num_protected=1)  # patches 2, 3 fuse 50/50 into slot of 2
    mean, _ = plan.apply(hidden, None, mode="mean")
    mlerp, _ = plan.apply(hidden, None, mode="mlerp")
    torch.testing.assert_close(mean[0, 2], torch.tensor([1.5, 2.0]))
    torch.testing.assert_close(mlerp[0, 2], torch.tensor([1.5, 2.0]) * 4 / 2.5)
    with pytest.raises(ValueError, match="merge mode"):
        plan.apply(hidden, None, mode="max")


def reference_topk(importance: list[float], hidden: list[list[float]], sizes: list[float], r: int, protected: int):
    """Top-k fusion with plain loops: (kept indices, removed set, output hidden, output sizes)."""
    ranked = sorted(range(protected, len(importance)), key=lambda i: (-importance[i], i))
    group = ranked[len(ranked) - r - 1 :]
    representative, removed = group[0], set(group[1:])
    total = sum(importance[i] for i in group)
    kept = [i for i in range(len(importance)) if i not in removed]
    out_hidden, out_sizes = [], []
    for token in kept:
        if token == representative:
            fused = [sum(importance[i] / total * hidden[i][c] for i in group) for c in range(len(hidden[token]))]
            out_hidden.append(fused)
            out_sizes.append(sum(sizes[i] for i in group))
        else:
            out_hidden.append(hidden[token])
            out_sizes.append(sizes[token])
    return kept, removed, out_hidden, out_sizes


@settings(max_examples=30, deadline=None)
@given(
    protected=st.sampled_from([0, 1, 2, 5]),
    patches=st.integers(2, 12),
    r_fraction=st.floats(0.0, 1.0),
    seed=st.integers(0, 10_000),
)
def test_topk_matches_loop_reference(protected, patches, r_fraction, seed):
    generator = torch.Generator().manual_seed(seed)
    batch, tokens = 2, protected + patches
    r = max(1, min(patches - 1, round(r_fraction * (patches - 1))))
    importance = torch.rand(batch, tokens, generator=generator, dtype=torch.float64).softmax(dim=-1)
    hidden = torch.randn(batch, tokens, 4, generator=generator, dtype=torch.float64)
    sizes = torch.randint(1, 4, (batch, tokens, 1), generator=generator).float()
    plan = topk_fuse_plan(importance, r, protected)
    fused, new_sizes = plan.apply(hidden, sizes)

    for row in range(batch):
        kept, removed, expected, expected_sizes = reference_topk(
            importance[row].tolist(), hidden[row].tolist(), sizes[row, :, 0].tolist(), r, protected
        )
        assert plan.kept[row].tolist() == kept and set(plan.removed[row].tolist()) == removed
        torch.testing.assert_close(fused[row], torch.tensor(expected, dtype=torch.float64))
        assert new_sizes[row, :, 0].tolist() == expected_sizes
    check_invariants(plan, hidden, sizes, fused, new_sizes, r, protected)


# -------------------------------------------------------------------------------------------------- shared


def check_invariants(plan, hidden, sizes, output, new_sizes, r, protected):
    """Exactly r leave; protected tokens stay first, untouched; sizes are conserved; bystanders are bit-exact."""
    batch, tokens = hidden.shape[:2]
    assert plan.kept.shape == (batch, tokens - r) and plan.removed.shape == (batch, r) and plan.r == r
    everything = torch.sort(torch.cat([plan.kept, plan.removed], dim=1), dim=1).values
    assert torch.equal(everything, torch.arange(tokens).expand(batch, -1))
    assert (plan.kept[:, :protected] == torch.arange(protected)).all()
    assert (plan.removed >= protected).all()
    assert (plan.destinations >= protected).all()  # positions in kept: never a protected slot
    assert torch.equal(plan.kept, plan.kept.sort(dim=1).values)
    torch.testing.assert_close(new_sizes.sum(dim=1), sizes.sum(dim=1))
    receiving = torch.zeros(batch, tokens - r, dtype=torch.bool).scatter(1, plan.destinations, True)
    untouched = ~receiving
    copied = hidden.gather(1, plan.kept.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    assert torch.equal(output[untouched], copied[untouched])
    assert torch.equal(new_sizes[untouched], sizes.gather(1, plan.kept.unsqueeze(-1))[untouched])


@pytest.mark.parametrize("method", ["pitome", "topk"])
def test_tracing_follows_the_plans(method):
    # Source tracing needs only `removed` and `sum_into_destinations`: each patch follows its token.
    generator = torch.Generator().manual_seed(0)
    metric = torch.nn.functional.normalize(torch.randn(2, 9, 4, generator=generator), dim=-1)
    importance = torch.rand(2, 9, generator=generator)
    plan = pitome_merge_plan(metric, 3, 1, 0.5) if method == "pitome" else topk_fuse_plan(importance, 3, 1)
    start = initial_assignment(2, 8, 1, torch.device("cpu"))
    assignment, pruned_at = update_assignment(plan, start, initial_pruned_at(start), 9, layer=0)
    assert (pruned_at == -1).all()  # merging and fusing prune nothing
    sizes = plan.sum_into_destinations(torch.ones(2, 9, 1))
    counts = torch.stack([torch.bincount(row, minlength=6) for row in assignment])
    assert torch.equal(counts[:, 1:], sizes[:, 1:, 0].long())  # patch tokens stand for `size` patches


def pitome_step(metric: torch.Tensor, hidden: torch.Tensor, sizes: torch.Tensor):
    return apply_plan(pitome_merge_plan(metric, 3, 1, 0.5), hidden, sizes)


def topk_step(importance: torch.Tensor, hidden: torch.Tensor, sizes: torch.Tensor):
    return topk_fuse_plan(importance, 3, 1).apply(hidden, sizes)


class Step(torch.nn.Module):
    def __init__(self, step):
        super().__init__()
        self.step = step

    def forward(self, scores, hidden, sizes):
        return self.step(scores, hidden, sizes)


@pytest.mark.parametrize("step", [pitome_step, topk_step], ids=["pitome", "topk"])
def test_steps_trace_whole_under_compile_and_export(step):
    generator = torch.Generator().manual_seed(3)
    metric = torch.nn.functional.normalize(torch.randn(2, 11, 4, generator=generator), dim=-1)
    scores = metric if step is pitome_step else torch.rand(2, 11, generator=generator).softmax(-1)
    hidden, sizes = torch.randn(2, 11, 6, generator=generator), torch.ones(2, 11, 1)
    expected = step(scores, hidden, sizes)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="eager")(scores, hidden, sizes)
    exported = torch.export.export(Step(step), (scores, hidden, sizes)).module()(scores, hidden, sizes)
    for output in (compiled, exported):  # exported: counting sort instead of a stable sort, same order
        for got, want in zip(output, expected, strict=True):
            assert torch.equal(got, want)
