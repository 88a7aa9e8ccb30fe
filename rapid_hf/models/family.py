"""The family protocol: what one model family declares, once, in its modeling file, and what follows from it.

A family module (`modeling_rapid_*.py`, listed once in `rapid_hf.models.families.FAMILY_MODULES`) defines its Rapid
config classes (`RapidConfigMixin`), its Rapid layer/attention/model classes (the mixins of `layers` and `encoder`)
and one `FAMILY = Family(...)`. From that declaration follow the Auto registration (`register_family`),
`get_rapid_model`, the lazy `rapid_hf.<Name>` exports, the Hub remote code, ONNX export, the CLI and the shared
tests. docs/ADDING_A_FAMILY.md walks through it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

AUTO_MODEL = "AutoModel"
AUTO_CLASSIFIER = "AutoModelForImageClassification"
AUTO_ZERO_SHOT = "AutoModelForZeroShotImageClassification"


@dataclass(frozen=True)
class Family:
    """One model family as rapid_hf sees it.

    Attributes:
        name: short name (`vit`, `siglip`, ...).
        configs: its Rapid config classes (each a `RapidConfigMixin` over a stock config class).
        module_classes: stock layer and attention classes -> their Rapid subclasses (swapped in place).
        model_classes: stock model classes -> their Rapid classes (what `get_rapid_model` converts).
        auto_classes: Rapid model class -> the transformers Auto classes that load it (by name).
        exports: extra public names of the module beyond its model and config classes (e.g. output classes).
    """

    name: str
    configs: tuple[type, ...]
    module_classes: Mapping[type[nn.Module], type[nn.Module]]
    model_classes: Mapping[type[nn.Module], type[nn.Module]]
    auto_classes: Mapping[type[nn.Module], tuple[str, ...]]
    exports: tuple[str, ...] = ()

    @property
    def public_names(self) -> tuple[str, ...]:
        """What `rapid_hf` exports from this family: config and model classes, then `exports`."""
        names = [config.__name__ for config in self.configs] + [cls.__name__ for cls in self.model_classes.values()]
        return (*dict.fromkeys(names), *self.exports)


def register_family(family: Family) -> None:
    """Register the family's configs with `AutoConfig` and its models with their Auto classes.

    Several Rapid classes under one Auto class and config (DeiT's two classifier heads) are registered together,
    as transformers' own "deit" entry is: `config.architectures` chooses between them at load.
    """
    import transformers

    for config in family.configs:
        transformers.AutoConfig.register(config.model_type, config, exist_ok=True)
    grouped: dict[tuple[str, type], list[type]] = {}
    for rapid_class, autos in family.auto_classes.items():
        for auto in autos:
            grouped.setdefault((auto, rapid_class.config_class), []).append(rapid_class)
    for (auto, config), classes in grouped.items():
        getattr(transformers, auto).register(config, classes[0] if len(classes) == 1 else tuple(classes), exist_ok=True)


__all__ = ["AUTO_CLASSIFIER", "AUTO_MODEL", "AUTO_ZERO_SHOT", "Family", "register_family"]
