"""Calibrate to a speed target: where and how much to reduce, with the method's knobs, for the lowest divergence
from the unreduced model subject to a predicted speed-up, measured on this machine.

`rapid_hf.evaluation.latency_model` predicts a schedule's latency from per-layer and per-step times measured on
the user's machine (runtime, threads, batch size). The search here:

1. places reduction on a *pattern* of layers (`Pattern`: every layer, every 2nd, 3rd or 4th layer at each offset)
   and, for a given config, finds by bisection the smallest total amount (tokens removed, spread as evenly as the
   pattern allows, larger values first) whose predicted speed-up reaches the target (`place`);
2. scores every pattern so placed with the starting knobs on the calibration images (KL to the unreduced model,
   `rapid_hf.calibration.search.measure_fidelity`), keeps the best;
3. runs the coordinate search of `rapid_hf.calibration.search` over the method's knobs and the pattern, each
   candidate re-placed so that it meets the target (a knob that makes steps dearer, e.g. merging instead of
   pruning, buys its speed back with more reduction), until a round changes nothing.

Then `measure_speedup` measures the chosen config against the unreduced model (interleaved rounds, median of the
per-round ratios), and `speed_metadata` is what the saved config.json records under `rapid_speed`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from rapid_hf.calibration.choices import DEFAULT_OBJECTIVE, OBJECTIVES, SEARCHABLE, SEARCHED, Objective
from rapid_hf.calibration.search import (
    CalibrationResult,
    Fidelity,
    Trial,
    is_relevant,
    measure_fidelity,
    predict_logits,
    search_grid,
)
from rapid_hf.calibration.statistics import MIN_REDUNDANT_FRACTION, auto_switch_layer, layer_statistics
from rapid_hf.reduction.config import AUTO, RapidConfig, reducing_layers

MISS_TOLERANCE = 0.05
"""A measured speed-up more than this fraction below the target is reported as missed."""
SPEED_METADATA_KEY = "rapid_speed"
"""Where the saved config.json records the speed target, the machine and the measured speed-up."""


class CostModel(Protocol):
    """What the search needs from a cost model (`rapid_hf.evaluation.latency_model.LatencyModel` is one)."""

    num_layers: int

    def predict_ms(self, config: RapidConfig) -> float: ...


@dataclass(frozen=True)
class Pattern:
    """The layers that reduce: `layer % every == offset`."""

    every: int = 1
    offset: int = 0

    def __post_init__(self) -> None:
        if self.every < 1 or not 0 <= self.offset < self.every:
            raise ValueError(f"Pattern needs every >= 1 and 0 <= offset < every, got {self.every}, {self.offset}")

    def layers(self, num_layers: int) -> list[int]:
        return reducing_layers(num_layers, self.every, self.offset)

    @property
    def label(self) -> str:
        return "every layer" if self.every == 1 else f"every {self.every} layers from layer {self.offset}"


def default_patterns(num_layers: int, largest_gap: int = 4) -> list[Pattern]:
    """Every layer, then every 2nd .. `largest_gap`-th layer at each offset (at least two reducing layers)."""
    patterns = [Pattern(1, 0)]
    for every in range(2, largest_gap + 1):
        patterns += [Pattern(every, offset) for offset in range(every)
                     if len(Pattern(every, offset).layers(num_layers)) >= 2]
    return patterns


def pattern_schedule(pattern: Pattern, amount: int, num_layers: int) -> list[int]:
    """Per-layer r: `amount` tokens spread over the pattern's layers, the larger shares first."""
    layers = pattern.layers(num_layers)
    if not layers:
        raise ValueError(f"{pattern.label} selects no layer of a {num_layers}-layer model")
    base, extra = divmod(max(0, amount), len(layers))
    schedule = [0] * num_layers
    for position, layer in enumerate(layers):
        schedule[layer] = base + (1 if position < extra else 0)
    return schedule


def on_pattern(config: RapidConfig, pattern: Pattern, amount: int, num_layers: int) -> RapidConfig:
    """`config`'s knobs removing `amount` tokens on `pattern`'s layers (a per-layer list: the pattern says where)."""
    return config.replace(r=pattern_schedule(pattern, amount, num_layers), output_tokens=None, reduce_every=1)


