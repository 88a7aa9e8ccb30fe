"""The Rapid classes on the real DeiT-Tiny: drop-in behaviour, token accounting, loading and saving."""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    BertConfig,
    DeiTConfig,
    DeiTForImageClassificationWithTeacher,
    ViTForImageClassification,
    pipeline,
)
from transformers.utils import logging as hf_logging

from rapid_hf import (
    RapidConfig,
    RapidDeiTForImageClassification,
    RapidDeiTForImageClassificationWithTeacher,
    RapidViTForImageClassification,
)
from rapid_hf.reduction.schedule import token_counts

METHODS = ["rapid", "tome", "tofu"]


@pytest.fixture(scope="module")
def model(deit_tiny_path):
    return RapidViTForImageClassification.from_pretrained(deit_tiny_path).eval()


@pytest.fixture(scope="module")
def reference_logits(reference_model, dev_pixel_values):
    with torch.no_grad():
        return reference_model(pixel_values=dev_pixel_values).logits


def run(model, pixel_values, **settings):
    model.set_rapid(RapidConfig(**settings))
    with torch.no_grad():
        return model(pixel_values=pixel_values)


def test_loads_ordinary_checkpoint_without_missing_or_unexpected_keys(deit_tiny_path):
    _, info = RapidViTForImageClassification.from_pretrained(deit_tiny_path, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_no_reduction_is_bit_identical_to_transformers(deit_tiny_path, dev_pixel_values, attention):
    pixel_values = dev_pixel_values[:4]
    reference = ViTForImageClassification.from_pretrained(deit_tiny_path, attn_implementation=attention).eval()
    rapid = RapidViTForImageClassification.from_pretrained(deit_tiny_path, attn_implementation=attention).eval()
    assert rapid.config._attn_implementation == attention
    with torch.no_grad():
        expected = reference(pixel_values=pixel_values).logits
    for settings in [{"method": "none", "r": 16}] + [{"method": m, "r": 0} for m in METHODS]:
        output = run(rapid, pixel_values, **settings)
        assert torch.equal(output.logits, expected), settings
        assert output.token_counts == (197,) * 12


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("r", [8, 16, 40])
def test_token_counts_follow_capped_schedule(model, dev_pixel_values, method, r):
    output = run(model, dev_pixel_values[:1], method=method, r=r)
    assert list(output.token_counts) == token_counts(197, [r] * 12, num_protected=1)
    assert output.sizes.shape == (1, output.token_counts[-1])


@pytest.mark.parametrize("method", METHODS)
def test_sizes_account_for_every_patch(model, dev_pixel_values, method):
    output = run(model, dev_pixel_values[:2], method=method, r=16)
    counts = [197, *output.token_counts]
    switch = model.rapid.resolved_switch_layer(12)
    pruned = 0 if method == "tome" else counts[0] - counts[switch]
    assert torch.all(output.sizes[:, 0] == 1)  # CLS is never merged
    assert torch.all(output.sizes[:, 1:].sum(dim=1) == 196 - pruned)


@pytest.mark.parametrize("method", METHODS)
def test_output_tokens_target(model, dev_pixel_values, method):
    output = run(model, dev_pixel_values[:1], method=method, output_tokens=29)
    assert output.token_counts[-1] == 29


@pytest.mark.parametrize("method", METHODS)
def test_batch_independence(model, dev_pixel_values, method):
    batch = run(model, dev_pixel_values[:4], method=method, r=16).logits
    alone = run(model, dev_pixel_values[2:3], method=method, r=16).logits
    assert torch.allclose(alone[0], batch[2], atol=1e-5, rtol=0)


def test_reduction_changes_logits_but_keeps_most_predictions(model, dev_pixel_values, reference_logits):
    for method in METHODS:
        logits = run(model, dev_pixel_values, method=method, r=8).logits
        assert not torch.equal(logits, reference_logits)
        assert (logits.argmax(-1) == reference_logits.argmax(-1)).float().mean() >= 0.75


def test_set_rapid_switches_in_place(model, dev_pixel_values):
    tome = run(model, dev_pixel_values[:2], method="tome", r=8)
    assert model.rapid == RapidConfig(method="tome", r=8)
    assert model.config.rapid == RapidConfig(method="tome", r=8).to_dict()
    rapid = run(model, dev_pixel_values[:2], method="rapid", r=8)
    assert not torch.equal(tome.logits, rapid.logits)


def test_attention_stays_sdpa_with_cls_row_only_and_size_bias(model, dev_pixel_values, monkeypatch):
    """Every layer calls SDPA once; after the first merge it gets the log-size bias, never an N x N map."""
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(query, key, value, attn_mask=None, **kwargs):
        calls.append(None if attn_mask is None else tuple(attn_mask.shape))
        return original(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    output = run(model, dev_pixel_values[:2], method="rapid", r=16)
    counts = [197, *output.token_counts]
    assert len(calls) == 12
    assert calls[:5] == [None] * 5  # layers 0-3 prune (sizes stay 1); layer 4 attends before its first merge
    assert calls[5:] == [(2, 1, 1, counts[layer]) for layer in range(5, 12)]
    run(model, dev_pixel_values[:2], method="rapid", r=16, prop_attn=False)
    assert calls[12:] == [None] * 12


def test_save_and_reload_round_trip(model, dev_pixel_values, tmp_path):
    expected = run(model, dev_pixel_values[:2], method="tofu", r=(8, 0.5), prop_attn=False)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "rapid_vit" and saved["rapid"]["method"] == "tofu"
    for loader in (RapidViTForImageClassification, AutoModelForImageClassification):
        reloaded = loader.from_pretrained(tmp_path).eval()
        assert isinstance(reloaded, RapidViTForImageClassification)
        assert reloaded.rapid == RapidConfig(method="tofu", r=(8, 0.5), prop_attn=False)
        with torch.no_grad():
            assert torch.equal(reloaded(pixel_values=dev_pixel_values[:2]).logits, expected.logits)


def test_pipeline_works_without_warnings(model, deit_tiny_path, dev_images_path, caplog):
    from PIL import Image

    model.set_rapid(RapidConfig(method="rapid", r=16))
    processor = AutoImageProcessor.from_pretrained(deit_tiny_path)
    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING), warnings.catch_warnings():
            warnings.simplefilter("error")
            classifier = pipeline("image-classification", model=model, image_processor=processor)
            predictions = classifier(Image.open(dev_images_path / "n01440764.jpg"))
    finally:
        hf_logging.disable_propagation()
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert predictions[0]["label"].startswith("tench")


def test_non_vit_checkpoint_is_refused_clearly(tmp_path):
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path
    )
    with pytest.raises(ValueError, match="'bert' checkpoint, not a vit image classifier"):
        RapidViTForImageClassification.from_pretrained(tmp_path)


