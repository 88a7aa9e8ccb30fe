"""Every supported family in one place: `get_rapid_model` turns a loaded transformers model into its Rapid class."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from rapid_hf.models import modeling_rapid
from rapid_hf.models.encoder import RapidSettingsMixin
from rapid_hf.models.layers import swap_module_classes
from rapid_hf.reduction.config import RapidConfig

RAPID_CLASSES: dict[type[nn.Module], type[RapidSettingsMixin]] = {**modeling_rapid.RAPID_CLASSES}
"""Stock transformers class -> its Rapid class, for every supported family."""


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
    swap_module_classes(model, {type(model): rapid_class, **rapid_class.module_classes})
    if rapid is not None:
        model.set_rapid(rapid)
    return model