def predicted_speedup(cost: CostModel, config: RapidConfig) -> float:
    """The cost model's unreduced time over its time for `config`."""
    return cost.predict_ms(RapidConfig(method="none")) / cost.predict_ms(config)


def place(cost: CostModel, config: RapidConfig, pattern: Pattern, target: float,
          max_amount: int | None = None) -> tuple[RapidConfig, float] | None:
    """`config` reducing on `pattern` with the smallest amount whose predicted speed-up is >= `target`, and that
    speed-up; None when no amount up to `max_amount` (default: every pattern layer removing every token it could)
    reaches it. The predicted speed-up grows with the amount (more tokens removed, earlier), so the amount is
    bisected."""
    num_layers = cost.num_layers
    stock = cost.predict_ms(RapidConfig(method="none"))
    largest = max_amount if max_amount is not None else (
        getattr(cost, "num_tokens", 256) * len(pattern.layers(num_layers)))

    def at(amount: int) -> tuple[RapidConfig, float]:
        candidate = on_pattern(config, pattern, amount, num_layers)
        return candidate, stock / cost.predict_ms(candidate)

    if largest < 1 or at(largest)[1] < target:
        return None
    low, high = 1, largest  # at(high) reaches the target
    while low < high:
        middle = (low + high) // 2
        if at(middle)[1] >= target:
            high = middle
        else:
            low = middle + 1
    return at(high)


def best_reachable(cost: CostModel, config: RapidConfig, patterns: Sequence[Pattern]) -> float:
    """The largest predicted speed-up any pattern reaches with `config`'s knobs (every layer at its cap)."""
    largest = getattr(cost, "num_tokens", 256)
    return max(predicted_speedup(cost, on_pattern(config, p, largest * cost.num_layers, cost.num_layers))
               for p in patterns)


@dataclass
class SpeedCalibrationResult(CalibrationResult):
    """A `CalibrationResult` (the chosen config and the search log) plus the speed target and what reached it."""

    target_speedup: float = 0.0
    predicted_speedup: float = 0.0
    predicted_ms: float = 0.0
    predicted_stock_ms: float = 0.0
    pattern: str = ""
    machine: dict[str, Any] = field(default_factory=dict)
    measured: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "target_speedup": self.target_speedup,
                "predicted_speedup": self.predicted_speedup, "predicted_ms": self.predicted_ms,
                "predicted_stock_ms": self.predicted_stock_ms, "pattern": self.pattern, "machine": self.machine,
                "measured": self.measured}


def _key(config: RapidConfig) -> str:
    return json.dumps(config.to_dict(), sort_keys=True)


