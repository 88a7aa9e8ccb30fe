"""What users attach to a transformers model works on the Rapid classes, with reduction on.

Hooks fire once per layer, gradient checkpointing saves memory and keeps gradients, PEFT LoRA trains and round-trips,
`output_attentions` behaves as transformers does, `config.rapid` is the one source of truth of the settings, the
classes build from plain configs, and `get_rapid_model` converts a model already in memory.
"""

from __future__ import annotations

import copy
import json
import logging

import peft
import pytest
import torch
from transformers import (
    AutoModelForImageClassification,
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)
from transformers.utils import logging as hf_logging

from rapid_hf import (
    RapidConfig,
    RapidDeiTConfig,
    RapidDeiTForImageClassification,
    RapidDeiTForImageClassificationWithTeacher,
    RapidViTConfig,
    RapidViTForImageClassification,
    RapidViTModel,
    get_rapid_model,
)
from rapid_hf.reduction.config import METHODS

SMALL = {
    "hidden_size": 48,
    "num_hidden_layers": 4,
    "num_attention_heads": 3,
    "intermediate_size": 96,
    "image_size": 64,
    "patch_size": 8,
    "num_labels": 5,
}
REDUCING = [m for m in METHODS if m != "none"]
SETTINGS = {method: RapidConfig(method=method, r=8, switch_layer=2) for method in REDUCING}


def small_stock(cls=ViTForImageClassification, config_class=ViTConfig, **overrides):
    torch.manual_seed(0)
    return cls(config_class(**{**SMALL, **overrides})).eval()


def small_rapid(**overrides) -> RapidViTForImageClassification:
    model = RapidViTForImageClassification(ViTConfig(**{**SMALL, **overrides})).eval()
    model.load_state_dict(small_stock(**overrides).state_dict())
    return model


