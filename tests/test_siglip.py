"""SigLIP through the shared adapter: `RapidSiglipVisionModel`, `RapidSiglipModel` and
`RapidSiglipForImageClassification` against the stock transformers classes (small random-weight models; no real
SigLIP weights can be had offline): no protected token, the received-attention importance, the size-weighted
attention-pooling head and patch mean, the untouched text tower, the zero-shot pipeline, and the family's remote
code."""

from __future__ import annotations

import json

import family_checks as checks
import pytest
import torch
from PIL import Image
from remote_user import run_as_remote_user
from tokenizers import pre_tokenizers
from transformers import (
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForZeroShotImageClassification,
    CLIPImageProcessor,
    CLIPTokenizer,
    SiglipConfig,
    SiglipForImageClassification,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
    pipeline,
)
from transformers.models.siglip.modeling_siglip import SiglipAttention, SiglipEncoderLayer

import rapid_hf
from rapid_hf import (
    RapidConfig,
    RapidSiglipConfig,
    RapidSiglipForImageClassification,
    RapidSiglipModel,
    RapidSiglipVisionConfig,
    RapidSiglipVisionModel,
    get_rapid_model,
    rapid_class_for_config,
)
from rapid_hf.hub.remote_code import auto_map, modules_for, write_remote_code
from rapid_hf.models import modeling_rapid_siglip
from rapid_hf.models.layers import LayerReduction
from rapid_hf.reduction.attention import attention_importance
from rapid_hf.reduction.steps import layer_steps, reduce_tokens

VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 4,
}
TEXT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "vocab_size": 514,
    "max_position_embeddings": 64,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 1,
}


def siglip_config(**kwargs) -> SiglipConfig:
    return SiglipConfig(vision_config=VISION, text_config=TEXT, **kwargs)


