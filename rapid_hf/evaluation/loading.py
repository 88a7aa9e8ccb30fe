"""Load any ViT/DeiT image classifier (Hub id or local folder) as the matching Rapid class."""

from __future__ import annotations

import torch
from transformers import AutoConfig

from rapid_hf.models.encoder import RapidHeadMixin
from rapid_hf.reduction.config import RapidConfig

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def rapid_class_for(name_or_path: str) -> type[RapidHeadMixin]:
    """The Rapid class for a checkpoint, from its config's `model_type` and `architectures` (any family)."""
    import rapid_hf  # noqa: F401  (registers the Rapid configs with AutoConfig)
    from rapid_hf.models.auto import rapid_class_for_config

    return rapid_class_for_config(AutoConfig.from_pretrained(name_or_path))


def load_rapid_model(name_or_path: str, device: str | torch.device = "cpu") -> RapidHeadMixin:
    """The checkpoint as a Rapid model in eval mode on `device` (float32 weights; use autocast for fp16/bf16)."""
    model = rapid_class_for(name_or_path).from_pretrained(name_or_path)
    return model.to(device).eval()


def autocast_for(device: torch.device, precision: str) -> torch.autocast:
    """The autocast context of a precision name (fp32 disables it), as in the paper's AMP protocol."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is invalid: choose from {', '.join(PRECISIONS)}")
    return torch.autocast(device.type, dtype=PRECISIONS[precision], enabled=precision != "fp32")


def saved_settings(name_or_path: str) -> RapidConfig | None:
    """The reduction settings a checkpoint was saved with (config.json `rapid`), None for a plain checkpoint.

    This is what the model runs when nothing overrides it (`model.rapid` after loading), read without loading
    the weights so the command line can be checked first.
    """
    import rapid_hf  # noqa: F401  (registers rapid_vit / rapid_deit with AutoConfig)

    settings = getattr(AutoConfig.from_pretrained(name_or_path), "rapid", None)
    if settings is None:
        return None
    if not isinstance(settings, dict):
        raise ValueError(f"{name_or_path!r}: config.json 'rapid' must be an object of RapidConfig fields")
    return RapidConfig.from_dict(settings)
