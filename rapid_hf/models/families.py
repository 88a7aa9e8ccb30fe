"""The registry of model families: one entry per family module. Importing this module imports no transformers."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rapid_hf.models.family import Family

FAMILY_MODULES: tuple[str, ...] = (
    "rapid_hf.models.modeling_rapid",
    "rapid_hf.models.modeling_rapid_dinov2",
    "rapid_hf.models.modeling_rapid_clip",
    "rapid_hf.models.modeling_rapid_siglip",
    "rapid_hf.models.modeling_rapid_dinov3",
)
"""One modeling module per family, each defining `FAMILY`; families never import each other."""


def families() -> tuple[Family, ...]:
    """Every supported family's declaration (imports the family modules, hence transformers)."""
    return tuple(importlib.import_module(module).FAMILY for module in FAMILY_MODULES)


__all__ = ["FAMILY_MODULES", "families"]