def tiny_tokenizer() -> CLIPTokenizer:
    """A byte-level tokenizer (one token per byte, 514 tokens; SigLIP's own needs a SentencePiece model)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    tokenizer.model_max_length = TEXT["max_position_embeddings"]
    return tokenizer


def pixels(batch: int, seed: int = 1) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))}


def pixels_and_text(batch: int) -> dict[str, torch.Tensor]:
    tokens = tiny_tokenizer()(["a photo of a cat.", "a dog", "two birds on a wire"], padding=True, return_tensors="pt")
    return {**pixels(batch), "input_ids": tokens["input_ids"]}


FAMILIES = {
    "siglip_vision": checks.Family(
        name="siglip_vision",
        stock_class=SiglipVisionModel,
        rapid_class=RapidSiglipVisionModel,
        make_config=lambda: SiglipVisionConfig(**VISION),
        auto_class=AutoModel,
        inputs=pixels,
        compared=("last_hidden_state", "pooler_output", "hidden_states"),
        backbone=lambda model: model,
        layers=lambda model: model.encoder.layers,
        num_protected=0,
        loss=lambda output: output.pooler_output.pow(2).mean(),
    ),
    "siglip": checks.Family(
        name="siglip",
        stock_class=SiglipModel,
        rapid_class=RapidSiglipModel,
        make_config=siglip_config,
        auto_class=AutoModelForZeroShotImageClassification,
        inputs=pixels_and_text,
        compared=("logits_per_image", "logits_per_text", "image_embeds", "text_embeds"),
        backbone=lambda model: model.vision_model,
        layers=lambda model: model.vision_model.encoder.layers,
        num_protected=0,
        reduced=lambda output: output.vision_model_output,
        loss=lambda output: output.logits_per_image.pow(2).mean(),
    ),
    "siglip_classifier": checks.Family(
        name="siglip_classifier",
        stock_class=SiglipForImageClassification,
        rapid_class=RapidSiglipForImageClassification,
        make_config=lambda: siglip_config(num_labels=5),
        auto_class=AutoModelForImageClassification,
        inputs=pixels,
        compared=("logits", "hidden_states"),
        backbone=lambda model: model.vision_model,
        layers=lambda model: model.vision_model.encoder.layers,
        num_protected=0,
        loss=lambda output: output.logits.pow(2).mean(),
    ),
}
ALL = list(FAMILIES)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ALL)
def test_no_reduction_is_bit_identical_to_the_stock_class(name, attention):
    checks.check_no_reduction_equals_stock(FAMILIES[name], attention)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_layers_and_attention_mirror_the_stock_modules(attention):
    """Fails if transformers changes `SiglipEncoderLayer.forward` / `SiglipAttention.forward` (mirrored from 5.25)."""
    checks.check_layers_mirror_stock(FAMILIES["siglip_vision"], modeling_rapid_siglip.MODULE_CLASSES, attention)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_every_output_mirrors_the_stock_model(attention):
    """`SiglipVisionModel.forward` (pooling head included), `SiglipModel.get_image_features`/`get_text_features`,
    the sigmoid loss and `SiglipForImageClassification.forward` with labels (mirrored from 5.25)."""
    stock, model = FAMILIES["siglip"].stock(attention), FAMILIES["siglip"].rapid(attention)
    inputs = pixels_and_text(3)
    with torch.no_grad():
        checks.outputs_equal(
            stock.vision_model(pixel_values=inputs["pixel_values"], output_hidden_states=True),
            model.vision_model(pixel_values=inputs["pixel_values"], output_hidden_states=True),
            ("last_hidden_state", "pooler_output", "hidden_states"),
        )
        checks.outputs_equal(
            stock.get_image_features(pixel_values=inputs["pixel_values"]),
            model.get_image_features(pixel_values=inputs["pixel_values"]),
            ("last_hidden_state", "pooler_output"),
        )
        checks.outputs_equal(
            stock.get_text_features(input_ids=inputs["input_ids"]),
            model.get_text_features(input_ids=inputs["input_ids"]),
            ("last_hidden_state", "pooler_output"),
        )
        checks.outputs_equal(
            stock(**inputs, return_loss=True), model(**inputs, return_loss=True), ("loss", "logits_per_image")
        )
    classifier_stock = FAMILIES["siglip_classifier"].stock(attention)
    classifier = FAMILIES["siglip_classifier"].rapid(attention)
    labels = torch.tensor([0, 3])
    with torch.no_grad():
        checks.outputs_equal(
            classifier_stock(**pixels(2), labels=labels), classifier(**pixels(2), labels=labels), ("loss", "logits")
        )


@pytest.mark.parametrize("name", ALL)
def test_hub_format_checkpoint_loads_without_missing_or_unexpected_keys(name, tmp_path):
    checks.check_hub_checkpoint_loads(FAMILIES[name], tmp_path)


@pytest.mark.parametrize("name", ALL)
def test_save_reload_and_auto_classes_keep_the_settings(name, tmp_path):
    checks.check_save_reload_keeps_settings(FAMILIES[name], tmp_path)


def test_siglip_model_reloads_through_automodel(tmp_path):
    model = FAMILIES["siglip"].rapid(rapid=RapidConfig(method="tome", r=4))
    model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path)
    assert type(reloaded) is RapidSiglipModel and reloaded.rapid == RapidConfig(method="tome", r=4)


@pytest.mark.parametrize("method", checks.REDUCING)
@pytest.mark.parametrize("name", ["siglip_vision", "siglip"])
def test_hooks_fire_once_per_layer_per_forward(name, method):
    checks.check_hooks_fire_once_per_layer(FAMILIES[name], method)


@pytest.mark.parametrize("method", ["rapid", "tome"])
@pytest.mark.parametrize("name", ["siglip_vision", "siglip_classifier"])
def test_gradient_checkpointing_keeps_gradients_with_reduction(name, method):
    checks.check_gradient_checkpointing(FAMILIES[name], method)


@pytest.mark.parametrize("name", ALL)
def test_per_call_settings_leave_the_model_settings_alone(name):
    checks.check_per_call_settings(FAMILIES[name])


@pytest.mark.parametrize("method", checks.REDUCING)
def test_sources_partition_the_patches(method):
    checks.check_tracing_partitions_patches(FAMILIES["siglip_vision"], method)


def test_output_attentions_eager_one_map_per_layer():
    checks.check_output_attentions_eager(FAMILIES["siglip_vision"])


@pytest.mark.parametrize("name", ALL)
def test_get_rapid_model_converts_in_place(name):
    checks.check_get_rapid_model_in_place(FAMILIES[name])


@pytest.mark.parametrize("name", ["siglip", "siglip_classifier"])
def test_peft_lora_trains_with_reduction_and_round_trips(name, tmp_path):
    checks.check_peft_lora_trains_and_round_trips(FAMILIES[name], tmp_path)


# ------------------------------------------------------------------------------------------- no CLS token


def test_no_token_is_protected():
    model = FAMILIES["siglip_vision"].rapid()
    assert model.num_protected_tokens == 0 and model.num_input_tokens == 64
    config = FAMILIES["siglip"].rapid().config
    assert config.encoder_config is config.vision_config
    assert (config.mlp_size, config.num_input_tokens, config.num_protected_tokens) == (64, 64, 0)
    with torch.no_grad():  # every method may remove any token, the first one included
        first_removed = [
            not model(**pixels(4), rapid=RapidConfig(method=m, r=16), output_sources=True).sources[:, 0, 0].all()
            for m in checks.REDUCING
        ]
    assert any(first_removed)


@pytest.mark.parametrize("method", ["rapid", "crucial", "topk"])
def test_importance_is_the_attention_each_token_receives_from_every_query(method):
    """Layer 0 of the reduced model equals the layer computed by hand with `attention_importance` over every query
    row (RAPID merges from layer 0 with switch_layer=0)."""
    model = FAMILIES["siglip_vision"].rapid()
    settings = RapidConfig(method=method, r=8, switch_layer=0)
    x = pixels(2)["pixel_values"]
    with torch.no_grad():
        output = model(pixel_values=x, rapid=settings, output_hidden_states=True)
        hidden = model.embeddings(x)
        layer = model.encoder.layers[0]
        probe = LayerReduction()
        attended = layer.attention_residual(hidden, None, reduction=probe)
        scaling = layer.attention_scaling
        importance = attention_importance(probe.query, probe.keys, scaling, None)
        step = layer_steps(settings, 64, 4, 0)[0]
        assert step.needs_importance
        reduced, _, _ = reduce_tokens(step, attended, None, probe.keys, importance, 0)
        expected = layer.mlp_residual(reduced)
        cls_like = attention_importance(probe.query[:, :, :1], probe.keys, scaling, None)
        other, _, _ = reduce_tokens(step, attended, None, probe.keys, cls_like, 0)
    assert torch.equal(output.hidden_states[1], expected)
    assert not torch.equal(layer.mlp_residual(other), expected)  # the importance decides the plan


# ------------------------------------------------------------------------------------------- size-weighted pooling


def test_pooling_head_weighs_a_merged_token_as_its_copies():
    """Proportional attention in the head: a token of size s pools exactly as s copies of it would."""
    head = FAMILIES["siglip_vision"].rapid().head
    tokens = torch.randn(2, 10, 32)
    sizes = torch.tensor([1.0, 3, 1, 2, 1, 1, 5, 1, 1, 1]).expand(2, -1)[..., None]
    copies = tokens.repeat_interleave(sizes[0, :, 0].long(), dim=1)
    with torch.no_grad():
        weighted = head(tokens, sizes)
        expected = head(copies)
        unweighted = head(tokens)
        assert torch.equal(head(tokens, None), torch.nn.Module.__call__(FAMILIES["siglip_vision"].stock().head, tokens))
    assert torch.allclose(weighted, expected, atol=1e-5)
    assert not torch.allclose(unweighted, expected, atol=1e-3)


def test_pooler_output_uses_the_sizes_of_the_merged_tokens():
    model = FAMILIES["siglip_vision"].rapid()
    with torch.no_grad():
        output = model(**pixels(2), rapid=checks.settings_for("tome"))
        expected = model.head(output.last_hidden_state, output.sizes[..., None])
        unweighted = model.head(output.last_hidden_state)
        pruned = model(**pixels(2), rapid=RapidConfig(method="tofu", r=8, switch_layer=4))  # pruning only
    assert output.sizes.max() > 1
    assert torch.equal(output.pooler_output, expected)
    assert not torch.allclose(output.pooler_output, unweighted, atol=1e-4)
    assert pruned.sizes.max() == 1
    assert torch.equal(pruned.pooler_output, model.head(pruned.last_hidden_state))  # sizes all 1: the stock call


def test_classifier_pools_the_size_weighted_mean_of_the_remaining_tokens():
    model = FAMILIES["siglip_classifier"].rapid()
    with torch.no_grad():
        output = model(**pixels(2), rapid=checks.settings_for("tome"), output_hidden_states=True)
        hidden = model.vision_model.post_layernorm(output.hidden_states[-1])
        sizes = output.sizes[..., None]
        expected = model.classifier((hidden * sizes).sum(dim=1) / sizes.sum(dim=1))
    assert output.sizes.max() > 1
    assert torch.allclose(output.logits, expected, atol=1e-6)
    assert not torch.allclose(output.logits, model.classifier(hidden.mean(dim=1)), atol=1e-4)


# ------------------------------------------------------------------------------------------- two towers


def test_text_tower_is_untouched_and_image_embeddings_come_from_the_reduced_tower():
    model = FAMILIES["siglip"].rapid()
    assert all(type(layer) is SiglipEncoderLayer for layer in model.text_model.encoder.layers)
    assert all(type(layer.self_attn) is SiglipAttention for layer in model.text_model.encoder.layers)
    assert type(model.vision_model) is RapidSiglipVisionModel
    inputs = pixels_and_text(2)
    settings = checks.settings_for("rapid")
    with torch.no_grad():
        reduced = model(**inputs, rapid=settings)
        plain = model(**inputs)
        vision = model.vision_model(pixel_values=inputs["pixel_values"], rapid=settings)
        alone = model(pixel_values=inputs["pixel_values"], rapid=settings)
    assert torch.equal(reduced.text_embeds, plain.text_embeds)
    assert reduced.token_counts == (56, 48, 40, 32) == alone.token_counts
    assert torch.equal(reduced.image_embeds, vision.pooler_output / vision.pooler_output.norm(dim=-1, keepdim=True))
    assert torch.equal(alone.image_embeds, reduced.image_embeds) and alone.logits_per_image is None
    assert not torch.allclose(reduced.image_embeds, plain.image_embeds)
    with pytest.raises(ValueError, match="return_loss needs input_ids"):
        model(pixel_values=inputs["pixel_values"], return_loss=True)


def test_get_rapid_model_on_siglip_leaves_the_text_tower_alone():
    model = get_rapid_model(FAMILIES["siglip"].stock(), RapidConfig(method="tome", r=4))
    assert isinstance(model.config, RapidSiglipConfig) and model.rapid == RapidConfig(method="tome", r=4)
    assert all(type(layer) is SiglipEncoderLayer for layer in model.text_model.encoder.layers)
    with torch.no_grad():
        assert model(**pixels_and_text(2)).token_counts == (60, 56, 52, 48)


def test_zero_shot_pipeline_uses_the_sigmoid_with_reduction_on():
    model = FAMILIES["siglip"].rapid(rapid=RapidConfig(method="rapid", r=8, switch_layer=2))
    tokenizer = tiny_tokenizer()
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    seen: list[int] = []
    model.vision_model.encoder.layers[-1].register_forward_hook(lambda m, args, out: seen.append(out.shape[1]))
    classifier = pipeline("zero-shot-image-classification", model=model, tokenizer=tokenizer, image_processor=processor)
    generator = torch.Generator().manual_seed(3)
    images = [Image.fromarray((torch.rand(40, 48, 3, generator=generator) * 255).to(torch.uint8).numpy())]
    labels = ["cat", "dog", "car"]
    result = classifier(images, candidate_labels=labels)[0]
    assert seen == [32]
    prompts = tokenizer(
        [f"This is a photo of {label}." for label in labels], padding="max_length", max_length=64, return_tensors="pt"
    )  # what the pipeline does for SigLIP ("siglip" in model_type)
    with torch.no_grad():
        output = model(**prompts, **processor(images=images, return_tensors="pt"))
    expected = {label: p.item() for label, p in zip(labels, output.logits_per_image[0].sigmoid(), strict=True)}
    assert {entry["label"]: entry["score"] for entry in result} == pytest.approx(expected, abs=1e-6)


# ------------------------------------------------------------------------------------------- configs, loaders


def test_a_siglip_checkpoint_configures_the_vision_classes(tmp_path):
    SiglipModel(siglip_config()).save_pretrained(tmp_path)
    config = RapidSiglipVisionConfig.from_pretrained(tmp_path)
    assert config.model_type == "rapid_siglip_vision_model" and config.hidden_size == 32
    assert isinstance(RapidSiglipConfig.from_pretrained(tmp_path).vision_config, SiglipVisionConfig)
    assert type(RapidSiglipVisionModel.from_pretrained(tmp_path)) is RapidSiglipVisionModel


def test_bad_settings_are_refused_at_construction_and_assignment():
    with pytest.raises(ValueError, match="expected a list of 4 ints"):
        RapidSiglipModel(siglip_config(), rapid={"method": "tome", "r": [1, 2]})
    model = FAMILIES["siglip"].rapid()
    with pytest.raises(ValueError, match="expected a list of 4 ints"):
        model.config.rapid = {"method": "tome", "r": [1, 2, 3]}
    assert model.rapid == RapidConfig()
    with pytest.raises(ValueError, match="take no bool_masked_pos"):
        model.vision_model(**pixels(1), bool_masked_pos=torch.zeros(1, 64, dtype=torch.bool))


def test_wrong_size_is_refused_and_interpolation_works():
    model = FAMILIES["siglip_vision"].rapid()
    with pytest.raises(ValueError, match="do not match the model's 32x32 px"):
        model(pixel_values=torch.randn(1, 3, 48, 48))
    with torch.no_grad():
        output = model(
            pixel_values=torch.randn(1, 3, 48, 48), interpolate_pos_encoding=True, rapid={"method": "tome", "r": 8}
        )
    assert output.token_counts[0] == 144 - 8


@pytest.mark.parametrize(
    "config, expected",
    [
        (siglip_config(), RapidSiglipModel),
        (siglip_config(architectures=["SiglipForImageClassification"]), RapidSiglipForImageClassification),
        (SiglipVisionConfig(**VISION), RapidSiglipVisionModel),
        (RapidSiglipConfig(vision_config=VISION, architectures=["RapidSiglipModel"]), RapidSiglipModel),
    ],
)
def test_rapid_class_for_config_picks_the_loader(config, expected):
    assert rapid_class_for_config(config) is expected


def test_the_family_is_exported_lazily_and_declared_once():
    assert rapid_hf.RapidSiglipModel is modeling_rapid_siglip.RapidSiglipModel
    assert rapid_hf.RapidSiglipOutput is modeling_rapid_siglip.RapidSiglipOutput
    assert {"RapidSiglipVisionModel", "RapidSiglipConfig"} <= set(dir(rapid_hf))
    assert modeling_rapid_siglip.FAMILY.public_names == (
        "RapidSiglipVisionConfig", "RapidSiglipConfig", "RapidSiglipVisionModel", "RapidSiglipModel",
        "RapidSiglipForImageClassification", "RapidSiglipOutput",
    )


REMOTE_SCRIPT = r'''
import torch
from transformers import AutoModel, AutoModelForImageClassification

for case in spec["cases"]:
    loader = AutoModelForImageClassification if case["auto"] == "classifier" else AutoModel
    model, info = loader.from_pretrained(case["folder"], trust_remote_code=True, output_loading_info=True)
    expected = torch.load(case["expected"])
    with torch.no_grad():
        output = model.eval()(**expected["inputs"])
    report[case["name"]] = {
        "class": type(model).__module__ + "." + type(model).__name__,
        "missing": sorted(info["missing_keys"]) + sorted(info["unexpected_keys"]),
        "rapid": model.config.rapid,
        "max_diff": (output[expected["key"]] - expected["value"]).abs().max().item(),
        "token_counts": list(output.token_counts),
    }
json.dump(report, open(spec["report"], "w"))
'''


def test_remote_code_loads_the_family_without_rapid_hf(tmp_path):
    cases = []
    inputs = pixels_and_text(2)
    for name, key, auto, model_inputs in (
        ("siglip", "logits_per_image", "model", inputs),
        ("siglip_classifier", "logits", "classifier", pixels(2)),
    ):
        model = FAMILIES[name].rapid(rapid=RapidConfig(method="rapid", r=8, switch_layer=2))
        folder = tmp_path / name
        model.save_pretrained(folder)
        files = write_remote_code(folder, modules_for(type(model)))
        assert "modeling_rapid_siglip.py" in files and "configuration_rapid.py" in files
        config = json.loads((folder / "config.json").read_text())
        config["auto_map"] = auto_map(type(model), type(model.config))
        (folder / "config.json").write_text(json.dumps(config))
        with torch.no_grad():
            output = model(**model_inputs)
        torch.save({"inputs": model_inputs, "key": key, "value": output[key]}, tmp_path / f"{name}.pt")
        cases.append({"name": name, "folder": str(folder), "expected": str(tmp_path / f"{name}.pt"), "auto": auto,
                      "class": type(model).__name__, "rapid": model.config.rapid,
                      "token_counts": list(output.token_counts)})
    report = run_as_remote_user(tmp_path, REMOTE_SCRIPT, cases)
    assert report["rapid_hf_importable"] is False
    for case in cases:
        result = report[case["name"]]
        assert result["class"].startswith("transformers_modules.") and result["class"].endswith(case["class"])
        assert result["missing"] == [] and result["rapid"] == case["rapid"]
        assert result["token_counts"] == case["token_counts"] == [56, 48, 40, 32]
        assert result["max_diff"] <= 1e-5