def pixels(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------- hooks


@pytest.mark.parametrize("method", REDUCING)
def test_hooks_on_every_layer_and_attention_fire_once_per_forward(method):
    model = small_rapid()
    calls: dict[str, list[int]] = {}

    def record(name):
        def hook(module, args, *rest):
            calls.setdefault(name, []).append(args[0].shape[1])

        return hook

    for index, layer in enumerate(model.vit.layers):
        layer.register_forward_pre_hook(record(f"layer{index}.pre"))
        layer.register_forward_hook(record(f"layer{index}"))
        layer.attention.register_forward_pre_hook(record(f"attention{index}.pre"))
        layer.attention.register_forward_hook(record(f"attention{index}"))
    with torch.no_grad():
        output = model(pixel_values=pixels(), rapid=SETTINGS[method])
    entering = [65, *output.token_counts[:-1]]
    assert output.token_counts[-1] < 65
    for index in range(4):
        for name in (f"layer{index}.pre", f"layer{index}", f"attention{index}.pre", f"attention{index}"):
            assert calls[name] == [entering[index]], name  # once, seeing the tokens that enter the layer


# ------------------------------------------------------------------------------------- gradient checkpointing


def saved_activation_bytes(model, pixel_values, labels) -> tuple[int, dict[str, torch.Tensor]]:
    """Bytes of the distinct tensors autograd saves for backward in one training forward; and the gradients."""
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(pixel_values=pixel_values, labels=labels).loss
    loss.backward()
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    gradients = {name: p.grad.clone() for name, p in parameters.items() if p.grad is not None}
    return sum(storages.values()), gradients


@pytest.mark.parametrize("method", ["rapid", "tome"])
def test_gradient_checkpointing_saves_memory_and_keeps_gradients(method):
    model = small_rapid(num_hidden_layers=6)
    model.set_rapid(RapidConfig(method=method, r=6, switch_layer=2))
    model.train()
    pixel_values, labels = pixels(4), torch.tensor([0, 1, 2, 3])
    plain_bytes, plain_gradients = saved_activation_bytes(model, pixel_values, labels)
    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing
    checkpointed_bytes, checkpointed_gradients = saved_activation_bytes(model, pixel_values, labels)
    stock = small_stock(num_hidden_layers=6).train()
    stock_plain, _ = saved_activation_bytes(stock, pixel_values, labels)
    stock.activation_checkpointing_enable()
    stock_checkpointed, _ = saved_activation_bytes(stock, pixel_values, labels)
    # Checkpointing keeps each layer's input only: it must shrink the saved activations as much as for the stock
    # model (within a margin for the small reduced tensors kept per layer).
    assert checkpointed_bytes < 0.3 * plain_bytes
    assert checkpointed_bytes / plain_bytes <= stock_checkpointed / stock_plain + 0.05
    assert plain_gradients.keys() == checkpointed_gradients.keys() and len(plain_gradients) > 0
    for name, gradient in plain_gradients.items():
        assert torch.allclose(gradient, checkpointed_gradients[name], atol=1e-5, rtol=0), name


# ------------------------------------------------------------------------------------------------------ PEFT


def test_peft_lora_trains_with_reduction_and_round_trips(tmp_path):
    model = small_rapid()
    model.set_rapid(RapidConfig(method="rapid", r=8, switch_layer=2))
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_alpha=8))
    lora.train()
    pixel_values, labels = pixels(4), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        before = lora(pixel_values=pixel_values).logits
    optimizer = torch.optim.SGD([p for p in lora.parameters() if p.requires_grad], lr=0.5)
    output = lora(pixel_values=pixel_values, labels=labels)
    assert output.token_counts[-1] < 65  # the reduction ran inside the PEFT model
    output.loss.backward()
    lora_gradients = {n: p.grad for n, p in lora.named_parameters() if "lora_B" in n}
    assert len(lora_gradients) == 2 * 4  # q_proj and v_proj of 4 layers
    assert all(g is not None and g.abs().sum() > 0 for g in lora_gradients.values())
    assert all(p.grad is None for n, p in lora.named_parameters() if "lora" not in n)
    optimizer.step()
    lora.eval()
    with torch.no_grad():
        after = lora(pixel_values=pixel_values).logits
    assert not torch.allclose(before, after)  # the trained LoRA weights are used in the forward

    lora.save_pretrained(tmp_path / "adapter")
    fresh = small_rapid()
    fresh.set_rapid(RapidConfig(method="rapid", r=8, switch_layer=2))
    reloaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=pixel_values).logits, after)


# --------------------------------------------------------------------------------------------- attentions


def test_output_attentions_eager_gives_one_map_per_layer_with_its_token_count():
    model = small_rapid()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        output = model(pixel_values=pixels(), rapid=SETTINGS["tome"], output_attentions=True)
    entering = [65, *output.token_counts[:-1]]
    assert [tuple(a.shape) for a in output.attentions] == [(2, 3, n, n) for n in entering]
    assert all(torch.allclose(a.sum(-1), torch.ones(())) for a in output.attentions)


def test_output_attentions_under_sdpa_behaves_as_transformers(caplog):
    stock, model = small_stock(), small_rapid()
    results = []
    for candidate in (stock, model):
        hf_logging.enable_propagation()
        hf_logging.set_verbosity_warning()
        logging.Logger.warning_once.cache_clear()  # transformers logs this warning once per process
        caplog.clear()
        with caplog.at_level(logging.WARNING), torch.no_grad():
            output = candidate(pixel_values=pixels(), output_attentions=True)
        results.append((output.attentions, "does not support `output_attentions=True`" in caplog.text))
    assert results[0][0] == () and results[0][1]  # what transformers does today: warn, return no maps
    assert results[1] == results[0]


def test_hidden_states_are_captured_per_layer_with_their_token_counts():
    with torch.no_grad():
        output = small_rapid()(pixel_values=pixels(), rapid=SETTINGS["rapid"], output_hidden_states=True)
    assert [h.shape[1] for h in output.hidden_states] == [65, *output.token_counts]


# ---------------------------------------------------------------------------------- one source of truth