def speed_calibrate(
    model: Any,
    pixel_values: Tensor,
    cost: CostModel,
    target_speedup: float,
    rapid: RapidConfig | None = None,
    searched: Sequence[str] | None = None,
    grid: Mapping[str, Sequence[Any]] | None = None,
    patterns: Sequence[Pattern] | None = None,
    max_rounds: int = 2,
    batch_size: int = 50,
    min_redundant_fraction: float = MIN_REDUNDANT_FRACTION,
    objective: Objective = DEFAULT_OBJECTIVE,
    progress: bool = True,
) -> SpeedCalibrationResult:
    """The lowest-divergence config of `rapid.method` whose predicted speed-up (by `cost`) is >= `target_speedup`
    (see the module docstring). `rapid` gives the method and the starting knobs (its r is ignored); `searched`
    defaults to the method's calibrated knobs (`SEARCHED`; none for ToMe, PiToMe and top-k, whose search is then
    over patterns and amounts only). Raises ValueError when no pattern reaches the target."""
    if not isinstance(target_speedup, int | float) or not target_speedup > 1.0:
        raise ValueError(f"target_speedup must be > 1, got {target_speedup!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}")
    if max_rounds < 1:
        raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
    rapid = model.rapid if rapid is None else rapid
    if rapid.method == "none":
        raise ValueError("method 'none' removes no tokens: choose a reduction method to reach a speed-up")
    searched = tuple(SEARCHED.get(rapid.method, ()) if searched is None else searched)
    unknown = sorted(set(searched) - set(SEARCHABLE.get(rapid.method, ())))
    if unknown:
        raise ValueError(f"cannot search {unknown} for method {rapid.method!r}; searchable: "
                         f"{list(SEARCHABLE.get(rapid.method, ()))}")
    num_layers = model.config.num_hidden_layers
    if cost.num_layers != num_layers:
        raise ValueError(f"the cost model is of a {cost.num_layers}-layer model, this one has {num_layers}")
    patterns = list(default_patterns(num_layers) if patterns is None else patterns)
    values = search_grid(searched, num_layers, grid)
    started = time.perf_counter()
    resolved_auto = None
    if rapid.switch_layer == AUTO:
        statistics = layer_statistics(model, pixel_values, rapid.prune_threshold, batch_size)
        resolved_auto = auto_switch_layer(statistics.redundant_fraction, min_redundant_fraction)
        rapid = rapid.replace(switch_layer=resolved_auto)
    base = rapid.replace(r=0, output_tokens=None)  # the knobs alone: `on_pattern` says where and how much

    reference = predict_logits(model, pixel_values, RapidConfig(method="none"), batch_size)
    scored: dict[str, Fidelity] = {}
    trials: list[Trial] = []
    bar = tqdm(desc=f"calibrate {rapid.method} to {target_speedup:g}x", unit="config", disable=not progress)

    def evaluate(knobs: RapidConfig, pattern: Pattern) -> tuple[RapidConfig, float, Fidelity] | None:
        placed = place(cost, knobs, pattern, target_speedup)
        if placed is None:
            return None
        config, speedup = placed
        key = _key(config)
        if key not in scored:
            scored[key] = measure_fidelity(model, pixel_values, reference, config, batch_size)
            settings = {name: getattr(config, name) for name in searched}
            settings.update(pattern=pattern.label, r=list(config.r), predicted_speedup=round(speedup, 4))
            trials.append(Trial(settings, **asdict(scored[key])))
            bar.update()
        return config, speedup, scored[key]

    placed = {pattern: evaluate(base, pattern) for pattern in patterns}
    reachable = {pattern: found for pattern, found in placed.items() if found is not None}
    if not reachable:
        bar.close()
        raise ValueError(f"a {target_speedup:g}x speed-up is out of reach by the cost model: the most "
                         f"{rapid.method} reaches is {best_reachable(cost, base, patterns):.2f}x "
                         f"({cost_description(cost)})")
    start_pattern = patterns[0] if patterns[0] in reachable else next(iter(reachable))
    start_config, _, start_fidelity = reachable[start_pattern]
    pattern = min(reachable, key=lambda p: reachable[p][2].order_key(objective))
    knobs = base
    config, speedup, best = reachable[pattern]
    for _ in range(max_rounds):
        changed = False
        for name in searched:
            if not is_relevant(name, knobs, num_layers):
                continue
            for value in values[name]:
                found = evaluate(knobs.replace(**{name: value}), pattern)
                if found is not None and found[2].better_than(best, objective):
                    knobs, (config, speedup, best), changed = knobs.replace(**{name: value}), found, True
                    bar.set_postfix(kl=f"{best.kl:.4f}", agreement=f"{best.agreement:.3f}")
        for candidate in patterns:
            found = evaluate(knobs, candidate)
            if found is not None and found[2].better_than(best, objective):
                pattern, (config, speedup, best), changed = candidate, found, True
        if not changed:
            break
    bar.close()
    machine = dict(getattr(cost, "machine", {}) or {})
    return SpeedCalibrationResult(
        rapid=config, fidelity=best, start=start_config, start_fidelity=start_fidelity, searched=searched,
        grid=values, num_images=len(pixel_values), seconds=time.perf_counter() - started,
        auto_switch_layer=resolved_auto, objective=objective, trials=trials, target_speedup=float(target_speedup),
        predicted_speedup=speedup, predicted_ms=cost.predict_ms(config),
        predicted_stock_ms=cost.predict_ms(RapidConfig(method="none")), pattern=pattern.label, machine=machine,
    )


def cost_description(cost: CostModel) -> str:
    machine = getattr(cost, "machine", None) or {}
    if not machine:
        return "the given cost model"
    return (f"{machine.get('runtime')}, batch {machine.get('batch_size')}, {machine.get('threads')} thread(s), "
            f"{machine.get('device')} ({machine.get('processor')})")


