"""CLIP through the shared adapter: `RapidCLIPVisionModel`, `RapidCLIPVisionModelWithProjection` and
`RapidCLIPModel` against the stock transformers classes (small random-weight models; no real CLIP weights can be
had offline), the untouched text tower, the zero-shot pipeline with reduction on, and zero-shot evaluation."""

from __future__ import annotations

import family_checks as checks
import pytest
import torch
from PIL import Image
from tokenizers import pre_tokenizers
from transformers import (
    AutoModel,
    AutoModelForZeroShotImageClassification,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    pipeline,
)
from transformers.models.clip.modeling_clip import CLIPAttention, CLIPEncoderLayer

from rapid_hf import (
    RapidCLIPConfig,
    RapidCLIPModel,
    RapidCLIPVisionConfig,
    RapidCLIPVisionModel,
    RapidCLIPVisionModelWithProjection,
    RapidConfig,
    get_rapid_model,
    rapid_class_for_config,
)
from rapid_hf.evaluation.accuracy import predict
from rapid_hf.evaluation.data import DataSpec, load_rows, make_dataloader
from rapid_hf.evaluation.variants import REFERENCE, Variant
from rapid_hf.evaluation.zero_shot import ZeroShotClassifier, class_names_from_id2label
from rapid_hf.models import modeling_rapid_clip

VISION = {
    "hidden_size": 48,
    "num_hidden_layers": 4,
    "num_attention_heads": 3,
    "intermediate_size": 96,
    "image_size": 64,
    "patch_size": 8,
    "projection_dim": 24,
}
TEXT = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "vocab_size": 514,
    "max_position_embeddings": 96,
    "projection_dim": 24,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 1,
}


def clip_config() -> CLIPConfig:
    return CLIPConfig(vision_config=VISION, text_config=TEXT, projection_dim=24)


