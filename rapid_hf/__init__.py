"""rapid_hf: training-free token reduction (RAPID, ToMe, ToFu, crucial-token merging) for transformers ViTs.

`import rapid_hf` registers the Rapid configs and models with transformers' Auto classes (as soon as transformers
loads them, see `rapid_hf.registration`), so `AutoModelForImageClassification.from_pretrained` reloads a saved
Rapid model as a Rapid model. The names below are imported on first use: `import rapid_hf.reduction` (the
algorithm, pure torch) imports no transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from rapid_hf.registration import register_when_transformers_loads

__version__ = "0.2.0"

_EXPORTS: dict[str, str] = {
    "RapidConfig": "rapid_hf.reduction.config",
    "RapidViTConfig": "rapid_hf.models.configuration_rapid",
    "RapidDeiTConfig": "rapid_hf.models.configuration_rapid",
    "RapidViTModel": "rapid_hf.models.modeling_rapid",
    "RapidViTForImageClassification": "rapid_hf.models.modeling_rapid",
    "RapidDeiTModel": "rapid_hf.models.modeling_rapid",
    "RapidDeiTForImageClassification": "rapid_hf.models.modeling_rapid",
    "RapidDeiTForImageClassificationWithTeacher": "rapid_hf.models.modeling_rapid",
    "RapidDinov2Config": "rapid_hf.models.configuration_rapid",
    "RapidDinov2WithRegistersConfig": "rapid_hf.models.configuration_rapid",
    "RapidDinov2Model": "rapid_hf.models.modeling_rapid_dinov2",
    "RapidDinov2ForImageClassification": "rapid_hf.models.modeling_rapid_dinov2",
    "RapidDinov2WithRegistersModel": "rapid_hf.models.modeling_rapid_dinov2",
    "RapidDinov2WithRegistersForImageClassification": "rapid_hf.models.modeling_rapid_dinov2",
    "RapidCLIPConfig": "rapid_hf.models.configuration_rapid",
    "RapidCLIPVisionConfig": "rapid_hf.models.configuration_rapid",
    "RapidCLIPVisionModel": "rapid_hf.models.modeling_rapid_clip",
    "RapidCLIPVisionModelWithProjection": "rapid_hf.models.modeling_rapid_clip",
    "RapidCLIPModel": "rapid_hf.models.modeling_rapid_clip",
    "RapidCLIPOutput": "rapid_hf.models.modeling_rapid_clip",
    "RapidCLIPVisionModelOutput": "rapid_hf.models.modeling_rapid_clip",
    "RapidModelOutput": "rapid_hf.models.outputs",
    "RapidImageClassifierOutput": "rapid_hf.models.outputs",
    "RapidDeiTWithTeacherOutput": "rapid_hf.models.outputs",
    "get_rapid_model": "rapid_hf.models.auto",
    "rapid_class_for_config": "rapid_hf.models.auto",
}

__all__ = [
    "RapidCLIPConfig",
    "RapidCLIPModel",
    "RapidCLIPOutput",
    "RapidCLIPVisionConfig",
    "RapidCLIPVisionModel",
    "RapidCLIPVisionModelOutput",
    "RapidCLIPVisionModelWithProjection",
    "RapidConfig",
    "RapidDeiTConfig",
    "RapidDeiTForImageClassification",
    "RapidDeiTForImageClassificationWithTeacher",
    "RapidDeiTModel",
    "RapidDeiTWithTeacherOutput",
    "RapidDinov2Config",
    "RapidDinov2ForImageClassification",
    "RapidDinov2Model",
    "RapidDinov2WithRegistersConfig",
    "RapidDinov2WithRegistersForImageClassification",
    "RapidDinov2WithRegistersModel",
    "RapidImageClassifierOutput",
    "RapidModelOutput",
    "RapidViTConfig",
    "RapidViTForImageClassification",
    "RapidViTModel",
    "__version__",
    "get_rapid_model",
    "rapid_class_for_config",
]

if TYPE_CHECKING:
    from rapid_hf.models.auto import get_rapid_model, rapid_class_for_config
    from rapid_hf.models.configuration_rapid import (
        RapidCLIPConfig,
        RapidCLIPVisionConfig,
        RapidDeiTConfig,
        RapidDinov2Config,
        RapidDinov2WithRegistersConfig,
        RapidViTConfig,
    )
    from rapid_hf.models.modeling_rapid import (
        RapidDeiTForImageClassification,
        RapidDeiTForImageClassificationWithTeacher,
        RapidDeiTModel,
        RapidViTForImageClassification,
        RapidViTModel,
    )
    from rapid_hf.models.modeling_rapid_clip import (
        RapidCLIPModel,
        RapidCLIPOutput,
        RapidCLIPVisionModel,
        RapidCLIPVisionModelOutput,
        RapidCLIPVisionModelWithProjection,
    )
    from rapid_hf.models.modeling_rapid_dinov2 import (
        RapidDinov2ForImageClassification,
        RapidDinov2Model,
        RapidDinov2WithRegistersForImageClassification,
        RapidDinov2WithRegistersModel,
    )
    from rapid_hf.models.outputs import RapidDeiTWithTeacherOutput, RapidImageClassifierOutput, RapidModelOutput
    from rapid_hf.reduction.config import RapidConfig


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rapid_hf' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


register_when_transformers_loads()
