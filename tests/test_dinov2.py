"""DINOv2 through the shared adapter: `RapidDinov2Model`, `RapidDinov2ForImageClassification` and
`RapidDinov2WithRegistersModel` against the stock transformers classes (small random-weight models), protected
register tokens, the size-weighted patch mean of the classifier, and the cross-check on the real DeiT-Tiny
rewritten as a DINOv2 checkpoint (`experiments/dinov2_crosscheck/`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import family_checks as checks
import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForImageClassification,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersForImageClassification,
    Dinov2WithRegistersModel,
)

from rapid_hf import (
    RapidConfig,
    RapidDinov2Config,
    RapidDinov2ForImageClassification,
    RapidDinov2Model,
    RapidDinov2WithRegistersConfig,
    RapidDinov2WithRegistersForImageClassification,
    RapidDinov2WithRegistersModel,
    RapidViTModel,
    rapid_class_for_config,
)
from rapid_hf.models import modeling_rapid_dinov2
from rapid_hf.reduction.attention import attention_importance
from rapid_hf.reduction.steps import LayerStep, reduce_tokens

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL = {"hidden_size": 48, "num_hidden_layers": 4, "num_attention_heads": 3, "image_size": 64, "patch_size": 8}


def pixels(batch: int, seed: int = 1) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))}


BACKBONE_FIELDS = ("last_hidden_state", "pooler_output", "hidden_states")

FAMILIES = {
    "dinov2": checks.Family(
        name="dinov2",
        stock_class=Dinov2Model,
        rapid_class=RapidDinov2Model,
        make_config=lambda: Dinov2Config(**SMALL, layerscale_value=0.5),
        auto_class=AutoModel,
        inputs=pixels,
        compared=BACKBONE_FIELDS,
        backbone=lambda model: model,
        layers=lambda model: model.encoder.layer,
    ),
    "dinov2_classifier": checks.Family(
        name="dinov2_classifier",
        stock_class=Dinov2ForImageClassification,
        rapid_class=RapidDinov2ForImageClassification,
        make_config=lambda: Dinov2Config(**SMALL, num_labels=5),
        auto_class=AutoModelForImageClassification,
        inputs=pixels,
        compared=("logits", "hidden_states"),
        backbone=lambda model: model.dinov2,
        layers=lambda model: model.dinov2.encoder.layer,
        loss=lambda output: output.logits.pow(2).mean(),
    ),
    "dinov2_registers": checks.Family(
        name="dinov2_registers",
        stock_class=Dinov2WithRegistersModel,
        rapid_class=RapidDinov2WithRegistersModel,
        make_config=lambda: Dinov2WithRegistersConfig(**SMALL, num_register_tokens=4),
        auto_class=AutoModel,
        inputs=pixels,
        compared=BACKBONE_FIELDS,
        backbone=lambda model: model,
        layers=lambda model: model.encoder.layer,
        num_protected=5,
    ),
    "dinov2_registers_classifier": checks.Family(
        name="dinov2_registers_classifier",
        stock_class=Dinov2WithRegistersForImageClassification,
        rapid_class=RapidDinov2WithRegistersForImageClassification,
        make_config=lambda: Dinov2WithRegistersConfig(**SMALL, num_register_tokens=4, num_labels=5),
        auto_class=AutoModelForImageClassification,
        inputs=pixels,
        compared=("logits", "hidden_states"),
        backbone=lambda model: model.dinov2_with_registers,
        layers=lambda model: model.dinov2_with_registers.encoder.layer,
        num_protected=5,
        loss=lambda output: output.logits.pow(2).mean(),
    ),
}
ALL = list(FAMILIES)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ALL)
def test_no_reduction_is_bit_identical_to_the_stock_class(name, attention):
    checks.check_no_reduction_equals_stock(FAMILIES[name], attention)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["dinov2", "dinov2_registers"])
def test_layers_and_attention_mirror_the_stock_modules(name, attention):
    """Fails if transformers changes `Dinov2Layer.forward` / `Dinov2Attention.forward` (mirrored from 5.24)."""
    checks.check_layers_mirror_stock(FAMILIES[name], modeling_rapid_dinov2.MODULE_CLASSES, attention)


@pytest.mark.parametrize("name", ALL)
def test_hub_format_checkpoint_loads_without_missing_or_unexpected_keys(name, tmp_path):
    checks.check_hub_checkpoint_loads(FAMILIES[name], tmp_path)


@pytest.mark.parametrize("name", ALL)
def test_save_reload_and_auto_classes_keep_the_settings(name, tmp_path):
    checks.check_save_reload_keeps_settings(FAMILIES[name], tmp_path)


@pytest.mark.parametrize("method", checks.REDUCING)
@pytest.mark.parametrize("name", ["dinov2", "dinov2_registers"])
def test_hooks_fire_once_per_layer_per_forward(name, method):
    checks.check_hooks_fire_once_per_layer(FAMILIES[name], method)


@pytest.mark.parametrize("method", ["rapid", "tome"])
@pytest.mark.parametrize("name", ["dinov2_classifier", "dinov2_registers_classifier"])
def test_gradient_checkpointing_keeps_gradients_with_reduction(name, method):
    checks.check_gradient_checkpointing(FAMILIES[name], method)


@pytest.mark.parametrize("name", ALL)
def test_per_call_settings_leave_the_model_settings_alone(name):
    checks.check_per_call_settings(FAMILIES[name])


@pytest.mark.parametrize("method", checks.REDUCING)
@pytest.mark.parametrize("name", ["dinov2", "dinov2_registers"])
def test_sources_partition_the_patches(name, method):
    checks.check_tracing_partitions_patches(FAMILIES[name], method)


@pytest.mark.parametrize("name", ["dinov2", "dinov2_registers"])
def test_output_attentions_eager_one_map_per_layer(name):
    checks.check_output_attentions_eager(FAMILIES[name])


@pytest.mark.parametrize("name", ALL)
def test_get_rapid_model_converts_in_place(name):
    checks.check_get_rapid_model_in_place(FAMILIES[name])


def test_dense_features_give_one_feature_per_patch():
    model = FAMILIES["dinov2"].rapid()
    with torch.no_grad():
        plain = model(**pixels(2), output_dense=True)
        reduced = model(**pixels(2), rapid=checks.settings_for("tome"), output_dense=True, output_sources=True)
    assert torch.equal(plain.dense_features, plain.last_hidden_state[:, 1:])  # no reduction: the patch tokens
    owner = reduced.sources.float().argmax(dim=1)  # (B, P): the token standing for each patch
    expected = reduced.last_hidden_state.gather(1, owner[..., None].expand(-1, -1, 48))
    assert reduced.dense_features.shape == (2, 64, 48) and torch.equal(reduced.dense_features, expected)


# ------------------------------------------------------------------------------------------- registers


@pytest.mark.parametrize("num_protected", [0, 1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize(
    "operation", ["prune_redundant", "merge_important", "prune_similar", "merge_similar", "merge_crucial"]
)
def test_protected_tokens_are_never_removed_merged_or_destinations(num_protected, operation):
    """Any number of protected tokens (CLS + registers) stays first, unchanged, with size 1, for every operation,
    even when the tokens are built so that the protected ones are the most similar to everything."""
    torch.manual_seed(num_protected)
    batch, num_tokens, heads, dim = 3, 41 + num_protected, 2, 8
    keys = torch.randn(batch, heads, num_tokens, dim)
    keys[:, :, :num_protected] = keys[:, :, num_protected:].mean(dim=2, keepdim=True)  # the best matches
    query = torch.randn(batch, heads, num_tokens, dim)
    hidden = torch.randn(batch, num_tokens, 16)
    sizes = torch.ones(batch, num_tokens, 1)
    step = LayerStep(operation, 20, RapidConfig(prune_threshold=0.0, importance_ratio=0.3))
    importance = attention_importance(query[:, :, :1] if num_protected else query, keys, dim**-0.5, None)
    reduced, new_sizes, plan = reduce_tokens(step, hidden, sizes, keys, importance, num_protected)
    assert plan is not None and reduced.shape[1] == num_tokens - 20
    assert torch.equal(reduced[:, :num_protected], hidden[:, :num_protected])
    assert torch.equal(new_sizes[:, :num_protected], sizes[:, :num_protected])
    assert new_sizes.sum(dim=1).le(num_tokens).all()


def test_registers_are_protected_in_the_model():
    family = FAMILIES["dinov2_registers"]
    model = family.rapid()
    assert model.num_protected_tokens == 5 and model.config.num_protected_tokens == 5
    assert model.config.num_input_tokens == 69
    for method in checks.REDUCING:
        with torch.no_grad():
            output = model(**pixels(2), rapid=checks.settings_for(method), output_sources=True)
        assert torch.equal(output.sizes[:, :5], torch.ones(2, 5)), method
        assert output.token_counts == (61, 53, 45, 37), method
    with pytest.raises(ValueError, match="reachable range"):
        model(**pixels(1), rapid=RapidConfig(method="tome", output_tokens=6))


# ------------------------------------------------------------------------------------------- classifier


@pytest.mark.parametrize("name, first_patch", [("dinov2_classifier", 1), ("dinov2_registers_classifier", 5)])
def test_classifier_pools_the_size_weighted_mean_of_the_remaining_patch_tokens(name, first_patch):
    model = FAMILIES[name].rapid()
    with torch.no_grad():
        output = model(**pixels(2), rapid=checks.settings_for("tome"), output_hidden_states=True)
        hidden = FAMILIES[name].backbone(model).layernorm(output.hidden_states[-1])
        patches, sizes = hidden[:, first_patch:], output.sizes[:, first_patch:, None]
        weighted_mean = (patches * sizes).sum(dim=1) / sizes.sum(dim=1)
        expected = model.classifier(torch.cat([hidden[:, 0], weighted_mean], dim=1))
    assert output.sizes[:, 1:].max() > 1  # tokens were merged, so the weighting matters
    assert torch.allclose(output.logits, expected, atol=1e-6)
    assert not torch.allclose(output.logits, model.classifier(torch.cat([hidden[:, 0], patches.mean(1)], 1)))


# ------------------------------------------------------------------------------------------- configs, loaders


def test_checkpoints_of_the_other_family_are_refused(tmp_path):
    Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**SMALL)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="use RapidDinov2WithRegistersModel"):
        RapidDinov2Model.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="cannot configure a Rapid model built on RapidDinov2Config"):
        RapidDinov2Model(Dinov2WithRegistersConfig(**SMALL))


def test_any_image_size_works_as_in_the_stock_model():
    stock, model = FAMILIES["dinov2"].stock(), FAMILIES["dinov2"].rapid()
    x = torch.randn(1, 3, 48, 80)
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).last_hidden_state, stock(pixel_values=x).last_hidden_state)
        assert model(pixel_values=x, rapid=checks.settings_for("tome")).token_counts[0] == 1 + 60 - 8


@pytest.mark.parametrize(
    "config, expected",
    [
        (Dinov2Config(**SMALL, architectures=["Dinov2ForImageClassification"]), RapidDinov2ForImageClassification),
        (Dinov2Config(**SMALL), RapidDinov2Model),
        (RapidDinov2Config(**SMALL, architectures=["RapidDinov2Model"]), RapidDinov2Model),
        (Dinov2WithRegistersConfig(**SMALL), RapidDinov2WithRegistersModel),
        (
            Dinov2WithRegistersConfig(**SMALL, architectures=["Dinov2WithRegistersForImageClassification"]),
            RapidDinov2WithRegistersForImageClassification,
        ),
        (RapidDinov2WithRegistersConfig(**SMALL), RapidDinov2WithRegistersModel),
    ],
)
def test_rapid_class_for_config_picks_the_loader(config, expected):
    assert rapid_class_for_config(config) is expected


# ------------------------------------------------------------------------------------------- real weights


def load_crosscheck():
    path = REPO_ROOT / "experiments" / "dinov2_crosscheck" / "crosscheck.py"
    spec = importlib.util.spec_from_file_location("dinov2_crosscheck", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def crosscheck_models(deit_tiny_path):
    crosscheck = load_crosscheck()
    vit = RapidViTModel.from_pretrained(deit_tiny_path, add_pooling_layer=False).eval()
    return crosscheck, vit, crosscheck.vit_as_dinov2(vit)


@pytest.mark.parametrize("r", [8, 16])
@pytest.mark.parametrize("method", ["none", "tome", "tofu", "rapid", "crucial"])
def test_real_deit_tiny_as_dinov2_keeps_the_tokens_and_cls_features_of_the_vit_path(
    crosscheck_models, dev_pixel_values, method, r
):
    crosscheck, vit, dinov2 = crosscheck_models
    row = crosscheck.compare(vit, dinov2, dev_pixel_values[:3], crosscheck.settings(method, r))
    assert row["same_token_counts"] and row["same_sources"] and row["same_sizes"], row
    assert row["max_abs_cls_diff"] <= 1e-4, row
    if method != "none":
        assert row["token_counts"][-1] < 197


def test_encoder_geometry_for_the_harness():
    config = RapidDinov2Config(**SMALL, mlp_ratio=3)
    assert config.encoder_config is config and config.mlp_size == 144 and config.num_input_tokens == 65
    registers = RapidDinov2WithRegistersConfig(**SMALL, num_register_tokens=2)
    assert registers.num_protected_tokens == 3 and registers.num_input_tokens == 67


@pytest.mark.parametrize("name", ["dinov2_classifier", "dinov2_registers"])
def test_peft_lora_trains_with_reduction_and_round_trips(name, tmp_path):
    checks.check_peft_lora_trains_and_round_trips(FAMILIES[name], tmp_path)