def tiny_tokenizer() -> CLIPTokenizer:
    """A real CLIP tokenizer with a byte-level vocabulary and no merges (one token per byte): 514 tokens."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


def image_processor() -> CLIPImageProcessor:
    return CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})


def pixels(batch: int, seed: int = 1) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))}


def pixels_and_text(batch: int) -> dict[str, torch.Tensor]:
    tokens = tiny_tokenizer()(["a photo of a cat.", "a dog", "two birds on a wire"], padding=True, return_tensors="pt")
    return {**pixels(batch), "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}


FAMILIES = {
    "clip_vision": checks.Family(
        name="clip_vision",
        stock_class=CLIPVisionModel,
        rapid_class=RapidCLIPVisionModel,
        make_config=lambda: CLIPVisionConfig(**VISION),
        auto_class=AutoModel,
        inputs=pixels,
        compared=("last_hidden_state", "pooler_output", "hidden_states"),
        backbone=lambda model: model,
        layers=lambda model: model.encoder.layers,
    ),
    "clip_vision_projection": checks.Family(
        name="clip_vision_projection",
        stock_class=CLIPVisionModelWithProjection,
        rapid_class=RapidCLIPVisionModelWithProjection,
        make_config=lambda: CLIPVisionConfig(**VISION),
        auto_class=None,  # transformers has no Auto class for CLIPVisionModelWithProjection either
        inputs=pixels,
        compared=("image_embeds", "last_hidden_state", "hidden_states"),
        backbone=lambda model: model.vision_model,
        layers=lambda model: model.vision_model.encoder.layers,
        loss=lambda output: output.image_embeds.pow(2).mean(),
    ),
    "clip": checks.Family(
        name="clip",
        stock_class=CLIPModel,
        rapid_class=RapidCLIPModel,
        make_config=clip_config,
        auto_class=AutoModelForZeroShotImageClassification,
        inputs=pixels_and_text,
        compared=("logits_per_image", "logits_per_text", "image_embeds", "text_embeds"),
        backbone=lambda model: model.vision_model,
        layers=lambda model: model.vision_model.encoder.layers,
        reduced=lambda output: output.vision_model_output,
        loss=lambda output: output.logits_per_image.pow(2).mean(),
    ),
}
ALL = list(FAMILIES)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ALL)
def test_no_reduction_is_bit_identical_to_the_stock_class(name, attention):
    checks.check_no_reduction_equals_stock(FAMILIES[name], attention)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_layers_and_attention_mirror_the_stock_modules(attention):
    """Fails if transformers changes `CLIPEncoderLayer.forward` / `CLIPAttention.forward` (mirrored from 5.24)."""
    checks.check_layers_mirror_stock(FAMILIES["clip_vision"], modeling_rapid_clip.MODULE_CLASSES, attention)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_vision_tower_and_image_features_mirror_the_stock_model_at_every_output(attention):
    """`CLIPVisionModel.forward`, `CLIPModel.get_image_features` and `get_text_features` (mirrored from 5.24)."""
    stock, model = FAMILIES["clip"].stock(attention), FAMILIES["clip"].rapid(attention)
    inputs = pixels_and_text(2)
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
        text = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        checks.outputs_equal(
            stock.get_text_features(**text), model.get_text_features(**text), ("last_hidden_state", "pooler_output")
        )


@pytest.mark.parametrize("name", ALL)
def test_hub_format_checkpoint_loads_without_missing_or_unexpected_keys(name, tmp_path):
    checks.check_hub_checkpoint_loads(FAMILIES[name], tmp_path)


@pytest.mark.parametrize("name", ALL)
def test_save_reload_and_auto_classes_keep_the_settings(name, tmp_path):
    checks.check_save_reload_keeps_settings(FAMILIES[name], tmp_path)


def test_clip_model_reloads_through_automodel(tmp_path):
    model = FAMILIES["clip"].rapid(rapid=RapidConfig(method="tome", r=4))
    model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path)
    assert type(reloaded) is RapidCLIPModel and reloaded.rapid == RapidConfig(method="tome", r=4)


@pytest.mark.parametrize("method", checks.REDUCING)
@pytest.mark.parametrize("name", ALL)
def test_hooks_fire_once_per_layer_per_forward(name, method):
    checks.check_hooks_fire_once_per_layer(FAMILIES[name], method)


@pytest.mark.parametrize("method", ["rapid", "tome"])
@pytest.mark.parametrize("name", ["clip_vision_projection", "clip"])
def test_gradient_checkpointing_keeps_gradients_with_reduction(name, method):
    checks.check_gradient_checkpointing(FAMILIES[name], method)


@pytest.mark.parametrize("name", ALL)
def test_per_call_settings_leave_the_model_settings_alone(name):
    checks.check_per_call_settings(FAMILIES[name])


@pytest.mark.parametrize("method", checks.REDUCING)
@pytest.mark.parametrize("name", ["clip_vision", "clip"])
def test_sources_partition_the_patches(name, method):
    checks.check_tracing_partitions_patches(FAMILIES[name], method)


@pytest.mark.parametrize("name", ["clip_vision", "clip"])
def test_output_attentions_eager_one_map_per_layer(name):
    checks.check_output_attentions_eager(FAMILIES[name])


@pytest.mark.parametrize("name", ALL)
def test_get_rapid_model_converts_in_place(name):
    checks.check_get_rapid_model_in_place(FAMILIES[name])


# ------------------------------------------------------------------------------------------- text tower


def test_text_tower_is_untouched_and_image_embeddings_come_from_the_reduced_tower():
    stock, model = FAMILIES["clip"].stock(), FAMILIES["clip"].rapid()
    for module in model.text_model.modules():
        assert type(module) in (type(m) for m in stock.text_model.modules())  # stock classes only
    assert all(type(layer) is CLIPEncoderLayer for layer in model.text_model.encoder.layers)
    assert all(type(layer.self_attn) is CLIPAttention for layer in model.text_model.encoder.layers)
    inputs = pixels_and_text(2)
    with torch.no_grad():
        reduced = model(**inputs, rapid=checks.settings_for("rapid"))
        plain = model(**inputs)
        vision = model.vision_model(pixel_values=inputs["pixel_values"], rapid=checks.settings_for("rapid"))
    assert torch.equal(reduced.text_embeds, plain.text_embeds)  # text untouched
    assert reduced.token_counts == (57, 49, 41, 33) and reduced.vision_model_output.token_counts == (57, 49, 41, 33)
    projected = model.visual_projection(vision.pooler_output)
    assert torch.equal(reduced.image_embeds, projected / projected.norm(dim=-1, keepdim=True))
    assert not torch.allclose(reduced.image_embeds, plain.image_embeds)


def test_projection_head_shares_its_config_with_the_tower():
    model = FAMILIES["clip_vision_projection"].rapid()
    assert model.vision_model.config is model.config
    model.set_rapid(RapidConfig(method="tome", r=4))
    with torch.no_grad():
        assert model.vision_model(**pixels(1)).token_counts == (61, 57, 53, 49)


def test_masked_positions_are_refused():
    model = FAMILIES["clip_vision"].rapid()
    with pytest.raises(ValueError, match="take no bool_masked_pos"):
        model(**pixels(1), bool_masked_pos=torch.zeros(1, 64, dtype=torch.bool))


def test_wrong_size_is_refused_and_interpolation_works():
    model = FAMILIES["clip_vision"].rapid()
    with pytest.raises(ValueError, match="do not match the model's 64x64 px"):
        model(pixel_values=torch.randn(1, 3, 96, 96))
    with torch.no_grad():
        output = model(
            pixel_values=torch.randn(1, 3, 96, 96), interpolate_pos_encoding=True, rapid={"method": "tome", "r": 8}
        )
    assert output.token_counts[0] == 1 + 144 - 8


# ------------------------------------------------------------------------------------------- zero-shot


def photos(count: int) -> list[Image.Image]:
    generator = torch.Generator().manual_seed(3)
    return [
        Image.fromarray((torch.rand(80, 96, 3, generator=generator) * 255).to(torch.uint8).numpy())
        for _ in range(count)
    ]


def test_zero_shot_pipeline_works_with_reduction_on():
    model = FAMILIES["clip"].rapid(rapid=RapidConfig(method="rapid", r=8, switch_layer=2))
    tokenizer, processor = tiny_tokenizer(), image_processor()
    seen: list[int] = []
    model.vision_model.encoder.layers[-1].register_forward_hook(lambda m, args, out: seen.append(out.shape[1]))
    classifier = pipeline("zero-shot-image-classification", model=model, tokenizer=tokenizer, image_processor=processor)
    labels = ["cat", "dog", "car"]
    images = photos(2)
    results = classifier(images, candidate_labels=labels)
    assert seen == [33, 33]  # the reduced tower ran for each image
    prompts = tokenizer([f"This is a photo of {label}." for label in labels], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**prompts, pixel_values=processor(images=images, return_tensors="pt")["pixel_values"])
    expected = logits.logits_per_image.softmax(dim=-1)
    for result, probabilities in zip(results, expected, strict=True):
        scores = {entry["label"]: entry["score"] for entry in result}
        expected_scores = {label: p.item() for label, p in zip(labels, probabilities, strict=True)}
        assert scores == pytest.approx(expected_scores, abs=1e-5)


def test_zero_shot_classifier_matches_the_model_logits_and_runs_in_the_harness(tmp_path):
    model = FAMILIES["clip"].rapid()
    tokenizer, processor = tiny_tokenizer(), image_processor()
    names = ["cat", "dog", "car", "tree"]
    classifier = ZeroShotClassifier(model, tokenizer, names)
    assert classifier.config.num_labels == 4
    images = photos(3)
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    prompts = tokenizer([f"a photo of a {name}." for name in names], padding=True, return_tensors="pt")
    for settings in (None, checks.settings_for("tome")):
        with torch.no_grad():
            expected = model(**prompts, pixel_values=pixel_values, rapid=settings).logits_per_image
            got = classifier(pixel_values, rapid=settings)
        assert torch.allclose(got.logits, expected, atol=1e-5)
        assert got.token_counts == model(**prompts, pixel_values=pixel_values, rapid=settings).token_counts

    folder = tmp_path / "images"
    folder.mkdir()
    rows = ["file_name,label"]
    for index, image in enumerate(photos(6)):
        image.save(folder / f"{index}.png")
        rows.append(f"{index}.png,{index % 4}")
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n")
    dataloader = make_dataloader(load_rows(DataSpec(data_dir=str(folder))), processor, batch_size=4, num_workers=0)
    variant = Variant("tome", RapidConfig(method="tome", r=8))
    result = predict(classifier, dataloader, [Variant("none", REFERENCE), variant])
    assert result.labels.tolist() == [0, 1, 2, 3, 0, 1]
    assert result.token_counts[1] == (57, 49, 41, 33) and result.ranks.shape == (6, 3, 4)


def test_zero_shot_smoke_on_dev_photos_with_imagenet_class_names(deit_tiny_path, dev_images_path):
    import json

    id2label = json.loads((deit_tiny_path / "config.json").read_text())["id2label"]
    names = class_names_from_id2label(id2label)
    assert len(names) == 1000 and names[0] == "tench"
    classifier = ZeroShotClassifier(FAMILIES["clip"].rapid(), tiny_tokenizer(), names)
    spec = DataSpec(data_dir=str(dev_images_path), max_samples=4)
    dataloader = make_dataloader(load_rows(spec), image_processor(), batch_size=4, num_workers=0)
    result = predict(classifier, dataloader, [Variant("rapid", RapidConfig(method="rapid", r=8, switch_layer=2))])
    assert result.ranks.shape == (4, 2, 5) and result.token_counts[0][-1] == 33


def test_zero_shot_inputs_are_checked():
    model = FAMILIES["clip"].rapid()
    with pytest.raises(ValueError, match="needs a RapidCLIPModel"):
        ZeroShotClassifier(FAMILIES["clip"].stock(), tiny_tokenizer(), ["a", "b"])
    with pytest.raises(ValueError, match="at least 2 non-empty strings"):
        ZeroShotClassifier(model, tiny_tokenizer(), ["only"])
    with pytest.raises(ValueError, match="must contain"):
        ZeroShotClassifier(model, tiny_tokenizer(), ["a", "b"], templates=["no slot"])
    with pytest.raises(ValueError, match=r"keys must be 0\.\.1"):
        class_names_from_id2label({"0": "a", "2": "b"})


# ------------------------------------------------------------------------------------------- configs


def test_a_clip_checkpoint_configures_the_vision_classes(tmp_path):
    CLIPModel(clip_config()).save_pretrained(tmp_path)
    config = RapidCLIPVisionConfig.from_pretrained(tmp_path)
    assert config.model_type == "rapid_clip_vision_model" and config.hidden_size == 48
    assert isinstance(RapidCLIPConfig.from_pretrained(tmp_path).vision_config, CLIPVisionConfig)


def test_bad_settings_are_refused_at_construction_and_assignment():
    with pytest.raises(ValueError, match="expected a list of 4 ints"):
        RapidCLIPModel(clip_config(), rapid={"method": "tome", "r": [1, 2]})
    model = FAMILIES["clip"].rapid()
    with pytest.raises(ValueError, match="expected a list of 4 ints"):
        model.config.rapid = {"method": "tome", "r": [1, 2, 3]}
    assert model.rapid == RapidConfig()


@pytest.mark.parametrize(
    "config, expected",
    [
        (clip_config(), RapidCLIPModel),
        (CLIPVisionConfig(**VISION), RapidCLIPVisionModel),
        (
            CLIPVisionConfig(**VISION, architectures=["CLIPVisionModelWithProjection"]),
            RapidCLIPVisionModelWithProjection,
        ),
        (RapidCLIPConfig(vision_config=VISION, architectures=["RapidCLIPModel"]), RapidCLIPModel),
    ],
)
def test_rapid_class_for_config_picks_the_loader(config, expected):
    assert rapid_class_for_config(config) is expected


def test_get_rapid_model_on_clip_leaves_the_text_tower_alone():
    model = get_rapid_model(FAMILIES["clip"].stock(), RapidConfig(method="tome", r=4))
    assert isinstance(model.config, RapidCLIPConfig) and model.rapid == RapidConfig(method="tome", r=4)
    assert all(type(layer) is CLIPEncoderLayer for layer in model.text_model.encoder.layers)


def test_images_alone_give_the_image_embeddings_for_benchmarks():
    model = FAMILIES["clip"].rapid(rapid=checks.settings_for("tome"))
    with torch.no_grad():
        alone = model(**pixels(2))
        with_text = model(**pixels_and_text(2))
    assert torch.equal(alone.image_embeds, with_text.image_embeds)
    assert alone.logits_per_image is None and alone.text_embeds is None
    assert alone.token_counts == with_text.token_counts == (57, 49, 41, 33)
    with pytest.raises(ValueError, match="return_loss needs input_ids"):
        model(**pixels(2), return_loss=True)


def test_encoder_geometry_for_the_harness():
    config = FAMILIES["clip"].rapid().config
    assert config.encoder_config is config.vision_config
    assert (config.mlp_size, config.num_input_tokens, config.num_protected_tokens) == (96, 65, 1)
    vision = RapidCLIPVisionConfig(**VISION)
    assert vision.encoder_config is vision and vision.mlp_size == 96


@pytest.mark.parametrize("name", ["clip_vision_projection", "clip"])
def test_peft_lora_trains_with_reduction_and_round_trips(name, tmp_path):
    checks.check_peft_lora_trains_and_round_trips(FAMILIES[name], tmp_path)
