"""Source tracing, dense outputs and any-resolution inputs.

Pure trace functions are checked against the plans' own `sum_into_destinations` (an independent derivation);
model-level checks use tiny random-weight models, and the real DeiT-Tiny only where its weights matter
(flat regions reduced first, interpolated resolutions).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rapid_hf import (
    RapidConfig,
    RapidDeiTConfig,
    RapidDeiTForImageClassification,
    RapidDeiTForImageClassificationWithTeacher,
    RapidViTConfig,
    RapidViTForImageClassification,
)
from rapid_hf.models import encoder as encoder_module
from rapid_hf.reduction.config import METHODS
from rapid_hf.reduction.matching import bipartite_similarity, matching_metric, removal_cap
from rapid_hf.reduction.methods import similarity_merge_plan, similarity_prune_plan
from rapid_hf.reduction.schedule import expand_schedule, token_counts
from rapid_hf.reduction.tracing import (
    assignment_from_sources,
    initial_assignment,
    initial_pruned_at,
    scatter_to_patches,
    sources_from_assignment,
    update_assignment,
)

REDUCING = ["rapid", "tome", "tofu"]
TINY = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 128}


def tiny(model_class, config_class):
    torch.manual_seed(0)
    config = config_class(**TINY, image_size=64, patch_size=8, num_labels=10)
    return model_class(config).eval()


@pytest.fixture(scope="module")
def tiny_vit():
    return tiny(RapidViTForImageClassification, RapidViTConfig)


@pytest.fixture(scope="module")
def deit_tiny(deit_tiny_path):
    return RapidViTForImageClassification.from_pretrained(deit_tiny_path).eval()


def traced(model, pixel_values, rapid: RapidConfig, **options):
    model.set_rapid(rapid)
    with torch.no_grad():
        return model(pixel_values=pixel_values, output_sources=True, **options)


def assert_partition(output, num_patches: int, num_protected: int) -> None:
    """Every patch is in exactly one output token or was pruned; protected tokens hold no patch."""
    owners = output.sources.sum(dim=1)
    pruned = output.pruned_at >= 0
    assert output.sources.shape[-1] == num_patches
    assert torch.equal(owners, (~pruned).long())
    assert not output.sources[:, :num_protected].any()
    patch_sizes = output.sources[:, num_protected:].sum(dim=-1).float()
    assert torch.equal(patch_sizes, output.sizes[:, num_protected:])


# --- pure functions -------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    num_protected=st.sampled_from([1, 2]),
    batch_size=st.integers(1, 3),
    num_patches=st.integers(2, 40),
    steps=st.lists(st.tuples(st.booleans(), st.integers(1, 12)), min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
)
def test_trace_matches_membership_summed_by_the_plans(num_protected, batch_size, num_patches, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    num_tokens = num_patches + num_protected
    assignment = initial_assignment(batch_size, num_patches, num_protected, torch.device("cpu"))
    pruned_at = initial_pruned_at(assignment)
    membership = sources_from_assignment(assignment, num_tokens).float()
    expected_pruned = torch.full_like(pruned_at, -1)
    for layer, (prune, r) in enumerate(steps):
        r = min(r, removal_cap(num_tokens, num_protected))
        if r == 0:
            break
        keys = torch.randn(batch_size, 1, num_tokens, 4, generator=generator)
        scores = bipartite_similarity(matching_metric(keys), num_protected)
        plan = (similarity_prune_plan if prune else similarity_merge_plan)(scores, r, num_protected)

        before = membership
        membership = plan.sum_into_destinations(membership)
        lost = (before.sum(dim=1) > 0) & (membership.sum(dim=1) == 0)
        expected_pruned = torch.where(lost, layer, expected_pruned)
        assignment, pruned_at = update_assignment(plan, assignment, pruned_at, num_tokens, layer)
        num_tokens -= r

        assert torch.equal(sources_from_assignment(assignment, num_tokens).float(), membership)
        assert torch.equal(pruned_at, expected_pruned)
        assert torch.equal(assignment < 0, pruned_at >= 0)
        assert torch.equal(assignment_from_sources(membership.bool()), assignment)


def test_scatter_to_patches_gathers_each_patch_token_and_fills_pruned():
    tokens = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    assignment = torch.tensor([[1, 1, -1, 3], [2, -1, 2, 1]])
    dense = scatter_to_patches(tokens, assignment, fill=-7.0)
    assert dense.shape == (2, 4, 3)
    assert torch.equal(dense[0, 0], tokens[0, 1]) and torch.equal(dense[0, 1], tokens[0, 1])
    assert torch.equal(dense[1, 0], tokens[1, 2]) and torch.equal(dense[1, 3], tokens[1, 1])
    assert torch.equal(dense[0, 2], torch.full((3,), -7.0)) and torch.equal(dense[1, 1], torch.full((3,), -7.0))


def test_trace_functions_reject_bad_inputs():
    with pytest.raises(ValueError, match="same batch"):
        scatter_to_patches(torch.zeros(2, 4, 3), torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="points at token 9"):
        scatter_to_patches(torch.zeros(1, 4, 3), torch.tensor([[0, 9]]))
    with pytest.raises(ValueError, match="not a partition"):
        assignment_from_sources(torch.ones(1, 2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="shape"):
        assignment_from_sources(torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="0 patches"):
        initial_assignment(1, 0, 1, torch.device("cpu"))


# --- tiny random-weight models --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_sources_partition_patches_and_tracing_leaves_logits_bit_identical(tiny_vit, method):
    pixel_values = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    rapid = RapidConfig(method=method, r=8)
    output = traced(tiny_vit, pixel_values, rapid, output_dense=True)
    with torch.no_grad():
        plain = tiny_vit(pixel_values=pixel_values)
    assert torch.equal(plain.logits, output.logits)
    assert plain.sources is None and plain.pruned_at is None and plain.layer_sources is None
    assert plain.dense_features is None

    assert_partition(output, num_patches=64, num_protected=1)
    assert [s.shape[1] for s in output.layer_sources] == list(output.token_counts)
    assert torch.equal(output.layer_sources[-1], output.sources)
    if method != "none":
        assert output.token_counts[-1] < 65
    # Patches are only ever pruned by pruning layers: RAPID before its switch layer, ToFu in layers 0 .. L // 2.
    pruned_layers = set(output.pruned_at[output.pruned_at >= 0].tolist())
    allowed = {"rapid": {0}, "tofu": {0, 1, 2}}.get(method, set())
    assert pruned_layers <= allowed
    if method in allowed:
        assert pruned_layers == allowed


def test_sources_are_independent_per_image(tiny_vit):
    pixel_values = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    batch = traced(tiny_vit, pixel_values, RapidConfig(method="tome", r=8))
    assert not torch.equal(batch.sources[0], batch.sources[1])
    for index in range(3):
        single = traced(tiny_vit, pixel_values[index : index + 1], RapidConfig(method="tome", r=8))
        assert torch.equal(single.sources[0], batch.sources[index])
        assert torch.equal(single.pruned_at[0], batch.pruned_at[index])


@pytest.mark.parametrize("method", ["rapid", "tofu", "none"])
def test_dense_features_give_each_patch_its_token_feature(tiny_vit, method):
    pixel_values = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    tiny_vit.set_rapid(RapidConfig(method=method, r=8))
    with torch.no_grad():
        output = tiny_vit(pixel_values=pixel_values, output_dense=True, output_sources=True, output_hidden_states=True)
        last_hidden_state = tiny_vit.vit.layernorm(output.hidden_states[-1])
        stock = tiny_vit.vit(pixel_values=pixel_values).last_hidden_state
    dense = output.dense_features
    assert dense.shape == (2, 64, 64)
    owners = assignment_from_sources(output.sources)
    pruned = output.pruned_at >= 0
    for b in range(2):
        for p in range(64):
            expected = torch.zeros(64) if pruned[b, p] else last_hidden_state[b, owners[b, p]]
            assert torch.equal(dense[b, p], expected)
    if method == "none":
        assert torch.equal(dense, stock[:, 1:])
    else:
        assert not torch.equal(dense, stock[:, 1:])


def test_dense_alone_computes_no_per_layer_sources(tiny_vit):
    tiny_vit.set_rapid(RapidConfig(method="rapid", r=8))
    with torch.no_grad():
        output = tiny_vit(pixel_values=torch.randn(1, 3, 64, 64), output_dense=True)
    assert output.dense_features.shape == (1, 64, 64)
    assert output.sources is None and output.layer_sources is None
    pruned = output.pruned_at >= 0
    assert pruned.sum() == 8  # RAPID prunes r=8 in layer 0 of this 4-layer model, then merges
    assert (output.dense_features[pruned] == 0).all() and (output.dense_features[~pruned] != 0).any(dim=-1).all()


def test_tracing_off_computes_no_trace(tiny_vit, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a source trace was computed although tracing is off")

    for name in ("initial_assignment", "update_assignment", "sources_from_assignment", "scatter_to_patches"):
        monkeypatch.setattr(encoder_module, name, fail)
    tiny_vit.set_rapid(RapidConfig(method="rapid", r=8))
    with torch.no_grad():
        output = tiny_vit(pixel_values=torch.randn(1, 3, 64, 64), output_hidden_states=True, return_dict=True)
    assert output.sources is None
    with pytest.raises(AssertionError, match="tracing is off"), torch.no_grad():
        tiny_vit(pixel_values=torch.randn(1, 3, 64, 64), output_sources=True)


def test_misspelt_trace_option_is_rejected(tiny_vit):
    with pytest.raises(ValueError, match="output_source"):
        tiny_vit(pixel_values=torch.randn(1, 3, 64, 64), output_source=True)


@pytest.mark.parametrize("model_class", [RapidDeiTForImageClassification, RapidDeiTForImageClassificationWithTeacher])
@pytest.mark.parametrize("method", REDUCING)
def test_deit_traces_exclude_cls_and_distillation_tokens(model_class, method):
    model = tiny(model_class, RapidDeiTConfig)
    output = traced(model, torch.randn(2, 3, 64, 64), RapidConfig(method=method, r=8), output_dense=True)
    assert_partition(output, num_patches=64, num_protected=2)
    assert output.dense_features.shape == (2, 64, 64)


# --- real DeiT-Tiny -------------------------------------------------------------------------------------------


def reduced_patches(output, layer: int) -> torch.Tensor:
    """`(B, P)` True for patches pruned by `layer` or sharing a token with another patch after it."""
    sources = output.layer_sources[layer]
    token_sizes = sources.sum(dim=-1, keepdim=True)
    merged = (sources & (token_sizes > 1)).any(dim=1)
    pruned = (output.pruned_at >= 0) & (output.pruned_at <= layer)
    return merged | pruned


@pytest.mark.parametrize("method", REDUCING)
def test_flat_regions_are_reduced_first(deit_tiny, dev_pixel_values, method):
    """With half of each photo replaced by a flat colour, the first reductions take their patches from it.

    The flat half is on the left of 4 photos and on the right of the same 4 (ties break towards low indices,
    i.e. the top, so neither half is favoured by position). A choice blind to content would take ~50% of the
    reduced patches (>= 64 per batch half) from the flat half, give or take 6%; on the untouched photos the
    same statistic stays below 75%.
    """
    photos = dev_pixel_values[:4]
    flat_columns = torch.arange(224) // 16 < 7
    left_patches = flat_columns[::16].repeat(14)  # row-major patch grid: patch p is in column p % 14
    flat_patches = torch.cat([left_patches.expand(4, -1), (~left_patches).expand(4, -1)])
    pixel_values = torch.cat([photos, photos])
    pixel_values[:4, ..., flat_columns] = 0.3
    pixel_values[4:, ..., ~flat_columns] = 0.3
    rapid = RapidConfig(method=method, r=16)
    output = traced(deit_tiny, pixel_values, rapid)
    for layer in (0, 1):
        reduced = reduced_patches(output, layer)
        for half, name in ((slice(0, 4), "left"), (slice(4, 8), "right")):
            share = (reduced[half] & flat_patches[half]).sum() / reduced[half].sum()
            assert share > 0.8, f"{method} layer {layer}, flat {name}: only {share:.0%} of reduced patches are flat"
    control = reduced_patches(traced(deit_tiny, photos, rapid), 0)
    assert (control & left_patches).sum() / control.sum() < 0.75
    assert (control & ~left_patches).sum() / control.sum() < 0.75


@pytest.mark.parametrize("size", [160, 288])
@pytest.mark.parametrize("method", METHODS)
def test_any_resolution_adapts_schedule_and_traces_its_grid(deit_tiny, dev_pixel_values, size, method):
    pixel_values = torch.nn.functional.interpolate(dev_pixel_values[:1], size=(size, size), mode="bilinear")
    num_patches = (size // 16) ** 2
    output = traced(deit_tiny, pixel_values, RapidConfig(method=method, r=16), interpolate_pos_encoding=True)
    schedule = [0] * 12 if method == "none" else expand_schedule(16, 12)
    assert list(output.token_counts) == token_counts(num_patches + 1, schedule, 1)
    assert_partition(output, num_patches, num_protected=1)
    assert torch.isfinite(output.logits).all()

    target = 20
    rapid = RapidConfig(method=method, output_tokens=target)
    output = traced(deit_tiny, pixel_values, rapid, interpolate_pos_encoding=True)
    assert output.token_counts[-1] == (num_patches + 1 if method == "none" else target)
    assert_partition(output, num_patches, num_protected=1)


def test_no_reduction_at_another_resolution_is_bit_identical(deit_tiny, reference_model, dev_pixel_values):
    pixel_values = torch.nn.functional.interpolate(dev_pixel_values[:2], size=(288, 288), mode="bilinear")
    deit_tiny.set_rapid(RapidConfig(method="none"))
    with torch.no_grad():
        ours = deit_tiny(pixel_values=pixel_values, interpolate_pos_encoding=True).logits
        stock = reference_model(pixel_values=pixel_values, interpolate_pos_encoding=True).logits
    assert torch.equal(ours, stock)
