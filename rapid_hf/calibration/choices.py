"""What calibration can search and optimise: plain constants, importable without torch (the `rapid-hf calibrate`
flags are built from them before anything heavy is imported)."""

from __future__ import annotations

from typing import Literal

Objective = Literal["kl", "agreement", "top1_nll"]
OBJECTIVES: tuple[Objective, ...] = ("kl", "agreement", "top1_nll")
DEFAULT_OBJECTIVE: Objective = "kl"

# The knobs searched by default, per method (RAPID with importance_mode="protect" adds importance_ratio).
SEARCHED: dict[str, tuple[str, ...]] = {
    "rapid": ("switch_layer", "prune_threshold", "importance_weight", "merge_mode"),
    "tofu": ("switch_layer", "merge_mode"),
    "crucial": ("importance_ratio", "merge_mode"),
}
# Every knob that may be searched when asked for.
SEARCHABLE: dict[str, tuple[str, ...]] = {
    **SEARCHED,
    "rapid": (*SEARCHED["rapid"], "importance_ratio", "importance_mode", "importance_source"),
}
