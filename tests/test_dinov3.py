"""DINOv3 ViT through the shared adapter: `RapidDINOv3ViTModel` and `RapidDINOv3ViTBackbone` against the stock
transformers classes (small random-weight models; no real DINOv3 weights can be had offline): protected CLS and
registers, and rotary positions that travel with their tokens: in every layer, for every method, each token is
rotated by the position of the patch its own index came from (a merged token: its destination's)."""

from __future__ import annotations

import copy
import itertools
import json

import family_checks as checks
import pytest
import torch
from remote_user import run_as_remote_user
from transformers import AutoBackbone, AutoModel, DINOv3ViTBackbone, DINOv3ViTConfig, DINOv3ViTModel
from transformers.models.dinov3_vit.modeling_dinov3_vit import apply_rotary_pos_emb

import rapid_hf
from rapid_hf import (
    RapidConfig,
    RapidDINOv3ViTBackbone,
    RapidDINOv3ViTConfig,
    RapidDINOv3ViTModel,
    rapid_class_for_config,
)
from rapid_hf.hub.remote_code import auto_map, modules_for, write_remote_code
from rapid_hf.models import modeling_rapid_dinov3
from rapid_hf.models.layers import LayerReduction, swap_module_classes

SMALL = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 4,
    "layerscale_value": 0.5,
    "key_bias": True,
    "pos_embed_rescale": None,  # no random position augmentation in training (gradient checks run two forwards)
}
REGISTERS = 2
PREFIX = 1 + REGISTERS


def config(**kwargs) -> DINOv3ViTConfig:
    return DINOv3ViTConfig(**{**SMALL, "num_register_tokens": REGISTERS, **kwargs})


def pixels(batch: int, seed: int = 1, size: tuple[int, int] = (32, 32)) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))}


FAMILIES = {
    "dinov3": checks.Family(
        name="dinov3",
        stock_class=DINOv3ViTModel,
        rapid_class=RapidDINOv3ViTModel,
        make_config=config,
        auto_class=AutoModel,
        inputs=pixels,
        compared=("last_hidden_state", "pooler_output", "hidden_states"),
        backbone=lambda model: model,
        layers=lambda model: model.model.layer,
        num_protected=PREFIX,
    ),
    "dinov3_backbone": checks.Family(
        name="dinov3_backbone",
        stock_class=DINOv3ViTBackbone,
        rapid_class=RapidDINOv3ViTBackbone,
        make_config=lambda: config(num_register_tokens=0, out_features=["stage2", "stage4"], return_class_token=True),
        auto_class=None,  # transformers 5.25's AutoBackbone.from_pretrained takes Hub ids only (see below)
        inputs=pixels,
        compared=("feature_maps", "cls_tokens", "hidden_states"),
        backbone=lambda model: model,
        layers=lambda model: model.model.layer,
        num_protected=1,
        loss=lambda output: output.feature_maps[-1].pow(2).mean(),
    ),
}
ALL = list(FAMILIES)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ALL)
def test_no_reduction_is_bit_identical_to_the_stock_class(name, attention):
    checks.check_no_reduction_equals_stock(FAMILIES[name], attention)


