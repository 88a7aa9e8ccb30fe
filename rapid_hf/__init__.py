"""rapid_hf: training-free token reduction (RAPID, ToMe, ToFu, crucial-token merging) for transformers ViTs.

`import rapid_hf` registers the Rapid configs and models with transformers' Auto classes (as soon as transformers
loads them, see `rapid_hf.registration`), so `AutoModelForImageClassification.from_pretrained` reloads a saved
Rapid model as a Rapid model. The names below are imported on first use: `import rapid_hf.reduction` (the
algorithm, pure torch) imports no transformers.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

from rapid_hf.models.families import FAMILY_MODULES
from rapid_hf.registration import register_when_transformers_loads

__version__ = "0.2.0"

_EXPORTS: dict[str, str] = {
    "RapidConfig": "rapid_hf.reduction.config",
    "RapidModelOutput": "rapid_hf.models.outputs",
    "RapidImageClassifierOutput": "rapid_hf.models.outputs",
    "RapidDeiTWithTeacherOutput": "rapid_hf.models.outputs",
    "get_rapid_model": "rapid_hf.models.auto",
    "rapid_class_for_config": "rapid_hf.models.auto",
}
"""Names shared by every family. Each family's own classes (`RapidViTForImageClassification`, ...) are found in its
modeling module (`rapid_hf.models.families`), so adding a family changes nothing here."""

__all__ = [
    "RapidConfig",
    "RapidDeiTWithTeacherOutput",
    "RapidImageClassifierOutput",
    "RapidModelOutput",
    "__version__",
    "get_rapid_model",
    "rapid_class_for_config",
]

if TYPE_CHECKING:
    from rapid_hf.models.auto import get_rapid_model, rapid_class_for_config
    from rapid_hf.models.outputs import RapidDeiTWithTeacherOutput, RapidImageClassifierOutput, RapidModelOutput
    from rapid_hf.reduction.config import RapidConfig


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(_EXPORTS[name])
    elif name.startswith("Rapid"):  # a family's class: import the family modules (and transformers) only now
        modules = (importlib.import_module(family) for family in FAMILY_MODULES)
        module = next((m for m in modules if name in m.__all__), None)
    else:
        module = None
    if module is None:
        raise AttributeError(f"module 'rapid_hf' has no attribute {name!r}")
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    loaded = [name for module in FAMILY_MODULES if module in sys.modules for name in sys.modules[module].__all__]
    return sorted({*globals(), *_EXPORTS, *loaded})


register_when_transformers_loads()
