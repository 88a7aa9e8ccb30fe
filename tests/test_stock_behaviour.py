"""What users attach to or do with a stock transformers model keeps working on a Rapid model: hooks written for the
stock module outputs, configs shared between models, stock forward arguments, saved settings, export errors."""

from __future__ import annotations

import pytest
import torch
from transformers import Dinov2Config, Dinov2ForImageClassification, ViTConfig, ViTForImageClassification

from rapid_hf import RapidConfig, RapidViTModel, get_rapid_model
from rapid_hf.export import export_onnx

TINY = {"image_size": 32, "patch_size": 4, "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2,
        "intermediate_size": 64, "num_labels": 3}


def pixels(batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("settings", [None, RapidConfig(method="rapid", r=8, switch_layer=2)])
def test_hooks_written_for_the_stock_outputs_work_after_conversion(settings):
    """A layer hook that detaches its output tensor and an attention hook that unpacks `(attended, weights)`."""
    model = get_rapid_model(ViTForImageClassification(ViTConfig(**TINY)).eval(), settings)
    detached, unpacked = [], []

    def layer_hook(module, args, output):
        detached.append(output.detach().shape[1])

    def attention_hook(module, args, output):
        attended, _weights = output
        unpacked.append(attended.shape[1])

    for layer in model.vit.layers:
        layer.register_forward_hook(layer_hook)
        layer.attention.register_forward_hook(attention_hook)
    with torch.no_grad():
        out = model(pixel_values=pixels())
    assert detached == list(out.token_counts)
    assert unpacked == [65, *out.token_counts[:-1]]  # each attention sees the tokens entering its layer


def test_converting_one_model_leaves_a_model_sharing_its_config_stock(tmp_path):
    config = ViTConfig(**TINY)
    converted, untouched = ViTForImageClassification(config), ViTForImageClassification(config)
    get_rapid_model(converted, RapidConfig(method="tome", r=4))
    assert type(untouched.config) is ViTConfig and untouched.config is config
    untouched.save_pretrained(tmp_path / "stock")
    reloaded = ViTForImageClassification.from_pretrained(tmp_path / "stock")
    assert reloaded.config.model_type == "vit" and not hasattr(reloaded.config, "rapid")
    assert converted.config.model_type == "rapid_vit" and converted.vit.config is converted.config


def test_dinov2_classifier_takes_interpolate_pos_encoding_as_stock_does():
    config = Dinov2Config(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, num_labels=3)
    stock = Dinov2ForImageClassification(config).eval()
    with torch.no_grad():
        expected = stock(pixel_values=pixels(size=48), interpolate_pos_encoding=True).logits
        model = get_rapid_model(stock)
        got = model(pixel_values=pixels(size=48), interpolate_pos_encoding=True).logits
    assert torch.equal(got, expected)


def test_an_in_place_edit_of_the_saved_settings_is_refused_when_saving(tmp_path):
    model = get_rapid_model(ViTForImageClassification(ViTConfig(**TINY)), RapidConfig(method="tome", r=4))
    model.config.rapid["r"] = -5
    with pytest.raises(ValueError, match=r"RapidConfig\.r=-5 is invalid"):
        model.save_pretrained(tmp_path / "bad")
    assert not (tmp_path / "bad" / "config.json").exists()


def test_exporting_a_backbone_is_refused_before_tracing(tmp_path):
    with pytest.raises(ValueError, match="returns no logits"):
        export_onnx(RapidViTModel(ViTConfig(**TINY)), tmp_path / "backbone.onnx")
    assert not (tmp_path / "backbone.onnx").exists()
