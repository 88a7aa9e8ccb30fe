"""Crucial-token merging: the plan on hand-checkable tensors, and the method inside a tiny model."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import ViTConfig

from rapid_hf import RapidConfig, RapidViTForImageClassification
from rapid_hf.reduction.methods import crucial_count, crucial_merge_plan
from rapid_hf.reduction.plan import SelectionPlan, apply_plan


def unit(*angles_deg: float) -> torch.Tensor:
    """Unit 2-D vectors at the given angles: `(1, N, 2)` metric with known cosines."""
    angles = torch.tensor(angles_deg) * torch.pi / 180
    return torch.stack([angles.cos(), angles.sin()], dim=-1)[None]


# CLS + 5 patches. CLS attention ranks patches 4 > 2 > 1 > 3 > 5; angles put 3 next to 2 and 5 next to 4.
METRIC = unit(0, 90, 10, 15, 200, 205)
ATTENTION = torch.tensor([[0.5, 0.1, 0.3, 0.05, 0.4, 0.02]])


def test_crucial_plan_hand_checked():
    # rho 0.4 of 5 patches -> 2 crucial (4, 2); the 2 least important (3, 5) leave.
    plan = crucial_merge_plan(METRIC, r=2, num_protected=1, cls_attention=ATTENTION, importance_ratio=0.4)
    assert isinstance(plan, SelectionPlan)
    assert plan.kept.tolist() == [[0, 1, 2, 4]]
    assert sorted(plan.removed[0].tolist()) == [3, 5]
    destination_of = dict(zip(plan.removed[0].tolist(), plan.kept[0, plan.destinations[0]].tolist(), strict=True))
    assert destination_of == {3: 2, 5: 4}

    hidden = torch.arange(6, dtype=torch.float32).view(1, 6, 1).expand(1, 6, 3).contiguous()
    merged, sizes = apply_plan(plan, hidden, None)
    assert sizes[0, :, 0].tolist() == [1, 1, 2, 2]
    assert merged[0, :, 0].tolist() == [0, 1, (2 + 3) / 2, (4 + 5) / 2]


def test_only_crucial_tokens_receive_merges():
    # rho 0.2 -> only patch 4 is crucial. Patch 3 sits next to patch 2, but 2 is not crucial, so 3's best match
    # is 4 (cosine -1): 5 (cosine ~1 to 4) and 1 (cosine -0.34) leave instead, both into 4.
    plan = crucial_merge_plan(METRIC, r=2, num_protected=1, cls_attention=ATTENTION, importance_ratio=0.2)
    assert sorted(plan.removed[0].tolist()) == [1, 5]
    assert plan.kept[0, plan.destinations[0]].tolist() == [4, 4]
    _, sizes = apply_plan(plan, torch.zeros(1, 6, 2), None)
    assert sizes[0, :, 0].tolist() == [1, 1, 1, 3]


def test_distillation_token_is_never_removed_nor_a_destination():
    # Token 1 is the distillation token: lowest attention and most similar to the removed ones, still untouched.
    metric = unit(0, 11, 10, 15, 200, 12)
    attention = torch.tensor([[0.5, 0.0, 0.3, 0.05, 0.4, 0.02]])
    plan = crucial_merge_plan(metric, r=2, num_protected=2, cls_attention=attention, importance_ratio=1.0)
    assert plan.kept[0, :2].tolist() == [0, 1]
    assert sorted(plan.removed[0].tolist()) == [3, 5]
    assert set(plan.kept[0, plan.destinations[0]].tolist()) <= {2, 4}


def test_crucial_count_leaves_room_for_the_removed_tokens():
    assert crucial_count(10, r=3, importance_ratio=0.2) == 2
    assert crucial_count(10, r=3, importance_ratio=1.0) == 7
    with pytest.raises(ValueError, match="0 < r < N_patch"):
        crucial_count(5, r=5, importance_ratio=0.5)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3),
    patches=st.integers(2, 20),
    protected=st.sampled_from([1, 2]),
    r_fraction=st.floats(0.01, 0.99),
    rho=st.floats(0.01, 1.0),
    seed=st.integers(0, 1000),
)
def test_crucial_plan_properties(batch, patches, protected, r_fraction, rho, seed):
    generator = torch.Generator().manual_seed(seed)
    tokens = protected + patches
    r = max(1, min(patches - 1, int(r_fraction * patches)))
    metric = torch.nn.functional.normalize(torch.randn(batch, tokens, 4, generator=generator), dim=-1)
    attention = torch.rand(batch, tokens, generator=generator)
    plan = crucial_merge_plan(metric, r, protected, attention, rho)

    assert plan.kept.shape == (batch, tokens - r) and plan.removed.shape == (batch, r)
    assert (plan.kept[:, :protected] == torch.arange(protected)).all()
    assert (plan.removed >= protected).all()
    destinations = plan.kept.gather(1, plan.destinations)
    assert (destinations >= protected).all()
    # Every removed token is less important than every destination, which is among the crucial top-k.
    num_crucial = crucial_count(patches, r, rho)
    kth = attention[:, protected:].topk(num_crucial, dim=-1).values[:, -1:]
    assert (attention.gather(1, destinations) >= kth).all()
    assert (attention.gather(1, plan.removed).amax(-1) <= attention.gather(1, destinations).amin(-1)).all()
    # The leaving tokens are the non-crucial ones whose best crucial match is most similar.
    order = attention[:, protected:].argsort(dim=-1, descending=True) + protected
    crucial, non_crucial = order[:, :num_crucial], order[:, num_crucial:]
    best = (metric.gather(1, non_crucial[..., None].expand(-1, -1, 4))
            @ metric.gather(1, crucial[..., None].expand(-1, -1, 4)).transpose(1, 2)).amax(-1)
    for row in range(batch):
        leaving = torch.isin(non_crucial[row], plan.removed[row])
        staying = best[row][~leaving]
        if staying.numel():
            assert best[row][leaving].min() >= staying.max() - 1e-6
    # Sizes are conserved and every kept token appears once.
    sizes = torch.rand(batch, tokens, 1, generator=generator) + 0.5
    hidden = torch.randn(batch, tokens, 3, generator=generator)
    merged, new_sizes = apply_plan(plan, hidden, sizes)
    torch.testing.assert_close(new_sizes.sum(1), sizes.sum(1))
    assert merged.shape == (batch, tokens - r, 3)
    assert torch.equal(torch.sort(torch.cat([plan.kept, plan.removed], 1), dim=1).values,
                       torch.arange(tokens).expand(batch, -1))


@pytest.fixture(scope="module")
def tiny_model() -> RapidViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
        image_size=64, patch_size=8, num_labels=10,
    )
    return RapidViTForImageClassification(config).eval()


def test_crucial_method_in_the_model(tiny_model):
    tiny_model.set_rapid(RapidConfig(method="crucial", r=8))
    pixel_values = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        out = tiny_model(pixel_values=pixel_values)
        alone = tiny_model(pixel_values=pixel_values[1:2])
    assert out.token_counts == (57, 49, 41, 33)
    torch.testing.assert_close(out.sizes.sum(-1), torch.full((3,), 65.0))
    assert (out.sizes[:, 0] == 1).all()  # CLS never merged
    torch.testing.assert_close(alone.logits, out.logits[1:2], atol=1e-5, rtol=1e-5)


def test_crucial_is_saved_and_reloaded(tiny_model, tmp_path):
    tiny_model.set_rapid(RapidConfig(method="crucial", r=4, importance_ratio=0.5))
    tiny_model.save_pretrained(tmp_path)
    reloaded = RapidViTForImageClassification.from_pretrained(tmp_path)
    assert reloaded.rapid == RapidConfig(method="crucial", r=4, importance_ratio=0.5)


def test_crucial_plans_trace_their_sources(tiny_model):
    # Source tracing works on any plan with `sum_into_destinations`: each patch token stands for `size` patches.
    tiny_model.set_rapid(RapidConfig(method="crucial", r=8, importance_ratio=0.5))
    pixel_values = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        out = tiny_model(pixel_values=pixel_values, output_sources=True)
    assert torch.equal(out.sources.sum(-1)[:, 1:].float(), out.sizes[:, 1:])
    assert (out.sources.sum(1) == 1).all()  # merging only: every patch is in exactly one token