def _tiny_deit(tmp_path, cls):
    config = DeiTConfig(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=128, image_size=64,
        patch_size=8, num_labels=10,
    )
    torch.manual_seed(0)
    reference = cls(config).eval()
    # Make the distillation token recognisable: a huge embedding that dominates its residual stream.
    with torch.no_grad():
        reference.deit.embeddings.distillation_token.fill_(0.0)
        reference.deit.embeddings.distillation_token[..., 0] = 1000.0
    reference.save_pretrained(tmp_path)
    return reference


@pytest.mark.parametrize("method", METHODS)
def test_deit_distillation_token_survives_every_layer(tmp_path, method):
    reference = _tiny_deit(tmp_path, DeiTForImageClassificationWithTeacher)
    model, info = RapidDeiTForImageClassificationWithTeacher.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(pixel_values=pixel_values).logits, reference(pixel_values).logits)
        model.set_rapid(RapidConfig(method=method, r=12, switch_layer=2))
        output = model(pixel_values=pixel_values, output_hidden_states=True)
    assert list(output.token_counts) == token_counts(66, [12] * 4, num_protected=2)
    for hidden in output.hidden_states:
        assert torch.all(hidden.norm(dim=-1).argmax(dim=1) == 1)  # the distillation token is still at index 1
    assert torch.all(output.sizes[:, :2] == 1)
    assert output.cls_logits.shape == output.distillation_logits.shape == (2, 10)


def test_deit_single_head_class_and_auto_picks_head_by_architecture(tmp_path):
    _tiny_deit(tmp_path / "teacher", DeiTForImageClassificationWithTeacher)
    teacher = AutoModelForImageClassification.from_pretrained(tmp_path / "teacher")
    assert type(teacher) is DeiTForImageClassificationWithTeacher  # rapid_hf does not hijack stock checkpoints
    rapid = RapidDeiTForImageClassificationWithTeacher.from_pretrained(tmp_path / "teacher")
    rapid.set_rapid(RapidConfig(method="tome", r=4))
    rapid.save_pretrained(tmp_path / "rapid_teacher")
    assert type(AutoModelForImageClassification.from_pretrained(tmp_path / "rapid_teacher")) is (
        RapidDeiTForImageClassificationWithTeacher
    )
    single = RapidDeiTForImageClassification(rapid.config)
    single.config.architectures = None
    single.save_pretrained(tmp_path / "rapid_single")
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "rapid_single")
    assert type(reloaded) is RapidDeiTForImageClassification
    assert reloaded.rapid == RapidConfig(method="tome", r=4)
    with torch.no_grad():
        assert reloaded.eval()(pixel_values=torch.randn(1, 3, 64, 64)).token_counts == (62, 58, 54, 50)