def test_config_rapid_is_what_runs_and_what_is_saved(tmp_path):
    model = small_rapid()
    x = pixels()
    model.config.rapid = RapidConfig(method="tome", r=8)  # assigning the config changes the model
    assert model.rapid == RapidConfig(method="tome", r=8)
    with torch.no_grad():
        via_config = model(pixel_values=x).logits
        expected = model(pixel_values=x, rapid=RapidConfig(method="tome", r=8)).logits
    assert torch.equal(via_config, expected)
    model.config.rapid = {"method": "rapid", "r": 8, "switch_layer": 2}  # its dict form too
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["rapid"]
    assert RapidConfig.from_dict(saved) == model.rapid == RapidConfig(method="rapid", r=8, switch_layer=2)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=x).logits, model(pixel_values=x).logits)


@pytest.mark.parametrize(
    "value, message",
    [
        ({"method": "bogus"}, "RapidConfig.method='bogus' is invalid"),
        ({"r": [1, 2]}, r"RapidConfig.r=.* is invalid: expected a list of 4 ints"),
        ("tome", "rapid settings must be a RapidConfig"),
    ],
)
def test_assigning_bad_settings_to_the_config_fails_at_once(value, message):
    model = small_rapid()
    with pytest.raises(ValueError, match=message):
        model.config.rapid = value
    assert model.config.rapid is None and model.rapid == RapidConfig()


def test_per_call_settings_leave_the_model_settings_alone():
    model = small_rapid()
    own = RapidConfig(method="tofu", r=4, switch_layer=1)
    model.set_rapid(own)
    x = pixels()
    with torch.no_grad():
        per_call = model(pixel_values=x, rapid=RapidConfig(method="crucial", r=8))
        assert per_call.token_counts == (57, 49, 41, 33)
        assert model.rapid == own and model.config.rapid == own.to_dict()
        assert model(pixel_values=x).token_counts == (61, 57, 53, 49)
        assert model(pixel_values=x, rapid={"method": "tome", "r": 2}).token_counts == (63, 61, 59, 57)


# --------------------------------------------------------------------------------------------- construction


def test_built_from_plain_config_with_rapid_saves_as_rapid(tmp_path):
    model = RapidViTForImageClassification(ViTConfig(**SMALL), rapid=RapidConfig(method="tome", r=4)).eval()
    assert isinstance(model.config, RapidViTConfig) and model.config.model_type == "rapid_vit"
    assert model.rapid == RapidConfig(method="tome", r=4)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert type(reloaded) is RapidViTForImageClassification and reloaded.rapid == model.rapid


def test_rapid_config_takes_a_rapid_config_object():
    config = RapidViTConfig(**SMALL, rapid=RapidConfig(method="tome", r=4))
    assert config.rapid == RapidConfig(method="tome", r=4).to_dict()
    assert RapidViTForImageClassification(config).rapid == RapidConfig(method="tome", r=4)


@pytest.mark.parametrize(
    "rapid_class, config_class, architecture",
    [
        (RapidDeiTForImageClassification, DeiTConfig, "RapidDeiTForImageClassification"),
        (RapidDeiTForImageClassificationWithTeacher, DeiTConfig, "RapidDeiTForImageClassificationWithTeacher"),
    ],
)
def test_deit_classes_build_from_plain_config_and_reload(tmp_path, rapid_class, config_class, architecture):
    model = rapid_class(config_class(**SMALL), rapid={"method": "rapid", "r": 4}).eval()
    assert isinstance(model.config, RapidDeiTConfig)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [architecture]
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert type(reloaded) is rapid_class and reloaded.rapid == RapidConfig(method="rapid", r=4)


def test_wrong_family_config_is_refused():
    with pytest.raises(ValueError, match="DeiTConfig cannot configure a Rapid model built on RapidViTConfig"):
        RapidViTForImageClassification(DeiTConfig(**SMALL))


