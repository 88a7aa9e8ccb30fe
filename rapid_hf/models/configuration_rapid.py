"""Transformers configs of the Rapid models: the ViT/DeiT config plus a `rapid` dict of reduction settings.

They have their own `model_type` ("rapid_vit", "rapid_deit") so Auto classes find the Rapid classes after
`import rapid_hf`, and they read the ordinary `vit`/`deit` checkpoints of the Hub silently.
"""

from __future__ import annotations

from typing import Any

from transformers import DeiTConfig, ViTConfig

from rapid_hf.reduction.config import RapidConfig


class _RapidConfigMixin:
    """Accept the base model's config.json (`model_type` vit/deit) and refuse anything else clearly."""

    model_type: str
    source_model_types: tuple[str, ...]
    rapid_class_hint: str

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> tuple[dict[str, Any], dict]:
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        model_type = config_dict.get("model_type")
        if model_type in cls.source_model_types:
            config_dict = {**config_dict, "model_type": cls.model_type}
        elif model_type != cls.model_type:
            raise ValueError(
                f"{pretrained_model_name_or_path!r} is a {model_type!r} checkpoint, not a "
                f"{'/'.join(cls.source_model_types)} image classifier: {cls.rapid_class_hint}"
            )
        if config_dict.get("rapid") is not None:
            RapidConfig.from_dict(config_dict["rapid"])  # fail at load time, naming the bad field
        return config_dict, kwargs


class RapidViTConfig(_RapidConfigMixin, ViTConfig):
    """`ViTConfig` plus `rapid`: the `RapidConfig.to_dict()` of the reduction to run (None = no reduction)."""

    model_type = "rapid_vit"
    source_model_types = ("vit",)
    rapid_class_hint = (
        "RapidViTForImageClassification loads `vit` checkpoints (google/vit-*, facebook/deit-*-patch16-224); "
        "use RapidDeiT* classes for `deit` (distilled) checkpoints"
    )

    rapid: dict | None = None


class RapidDeiTConfig(_RapidConfigMixin, DeiTConfig):
    """`DeiTConfig` plus `rapid`: the `RapidConfig.to_dict()` of the reduction to run (None = no reduction)."""

    model_type = "rapid_deit"
    source_model_types = ("deit",)
    rapid_class_hint = (
        "RapidDeiT* classes load `deit` checkpoints (facebook/deit-*-distilled-*); "
        "use RapidViTForImageClassification for `vit` checkpoints"
    )

    rapid: dict | None = None
