"""Every supported family in one place: `get_rapid_model` turns a loaded transformers model into its Rapid class."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from torch import nn

from rapid_hf.models.encoder import RapidSettingsMixin
from rapid_hf.models.families import families
from rapid_hf.models.layers import swap_module_classes
from rapid_hf.reduction.config import RapidConfig

RAPID_CLASSES: dict[type[nn.Module], type[RapidSettingsMixin]] = {
    stock: rapid for family in families() for stock, rapid in family.model_classes.items()
}
"""Stock transformers class -> its Rapid class, for every supported family."""

AUTO_CLASSES: dict[type[RapidSettingsMixin], tuple[str, ...]] = {
    rapid: autos for family in families() for rapid, autos in family.auto_classes.items()
}
"""Rapid class -> the transformers Auto classes that load it."""


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
    """The transformers Auto classes that load `rapid_class` (for a Hub repository's `auto_map`), as its family
    declares them."""
    if rapid_class not in AUTO_CLASSES:
        raise ValueError(f"{rapid_class.__name__} is not a Rapid model class")
    return AUTO_CLASSES[rapid_class]


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
    _give_own_config(model, rapid_class.config_class)
    swap_module_classes(model, {type(model): rapid_class})
    model.swap_modules()
    if rapid is not None:
        model.set_rapid(rapid)
    return model


def _give_own_config(model: nn.Module, config_class: type) -> None:
    """Give `model` a copy of its config as `config_class`, and every submodule that shared the config (or one of
    its sub-configs, e.g. CLIP's vision config) the matching copy: a config object shared with another model keeps
    its class, so that model neither saves nor reloads as a Rapid model. Runtime state such as the attention
    implementation is copied with it."""
    old = model.config
    config_class.for_model(old)  # refuses a config of another family, naming it
    config = copy.copy(old)
    config.__class__ = config_class
    replaced = {id(old): config}
    for name in getattr(old, "sub_configs", None) or {}:
        if getattr(old, name, None) is not None:
            sub_config = copy.copy(getattr(old, name))
            object.__setattr__(config, name, sub_config)
            replaced[id(getattr(old, name))] = sub_config
    for module in model.modules():
        current = module.__dict__.get("config")
        if current is not None and id(current) in replaced:
            module.config = replaced[id(current)]
