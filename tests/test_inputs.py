"""Bad inputs fail at the boundary with a ValueError naming the problem; odd but valid inputs give the right answer.

Covers pixel_values of the wrong type, rank, channels, dtype, size (with and without `interpolate_pos_encoding`),
empty batches, NaN/inf pixels, r larger than the layers can remove, checkpoints that are not ViT/DeiT, and
attention kernels that cannot take proportional attention's float bias.
"""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import ConvNextConfig, DeiTConfig, SwinConfig, ViTConfig, ViTMAEConfig

from rapid_hf import (
    RapidConfig,
    RapidDeiTConfig,
    RapidDeiTForImageClassification,
    RapidDeiTForImageClassificationWithTeacher,
    RapidViTConfig,
    RapidViTForImageClassification,
)
from rapid_hf.reduction.config import METHODS
from rapid_hf.reduction.schedule import token_counts
from rapid_hf.reduction.steps import requested_schedule

TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "image_size": 64,
    "patch_size": 8,
    "num_labels": 10,
}
REDUCING = [m for m in METHODS if m != "none"]


def tiny(kind: str):
    torch.manual_seed(0)
    if kind == "vit":
        return RapidViTForImageClassification(RapidViTConfig(**TINY)).eval()
    return RapidDeiTForImageClassificationWithTeacher(RapidDeiTConfig(**TINY)).eval()


@pytest.fixture(scope="module", params=["vit", "deit"])
def model(request):
    """A tiny random Rapid ViT (1 protected token) and DeiT with teacher (2 protected tokens)."""
    return tiny(request.param)


def with_value(value: float, index: tuple = (1, 0, 3, 5), dtype: torch.dtype = torch.float32) -> torch.Tensor:
    pixel_values = torch.randn(2, 3, 64, 64).to(dtype)
    pixel_values[index] = value
    return pixel_values


# (id, pixel_values, extra forward kwargs, text the ValueError must contain)
BAD_INPUTS = [
    ("none", lambda: None, {}, "pixel_values is required"),
    ("numpy", lambda: np.zeros((2, 3, 64, 64), np.float32), {}, "must be a torch.Tensor, got ndarray"),
    ("list", lambda: [[0.0] * 64] * 64, {}, "must be a torch.Tensor, got list"),
    ("3d", lambda: torch.randn(3, 64, 64), {}, "shape (batch, channels, height, width), got shape (3, 64, 64)"),
    ("5d", lambda: torch.randn(1, 2, 3, 64, 64), {}, "shape (batch, channels, height, width)"),
    ("gray", lambda: torch.randn(2, 1, 64, 64), {}, "has 1 channels but the model expects 3"),
    ("rgba", lambda: torch.randn(2, 4, 64, 64), {}, "has 4 channels but the model expects 3"),
    ("channels-last-layout", lambda: torch.randn(2, 64, 64, 3), {}, "has 64 channels but the model expects 3"),
    ("empty-batch", lambda: torch.zeros(0, 3, 64, 64), {}, "empty batch"),
    ("uint8", lambda: torch.zeros(2, 3, 64, 64, dtype=torch.uint8), {}, "floating-point tensor, got dtype torch.uint8"),
    ("int64", lambda: torch.zeros(2, 3, 64, 64, dtype=torch.long), {}, "floating-point tensor, got dtype torch.int64"),
    ("bool", lambda: torch.zeros(2, 3, 64, 64, dtype=torch.bool), {}, "floating-point tensor, got dtype torch.bool"),
    ("complex", lambda: torch.zeros(2, 3, 64, 64, dtype=torch.complex64), {}, "floating-point tensor"),
    ("smaller-size", lambda: torch.randn(2, 3, 48, 48), {}, "of 48x48 px do not match the model's 64x64 px"),
    ("larger-size", lambda: torch.randn(2, 3, 96, 96), {}, "or pass interpolate_pos_encoding=True"),
    ("non-square", lambda: torch.randn(2, 3, 64, 72), {}, "of 64x72 px do not match"),
    ("below-one-patch", lambda: torch.randn(2, 3, 4, 4), {"interpolate_pos_encoding": True}, "smaller than one 8x8"),
    ("zero-size", lambda: torch.randn(2, 3, 0, 0), {"interpolate_pos_encoding": True}, "smaller than one 8x8"),
    ("one-side-too-small", lambda: torch.randn(2, 3, 64, 7), {"interpolate_pos_encoding": True}, "smaller than one"),
    ("nan", lambda: with_value(float("nan")), {}, "1 NaN and 0 infinite value(s) (batch index [1])"),
    ("inf", lambda: with_value(float("inf")), {}, "0 NaN and 1 infinite value(s) (batch index [1])"),
    ("-inf", lambda: with_value(float("-inf"), (0, 2, 0, 0)), {}, "0 NaN and 1 infinite value(s) (batch index [0])"),
    ("all-nan", lambda: torch.full((2, 3, 64, 64), float("nan")), {}, "24576 NaN and 0 infinite"),
    ("nan-bfloat16", lambda: with_value(float("nan"), dtype=torch.bfloat16), {}, "1 NaN"),
    ("inf-float16", lambda: with_value(float("inf"), dtype=torch.float16), {}, "1 infinite"),
    ("nan-interpolated", lambda: with_value(float("nan"))[..., :40, :40], {"interpolate_pos_encoding": True}, "NaN"),
    ("huge", lambda: torch.full((2, 3, 64, 64), 1e37), {}, "pixel_values are too large"),
    ("attention-mask", lambda: torch.randn(2, 3, 64, 64), {"attention_mask": torch.ones(2, 65)}, "attention_mask"),
    ("unknown-kwarg", lambda: torch.randn(2, 3, 64, 64), {"output_tokens": 8}, "unsupported forward argument"),
]


