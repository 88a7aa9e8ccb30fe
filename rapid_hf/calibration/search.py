"""Choose a method's knobs on calibration images: a coordinate search minimising the divergence from the model.

The unreduced logits are computed once; each candidate `RapidConfig` is scored on the calibration images by
the objective: `"kl"` (default) the mean KL(unreduced || reduced), ties by higher top-1 agreement; `"agreement"`
the top-1 agreement with the unreduced model, ties by lower KL (what a user who serves the top-1 class cares
about; coarse on few images: one image moves it by 1 / images); `"top1_nll"` the mean cross-entropy of the
reduced model against the unreduced model's top-1 class, ties by higher agreement (aimed at agreement, yet
informed continuously by every image). On held-apart photos neither alternative beat KL
(experiments/pooled_comparison/README.md). The search sweeps one knob at a time over its grid, keeping the best
value, and repeats the sweeps until a round changes nothing. Knobs that cannot matter for the current point are
skipped (tau when K = 0; lambda and the merge mode when K = L). RAPID with K = 0, lambda = 0 and mean merging is
exactly ToMe; when the searched knobs can reach that point it is scored first and the search starts from it if
it beats the given start, so on the calibration images the chosen RAPID is never worse than ToMe.

RAPID's rho is not searched by default: with `importance_mode="shift"` (eq. 2 as written) it only sets theta,
and eq. (2) subtracts `lambda * (a_i - theta)`, so theta shifts every source of an image by the same amount and
the top-r ranking of eq. (4) -- the plan -- does not depend on it. With `importance_mode="protect"` rho is the
fraction of tokens protected from merging, so it is searched then; `importance_mode` itself can be searched
when asked for. The merge mode (size-weighted mean or ToFu's MLERP) is searched too.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from rapid_hf.calibration.choices import DEFAULT_OBJECTIVE, OBJECTIVES, SEARCHABLE, SEARCHED, Objective
from rapid_hf.calibration.statistics import MIN_REDUNDANT_FRACTION, auto_switch_layer, layer_statistics
from rapid_hf.evaluation.fidelity import kl_divergence, top1_agreement, top1_nll
from rapid_hf.reduction.config import AUTO, RapidConfig

DEFAULT_GRID: dict[str, tuple[Any, ...]] = {
    "prune_threshold": (0.5, 0.6, 0.7, 0.8, 0.9),
    "importance_weight": (0.0, 10.0, 25.0, 50.0, 100.0),
    "importance_ratio": (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 1.0),
    "merge_mode": ("mean", "mlerp"),
    "importance_mode": ("shift", "protect"),
    "importance_source": ("attention", "per_patch"),
}
# RAPID knobs that make it exactly ToMe.
TOME_POINT: dict[str, Any] = {
    "switch_layer": 0, "importance_weight": 0.0, "merge_mode": "mean", "importance_mode": "shift"
}
def default_searched(rapid: RapidConfig) -> tuple[str, ...]:
    """The knobs `calibrate` searches when none are named: `SEARCHED`, plus rho for RAPID's "protect" reading."""
    if rapid.method == "rapid" and rapid.importance_mode == "protect":
        return (*SEARCHED["rapid"], "importance_ratio")
    return SEARCHED[rapid.method]


@dataclass(frozen=True)
class Fidelity:
    """Mean KL(unreduced || reduced) in nats, top-1 agreement with the unreduced model, and the mean
    cross-entropy against the unreduced model's top-1 class (`top1_nll`, nats)."""

    kl: float
    agreement: float
    top1_nll: float

    def order_key(self, objective: Objective = DEFAULT_OBJECTIVE) -> tuple[float, float]:
        """Sort key under `objective`, lower is better (ties: KL for agreement, agreement otherwise)."""
        if objective == "agreement":
            return (-self.agreement, self.kl)
        return (self.top1_nll if objective == "top1_nll" else self.kl, -self.agreement)

    def better_than(self, other: Fidelity, objective: Objective = DEFAULT_OBJECTIVE) -> bool:
        """Strictly better under `objective`."""
        return self.order_key(objective) < other.order_key(objective)


@dataclass(frozen=True)
class Trial:
    """One evaluated point of the search: the searched knobs' values and their fidelity."""

    settings: dict[str, Any]
    kl: float
    agreement: float
    top1_nll: float

    @property
    def fidelity(self) -> Fidelity:
        return Fidelity(self.kl, self.agreement, self.top1_nll)


