"""The family adapters mirror the stock transformers forwards: with no reduction, each Rapid layer and attention
module computes exactly what the stock module computes. If a transformers release changes a stock forward these
tests fail, and the mirrored code (marked with the version it mirrors) must follow."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DeiTConfig, ViTConfig
from transformers.models.deit.modeling_deit import DeiTLayer
from transformers.models.vit.modeling_vit import ViTLayer

from rapid_hf.models import modeling_rapid
from rapid_hf.models.layers import LayerReduction, swap_module_classes

FAMILIES = [
    pytest.param(ViTLayer, ViTConfig, modeling_rapid.MODULE_CLASSES, id="vit"),
    pytest.param(DeiTLayer, DeiTConfig, modeling_rapid.MODULE_CLASSES, id="deit"),
]


def stock_and_rapid(layer_class, config_class, module_classes, attention: str):
    torch.manual_seed(0)
    config = config_class(hidden_size=48, num_attention_heads=3, intermediate_size=96, qkv_bias=True)
    config._attn_implementation = attention
    stock = layer_class(config).eval()
    rapid = copy.deepcopy(stock)
    swap_module_classes(rapid, module_classes)
    assert type(rapid) is not type(stock) and isinstance(rapid, layer_class)
    return stock, rapid


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("layer_class, config_class, module_classes", FAMILIES)
def test_layer_without_reduction_equals_the_stock_layer(layer_class, config_class, module_classes, attention):
    stock, rapid = stock_and_rapid(layer_class, config_class, module_classes, attention)
    hidden = torch.randn(2, 17, 48)
    reduction = LayerReduction(num_protected=1)
    with torch.no_grad():
        expected = stock(hidden)
        plain, with_state = rapid(hidden), rapid(hidden, reduction=reduction)
    assert type(plain) is type(expected) and torch.equal(plain, expected) and torch.equal(with_state, expected)
    assert reduction.plan is None and reduction.sizes_out is None


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("layer_class, config_class, module_classes", FAMILIES)
def test_attention_returns_the_stock_pair_and_records_keys_and_query(
    layer_class, config_class, module_classes, attention
):
    stock, rapid = stock_and_rapid(layer_class, config_class, module_classes, attention)
    hidden = torch.randn(2, 17, 48)
    bias = torch.randn(2, 1, 1, 17)
    reduction = LayerReduction()
    with torch.no_grad():
        expected_output, expected_weights = stock.attention(hidden, bias)
        output, weights = rapid.attention(hidden, bias, reduction=reduction)
        expected_keys = stock.attention.k_proj(hidden).view(2, 17, 3, 16).transpose(1, 2)
        expected_query = stock.attention.q_proj(hidden).view(2, 17, 3, 16).transpose(1, 2)
    assert torch.equal(output, expected_output)
    assert (weights is None) == (expected_weights is None)
    if weights is not None:
        assert torch.equal(weights, expected_weights)
    assert torch.equal(reduction.keys, expected_keys) and torch.equal(reduction.query, expected_query)
