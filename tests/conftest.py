"""Shared fixtures: the real DeiT-Tiny and dev photos from `../shared/assets` (env `RAPID_HF_ASSETS`).

Where the assets are absent the tests that need them skip, except under CI=true, where they fail: CI must
exercise the real weights.
"""

from __future__ import annotations

import os

# One intra-op thread per process (inherited by the subprocess tests): the models under test are small, and on
# a 2-core machine several processes with several OpenMP threads each spend most of their time waiting.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO_ROOT = Path(__file__).resolve().parents[1]
# absolute, so that a relative RAPID_HF_ASSETS (as the experiments' commands give it) holds in any working directory
ASSETS = Path(os.environ.get("RAPID_HF_ASSETS", REPO_ROOT.parent / "shared" / "assets")).resolve()


def require_asset(relative: str) -> Path:
    path = ASSETS / relative
    if not path.exists():
        message = f"asset {path} is missing (set RAPID_HF_ASSETS to the shared assets folder)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def deit_tiny_path() -> Path:
    return require_asset("deit-tiny-imagenet")


@pytest.fixture(scope="session")
def dev_images_path() -> Path:
    return require_asset("imagenet-sample-dev")


@pytest.fixture(scope="session")
def reference_model(deit_tiny_path):
    """transformers' own unreduced ViTForImageClassification on the real DeiT-Tiny."""
    from transformers import ViTForImageClassification

    return ViTForImageClassification.from_pretrained(deit_tiny_path).eval()


@pytest.fixture(scope="session")
def rapid_model(deit_tiny_path):
    """The Rapid model on the same weights (tests switch its method with set_rapid; reset after use)."""
    from rapid_hf import RapidViTForImageClassification

    return RapidViTForImageClassification.from_pretrained(deit_tiny_path).eval()


@pytest.fixture(scope="session")
def dev_pixel_values(deit_tiny_path, dev_images_path) -> torch.Tensor:
    """The first 8 dev photos preprocessed by the model's own image processor."""
    from PIL import Image
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(deit_tiny_path)
    files = sorted(dev_images_path.glob("*.jpg"))[:8]
    images = [Image.open(f).convert("RGB") for f in files]
    return processor(images=images, return_tensors="pt")["pixel_values"]
