"""Hub remote code for the DINOv2 and CLIP families: a repository folder built with `rapid_hf.hub.remote_code`
(the import closure of the config module and the family's modeling module) loads in a fresh process where
rapid_hf cannot be imported, with no missing keys, the saved settings and the same outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from remote_user import run_as_remote_user
from transformers import CLIPConfig, Dinov2WithRegistersConfig

from rapid_hf import RapidCLIPModel, RapidConfig, RapidDinov2WithRegistersModel
from rapid_hf.hub.remote_code import collect_modules, write_remote_code

REMOTE_SCRIPT = r'''
import torch
from transformers import AutoModel

for case in spec["cases"]:
    model, info = AutoModel.from_pretrained(case["folder"], trust_remote_code=True, output_loading_info=True)
    expected = torch.load(case["expected"])
    with torch.no_grad():
        output = model.eval()(**expected["inputs"])
    report[case["name"]] = {
        "class": type(model).__module__ + "." + type(model).__name__,
        "loading_info": {key: sorted(map(str, value)) for key, value in info.items()},
        "rapid": model.config.rapid,
        "max_diff": (output[expected["key"]] - expected["value"]).abs().max().item(),
        "token_counts": list(output.token_counts),
    }
json.dump(report, open(spec["report"], "w"))
'''

VISION = {"hidden_size": 48, "num_hidden_layers": 4, "num_attention_heads": 3, "image_size": 64, "patch_size": 8}
TEXT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
        "vocab_size": 100, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}


def build_folder(folder: Path, model, modeling_module: str, auto_classes: tuple[str, ...]) -> list[str]:
    """Save `model` with its remote code: the shipped modules and `auto_map` naming the family's classes."""
    model.save_pretrained(folder)
    files = write_remote_code(folder, collect_modules((modeling_module,)))
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    modeling_file = modeling_module.rsplit(".", 1)[1]
    config["auto_map"] = {
        "AutoConfig": f"{type(model.config).__module__.rsplit('.', 1)[1]}.{type(model.config).__name__}",
        **{auto: f"{modeling_file}.{type(model).__name__}" for auto in auto_classes},
    }
    config_path.write_text(json.dumps(config, indent=2))
    return files


@pytest.fixture(scope="module")
def remote_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote_families")
    torch.manual_seed(0)
    pixel_values = torch.randn(2, 3, 64, 64)
    dinov2 = RapidDinov2WithRegistersModel(
        Dinov2WithRegistersConfig(**VISION, num_register_tokens=4), rapid=RapidConfig(method="rapid", r=8)
    ).eval()
    clip = RapidCLIPModel(
        CLIPConfig(vision_config={**VISION, "intermediate_size": 96}, text_config=TEXT, projection_dim=24),
        rapid=RapidConfig(method="tome", r=8),
    ).eval()
    input_ids = torch.randint(2, 100, (3, 6))
    input_ids[:, -1] = 1
    cases = []
    for name, model, module, autos, inputs, key in (
        ("dinov2_registers", dinov2, "rapid_hf.models.modeling_rapid_dinov2", ("AutoModel",),
         {"pixel_values": pixel_values}, "last_hidden_state"),
        ("clip", clip, "rapid_hf.models.modeling_rapid_clip",
         ("AutoModel", "AutoModelForZeroShotImageClassification"),
         {"pixel_values": pixel_values, "input_ids": input_ids}, "logits_per_image"),
    ):
        folder = root / name
        files = build_folder(folder, model, module, autos)
        assert module.rsplit(".", 1)[1] + ".py" in files and "configuration_rapid.py" in files
        with torch.no_grad():
            output = model(**inputs)
        torch.save({"inputs": inputs, "key": key, "value": output[key]}, root / f"{name}.pt")
        cases.append({"name": name, "folder": str(folder), "expected": str(root / f"{name}.pt"),
                      "class": type(model).__name__, "rapid": model.config.rapid,
                      "token_counts": list(output.token_counts)})
    return run_as_remote_user(root, REMOTE_SCRIPT, cases), cases


def test_remote_code_loads_the_new_families_without_rapid_hf(remote_report):
    report, cases = remote_report
    assert report["rapid_hf_importable"] is False
    for case in cases:
        result = report[case["name"]]
        assert result["class"].startswith("transformers_modules.") and result["class"].endswith(case["class"])
        assert result["loading_info"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [],
                                          "error_msgs": []}
        assert result["rapid"] == case["rapid"]
        assert result["token_counts"] == case["token_counts"] and case["token_counts"][-1] < case["token_counts"][0]
        assert result["max_diff"] <= 1e-5


def test_auto_class_names_for_every_rapid_class():
    from rapid_hf.models.auto import RAPID_CLASSES, auto_class_names

    names = {rapid.__name__: auto_class_names(rapid) for rapid in RAPID_CLASSES.values()}
    assert names["RapidViTForImageClassification"] == ("AutoModelForImageClassification",)
    assert names["RapidDeiTForImageClassificationWithTeacher"] == ("AutoModelForImageClassification",)
    assert names["RapidDinov2ForImageClassification"] == ("AutoModelForImageClassification",)
    assert names["RapidDinov2WithRegistersForImageClassification"] == ("AutoModelForImageClassification",)
    assert names["RapidDinov2WithRegistersModel"] == names["RapidCLIPVisionModel"] == ("AutoModel",)
    assert names["RapidCLIPModel"] == ("AutoModel", "AutoModelForZeroShotImageClassification")
    with pytest.raises(ValueError, match="is not a Rapid model class"):
        auto_class_names(CLIPConfig)
