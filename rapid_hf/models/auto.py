"""Every supported family in one place: `get_rapid_model` turns a loaded transformers model into its Rapid class."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from rapid_hf.models import modeling_rapid, modeling_rapid_clip, modeling_rapid_dinov2
from rapid_hf.models.encoder import RapidSettingsMixin
from rapid_hf.models.layers import swap_module_classes
from rapid_hf.reduction.config import RapidConfig

RAPID_CLASSES: dict[type[nn.Module], type[RapidSettingsMixin]] = {
    **modeling_rapid.RAPID_CLASSES,
    **modeling_rapid_dinov2.RAPID_CLASSES,
    **modeling_rapid_clip.RAPID_CLASSES,
}
"""Stock transformers class -> its Rapid class, for every supported family."""


def rapid_class_for_config(config: Any) -> type[RapidSettingsMixin]:
    """The Rapid class that loads a checkpoint with this config (stock or Rapid `model_type`), for the loaders.

    Chosen by `config.architectures` (the class that saved the checkpoint, stock or Rapid, e.g.
    `ViTForImageClassification`, `RapidCLIPModel`); without a known architecture, the family's first class (its
    backbone). Raises ValueError naming the supported model types otherwise.
    """
    by_name = {rapid.__name__: rapid for rapid in RAPID_CLASSES.values()}
    by_name.update({stock.__name__: rapid for stock, rapid in RAPID_CLASSES.items()})
    for name in getattr(config, "architectures", None) or ():
        if name in by_name:
            return by_name[name]
    model_type = getattr(config, "model_type", None)
    by_type: dict[str, type[RapidSettingsMixin]] = {}
    for rapid in RAPID_CLASSES.values():
        for accepted in (rapid.config_class.model_type, *rapid.config_class.source_model_types):
            by_type.setdefault(accepted, rapid)
    if model_type in by_type:
        return by_type[model_type]
    raise ValueError(
        f"no Rapid class loads a checkpoint with model_type={model_type!r} and architectures="
        f"{getattr(config, 'architectures', None)}; supported model types: {sorted(by_type)}"
    )


def auto_class_names(rapid_class: type[RapidSettingsMixin]) -> tuple[str, ...]:
    """The transformers Auto classes that load `rapid_class` (for a Hub repository's `auto_map`).

    Image classifiers: `AutoModelForImageClassification`; `RapidCLIPModel`: `AutoModel` and
    `AutoModelForZeroShotImageClassification` (what the zero-shot pipeline loads); every other class: `AutoModel`.
    """
    if rapid_class not in RAPID_CLASSES.values():
        raise ValueError(f"{rapid_class.__name__} is not a Rapid model class")
    if rapid_class.__name__.endswith("ForImageClassification") or "ForImageClassificationWith" in rapid_class.__name__:
        return ("AutoModelForImageClassification",)
    if rapid_class is modeling_rapid_clip.RapidCLIPModel:
        return ("AutoModel", "AutoModelForZeroShotImageClassification")
    return ("AutoModel",)


def get_rapid_model(model: nn.Module, rapid: RapidConfig | Mapping[str, Any] | None = None) -> RapidSettingsMixin:
    """Turn a transformers model already in memory into its Rapid class, in place, and return it.

    Nothing is reloaded or copied: the model object, its weights, devices and registered hooks stay; its class,
    its config's class and its layer/attention classes become the Rapid subclasses (which add no parameters).
    `rapid` sets the model's own settings (default: no reduction, so the outputs are unchanged). Like
    `peft.get_peft_model`, call it on the loaded model, e.g. `get_rapid_model(model, RapidConfig(r=16))`.
    """
    if isinstance(model, RapidSettingsMixin):
        if rapid is not None:
            model.set_rapid(rapid)
        return model
    rapid_class = RAPID_CLASSES.get(type(model))
    if rapid_class is None:
        supported = ", ".join(sorted(cls.__name__ for cls in RAPID_CLASSES))
        raise ValueError(f"get_rapid_model supports {supported}; got {type(model).__name__}")
    config = rapid_class.config_class.for_model(model.config)
    if config is not model.config:  # same fields: give the shared config object the Rapid class instead
        model.config.__class__ = rapid_class.config_class
    swap_module_classes(model, {type(model): rapid_class})
    model.swap_modules()
    if rapid is not None:
        model.set_rapid(rapid)
    return model