def target_from_latency(cost: CostModel, latency_ms: float) -> float:
    """The speed-up a latency target asks for: the cost model's unreduced time over `latency_ms`."""
    stock = cost.predict_ms(RapidConfig(method="none"))
    if not latency_ms > 0:
        raise ValueError(f"latency_ms must be > 0, got {latency_ms!r}")
    if latency_ms >= stock:
        raise ValueError(f"the unreduced model already takes {stock:.2f} ms per forward here "
                         f"({cost_description(cost)}), within {latency_ms:g} ms: no reduction is needed")
    return stock / latency_ms


def measure_speedup(model: Any, rapid: RapidConfig, batch_size: int = 1, threads: int | None = None,
                    device: str | torch.device = "cpu", rounds: int = 20, timer: str = "wall",
                    runtime: str = "eager") -> dict[str, Any]:
    """`rapid` against the unreduced model in `runtime`, interleaved: median ms of each, the median of the per-round
    speed-ups, their IQR over the median (`spread`) and the rounds."""
    from rapid_hf.evaluation.latency_model import measure_latencies

    stock, reduced = measure_latencies(model, [RapidConfig(method="none"), rapid], batch_size, threads, device,
                                       rounds, timer, runtime=runtime)
    ratios = np.asarray(stock) / np.asarray(reduced)
    low, median, high = np.percentile(ratios, [25, 50, 75])
    return {"speedup": float(median), "spread": float((high - low) / median), "ms": float(np.median(reduced)) * 1e3,
            "stock_ms": float(np.median(stock)) * 1e3, "rounds": rounds, "timer": timer,
            "batch_size": batch_size, "threads": torch.get_num_threads() if threads is None else threads,
            "runtime": runtime}


def speed_metadata(result: SpeedCalibrationResult, latency_ms: float | None = None) -> dict[str, Any]:
    """What config.json records under `rapid_speed`: the target, the machine description, the predicted and the
    measured speed-up."""
    measured = result.measured or {}
    return {
        "speed_target": result.target_speedup,
        "latency_ms_target": latency_ms,
        "machine": result.machine,
        "pattern": result.pattern,
        "predicted_speedup": round(result.predicted_speedup, 4),
        "measured_speedup": None if not measured else round(measured["speedup"], 4),
        "measured_ms": None if not measured else round(measured["ms"], 3),
        "measured_stock_ms": None if not measured else round(measured["stock_ms"], 3),
        "measured_spread": None if not measured else round(measured["spread"], 4),
        "measured_rounds": measured.get("rounds"),
        "timer": measured.get("timer"),
        "reached": None if not measured else speed_reached(result.target_speedup, measured["speedup"]),
    }


def speed_reached(target: float, measured: float, tolerance: float = MISS_TOLERANCE) -> bool:
    """Whether `measured` is within `tolerance` of `target` or above it."""
    return measured >= target * (1 - tolerance)


def miss_message(result: SpeedCalibrationResult, tolerance: float = MISS_TOLERANCE) -> str | None:
    """One line when the measured speed-up misses the target by more than `tolerance`, else None."""
    measured = (result.measured or {}).get("speedup")
    if measured is None or speed_reached(result.target_speedup, measured, tolerance):
        return None
    return (f"could not reach {result.target_speedup:.2f}x: measured {measured:.2f}x (predicted "
            f"{result.predicted_speedup:.2f}x, {(result.measured or {}).get('rounds')} interleaved rounds, "
            f"spread {(result.measured or {}).get('spread', 0):.0%}) on {cost_description_dict(result.machine)}")


def cost_description_dict(machine: Mapping[str, Any]) -> str:
    return (f"{machine.get('runtime')}, batch {machine.get('batch_size')}, {machine.get('threads')} thread(s), "
            f"{machine.get('device')}") if machine else "this machine"


__all__ = [
    "MISS_TOLERANCE",
    "SPEED_METADATA_KEY",
    "CostModel",
    "Pattern",
    "SpeedCalibrationResult",
    "best_reachable",
    "default_patterns",
    "measure_speedup",
    "miss_message",
    "pattern_schedule",
    "place",
    "predicted_speedup",
    "speed_calibrate",
    "speed_metadata",
    "speed_reached",
    "target_from_latency",
]
