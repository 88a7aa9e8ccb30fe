"""Checks every model family must pass, written once and run by each family's test file (`test_dinov2.py`,
`test_clip.py`) on small random-weight models: what `test_models.py`, `test_integration.py`, `test_tracing.py` and
`test_adapters.py` check for ViT/DeiT.

A `Family` says how to build the stock and Rapid model, what to feed them and which output fields to compare.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from rapid_hf import RapidConfig, get_rapid_model
from rapid_hf.models.layers import LayerReduction, swap_module_classes
from rapid_hf.reduction.config import METHODS

REDUCING = [m for m in METHODS if m != "none"]


def settings_for(method: str) -> RapidConfig:
    """Reduction settings that remove tokens in every layer of a 4-layer, 64-patch model."""
    return RapidConfig(method=method, r=8, switch_layer=2)


@dataclass
class Family:
    """One Rapid class and its stock class, with a small config and how to run and read them."""

    name: str
    stock_class: type[nn.Module]
    rapid_class: type[nn.Module]
    make_config: Callable[[], Any]
    auto_class: Any
    inputs: Callable[[int], dict[str, Tensor]]
    compared: tuple[str, ...]
    backbone: Callable[[nn.Module], nn.Module]
    layers: Callable[[nn.Module], nn.ModuleList]
    num_protected: int = 1
    num_patches: int = 64
    reduced: Callable[[Any], Any] = field(default=lambda output: output)
    loss: Callable[[Any], Tensor] = field(default=lambda output: output.last_hidden_state.pow(2).mean())

    @property
    def num_tokens(self) -> int:
        return self.num_patches + self.num_protected

    def stock(self, attention: str = "sdpa") -> nn.Module:
        torch.manual_seed(0)
        config = self.make_config()
        config._attn_implementation = attention
        model = self.stock_class(config).eval()
        model.set_attn_implementation(attention)
        # Random, non-trivial values where the stock init puts constants (layer scale, biases): the checks
        # must see every weight take part.
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lambda1" in name or name.endswith("bias"):
                    parameter.copy_(torch.randn_like(parameter) * 0.1 + (1.0 if "lambda1" in name else 0.0))
        return model

    def rapid(self, attention: str = "sdpa", rapid: RapidConfig | None = None) -> nn.Module:
        stock = self.stock(attention)
        model = self.rapid_class(stock.config, rapid=rapid).eval()
        model.set_attn_implementation(attention)
        assert model.config._attn_implementation == attention
        missing, unexpected = model.load_state_dict(stock.state_dict(), strict=True)
        assert not missing and not unexpected
        return model


def outputs_equal(expected: Any, got: Any, fields: tuple[str, ...]) -> None:
    for name in fields:
        a, b = getattr(expected, name), getattr(got, name)
        assert (a is None) == (b is None), name
        if a is None:
            continue
        if isinstance(a, tuple):
            assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), name
        else:
            assert torch.equal(a, b), name


def check_no_reduction_equals_stock(family: Family, attention: str) -> None:
    stock, model = family.stock(attention), family.rapid(attention)
    inputs = family.inputs(2)
    with torch.no_grad():
        expected = stock(**inputs, output_hidden_states=True)
        for settings in (None, RapidConfig(method="none", r=8), *(RapidConfig(method=m, r=0) for m in REDUCING)):
            got = model(**inputs, rapid=settings, output_hidden_states=True)
            outputs_equal(expected, got, family.compared)
            assert family.reduced(got).token_counts == (family.num_tokens,) * len(family.layers(model))


def check_hub_checkpoint_loads(family: Family, tmp_path) -> None:
    stock = family.stock()
    stock.save_pretrained(tmp_path)
    model, info = family.rapid_class.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    assert type(model) is family.rapid_class and model.rapid == RapidConfig()
    inputs = family.inputs(2)
    with torch.no_grad():
        expected = stock(**inputs, output_hidden_states=True)
        outputs_equal(expected, model.eval()(**inputs, output_hidden_states=True), family.compared)


def check_save_reload_keeps_settings(family: Family, tmp_path) -> None:
    settings = RapidConfig(method="rapid", r=4, switch_layer=2)
    model = family.rapid(rapid=settings)
    assert model.config.model_type.startswith("rapid_") and model.rapid == settings
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert RapidConfig.from_dict(saved["rapid"]) == settings
    for loader in (family.rapid_class,) + ((family.auto_class,) if family.auto_class is not None else ()):
        reloaded = loader.from_pretrained(tmp_path).eval()
        assert type(reloaded) is family.rapid_class and reloaded.rapid == settings
        inputs = family.inputs(2)
        with torch.no_grad():
            outputs_equal(model(**inputs), reloaded(**inputs), family.compared)
    assert family.rapid_class.from_pretrained(tmp_path, rapid={"method": "tome", "r": 2}).rapid.method == "tome"


def check_hooks_fire_once_per_layer(family: Family, method: str) -> None:
    model = family.rapid()
    calls: dict[str, list[int]] = {}

    def record(name):
        def hook(module, args, *rest):
            calls.setdefault(name, []).append(args[0].shape[1])

        return hook

    layers = family.layers(model)
    for index, layer in enumerate(layers):
        layer.register_forward_pre_hook(record(f"layer{index}.pre"))
        layer.register_forward_hook(record(f"layer{index}"))
        attention = getattr(layer, layer.attention_module_name)
        attention.register_forward_pre_hook(record(f"attention{index}.pre"))
        attention.register_forward_hook(record(f"attention{index}"))
    with torch.no_grad():
        output = family.reduced(model(**family.inputs(2), rapid=settings_for(method)))
    entering = [family.num_tokens, *output.token_counts[:-1]]
    assert output.token_counts[-1] < family.num_tokens
    for index in range(len(layers)):
        for name in (f"layer{index}.pre", f"layer{index}", f"attention{index}.pre", f"attention{index}"):
            assert calls[name] == [entering[index]], name


def gradients(
    model: nn.Module, inputs: dict[str, Tensor], loss: Callable[[Any], Tensor]
) -> tuple[int, dict[str, Tensor]]:
    """Bytes of the distinct tensors autograd saves for backward in one training forward; and the gradients."""
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        value = loss(model(**inputs))
    value.backward()
    return sum(storages.values()), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def check_gradient_checkpointing(family: Family, method: str) -> None:
    model = family.rapid(rapid=settings_for(method)).train()
    inputs = family.inputs(4)
    plain_bytes, plain = gradients(model, inputs, family.loss)
    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing
    assert all(layer.gradient_checkpointing for layer in family.layers(model))
    checkpointed_bytes, checkpointed = gradients(model, inputs, family.loss)
    assert checkpointed_bytes < 0.6 * plain_bytes  # each reduced layer keeps only its input
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    for name, gradient in plain.items():
        assert torch.allclose(gradient, checkpointed[name], atol=1e-5, rtol=0), name


def check_per_call_settings(family: Family) -> None:
    model = family.rapid()
    own = RapidConfig(method="tofu", r=4, switch_layer=1)
    model.set_rapid(own)
    inputs = family.inputs(2)
    n = family.num_tokens
    with torch.no_grad():
        per_call = family.reduced(model(**inputs, rapid=RapidConfig(method="crucial", r=8)))
        assert per_call.token_counts == (n - 8, n - 16, n - 24, n - 32)
        assert model.rapid == own and model.config.rapid == own.to_dict()
        assert family.reduced(model(**inputs)).token_counts == (n - 4, n - 8, n - 12, n - 16)
        assert family.reduced(model(**inputs, rapid={"method": "tome", "r": 2})).token_counts == (
            n - 2, n - 4, n - 6, n - 8,
        )


def check_tracing_partitions_patches(family: Family, method: str) -> None:
    model = family.rapid()
    inputs = family.inputs(2)
    with torch.no_grad():
        plain = model(**inputs, rapid=settings_for(method))
        traced = model(**inputs, rapid=settings_for(method), output_sources=True, output_dense=True)
    outputs_equal(plain, traced, tuple(f for f in family.compared if f != "hidden_states"))
    output = family.reduced(traced)
    k = family.num_protected
    sources, sizes = output.sources, output.sizes
    assert sources.shape == (2, output.token_counts[-1], family.num_patches)
    assert sources.sum(dim=1).max() <= 1  # no patch in two tokens
    assert not sources[:, :k].any()  # protected tokens stand for no patch
    assert torch.equal(sizes[:, :k], torch.ones(2, k))  # and received no merge
    assert torch.equal(sources[:, k:].sum(dim=-1).float(), sizes[:, k:])
    kept = sources.any(dim=1)
    assert torch.equal(~kept, output.pruned_at >= 0)
    if method in ("tome", "crucial"):  # merging only: every patch is in exactly one token
        assert kept.all()
    assert output.dense_features.shape == (2, family.num_patches, output.last_hidden_state.shape[-1])


def check_output_attentions_eager(family: Family) -> None:
    model = family.rapid("eager")
    with torch.no_grad():
        output = model(**family.inputs(2), rapid=settings_for("tome"), output_attentions=True)
    reduced = family.reduced(output)
    entering = [family.num_tokens, *reduced.token_counts[:-1]]
    attentions = reduced.attentions
    assert [a.shape[-1] for a in attentions] == entering
    assert all(torch.allclose(a.sum(-1), torch.ones(())) for a in attentions)


def check_get_rapid_model_in_place(family: Family) -> None:
    model = family.stock()
    inputs = family.inputs(2)
    with torch.no_grad():
        before = model(**inputs)
    weights = {name: p.data_ptr() for name, p in model.named_parameters()}
    converted = get_rapid_model(model)
    assert converted is model and type(model) is family.rapid_class
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == weights
    with torch.no_grad():
        outputs_equal(before, model(**inputs), family.compared)
        reduced = family.reduced(model(**inputs, rapid=settings_for("tome")))
    assert reduced.token_counts[-1] < family.num_tokens


def check_layers_mirror_stock(family: Family, module_classes: dict, attention: str) -> None:
    """Each Rapid layer and attention module, reduction off, computes exactly what the stock module computes."""
    stock_model = family.stock(attention)
    hidden = torch.randn(2, family.num_tokens, family.layers(stock_model)[0].mlp.fc2.out_features)
    bias = torch.randn(2, 1, 1, family.num_tokens)
    for stock in family.layers(stock_model):
        rapid = copy.deepcopy(stock)
        swap_module_classes(rapid, module_classes)
        assert type(rapid) is not type(stock) and isinstance(rapid, type(stock))
        stock_attention = getattr(stock, rapid.attention_module_name)
        rapid_attention = getattr(rapid, rapid.attention_module_name)
        reduction = LayerReduction(num_protected=family.num_protected)
        with torch.no_grad():
            expected = stock(hidden, None)
            output = rapid(hidden)
            assert type(output) is type(expected) and torch.equal(output, expected)
            assert torch.equal(rapid(hidden, reduction=reduction), expected) and reduction.plan is None
            expected_output, expected_weights = stock_attention(hidden, bias)
            got_output, got_weights = rapid_attention(hidden, bias, reduction=reduction)
            keys, query = reduction.keys, reduction.query
            split = (2, family.num_tokens, -1, rapid_attention.head_dim)
            assert torch.equal(got_output, expected_output)
            assert (got_weights is None) == (expected_weights is None)
            if got_weights is not None:
                assert torch.equal(got_weights, expected_weights)
            assert torch.equal(keys, stock_attention.k_proj(hidden).view(split).transpose(1, 2))
            assert torch.equal(query, stock_attention.q_proj(hidden).view(split).transpose(1, 2))
        hidden = expected


def check_peft_lora_trains_and_round_trips(family: Family, tmp_path) -> None:
    """LoRA on the attention projections trains with reduction on, only LoRA weights get gradients, and the
    saved adapter reloads onto a fresh Rapid model with the same outputs."""
    import peft

    settings = settings_for("rapid")
    lora = peft.get_peft_model(
        family.rapid(rapid=settings), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_alpha=8)
    )
    lora.train()
    inputs = family.inputs(4)
    with torch.no_grad():
        before = family.loss(lora(**inputs))
    optimizer = torch.optim.SGD([p for p in lora.parameters() if p.requires_grad], lr=0.5)
    output = lora(**inputs)
    assert family.reduced(output).token_counts[-1] < family.num_tokens  # the reduction ran inside PEFT
    family.loss(output).backward()
    lora_gradients = {n: p.grad for n, p in lora.named_parameters() if "lora_B" in n}
    assert len(lora_gradients) >= 2 * len(family.layers(lora.base_model.model))
    assert all(g is not None for g in lora_gradients.values())
    assert any(g.abs().sum() > 0 for g in lora_gradients.values())
    assert all(p.grad is None for n, p in lora.named_parameters() if "lora" not in n)
    optimizer.step()
    lora.eval()
    with torch.no_grad():
        after = lora(**inputs)
    assert not torch.equal(family.loss(after), before)
    lora.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(family.rapid(rapid=settings), tmp_path / "adapter").eval()
    with torch.no_grad():
        outputs_equal(after, reloaded(**inputs), family.compared)