def grid_positions(model, size: tuple[int, int] = (32, 32)) -> tuple[torch.Tensor, torch.Tensor]:
    """The stock `(cos, sin)` `(P, head_dim)` of the patch grid of a `size` image."""
    return model.rope_embeddings(torch.zeros(1, 3, *size))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_layers_and_attention_mirror_the_stock_modules(attention):
    """Fails if transformers changes `DINOv3ViTLayer.forward` / `DINOv3ViTAttention.forward` (mirrored from 5.25);
    the recorded keys and query are the post-rotary ones."""
    stock_model = FAMILIES["dinov3"].stock(attention)
    cos, sin = grid_positions(stock_model)
    num_tokens = PREFIX + 64
    hidden = torch.randn(2, num_tokens, 32)
    bias = torch.randn(2, 1, 1, num_tokens)
    for stock in stock_model.model.layer:
        rapid = copy.deepcopy(stock)
        swap_module_classes(rapid, modeling_rapid_dinov3.MODULE_CLASSES)
        assert type(rapid) is not type(stock) and isinstance(rapid, type(stock))
        reduction = LayerReduction(num_protected=PREFIX)
        per_image = (cos.expand(2, 1, -1, -1), sin.expand(2, 1, -1, -1))  # what the reduced forward passes
        with torch.no_grad():
            expected = stock(hidden, position_embeddings=(cos, sin))
            assert torch.equal(rapid(hidden, position_embeddings=(cos, sin)), expected)
            assert torch.equal(rapid(hidden, position_embeddings=per_image), expected)
            layer_reduction = LayerReduction(num_protected=PREFIX)
            assert torch.equal(rapid(hidden, reduction=layer_reduction, position_embeddings=per_image), expected)
            assert layer_reduction.plan is None
            probe_keys, probe_query = rapid.keys_and_query(hidden, position_embeddings=per_image)  # normed, rotated
            assert torch.equal(probe_keys, layer_reduction.keys) and torch.equal(probe_query, layer_reduction.query)
            expected_output, expected_weights = stock.attention(hidden, bias, (cos, sin))
            got_output, got_weights = rapid.attention(hidden, bias, per_image, reduction=reduction)
            assert torch.equal(got_output, expected_output)
            assert (got_weights is None) == (expected_weights is None)
            if got_weights is not None:
                assert torch.equal(got_weights, expected_weights)
            split = (2, num_tokens, -1, 16)
            query = stock.attention.q_proj(hidden).view(split).transpose(1, 2)
            keys = stock.attention.k_proj(hidden).view(split).transpose(1, 2)
            rotated_query, rotated_keys = apply_rotary_pos_emb(query, keys, cos, sin)
            assert torch.equal(reduction.keys, rotated_keys) and torch.equal(reduction.query, rotated_query)
            assert not torch.equal(reduction.keys[:, :, PREFIX:], keys[:, :, PREFIX:])  # the rotation matters
            assert torch.equal(reduction.query[:, :, :PREFIX], query[:, :, :PREFIX])  # CLS/registers: unrotated
        hidden = expected


# ------------------------------------------------------------------------------------------- rotary positions


def record_positions(model, inputs, settings, output_sources=False):
    """Run `model`; per layer the `(cos, sin)` its attention received and the `LayerReduction` it ran."""
    positions, reductions, handles = [], [], []
    for layer in model.model.layer:
        handles.append(layer.register_forward_pre_hook(
            lambda module, args, kwargs: reductions.append(kwargs["reduction"]), with_kwargs=True
        ))
        handles.append(layer.attention.register_forward_pre_hook(
            lambda module, args, kwargs: positions.append(kwargs["position_embeddings"]), with_kwargs=True
        ))
    try:
        with torch.no_grad():
            output = model(**inputs, rapid=settings, output_sources=output_sources)
    finally:
        for handle in handles:
            handle.remove()
    return output, positions, reductions


@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
@pytest.mark.parametrize("method", checks.REDUCING)
def test_every_layer_rotates_each_token_by_the_position_of_its_own_patch(method, size):
    """In every layer, every token's `(cos, sin)` is the row of the patch its own index came from (followed through
    each plan's output order: a kept token keeps its patch, a merged token is its destination); that patch is one
    of the token's sources, its only one while the token stands for one patch."""
    model = FAMILIES["dinov3"].rapid()
    inputs = pixels(3, size=size)
    cos, sin = grid_positions(model, size)
    num_patches = cos.shape[0]
    rows = torch.cat([cos, sin], dim=-1)
    assert torch.cdist(rows, rows).add(torch.eye(num_patches)).min() > 1e-3  # every patch's row is distinct
    settings = checks.settings_for(method)
    output, positions, reductions = record_positions(model, inputs, settings, output_sources=True)
    assert len(positions) == len(reductions) == 4
    counts = [PREFIX + num_patches, *output.token_counts]
    assert all(a > b for a, b in itertools.pairwise(counts)), counts  # every layer reduces
    assert all(reduction.plan is not None for reduction in reductions)
    sources_entering = [None, *output.layer_sources[:-1]]
    own = torch.arange(counts[0]).expand(3, -1)  # the input index each token came from
    for layer, ((layer_cos, layer_sin), reduction, sources) in enumerate(
        zip(positions, reductions, sources_entering, strict=True)
    ):
        patch = own[:, PREFIX:] - PREFIX  # (B, n) the patch each patch token came from
        assert (patch >= 0).all(), layer  # CLS and registers stay in front
        assert layer_cos.shape == layer_sin.shape == (3, 1, counts[layer] - PREFIX, 16)
        assert torch.equal(layer_cos[:, 0], cos[patch]) and torch.equal(layer_sin[:, 0], sin[patch]), layer
        if sources is not None:
            patch_sources = sources[:, PREFIX:]
            assert patch_sources.gather(2, patch[..., None]).all(), layer  # its own patch is one of its sources
            single = patch_sources.sum(dim=-1) == 1
            assert torch.equal(patch_sources.float().argmax(dim=-1)[single], patch[single]), layer
        own = own.gather(1, reduction.plan.output_tokens(counts[layer]))
    assert torch.equal(own[:, :PREFIX], torch.arange(PREFIX).expand(3, -1))


