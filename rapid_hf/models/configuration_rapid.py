"""Transformers configs of the Rapid models: the family's config plus a `rapid` dict of reduction settings.

They have their own `model_type` ("rapid_vit", "rapid_deit", ...) so Auto classes find the Rapid classes after
`import rapid_hf`, and they read the ordinary checkpoints of the Hub silently. `config.rapid` is the one source
of truth of a model's own settings: the forward runs it, `save_pretrained` writes it, and assigning it (a
`RapidConfig` or its dict) is validated at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from transformers import (
    AutoConfig,
    CLIPConfig,
    CLIPVisionConfig,
    DeiTConfig,
    Dinov2Config,
    Dinov2WithRegistersConfig,
    ViTConfig,
)

from rapid_hf.reduction.config import RapidConfig


class _RapidConfigMixin:
    """Accept the base model's config.json (`model_type` vit/deit) and refuse anything else clearly."""

    model_type: str
    source_model_types: tuple[str, ...]
    rapid_class_hint: str
    num_protected_tokens: int
    rapid: dict | None

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> tuple[dict[str, Any], dict]:
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        base_key = getattr(cls, "base_config_key", "")
        if base_key and isinstance(config_dict.get(base_key), dict):  # e.g. the vision tower of a `clip` checkpoint
            config_dict = config_dict[base_key]
        model_type = config_dict.get("model_type")
        if model_type in cls.source_model_types:
            config_dict = {**config_dict, "model_type": cls.model_type}
        elif model_type != cls.model_type:
            raise ValueError(
                f"{pretrained_model_name_or_path!r} is a {model_type!r} checkpoint, not a "
                f"{'/'.join(cls.source_model_types)} image classifier: {cls.rapid_class_hint}"
            )
        return config_dict, kwargs

    def __setattr__(self, key: str, value: Any) -> None:
        if key == "rapid" and value is not None:
            # Stored as the JSON dict save_pretrained writes; checked at construction, at load time (also via
            # AutoConfig) and on every assignment, naming the field.
            settings = as_rapid_config(value)
            if self._encoder_config_ready():
                self.validate_rapid(settings)
            value = settings.to_dict()
        super().__setattr__(key, value)

    @classmethod
    def for_model(cls, config: Any, rapid: RapidConfig | Mapping[str, Any] | None = None) -> Any:
        """The config a Rapid model is built with: `config` itself, or this class made from the family's plain
        config (e.g. a `ViTConfig`, same fields); with `rapid` set when given."""
        # By model_type, not class: transformers' remote-code loader may import this module twice.
        if getattr(config, "model_type", None) != cls.model_type:
            if getattr(config, "model_type", None) not in cls.source_model_types:
                raise ValueError(
                    f"a {type(config).__name__} cannot configure a Rapid model built on {cls.__name__}: "
                    f"{cls.rapid_class_hint}"
                )
            config = cls.from_dict({**config.to_dict(), "model_type": cls.model_type})
        if rapid is not None:
            config.rapid = rapid
        return config

    @property
    def encoder_config(self) -> Any:
        """The config of the reduced image encoder: this config, or its vision tower's (CLIP)."""
        return self

    def _encoder_config_ready(self) -> bool:
        return "num_hidden_layers" in self.__dict__

    @property
    def mlp_size(self) -> int:
        """Inner width of the reduced encoder's MLP (`intermediate_size`, or DINOv2's `hidden_size * mlp_ratio`)."""
        encoder = self.encoder_config
        if getattr(encoder, "intermediate_size", None) is not None:
            return encoder.intermediate_size
        return int(encoder.hidden_size * encoder.mlp_ratio)

    @property
    def num_input_tokens(self) -> int:
        """Tokens entering the encoder at the configured image size: patches plus protected tokens."""
        encoder = self.encoder_config
        image, patch = as_pair(encoder.image_size), as_pair(encoder.patch_size)
        return (image[0] // patch[0]) * (image[1] // patch[1]) + self.num_protected_tokens

    def validate_rapid(self, rapid: RapidConfig) -> None:
        """The checks of `rapid` that need this architecture (layers, input tokens, protected tokens)."""
        rapid.validate_for_model(
            num_layers=self.encoder_config.num_hidden_layers,
            num_tokens=self.num_input_tokens,
            num_protected=self.num_protected_tokens,
        )


def as_rapid_config(settings: RapidConfig | Mapping[str, Any] | None) -> RapidConfig:
    """Reduction settings given as a `RapidConfig`, its dict (as in config.json) or None (no reduction)."""
    if settings is None:
        return RapidConfig()
    if isinstance(settings, RapidConfig):
        return settings
    if isinstance(settings, Mapping):
        return RapidConfig.from_dict(settings)
    raise ValueError(
        f"rapid settings must be a RapidConfig, a dict of its fields or None, got {type(settings).__name__}"
    )


def as_pair(size: int | Sequence[int]) -> tuple[int, int]:
    """`image_size`/`patch_size` of a ViT config (an int or a pair) as (height, width)."""
    return (size, size) if isinstance(size, int) else (size[0], size[1])


class RapidViTConfig(_RapidConfigMixin, ViTConfig):
    """`ViTConfig` plus `rapid`: the `RapidConfig.to_dict()` of the reduction to run (None = no reduction)."""

    model_type = "rapid_vit"
    source_model_types = ("vit",)
    num_protected_tokens = 1
    rapid_class_hint = (
        "RapidViTForImageClassification loads `vit` checkpoints (google/vit-*, facebook/deit-*-patch16-224); "
        "use RapidDeiT* classes for `deit` (distilled) checkpoints"
    )

    rapid: dict | None = None


class RapidDeiTConfig(_RapidConfigMixin, DeiTConfig):
    """`DeiTConfig` plus `rapid`: the `RapidConfig.to_dict()` of the reduction to run (None = no reduction)."""

    model_type = "rapid_deit"
    source_model_types = ("deit",)
    num_protected_tokens = 2
    rapid_class_hint = (
        "RapidDeiT* classes load `deit` checkpoints (facebook/deit-*-distilled-*); "
        "use RapidViTForImageClassification for `vit` checkpoints"
    )

    rapid: dict | None = None


class RapidDinov2Config(_RapidConfigMixin, Dinov2Config):
    """`Dinov2Config` plus `rapid`: the `RapidConfig.to_dict()` of the reduction to run (None = no reduction)."""

    model_type = "rapid_dinov2"
    source_model_types = ("dinov2",)
    num_protected_tokens = 1
    rapid_class_hint = (
        "RapidDinov2Model / RapidDinov2ForImageClassification load `dinov2` checkpoints (facebook/dinov2-*); "
        "use RapidDinov2WithRegistersModel for `dinov2_with_registers` checkpoints"
    )

    rapid: dict | None = None


class RapidDinov2WithRegistersConfig(_RapidConfigMixin, Dinov2WithRegistersConfig):
    """`Dinov2WithRegistersConfig` plus `rapid`; CLS and every register token are protected."""

    model_type = "rapid_dinov2_with_registers"
    source_model_types = ("dinov2_with_registers",)
    rapid_class_hint = (
        "RapidDinov2WithRegistersModel loads `dinov2_with_registers` checkpoints (facebook/dinov2-with-registers-*); "
        "use RapidDinov2Model for `dinov2` checkpoints"
    )

    rapid: dict | None = None

    @property
    def num_protected_tokens(self) -> int:
        """CLS plus the register tokens."""
        return 1 + self.num_register_tokens


class RapidCLIPVisionConfig(_RapidConfigMixin, CLIPVisionConfig):
    """`CLIPVisionConfig` plus `rapid`; reads `clip_vision_model` configs and the vision part of `clip` ones."""

    model_type = "rapid_clip_vision_model"
    source_model_types = ("clip_vision_model",)
    num_protected_tokens = 1
    rapid_class_hint = (
        "RapidCLIPVisionModel / RapidCLIPVisionModelWithProjection load `clip` and `clip_vision_model` checkpoints "
        "(openai/clip-vit-*)"
    )

    rapid: dict | None = None


class RapidCLIPConfig(_RapidConfigMixin, CLIPConfig):
    """`CLIPConfig` plus `rapid`: the reduction of the vision tower (the text tower is never reduced)."""

    model_type = "rapid_clip"
    source_model_types = ("clip",)
    num_protected_tokens = 1
    rapid_class_hint = "RapidCLIPModel loads `clip` checkpoints (openai/clip-vit-*)"

    rapid: dict | None = None

    @property
    def encoder_config(self) -> Any:
        return self.vision_config

    def _encoder_config_ready(self) -> bool:
        return isinstance(self.__dict__.get("vision_config"), CLIPVisionConfig)

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.rapid is not None:  # set before the vision config existed: check it now
            self.validate_rapid(as_rapid_config(self.rapid))


RAPID_CONFIGS: tuple[type, ...] = (
    RapidViTConfig,
    RapidDeiTConfig,
    RapidDinov2Config,
    RapidDinov2WithRegistersConfig,
    RapidCLIPVisionConfig,
    RapidCLIPConfig,
)

if __name__.startswith("rapid_hf."):  # the installed package (see rapid_hf.registration), never Hub remote code,
    for _config_class in RAPID_CONFIGS:  # whose loading transformers allows only with trust_remote_code=True
        AutoConfig.register(_config_class.model_type, _config_class, exist_ok=True)
