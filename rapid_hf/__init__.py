"""rapid_hf: training-free token reduction (RAPID, ToMe, ToFu, crucial-token merging) for transformers ViTs.

Importing the package registers the Rapid configs and models with transformers' Auto classes, so
`AutoModelForImageClassification.from_pretrained` reloads a saved Rapid model as a Rapid model.
"""

from rapid_hf.models.auto import get_rapid_model, register_auto_classes
from rapid_hf.models.configuration_rapid import RapidDeiTConfig, RapidViTConfig
from rapid_hf.models.modeling_rapid import (
    RapidDeiTForImageClassification,
    RapidDeiTForImageClassificationWithTeacher,
    RapidDeiTModel,
    RapidViTForImageClassification,
    RapidViTModel,
)
from rapid_hf.models.outputs import RapidDeiTWithTeacherOutput, RapidImageClassifierOutput, RapidModelOutput
from rapid_hf.reduction.config import RapidConfig

__version__ = "0.2.0"

register_auto_classes()

__all__ = [
    "RapidConfig",
    "RapidDeiTConfig",
    "RapidDeiTForImageClassification",
    "RapidDeiTForImageClassificationWithTeacher",
    "RapidDeiTModel",
    "RapidDeiTWithTeacherOutput",
    "RapidImageClassifierOutput",
    "RapidModelOutput",
    "RapidViTConfig",
    "RapidViTForImageClassification",
    "RapidViTModel",
    "__version__",
    "get_rapid_model",
]