@pytest.mark.parametrize("method", checks.REDUCING)
def test_r0_passes_every_layer_the_stock_positions(method):
    model = FAMILIES["dinov3"].rapid()
    cos, sin = grid_positions(model)
    output, positions, reductions = record_positions(model, pixels(2), RapidConfig(method=method, r=0))
    assert output.token_counts == (PREFIX + 64,) * 4
    for layer_cos, layer_sin in positions:
        assert torch.equal(layer_cos, cos.expand(2, 1, -1, -1)) and torch.equal(layer_sin, sin.expand(2, 1, -1, -1))
    assert all(reduction.plan is None for reduction in reductions)


def test_merged_token_is_rotated_by_its_destination_and_moves_with_it():
    """A hand check of one ToMe merge in layer 0: layer 1 sees the rotary rows of every destination and of no
    removed source (ToMe's sources are the even tokens, destinations the odd ones)."""
    model = FAMILIES["dinov3"].rapid()
    rows = torch.cat(grid_positions(model), dim=-1)
    _, positions, reductions = record_positions(model, pixels(1), RapidConfig(method="tome", r=[8, 0, 0, 0]))
    plan = reductions[0].plan
    removed = 2 * plan.removed[0]
    destinations = 2 * plan.destinations[0] + 1
    seen = {tuple(row.tolist()) for row in torch.cat(positions[1], dim=-1)[0, 0]}
    assert len(seen) == 64 - 8
    for source, destination in zip(removed.tolist(), destinations.tolist(), strict=True):
        assert tuple(rows[source - PREFIX].tolist()) not in seen
        assert tuple(rows[destination - PREFIX].tolist()) in seen


def test_training_mode_position_augmentation_matches_the_stock_model():
    """In training the stock model jitters the rotary grid at random; the reduced model draws the same numbers."""
    torch.manual_seed(0)
    stock = DINOv3ViTModel(config(pos_embed_rescale=2.0, pos_embed_shift=0.1)).train()
    model = RapidDINOv3ViTModel(stock.config).train()
    model.load_state_dict(stock.state_dict())
    inputs = pixels(2)
    torch.manual_seed(5)
    expected = stock(**inputs).last_hidden_state
    torch.manual_seed(5)
    assert torch.equal(model(**inputs).last_hidden_state, expected)
    torch.manual_seed(5)
    assert model(**inputs, rapid=checks.settings_for("tome")).token_counts[-1] < PREFIX + 64


# ------------------------------------------------------------------------------------------- shared checks


@pytest.mark.parametrize("name", ALL)
def test_hub_format_checkpoint_loads_without_missing_or_unexpected_keys(name, tmp_path):
    checks.check_hub_checkpoint_loads(FAMILIES[name], tmp_path)


@pytest.mark.parametrize("name", ALL)
def test_save_reload_and_auto_classes_keep_the_settings(name, tmp_path):
    checks.check_save_reload_keeps_settings(FAMILIES[name], tmp_path)


@pytest.mark.parametrize("method", checks.REDUCING)
def test_hooks_fire_once_per_layer_per_forward(method):
    checks.check_hooks_fire_once_per_layer(FAMILIES["dinov3"], method)


@pytest.mark.parametrize("method", ["rapid", "tome"])
@pytest.mark.parametrize("name", ALL)
def test_gradient_checkpointing_keeps_gradients_with_reduction(name, method):
    checks.check_gradient_checkpointing(FAMILIES[name], method)


@pytest.mark.parametrize("name", ALL)
def test_per_call_settings_leave_the_model_settings_alone(name):
    checks.check_per_call_settings(FAMILIES[name])


@pytest.mark.parametrize("method", checks.REDUCING)
def test_sources_partition_the_patches(method):
    checks.check_tracing_partitions_patches(FAMILIES["dinov3"], method)


def test_output_attentions_eager_one_map_per_layer():
    checks.check_output_attentions_eager(FAMILIES["dinov3"])


