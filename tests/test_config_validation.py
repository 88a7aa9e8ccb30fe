"""Invalid reduction settings fail loudly with a ValueError naming the field and what is allowed.

Checked at every entry point: `RapidConfig(...)`, `from_dict`/`replace`, `set_rapid` (model-dependent checks),
`RapidViTConfig(rapid=...)`, and a config.json with a bad `rapid` dict loaded through the Rapid classes,
`AutoModelForImageClassification`, `AutoConfig` and the config class.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageClassification

from rapid_hf import (
    RapidConfig,
    RapidDeiTConfig,
    RapidDeiTForImageClassification,
    RapidViTConfig,
    RapidViTForImageClassification,
)
from rapid_hf.reduction.config import METHODS

TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "image_size": 32,
    "patch_size": 8,
    "num_labels": 3,
}  # 16 patches: 17 tokens for ViT, 18 for DeiT

# (settings, field named in the error, text of the allowed range that the error must contain)
INVALID_SETTINGS = [
    ({"method": "bogus"}, "method", "one of rapid, tome"),
    ({"method": "ToMe"}, "method", "one of"),
    ({"method": None}, "method", "one of"),
    ({"r": -1}, "r", "an int >= 0"),
    ({"r": 2.5}, "r", "an int >= 0"),
    ({"r": 8.0}, "r", "an int >= 0"),
    ({"r": "8"}, "r", "an int >= 0"),
    ({"r": True}, "r", "an int >= 0"),
    ({"r": None}, "r", "an int >= 0"),
    ({"r": [4, -1, 2, 0]}, "r", "a list of ints >= 0"),
    ({"r": [4, 1.5, 2, 0]}, "r", "a list of ints >= 0"),
    ({"r": (8, 1.5)}, "r", "inflection: float in [-1, 1]"),
    ({"r": (8, math.nan)}, "r", "inflection: float in [-1, 1]"),
    ({"r": (-2, 0.5)}, "r", "r: int >= 0"),
    ({"output_tokens": 0}, "output_tokens", "an int >= 1"),
    ({"output_tokens": -5}, "output_tokens", "an int >= 1"),
    ({"output_tokens": 10.0}, "output_tokens", "an int >= 1"),
    ({"output_tokens": 8, "r": 4}, "output_tokens", "give r or output_tokens, not both"),
    ({"reduce_every": 0}, "reduce_every", "an int >= 1"),
    ({"reduce_every": 2.0}, "reduce_every", "an int >= 1"),
    ({"reduce_every": 2, "r": [1, 0, 1, 0]}, "reduce_every", "1 when r is a per-layer list"),
    ({"switch_layer": -1}, "switch_layer", "an int >= 0"),
    ({"switch_layer": 2.0}, "switch_layer", "an int >= 0"),
    ({"switch_layer": "late"}, "switch_layer", "an int >= 0"),
    ({"prune_threshold": 1.5}, "prune_threshold", "[-1, 1]"),
    ({"prune_threshold": -1.01}, "prune_threshold", "[-1, 1]"),
    ({"prune_threshold": math.nan}, "prune_threshold", "[-1, 1]"),
    ({"prune_threshold": "0.7"}, "prune_threshold", "[-1, 1]"),
    ({"importance_ratio": 0.0}, "importance_ratio", "(0, 1]"),
    ({"importance_ratio": 1.2}, "importance_ratio", "(0, 1]"),
    ({"importance_ratio": -0.1}, "importance_ratio", "(0, 1]"),
    ({"importance_weight": -1.0}, "importance_weight", ">= 0"),
    ({"importance_weight": math.inf}, "importance_weight", ">= 0"),
    ({"prop_attn": "yes"}, "prop_attn", "True or False"),
    ({"prop_attn": 1}, "prop_attn", "True or False"),
    ({"merge_mode": "max"}, "merge_mode", "'mean', 'mlerp'"),
    ({"importance_source": "value_norm"}, "importance_source", "'attention' (CLS attention) or 'per_patch'"),
    ({"importance_source": "per_patch", "prop_attn": False}, "importance_source", "'attention' when prop_attn=False"),
]

# Valid on their own, invalid for the 4-layer, 16-patch tiny model (ViT: 1 protected token, DeiT: 2).
INVALID_FOR_MODEL = [
    ({"r": [1, 2]}, "r", "a list of 4 ints >= 0"),
    ({"r": [1, 1, 1, 1, 1]}, "r", "a list of 4 ints >= 0"),
    ({"switch_layer": 5}, "switch_layer", "an int in [0, 4]"),
    ({"output_tokens": 18}, "output_tokens", "reachable range is [2, 17]"),
    ({"output_tokens": 1}, "output_tokens", "reachable range is [2, 17]"),
    ({"reduce_every": 5, "r": 2}, "reduce_every", "an int in [1, 4]"),
    ({"reduce_every": 2, "output_tokens": 3}, "output_tokens", "reachable range is [5, 17]"),
]


def error_pattern(field: str, allowed: str) -> str:
    return rf"\b{field}=.*{re.escape(allowed)}"


def case_ids(cases: list[tuple]) -> list[str]:
    return [",".join(f"{key}={value!r}" for key, value in case[0].items()) for case in cases]


@pytest.mark.parametrize("settings, field, allowed", INVALID_SETTINGS, ids=case_ids(INVALID_SETTINGS))
def test_invalid_settings_fail_at_construction(settings, field, allowed):
    with pytest.raises(ValueError, match=rf"RapidConfig\.{error_pattern(field, allowed)}"):
        RapidConfig(**settings)
    with pytest.raises(ValueError, match=rf"RapidConfig\.{error_pattern(field, allowed)}"):
        RapidConfig.from_dict(settings)


@pytest.mark.parametrize("settings, field, allowed", INVALID_SETTINGS[::4], ids=case_ids(INVALID_SETTINGS[::4]))
def test_invalid_settings_fail_in_replace(settings, field, allowed):
    with pytest.raises(ValueError, match=error_pattern(field, allowed)):
        RapidConfig(method="tome").replace(**settings)


@pytest.mark.parametrize("data", [{"zzz": 1}, {"method": "tome", "R": 4}], ids=["zzz", "R"])
def test_from_dict_names_unknown_fields(data):
    unknown = next(key for key in data if key not in RapidConfig.__dataclass_fields__)
    with pytest.raises(ValueError, match=rf"unknown RapidConfig field\(s\) \['{unknown}'\]"):
        RapidConfig.from_dict(data)


@pytest.mark.parametrize("data", ["tome", ["tome", 8], None], ids=["str", "list", "None"])
def test_from_dict_rejects_non_mappings(data):
    with pytest.raises(ValueError, match="rapid settings must be a mapping"):
        RapidConfig.from_dict(data)


@pytest.mark.parametrize(
    "settings",
    [{"method": m, "r": 2} for m in METHODS]
    + [{"r": [0, 1, 2, 3]}, {"r": (2, 0.5)}, {"r": (2, -1.0)}, {"output_tokens": 5}, {"switch_layer": 4},
       {"r": 4, "reduce_every": 2}, {"output_tokens": 9, "reduce_every": 3},
       {"r": 2, "importance_source": "per_patch"}],
    ids=lambda s: ",".join(f"{k}={v!r}" for k, v in s.items()),
)
def test_valid_settings_round_trip_through_json(settings):
    rapid = RapidConfig(**settings)
    assert RapidConfig.from_dict(json.loads(json.dumps(rapid.to_dict()))) == rapid


@pytest.fixture(scope="module")
def tiny_vit():
    return RapidViTForImageClassification(RapidViTConfig(**TINY)).eval()


@pytest.fixture(scope="module")
def tiny_deit():
    return RapidDeiTForImageClassification(RapidDeiTConfig(**TINY)).eval()


@pytest.mark.parametrize("settings, field, allowed", INVALID_FOR_MODEL, ids=case_ids(INVALID_FOR_MODEL))
def test_model_dependent_settings_fail_at_set_rapid(tiny_vit, settings, field, allowed):
    before = tiny_vit.rapid
    with pytest.raises(ValueError, match=error_pattern(field, allowed)):
        tiny_vit.set_rapid(RapidConfig(**settings))
    assert tiny_vit.rapid == before  # a refused setting leaves the model as it was
    with pytest.raises(ValueError, match=error_pattern(field, allowed)):
        RapidViTConfig(**TINY, rapid=RapidConfig(**settings).to_dict())


def test_output_tokens_range_counts_the_distillation_token(tiny_deit):
    with pytest.raises(ValueError, match=r"output_tokens=2 .*reachable range is \[3, 18\]"):
        tiny_deit.set_rapid(RapidConfig(output_tokens=2))
    tiny_deit.set_rapid(RapidConfig(output_tokens=3))
    assert tiny_deit.rapid.output_tokens == 3


@pytest.mark.parametrize("value", ["tome", 8, ["tome"]], ids=["str", "int", "list"])
def test_set_rapid_wants_settings(tiny_vit, value):
    with pytest.raises(ValueError, match="rapid settings must be a RapidConfig, a dict of its fields or None"):
        tiny_vit.set_rapid(value)
    with pytest.raises(ValueError, match="rapid settings must be a RapidConfig"):
        tiny_vit(pixel_values=torch.randn(1, 3, 32, 32), rapid=value)


def test_set_rapid_takes_a_dict_or_none(tiny_vit):
    tiny_vit.set_rapid({"method": "tome", "r": 2})
    assert tiny_vit.rapid == RapidConfig(method="tome", r=2)
    tiny_vit.set_rapid(None)
    assert tiny_vit.rapid == RapidConfig() and not tiny_vit.rapid.reduces


@pytest.mark.parametrize("settings, field, allowed", INVALID_SETTINGS[::3], ids=case_ids(INVALID_SETTINGS[::3]))
def test_rapid_vit_config_validates_its_rapid_dict(settings, field, allowed):
    with pytest.raises(ValueError, match=error_pattern(field, allowed)):
        RapidViTConfig(**TINY, rapid=settings)


@pytest.fixture(scope="module")
def saved_vit(tmp_path_factory):
    """A saved tiny Rapid ViT with reduction settings, and its config.json as written."""
    path = tmp_path_factory.mktemp("rapid_vit")
    RapidViTForImageClassification(RapidViTConfig(**TINY, rapid={"method": "tome"})).save_pretrained(path)
    return path, json.loads((path / "config.json").read_text())


SAVED_CASES = [case for case in INVALID_SETTINGS if case[0].keys() == {case[1]}][::2] + INVALID_FOR_MODEL
LOADERS = {
    "RapidViTForImageClassification": RapidViTForImageClassification.from_pretrained,
    "AutoModelForImageClassification": AutoModelForImageClassification.from_pretrained,
    "AutoConfig": AutoConfig.from_pretrained,
    "RapidViTConfig": RapidViTConfig.from_pretrained,
}


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("settings, field, allowed", SAVED_CASES, ids=case_ids(SAVED_CASES))
def test_invalid_rapid_dict_in_config_json_fails_at_load(saved_vit, loader, settings, field, allowed):
    path, config = saved_vit
    (path / "config.json").write_text(json.dumps({**config, "rapid": {**config["rapid"], **settings}}))
    with pytest.raises(ValueError, match=error_pattern(field, allowed)):
        LOADERS[loader](path)


def test_saved_settings_reload_through_auto_classes(tmp_path, tiny_vit):
    rapid = RapidConfig(method="tofu", r=[3, 2, 1, 0], merge_mode="mean")
    tiny_vit.set_rapid(rapid)
    try:
        tiny_vit.save_pretrained(tmp_path)
    finally:
        tiny_vit.set_rapid(RapidConfig())
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert isinstance(loaded, RapidViTForImageClassification)
    assert loaded.rapid == rapid
    assert AutoConfig.from_pretrained(tmp_path).rapid == rapid.to_dict()


def test_reduce_every_runs_on_the_model_and_removes_only_at_its_layers(tiny_vit):
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = tiny_vit(pixel_values=pixel_values, rapid=RapidConfig(method="tome", r=4, reduce_every=2))
        solved = tiny_vit(pixel_values=pixel_values, rapid=RapidConfig(method="rapid", output_tokens=7,
                                                                          reduce_every=2, switch_layer=1))
    assert list(out.token_counts) == [13, 13, 9, 9]
    assert solved.token_counts[-1] == 7 and solved.token_counts[0] == solved.token_counts[1]