@dataclass
class CalibrationResult:
    """The chosen config, where the search started, and every point it evaluated (the search log)."""

    rapid: RapidConfig
    fidelity: Fidelity
    start: RapidConfig
    start_fidelity: Fidelity
    searched: tuple[str, ...]
    grid: dict[str, list[Any]]
    num_images: int
    seconds: float
    auto_switch_layer: int | None = None
    objective: Objective = DEFAULT_OBJECTIVE
    trials: list[Trial] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly log (written as calibration.json next to the saved model)."""
        return {
            "rapid": self.rapid.to_dict(),
            "fidelity": asdict(self.fidelity),
            "start": self.start.to_dict(),
            "start_fidelity": asdict(self.start_fidelity),
            "objective": self.objective,
            "searched": list(self.searched),
            "grid": self.grid,
            "num_images": self.num_images,
            "seconds": round(self.seconds, 1),
            "auto_switch_layer": self.auto_switch_layer,
            "num_trials": len(self.trials),
            "trials": [asdict(trial) for trial in self.trials],
        }


def _check_inputs(model: Any, pixel_values: Tensor, batch_size: int) -> None:
    if not isinstance(pixel_values, Tensor) or pixel_values.ndim != 4 or len(pixel_values) == 0:
        raise ValueError("calibration needs a non-empty (images, channels, height, width) pixel_values tensor")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if model.training:
        raise ValueError("the model is in training mode (dropout would make the search random): call model.eval()")


@torch.inference_mode()
def predict_logits(model: Any, pixel_values: Tensor, rapid: RapidConfig, batch_size: int = 50) -> Tensor:
    """Logits of `model` running `rapid` (per-call settings) on `pixel_values`, in batches."""
    _check_inputs(model, pixel_values, batch_size)
    device = next(model.parameters()).device
    return torch.cat(
        [
            model(pixel_values=pixel_values[start : start + batch_size].to(device), rapid=rapid).logits.float().cpu()
            for start in range(0, len(pixel_values), batch_size)
        ]
    )


def measure_fidelity(
    model: Any, pixel_values: Tensor, reference_logits: Tensor, rapid: RapidConfig, batch_size: int = 50
) -> Fidelity:
    """Fidelity of `rapid` to the unreduced logits `reference_logits` on the same images."""
    logits = predict_logits(model, pixel_values, rapid, batch_size)
    return Fidelity(
        kl=kl_divergence(reference_logits, logits).mean().item(),
        agreement=top1_agreement(reference_logits, logits).float().mean().item(),
        top1_nll=top1_nll(reference_logits, logits).mean().item(),
    )


def is_relevant(name: str, rapid: RapidConfig, num_layers: int) -> bool:
    """Whether knob `name` can change what `rapid` computes (knobs of a stage that never runs cannot)."""
    if rapid.method not in ("rapid", "tofu"):
        return True
    switch_layer = rapid.resolved_switch_layer(num_layers)
    if name == "prune_threshold":
        return rapid.method == "rapid" and switch_layer > 0
    if name == "importance_ratio":  # RAPID's rho only matters when it protects tokens
        return rapid.importance_mode == "protect" and switch_layer < num_layers
    if name in ("importance_weight", "merge_mode", "importance_mode", "importance_source"):
        return switch_layer < num_layers
    return True


def search_grid(
    searched: Sequence[str], num_layers: int, grid: Mapping[str, Sequence[Any]] | None = None
) -> dict[str, list[Any]]:
    """The values each searched knob may take: `grid` entries, else `DEFAULT_GRID`, and K in 0..L."""
    values: dict[str, list[Any]] = {}
    for name in searched:
        if grid is not None and name in grid:
            values[name] = list(grid[name])
        elif name == "switch_layer":
            values[name] = list(range(num_layers + 1))
        else:
            values[name] = list(DEFAULT_GRID[name])
        if not values[name]:
            raise ValueError(f"the search grid of {name!r} is empty")
    return values


def calibrate(
    model: Any,
    pixel_values: Tensor,
    rapid: RapidConfig | None = None,
    searched: Sequence[str] | None = None,
    grid: Mapping[str, Sequence[Any]] | None = None,
    max_rounds: int = 3,
    batch_size: int = 50,
    min_redundant_fraction: float = MIN_REDUNDANT_FRACTION,
    progress: bool = True,
    objective: Objective = DEFAULT_OBJECTIVE,
) -> CalibrationResult:
    """Coordinate search over `searched` knobs of `rapid` (default: the model's) on calibration `pixel_values`.

    The reduction amount (r or output_tokens) and every knob not searched stay as given. `switch_layer="auto"`
    is resolved by the token-statistics rule first and used as the starting K. The model's own setting is left
    unchanged; apply the result with `model.set_rapid(result.rapid)` or `save_calibrated`. `objective` is what the
    search optimises: `"kl"`, `"agreement"` or `"top1_nll"` (see the module docstring).
    """
    _check_inputs(model, pixel_values, batch_size)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}")
    rapid = model.rapid if rapid is None else rapid
    if rapid.method not in SEARCHED:
        raise ValueError(f"method {rapid.method!r} has no knobs to calibrate; calibrate one of {sorted(SEARCHED)}")
    if not rapid.reduces:
        raise ValueError("nothing to calibrate: the config removes no tokens (set r or output_tokens)")
    searched = tuple(default_searched(rapid) if searched is None else searched)
    unknown = sorted(set(searched) - set(SEARCHABLE[rapid.method]))
    if unknown or not searched:
        raise ValueError(f"cannot search {unknown or 'nothing'} for method {rapid.method!r}; "
                         f"searchable: {list(SEARCHABLE[rapid.method])}")
    rho_cannot_matter = rapid.importance_mode == "shift" and "importance_mode" not in searched
    if rapid.method == "rapid" and "importance_ratio" in searched and rho_cannot_matter:
        raise ValueError("cannot search importance_ratio with importance_mode='shift': rho does not change "
                         "eq. (2)'s plan; use importance_mode='protect' or search importance_mode too")
    if max_rounds < 1:
        raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
    num_layers = model.config.num_hidden_layers
    values = search_grid(searched, num_layers, grid)
    for name, options in values.items():
        for value in options:
            rapid.replace(**{name: value})  # a bad grid value fails now, naming the field, not mid-search
    if any(value == AUTO or value > num_layers for value in values.get("switch_layer", [])):
        raise ValueError(f"switch_layer grid {values['switch_layer']} must hold ints in [0, {num_layers}]")

    started = time.perf_counter()
    resolved_auto = None
    if rapid.switch_layer == AUTO:
        statistics = layer_statistics(model, pixel_values, rapid.prune_threshold, batch_size)
        resolved_auto = auto_switch_layer(statistics.redundant_fraction, min_redundant_fraction)
        rapid = rapid.replace(switch_layer=resolved_auto)

    reference = predict_logits(model, pixel_values, RapidConfig(method="none"), batch_size)
    scored: dict[str, Fidelity] = {}
    trials: list[Trial] = []
    bar = tqdm(desc=f"calibrate {rapid.method}", unit="config", disable=not progress)

    def score(candidate: RapidConfig) -> Fidelity:
        key = json.dumps(candidate.to_dict(), sort_keys=True)
        if key not in scored:
            scored[key] = measure_fidelity(model, pixel_values, reference, candidate, batch_size)
            settings = {name: getattr(candidate, name) for name in searched}
            trials.append(Trial(settings, **asdict(scored[key])))
            bar.update()
        return scored[key]

    current = rapid
    best = start_fidelity = score(current)
    if rapid.method == "rapid":
        tome = rapid.replace(**{name: value for name, value in TOME_POINT.items() if name in searched})
        is_tome = (
            tome.switch_layer == 0
            and tome.importance_weight == 0
            and tome.resolved_merge_mode() == "mean"
            and tome.importance_mode == "shift"
        )
        if is_tome and tome != rapid and score(tome).better_than(best, objective):
            current, best = tome, score(tome)
    for _ in range(max_rounds):
        changed = False
        for name in searched:
            if not is_relevant(name, current, num_layers):
                continue
            for value in values[name]:
                candidate = current.replace(**{name: value})
                fidelity = score(candidate)
                if fidelity.better_than(best, objective):
                    current, best, changed = candidate, fidelity, True
                    bar.set_postfix(kl=f"{best.kl:.4f}", agreement=f"{best.agreement:.3f}")
        if not changed:
            break
    bar.close()
    return CalibrationResult(
        rapid=current,
        fidelity=best,
        start=rapid,
        start_fidelity=start_fidelity,
        searched=searched,
        grid=values,
        num_images=len(pixel_values),
        seconds=time.perf_counter() - started,
        auto_switch_layer=resolved_auto,
        objective=objective,
        trials=trials,
    )