@pytest.mark.parametrize("name", ALL)
def test_get_rapid_model_converts_in_place(name):
    checks.check_get_rapid_model_in_place(FAMILIES[name])


def test_peft_lora_trains_with_reduction_and_round_trips(tmp_path):
    checks.check_peft_lora_trains_and_round_trips(FAMILIES["dinov3"], tmp_path)


# ------------------------------------------------------------------------------------------- protected tokens


def test_cls_and_registers_are_protected():
    model = FAMILIES["dinov3"].rapid()
    assert model.num_protected_tokens == PREFIX and model.config.num_protected_tokens == PREFIX
    assert model.config.num_input_tokens == PREFIX + 64
    for method in checks.REDUCING:
        with torch.no_grad():
            plain = model(**pixels(2), output_hidden_states=True)
            output = model(**pixels(2), rapid=checks.settings_for(method), output_hidden_states=True)
        assert torch.equal(output.sizes[:, :PREFIX], torch.ones(2, PREFIX)), method
        assert torch.equal(output.hidden_states[1][:, :PREFIX], plain.hidden_states[1][:, :PREFIX]), method
        assert output.token_counts == (59, 51, 43, 35), method
    with pytest.raises(ValueError, match="reachable range"):
        model(**pixels(1), rapid=RapidConfig(method="tome", output_tokens=PREFIX + 1))


def test_any_image_size_works_as_in_the_stock_model():
    stock, model = FAMILIES["dinov3"].stock(), FAMILIES["dinov3"].rapid()
    x = pixels(1, size=(24, 40))
    with torch.no_grad():
        assert torch.equal(model(**x).last_hidden_state, stock(**x).last_hidden_state)
        assert model(**x, rapid=checks.settings_for("tome")).token_counts[0] == PREFIX + 60 - 8


def test_masked_positions_are_passed_to_the_embeddings():
    stock, model = FAMILIES["dinov3"].stock(), FAMILIES["dinov3"].rapid()
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, ::3] = True
    with torch.no_grad():
        assert torch.equal(
            model(**pixels(2), bool_masked_pos=mask).last_hidden_state,
            stock(**pixels(2), bool_masked_pos=mask).last_hidden_state,
        )


# ------------------------------------------------------------------------------------------- backbone


@pytest.mark.parametrize("method", ["tome", "tofu"])
def test_backbone_feature_maps_put_each_token_at_its_patches(method):
    model = FAMILIES["dinov3_backbone"].rapid()
    with torch.no_grad():
        output = model(**pixels(2), rapid=checks.settings_for(method), output_sources=True, output_hidden_states=True)
    assert [tuple(f.shape) for f in output.feature_maps] == [(2, 32, 8, 8)] * 2
    for feature_map, stage in zip(output.feature_maps, (2, 4), strict=True):
        hidden = model.norm(output.hidden_states[stage])
        sources = output.layer_sources[stage - 1]  # (B, n, P) after layer `stage`
        expected = torch.einsum("btp,btc->bpc", sources.float(), hidden)  # pruned patches: zeros
        assert torch.allclose(feature_map.flatten(2).transpose(1, 2), expected, atol=1e-6)
    assert torch.equal(output.cls_tokens[-1], model.norm(output.hidden_states[-1])[:, 0])
    assert output.token_counts == (57, 49, 41, 33)
    assert method != "tofu" or (output.pruned_at >= 0).any()


def test_backbone_without_sources_requested_returns_no_traces():
    model = FAMILIES["dinov3_backbone"].rapid()
    with torch.no_grad():
        output = model(**pixels(1), rapid=checks.settings_for("tome"))
    assert output.sources is None and output.layer_sources is None and output.pruned_at is None
    assert output.hidden_states is None and output.token_counts == (57, 49, 41, 33)


# ------------------------------------------------------------------------------------------- configs, loaders


@pytest.mark.parametrize(
    "config, expected",
    [
        (config(), RapidDINOv3ViTModel),
        (config(architectures=["DINOv3ViTBackbone"]), RapidDINOv3ViTBackbone),
        (RapidDINOv3ViTConfig(**SMALL, architectures=["RapidDINOv3ViTModel"]), RapidDINOv3ViTModel),
    ],
)
def test_rapid_class_for_config_picks_the_loader(config, expected):
    assert rapid_class_for_config(config) is expected


