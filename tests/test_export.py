"""ONNX export: the file runs under onnxruntime alone (no torch, no rapid_hf) and gives PyTorch's logits."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from transformers import DeiTConfig, ViTConfig

from rapid_hf import RapidConfig, RapidDeiTForImageClassificationWithTeacher, RapidViTForImageClassification, cli
from rapid_hf.export import export_onnx, onnx_metadata

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

TINY = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 64,
        "image_size": 32, "patch_size": 4, "num_labels": 7}

# Runs in a fresh interpreter where importing torch or rapid_hf fails: what a deployment without them sees.
ORT_ONLY = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "rapid_hf", "transformers"):
                raise ImportError(f"{name} is blocked")
            return None

    sys.meta_path.insert(0, Blocker())
    import numpy as np
    import onnxruntime

    model_path, input_path, output_path = sys.argv[1:]
    session = onnxruntime.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"pixel_values": np.load(input_path)})
    np.save(output_path, logits)
    blocked = [name for name in ("torch", "rapid_hf", "transformers") if name in sys.modules]
    print(json.dumps({"loaded": blocked, "inputs": [i.name for i in session.get_inputs()]}))
    """
)


@pytest.fixture(scope="module")
def tiny_models():
    torch.manual_seed(0)
    return {
        "vit": RapidViTForImageClassification(ViTConfig(**TINY)).eval(),
        "deit": RapidDeiTForImageClassificationWithTeacher(DeiTConfig(**TINY)).eval(),
    }


def run_without_torch(model_path, pixel_values: np.ndarray, tmp_path) -> np.ndarray:
    input_path, output_path = tmp_path / "input.npy", tmp_path / "logits.npy"
    np.save(input_path, pixel_values)
    done = subprocess.run(
        [sys.executable, "-c", ORT_ONLY, str(model_path), str(input_path), str(output_path)],
        capture_output=True, text=True, check=False, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"loaded": [], "inputs": ["pixel_values"]}
    return np.load(output_path)


@pytest.mark.parametrize(
    ("family", "settings"),
    [
        ("vit", {"method": "none"}),
        ("vit", {"method": "rapid", "r": 4}),
        ("vit", {"method": "tome", "r": 4}),
        ("deit", {"method": "rapid", "r": 4, "switch_layer": 1}),
        ("deit", {"method": "tofu", "r": 4}),
        ("vit", {"method": "pitome", "r": 4}),
        ("deit", {"method": "topk", "r": 4}),
    ],
    ids=lambda value: value if isinstance(value, str) else "-".join(map(str, value.values())),
)
def test_onnx_runs_without_torch_and_matches_pytorch(tiny_models, family, settings, tmp_path):
    model = tiny_models[family]
    rapid = RapidConfig(**settings)
    path = export_onnx(model, tmp_path / "model.onnx", rapid=rapid, batch_size=2)
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = model(pixel_values=pixel_values, rapid=rapid).logits.numpy()
    logits = run_without_torch(path, pixel_values.numpy(), tmp_path)
    assert logits.shape == (2, 7)
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
    metadata = onnx_metadata(path)
    assert metadata["rapid"] == rapid.to_dict() and metadata["input_shape"] == [2, 3, 32, 32]


def test_export_uses_the_models_own_settings_by_default_and_warns_nothing(tiny_models, tmp_path):
    model = tiny_models["vit"]
    model.set_rapid(RapidConfig(method="tome", r=3))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            path = export_onnx(model, tmp_path / "own.onnx")
    finally:
        model.set_rapid(RapidConfig())
    assert onnx_metadata(path)["rapid"] == RapidConfig(method="tome", r=3).to_dict()
    assert not [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, UserWarning))]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"image_size": 30}, "multiple of the patch size"),
        ({"opset": 9}, "opset"),
        ({"rapid": {"method": "rapid", "r": [4, 4]}}, "r"),
    ],
)
def test_bad_export_arguments_are_named(tiny_models, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        export_onnx(tiny_models["vit"], tmp_path / "bad.onnx", **kwargs)


def test_bad_path_and_plain_module_are_refused(tiny_models, tmp_path):
    with pytest.raises(ValueError, match=r"\.onnx"):
        export_onnx(tiny_models["vit"], tmp_path / "model.bin")
    with pytest.raises(ValueError, match="Rapid model"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "linear.onnx")


def test_export_command_writes_a_verified_file(tiny_models, tmp_path, capsys):
    folder = tmp_path / "tiny"
    tiny_models["vit"].save_pretrained(folder)
    output = tmp_path / "cli.onnx"
    status = cli.main(["export", "--model", str(folder), "--method", "rapid", "--r", "4", "--output", str(output),
                       "--verify"])
    assert status == 0
    out = capsys.readouterr().out
    printed = json.loads(out[out.index("{"):])
    assert printed["rapid"] == RapidConfig(method="rapid", r=4).to_dict() and printed["input_shape"] == [1, 3, 32, 32]
    assert printed["max_abs_logit_diff"] < 1e-4
    assert onnx_metadata(output) == {key: printed[key] for key in onnx_metadata(output)}


def test_export_command_refuses_r_without_reducing_method(tiny_models, tmp_path):
    folder = tmp_path / "tiny"
    model = tiny_models["vit"]
    model.set_rapid(RapidConfig(method="none"))  # saved method none: --r alone has nothing to change
    try:
        model.save_pretrained(folder)
    finally:
        model.set_rapid(RapidConfig())
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", "--model", str(folder), "--r", "4", "--output", str(tmp_path / "x.onnx")])
    assert exit_info.value.code == 2
