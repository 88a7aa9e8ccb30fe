"""Transformers configs of the Rapid models: the family's config plus a `rapid` dict of reduction settings.

Each family defines its Rapid config classes in its modeling file with `RapidConfigMixin`. They have their own
`model_type` ("rapid_vit", "rapid_deit", ...) so Auto classes find the Rapid classes after `import rapid_hf`, and
they read the ordinary checkpoints of the Hub silently. `config.rapid` is the one source
of truth of a model's own settings: the forward runs it, `save_pretrained` writes it, and assigning it (a
`RapidConfig` or its dict) is validated at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rapid_hf.reduction.config import RapidConfig


class RapidConfigMixin:
    """A family's transformers config plus `rapid`; reads the stock checkpoint's config.json, refuses others.

    A family's Rapid config (in its modeling file) mixes this into the stock config class and sets `model_type`
    (its own, e.g. "rapid_vit"), `source_model_types` (the stock ones it reads), `rapid_class_hint` (which class
    loads what, for error messages) and `protected` (tokens at the front never reduced), or overrides
    `protected_tokens` when that depends on the config (registers).
    """

    model_type: str
    source_model_types: tuple[str, ...]
    rapid_class_hint: str
    protected: int = 1
    rapid: dict | None = None

    @classmethod
    def protected_tokens(cls, encoder_config: Any) -> int:
        """Tokens at the front never removed, merged or used as merge destinations (CLS, registers, ...)."""
        return cls.protected

    @classmethod
    def input_tokens(cls, encoder_config: Any) -> int:
        """Tokens entering the encoder at `encoder_config`'s image size: patches plus protected tokens."""
        image, patch = as_pair(encoder_config.image_size), as_pair(encoder_config.patch_size)
        return (image[0] // patch[0]) * (image[1] // patch[1]) + cls.protected_tokens(encoder_config)

    @property
    def num_protected_tokens(self) -> int:
        return type(self).protected_tokens(self.encoder_config)

    @property
    def num_input_tokens(self) -> int:
        """Tokens entering the encoder at the configured image size: patches plus protected tokens."""
        return type(self).input_tokens(self.encoder_config)

    def to_dict(self) -> dict[str, Any]:
        """transformers' dict (what `save_pretrained` writes), with `rapid` validated again: an in-place edit of
        the saved dict (`config.rapid["r"] = -5`) is refused here, as the forward refuses it."""
        data = super().to_dict()
        if data.get("rapid") is not None:
            settings = as_rapid_config(data["rapid"])
            if self._encoder_config_ready():
                self.validate_rapid(settings)
            data["rapid"] = settings.to_dict()
        return data

    def save_pretrained(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' `save_pretrained`, refusing invalid settings before anything is written."""
        self.to_dict()
        return super().save_pretrained(*args, **kwargs)

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

    def validate_rapid(self, rapid: RapidConfig) -> None:
        """The checks of `rapid` that need this architecture (layers, input tokens, protected tokens)."""
        rapid.validate_for_model(
            num_layers=self.encoder_config.num_hidden_layers,
            num_tokens=self.num_input_tokens,
            num_protected=self.num_protected_tokens,
        )


class TowerConfigMixin(RapidConfigMixin):
    """A Rapid config of a two-tower model (CLIP, SigLIP): only the vision tower, `vision_config`, is reduced."""

    @property
    def encoder_config(self) -> Any:
        return self.vision_config

    def _encoder_config_ready(self) -> bool:
        return "vision_config" in self.__dict__ and hasattr(self.__dict__["vision_config"], "num_hidden_layers")

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.rapid is not None:  # set before the vision config existed: check it now
            self.validate_rapid(as_rapid_config(self.rapid))


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