def test_auto_classes_build_the_rapid_classes(tmp_path):
    """AutoModel loads the model class; AutoBackbone builds the backbone class from its config (its
    `from_pretrained` of transformers 5.25 checks the Hub for the name first, so it cannot take a local folder)."""
    FAMILIES["dinov3"].rapid(rapid=RapidConfig(method="tome", r=4)).save_pretrained(tmp_path)
    assert type(AutoModel.from_pretrained(tmp_path)) is RapidDINOv3ViTModel
    backbone_config = RapidDINOv3ViTConfig(**SMALL, out_features=["stage4"], rapid={"method": "tome", "r": 4})
    backbone = AutoBackbone.from_config(backbone_config)
    assert type(backbone) is RapidDINOv3ViTBackbone and backbone.rapid == RapidConfig(method="tome", r=4)


def test_the_family_is_exported_lazily_and_declared_once():
    assert rapid_hf.RapidDINOv3ViTModel is modeling_rapid_dinov3.RapidDINOv3ViTModel
    assert modeling_rapid_dinov3.FAMILY.public_names == (
        "RapidDINOv3ViTConfig", "RapidDINOv3ViTModel", "RapidDINOv3ViTBackbone", "RapidDINOv3ViTBackboneOutput",
    )
    registers = RapidDINOv3ViTConfig(**SMALL, num_register_tokens=4)
    assert registers.num_protected_tokens == 5 and registers.num_input_tokens == 69 and registers.mlp_size == 64


REMOTE_SCRIPT = r'''
import torch
from transformers import AutoModel
from transformers.dynamic_module_utils import get_class_from_dynamic_module

for case in spec["cases"]:
    if case["auto"] == "AutoBackbone":  # AutoBackbone.from_pretrained (5.25) refuses local folders: its class, then
        loader = get_class_from_dynamic_module(case["auto_map"]["AutoBackbone"], case["folder"])
    else:
        loader = AutoModel
    model, info = loader.from_pretrained(case["folder"], trust_remote_code=True, output_loading_info=True)
    expected = torch.load(case["expected"])
    with torch.no_grad():
        output = model.eval()(**expected["inputs"])
    value = output.feature_maps[-1] if expected["key"] == "feature_maps" else output[expected["key"]]
    report[case["name"]] = {
        "class": type(model).__module__ + "." + type(model).__name__,
        "missing": sorted(info["missing_keys"]) + sorted(info["unexpected_keys"]),
        "rapid": model.config.rapid,
        "max_diff": (value - expected["value"]).abs().max().item(),
        "token_counts": list(output.token_counts),
    }
json.dump(report, open(spec["report"], "w"))
'''


def test_remote_code_loads_the_family_without_rapid_hf(tmp_path):
    cases = []
    for name, key in (("dinov3", "last_hidden_state"), ("dinov3_backbone", "feature_maps")):
        model = FAMILIES[name].rapid(rapid=RapidConfig(method="rapid", r=8, switch_layer=2))
        folder = tmp_path / name
        model.save_pretrained(folder)
        files = write_remote_code(folder, modules_for(type(model)))
        assert "modeling_rapid_dinov3.py" in files and "configuration_rapid.py" in files
        saved = json.loads((folder / "config.json").read_text())
        saved["auto_map"] = auto_map(type(model), type(model.config))
        (folder / "config.json").write_text(json.dumps(saved))
        inputs = pixels(2)
        with torch.no_grad():
            output = model(**inputs)
        value = output.feature_maps[-1] if key == "feature_maps" else output[key]
        torch.save({"inputs": inputs, "key": key, "value": value}, tmp_path / f"{name}.pt")
        cases.append({"name": name, "folder": str(folder), "expected": str(tmp_path / f"{name}.pt"),
                      "auto": next(iter(saved["auto_map"].keys() - {"AutoConfig"})), "auto_map": saved["auto_map"],
                      "class": type(model).__name__,
                      "rapid": model.config.rapid, "token_counts": list(output.token_counts)})
    report = run_as_remote_user(tmp_path, REMOTE_SCRIPT, cases)
    assert report["rapid_hf_importable"] is False
    for case in cases:
        result = report[case["name"]]
        assert result["class"].startswith("transformers_modules.") and result["class"].endswith(case["class"])
        assert result["missing"] == [] and result["rapid"] == case["rapid"]
        assert result["token_counts"] == case["token_counts"] and case["token_counts"][-1] < case["token_counts"][0]
        assert result["max_diff"] <= 1e-5
