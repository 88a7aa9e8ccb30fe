"""Calibration: fit a token-reduction config to a model on a few held-apart images, without training.

- `layer_statistics` / `auto_switch_layer` / `resolve_auto_switch_layer`: the `switch_layer="auto"` rule from
  the model's own token statistics (one unreduced pass over the calibration images).
- `calibrate`: coordinate search of RAPID's K, tau, lambda and merge mode (ToFu's K, crucial merging's rho)
  minimising KL(unreduced || reduced) on the calibration images (or another `objective`).
- `load_calibration_images` / `save_calibrated`: the calibration rows of a dataset; the chosen values written
  into the saved model's config.json, with the search log beside it.
"""

from rapid_hf.calibration.io import CALIBRATION_LOG, load_calibration_images, save_calibrated
from rapid_hf.calibration.search import (
    DEFAULT_GRID,
    SEARCHABLE,
    SEARCHED,
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

__all__ = [
    "CALIBRATION_LOG",
    "DEFAULT_GRID",
    "MIN_REDUNDANT_FRACTION",
    "SEARCHABLE",
    "SEARCHED",
    "CalibrationResult",
    "Fidelity",
    "LayerStatistics",
    "Trial",
    "auto_switch_layer",
    "calibrate",
    "default_searched",
    "layer_statistics",
    "load_calibration_images",
    "measure_fidelity",
    "predict_logits",
    "resolve_auto_switch_layer",
    "save_calibrated",
]
