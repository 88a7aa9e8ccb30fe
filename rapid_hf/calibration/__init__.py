"""Calibration: fit a token-reduction config to a model on a few held-apart images, without training.

- `layer_statistics` / `auto_switch_layer` / `resolve_auto_switch_layer`: the `switch_layer="auto"` rule from
  the model's own token statistics (one unreduced pass over the calibration images).
- `calibrate`: coordinate search of RAPID's K, tau, lambda and merge mode (ToFu's K, crucial merging's rho)
  minimising KL(unreduced || reduced) on the calibration images (or another `objective`).
- `load_calibration_images` / `save_calibrated`: the calibration rows of a dataset; the chosen values written
  into the saved model's config.json, with the search log beside it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from rapid_hf.calibration.choices import DEFAULT_OBJECTIVE, OBJECTIVES, SEARCHABLE, SEARCHED

_EXPORTS: dict[str, str] = {
    "CALIBRATION_LOG": "rapid_hf.calibration.io",
    "calibration_rows": "rapid_hf.calibration.io",
    "load_calibration_images": "rapid_hf.calibration.io",
    "save_calibrated": "rapid_hf.calibration.io",
    "DEFAULT_GRID": "rapid_hf.calibration.search",
    "CalibrationResult": "rapid_hf.calibration.search",
    "Fidelity": "rapid_hf.calibration.search",
    "Trial": "rapid_hf.calibration.search",
    "calibrate": "rapid_hf.calibration.search",
    "default_searched": "rapid_hf.calibration.search",
    "measure_fidelity": "rapid_hf.calibration.search",
    "predict_logits": "rapid_hf.calibration.search",
    "MIN_REDUNDANT_FRACTION": "rapid_hf.calibration.statistics",
    "LayerStatistics": "rapid_hf.calibration.statistics",
    "auto_switch_layer": "rapid_hf.calibration.statistics",
    "layer_statistics": "rapid_hf.calibration.statistics",
    "resolve_auto_switch_layer": "rapid_hf.calibration.statistics",
}

if TYPE_CHECKING:
    from rapid_hf.calibration.io import CALIBRATION_LOG, calibration_rows, load_calibration_images, save_calibrated
    from rapid_hf.calibration.search import (
        DEFAULT_GRID,
        CalibrationResult,
        Fidelity,
        Trial,
        calibrate,
        default_searched,
        measure_fidelity,
        predict_logits,
    )
    from rapid_hf.calibration.statistics import (
        MIN_REDUNDANT_FRACTION,
        LayerStatistics,
        auto_switch_layer,
        layer_statistics,
        resolve_auto_switch_layer,
    )


def __getattr__(name: str) -> Any:
    """The torch-using names are imported on first use (the constants above are not: the CLI reads them early)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rapid_hf.calibration' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


__all__ = [
    "CALIBRATION_LOG",
    "DEFAULT_GRID",
    "DEFAULT_OBJECTIVE",
    "MIN_REDUNDANT_FRACTION",
    "OBJECTIVES",
    "SEARCHABLE",
    "SEARCHED",
    "CalibrationResult",
    "Fidelity",
    "LayerStatistics",
    "Trial",
    "auto_switch_layer",
    "calibrate",
    "calibration_rows",
    "default_searched",
    "layer_statistics",
    "load_calibration_images",
    "measure_fidelity",
    "predict_logits",
    "resolve_auto_switch_layer",
    "save_calibrated",
]