@pytest.mark.parametrize("make, kwargs, message", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_rejects_bad_input_at_the_boundary(model, make, kwargs, message):
    model.set_rapid(RapidConfig(method="rapid", r=4, switch_layer=2))
    with pytest.raises(ValueError, match=re.escape(message)), torch.no_grad():
        model(pixel_values=make(), **kwargs)


@pytest.mark.parametrize("method", METHODS)
def test_rejects_nan_pixels_with_every_method(model, method):
    model.set_rapid(RapidConfig(method=method, r=8))
    with pytest.raises(ValueError, match="NaN"), torch.no_grad():
        model(pixel_values=with_value(float("nan")))


def test_float64_and_half_inputs_are_cast_to_the_model_dtype(model):
    model.set_rapid(RapidConfig(method="tome", r=8))
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(pixel_values=pixel_values).logits
        assert torch.equal(model(pixel_values=pixel_values.double()).logits, expected)
        channels_last = pixel_values.contiguous(memory_format=torch.channels_last)
        assert torch.equal(model(pixel_values=channels_last).logits, expected)
        half = pixel_values.bfloat16()
        assert torch.equal(model(pixel_values=half).logits, model(pixel_values=half.float()).logits)


def test_values_that_overflow_only_in_the_model_dtype_are_refused(model):
    """A float32 7e4 is finite, but inf in a float16 model: refused, not turned into NaN logits."""
    half = copy.deepcopy(model).to(torch.float16)
    pixel_values = torch.randn(1, 3, 64, 64)
    pixel_values[0, 0, 0, 0] = 7e4
    with torch.no_grad():
        assert torch.isfinite(model(pixel_values=pixel_values).logits).all()  # fine in float32
        with pytest.raises(ValueError, match=r"overflow the model's dtype torch.float16 \(largest \|value\| 7e\+04"):
            half(pixel_values=pixel_values)


def num_tokens(model, height: int, width: int) -> int:
    patch = model.config.patch_size
    return (height // patch) * (width // patch) + model.num_protected_tokens


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("size", [(40, 40), (96, 96), (64, 120)], ids=["40px", "96px", "64x120"])
@pytest.mark.parametrize("settings", [{"r": 6}, {"r": 1000}, {"output_tokens": 12}], ids=["r6", "r1000", "out12"])
def test_interpolated_sizes_solve_the_schedule_for_their_token_count(model, method, size, settings):
    model.set_rapid(RapidConfig(method=method, switch_layer=2, **settings))
    with torch.no_grad():
        output = model(pixel_values=torch.randn(2, 3, *size), interpolate_pos_encoding=True)
    tokens, protected = num_tokens(model, *size), model.num_protected_tokens
    schedule = requested_schedule(model.rapid, tokens, 4, protected)
    assert list(output.token_counts) == token_counts(tokens, schedule, protected)
    if "output_tokens" in settings and method != "none":
        assert output.token_counts[-1] == settings["output_tokens"]
    assert output.sizes.shape == (2, output.token_counts[-1])
    assert torch.isfinite(output.logits).all()


@pytest.mark.parametrize("method", REDUCING)
def test_rejects_output_tokens_unreachable_at_the_input_size(model, method):
    model.set_rapid(RapidConfig(method=method, output_tokens=30))  # fine at 64 px (65/66 tokens)
    tokens = num_tokens(model, 32, 32)  # 17 or 18 tokens
    message = f"output_tokens=30 cannot be reached: with {tokens} input tokens"
    with pytest.raises(ValueError, match=message), torch.no_grad():
        model(pixel_values=torch.randn(1, 3, 32, 32), interpolate_pos_encoding=True)


@pytest.mark.parametrize("method", REDUCING)
@pytest.mark.parametrize("r", [1000, [1000, 0, 1000, 3]], ids=["1000", "list"])
def test_r_beyond_the_cap_is_capped_and_reported(model, method, r):
    model.set_rapid(RapidConfig(method=method, r=r, switch_layer=2))
    with torch.no_grad():
        output = model(pixel_values=torch.randn(2, 3, 64, 64))
    protected = model.num_protected_tokens
    schedule = [r] * 4 if isinstance(r, int) else r
    expected = token_counts(64 + protected, schedule, protected)
    assert list(output.token_counts) == expected
    assert expected[0] == 64 + protected - 32  # the first layer removed its cap, (N - protected) // 2
    assert output.sizes.shape == (2, expected[-1])


@pytest.fixture(scope="module")
def deit_tiny(deit_tiny_path):
    """The real DeiT-Tiny for this module (not the shared session fixture, whose settings other tests rely on)."""
    return RapidViTForImageClassification.from_pretrained(deit_tiny_path).eval()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("size", [160, 288])
def test_deit_tiny_at_other_resolutions(deit_tiny, dev_pixel_values, reference_model, method, size):
    model = deit_tiny
    pixel_values = F.interpolate(dev_pixel_values[:2], size=(size, size), mode="bilinear", antialias=True)
    tokens = (size // 16) ** 2 + 1
    with torch.no_grad():
        for settings, final in [({"r": 16}, token_counts(tokens, [16] * 12, 1)[-1]), ({"output_tokens": 8}, 8)]:
            model.set_rapid(RapidConfig(method=method, **settings))
            output = model(pixel_values=pixel_values, interpolate_pos_encoding=True)
            schedule = requested_schedule(model.rapid, tokens, 12, 1)
            assert list(output.token_counts) == token_counts(tokens, schedule, 1), settings
            assert torch.isfinite(output.logits).all()
            assert torch.all(output.sizes.sum(dim=1) <= tokens)
            if method == "none":
                reference = reference_model(pixel_values=pixel_values, interpolate_pos_encoding=True).logits
                assert torch.equal(output.logits, reference)
            else:
                assert output.token_counts[-1] == final, settings
    if method != "none" and tokens < 150:
        model.set_rapid(RapidConfig(method=method, output_tokens=150))  # reachable at 224 px (197 tokens)
        with pytest.raises(ValueError, match=f"output_tokens=150 cannot be reached: with {tokens} input tokens"):
            model(pixel_values=pixel_values, interpolate_pos_encoding=True)


# (id, config saved as the checkpoint, class that loads it, text the ValueError must contain)
FOREIGN_CHECKPOINTS = [
    ("convnext", ConvNextConfig(), RapidViTForImageClassification, "'convnext' checkpoint, not a vit"),
    ("swin", SwinConfig(), RapidViTForImageClassification, "'swin' checkpoint, not a vit"),
    ("vit_mae", ViTMAEConfig(), RapidViTForImageClassification, "'vit_mae' checkpoint, not a vit"),
    ("deit-into-vit", DeiTConfig(), RapidViTForImageClassification, "use RapidDeiT\\* classes"),
    ("vit-into-deit", ViTConfig(), RapidDeiTForImageClassification, "use RapidViTForImageClassification"),
    ("vit-into-teacher", ViTConfig(), RapidDeiTForImageClassificationWithTeacher, "'vit' checkpoint, not a deit"),
    ("convnext-into-deit", ConvNextConfig(), RapidDeiTConfig, "'convnext' checkpoint, not a deit"),
]


@pytest.mark.parametrize(
    "config, cls, message", [c[1:] for c in FOREIGN_CHECKPOINTS], ids=[c[0] for c in FOREIGN_CHECKPOINTS]
)
def test_rejects_checkpoints_that_are_not_vit_or_deit(tmp_path, config, cls, message):
    config.save_pretrained(tmp_path)  # the config alone: loading must stop before any weights are read
    with pytest.raises(ValueError, match=message):
        cls.from_pretrained(tmp_path)


@pytest.mark.parametrize("implementation", ["flash_attention_2", "flash_attention_3", "flex_attention"])
@pytest.mark.parametrize("method", REDUCING)
def test_rejects_proportional_attention_on_kernels_without_float_bias(implementation, method):
    model = tiny("vit")
    model.config._attn_implementation = implementation
    merging = RapidConfig(method=method, r=8, switch_layer=1)
    with pytest.raises(ValueError, match=rf"prop_attn=True .* attn_implementation='{implementation}' cannot take"):
        model.set_rapid(merging)
    model.set_rapid(merging.replace(prop_attn=False))  # no bias needed: accepted
    model.set_rapid(RapidConfig(method="none"))

    model.config._attn_implementation = "sdpa"
    model.set_rapid(merging)
    model.config._attn_implementation = implementation  # switched after set_rapid: caught at forward
    with pytest.raises(ValueError, match="prop_attn=True"), torch.no_grad():
        model(pixel_values=torch.randn(1, 3, 64, 64))
