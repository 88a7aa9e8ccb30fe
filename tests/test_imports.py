"""`import rapid_hf.reduction` stays pure torch, and `import rapid_hf` alone makes the Auto classes load Rapid models,
whatever transformers was or will be imported by (fresh interpreters: imports are process-wide)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from transformers import ViTConfig

from rapid_hf import RapidConfig, RapidViTForImageClassification

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("saved")
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                       patch_size=8)
    RapidViTForImageClassification(config, rapid=RapidConfig(method="tome", r=2)).save_pretrained(folder)
    return folder


def run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def test_reduction_imports_no_transformers():
    code = (
        "import sys\n"
        "import rapid_hf.reduction, rapid_hf.reduction.steps, rapid_hf.reduction.plan, rapid_hf.reduction.tracing\n"
        "import rapid_hf.reduction.methods, rapid_hf.reduction.schedule, rapid_hf.reduction.config\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))"
    )
    assert run_python(code) == "[]"


@pytest.mark.parametrize(
    "imports",
    [
        "import rapid_hf\nfrom transformers import AutoModelForImageClassification as Auto",
        "import rapid_hf\nfrom transformers import pipeline\n"
        "from transformers import AutoModelForImageClassification as Auto",
        "from rapid_hf.models.encoder import ReducedBackboneMixin\n"
        "from transformers import AutoModelForImageClassification as Auto",
    ],
    ids=["rapid-first", "pipeline-first", "submodule-first"],
)
def test_import_rapid_hf_registers_the_auto_classes(saved_model, imports):
    code = f"{imports}\nmodel = Auto.from_pretrained({str(saved_model)!r})\nprint(type(model).__name__, model.rapid.r)"
    assert run_python(code) == "RapidViTForImageClassification 2"


def test_import_rapid_hf_registers_the_config_for_autoconfig_alone(saved_model):
    code = (
        "import rapid_hf\nfrom transformers import AutoConfig\n"
        f"print(type(AutoConfig.from_pretrained({str(saved_model)!r})).__name__)"
    )
    assert run_python(code) == "RapidViTConfig"


def test_importing_stock_classes_after_rapid_hf_keeps_one_copy_of_each_module():
    """Registration runs only after a module has run, so the stock classes the user imports are the ones the Rapid
    classes subclass."""
    code = (
        "import rapid_hf\nfrom transformers import ViTConfig, ViTForImageClassification\n"
        "from rapid_hf import RapidViTForImageClassification, get_rapid_model\n"
        "config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,"
        " image_size=32, patch_size=8)\n"
        "model = get_rapid_model(ViTForImageClassification(config))\n"
        "print(issubclass(RapidViTForImageClassification, ViTForImageClassification), type(model).__name__)"
    )
    assert run_python(code) == "True RapidViTForImageClassification"