def test_backbone_alone_reduces_and_pools():
    stock = ViTModel(ViTConfig(**SMALL)).eval()
    model = RapidViTModel(ViTConfig(**SMALL)).eval()
    model.load_state_dict(stock.state_dict())
    with torch.no_grad():
        expected = stock(pixel_values=pixels())
        output = model(pixel_values=pixels())
        reduced = model(pixel_values=pixels(), rapid=SETTINGS["rapid"])
    assert torch.equal(output.last_hidden_state, expected.last_hidden_state)
    assert torch.equal(output.pooler_output, expected.pooler_output)
    assert reduced.last_hidden_state.shape[1] == reduced.token_counts[-1] < 65
    assert reduced.pooler_output.shape == expected.pooler_output.shape


# ------------------------------------------------------------------------------------------ get_rapid_model


@pytest.mark.parametrize(
    "stock_class, config_class, rapid_class",
    [
        (ViTForImageClassification, ViTConfig, RapidViTForImageClassification),
        (DeiTForImageClassification, DeiTConfig, RapidDeiTForImageClassification),
        (DeiTForImageClassificationWithTeacher, DeiTConfig, RapidDeiTForImageClassificationWithTeacher),
        (ViTModel, ViTConfig, RapidViTModel),
    ],
)
def test_get_rapid_model_converts_in_place_without_copying(stock_class, config_class, rapid_class):
    model = small_stock(stock_class, config_class)
    x = pixels()
    with torch.no_grad():
        before = model(pixel_values=x)
    weights = {name: p.data_ptr() for name, p in model.named_parameters()}
    hook_calls = []
    model.register_forward_hook(lambda *args: hook_calls.append(1))
    converted = get_rapid_model(model)
    assert converted is model and type(model) is rapid_class
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == weights  # nothing copied
    with torch.no_grad():
        after = model(pixel_values=x)
        reduced = model(pixel_values=x, rapid=RapidConfig(method="tome", r=8))
    for key in ("logits", "last_hidden_state"):
        if key in before:
            assert torch.equal(after[key], before[key])
    assert hook_calls == [1, 1]  # the hook registered before the conversion fires on both forwards
    assert reduced.token_counts[-1] < 65
    get_rapid_model(model, RapidConfig(method="rapid", r=4))  # converting again only sets the settings
    assert model.rapid == RapidConfig(method="rapid", r=4)


def test_get_rapid_model_saves_as_rapid(tmp_path):
    model = get_rapid_model(small_stock(), RapidConfig(method="tome", r=4))
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert type(reloaded) is RapidViTForImageClassification and reloaded.rapid == RapidConfig(method="tome", r=4)


def test_get_rapid_model_refuses_other_models():
    from transformers import BertConfig, BertModel

    with pytest.raises(ValueError, match=r"get_rapid_model supports .*ViTForImageClassification.*got BertModel"):
        get_rapid_model(BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2)))


def test_get_rapid_model_on_real_deit_tiny_keeps_logits(reference_model, dev_pixel_values):
    model = copy.deepcopy(reference_model)
    with torch.no_grad():
        expected = reference_model(pixel_values=dev_pixel_values[:2]).logits
        get_rapid_model(model)
        assert torch.equal(model(pixel_values=dev_pixel_values[:2]).logits, expected)


def test_return_dict_false_gives_the_stock_tuple_with_reduction_on():
    stock, model = small_stock(), small_rapid()
    for options in ({}, {"output_hidden_states": True}):
        with torch.no_grad():
            expected = stock(pixel_values=pixels(), return_dict=False, **options)
            output = model(pixel_values=pixels(), return_dict=False, rapid=SETTINGS["tome"], **options)
        assert isinstance(output, tuple) and len(output) == len(expected)
        assert output[0].shape == expected[0].shape
    with torch.no_grad():
        full = model(pixel_values=pixels(), rapid=SETTINGS["tome"])
    assert full[0] is full.logits and full.token_counts[-1] < 65  # reduction fields stay attributes
