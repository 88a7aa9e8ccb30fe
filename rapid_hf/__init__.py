"""rapid_hf: training-free token reduction (RAPID, ToMe, ToFu) for transformers ViT/DeiT classifiers.

Importing the package registers the Rapid configs and models with transformers' Auto classes, so
`AutoModelForImageClassification.from_pretrained` reloads a saved Rapid model as a Rapid model.
"""

from transformers import AutoConfig, AutoModelForImageClassification

from rapid_hf.models.configuration_rapid import RapidDeiTConfig, RapidViTConfig
from rapid_hf.models.modeling_rapid import (
    RapidDeiTForImageClassification,
    RapidDeiTForImageClassificationWithTeacher,
    RapidDeiTWithTeacherOutput,
    RapidImageClassifierOutput,
    RapidViTForImageClassification,
)
from rapid_hf.reduction.config import RapidConfig

__version__ = "0.1.0"

AutoConfig.register(RapidViTConfig.model_type, RapidViTConfig, exist_ok=True)
AutoConfig.register(RapidDeiTConfig.model_type, RapidDeiTConfig, exist_ok=True)
AutoModelForImageClassification.register(RapidViTConfig, RapidViTForImageClassification, exist_ok=True)
# Like transformers' own "deit" entry: one config, two heads, chosen by `config.architectures`.
AutoModelForImageClassification.register(
    RapidDeiTConfig, (RapidDeiTForImageClassification, RapidDeiTForImageClassificationWithTeacher), exist_ok=True
)

__all__ = [
    "RapidConfig",
    "RapidDeiTConfig",
    "RapidDeiTForImageClassification",
    "RapidDeiTForImageClassificationWithTeacher",
    "RapidDeiTWithTeacherOutput",
    "RapidImageClassifierOutput",
    "RapidViTConfig",
    "RapidViTForImageClassification",
    "__version__",
]
