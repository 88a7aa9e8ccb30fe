"""`RapidConfig`: which token-reduction method runs, how many tokens each layer removes, and its knobs."""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

Method = Literal["rapid", "tome", "tofu", "crucial", "pitome", "topk", "none"]
METHODS: tuple[str, ...] = get_args(Method)
AUTO = "auto"
MergeMode = Literal["mean", "mlerp"]
MERGE_MODES: tuple[str, ...] = get_args(MergeMode)
ImportanceMode = Literal["shift", "protect"]
IMPORTANCE_MODES: tuple[str, ...] = get_args(ImportanceMode)
ImportanceSource = Literal["attention", "per_patch"]
IMPORTANCE_SOURCES: tuple[str, ...] = get_args(ImportanceSource)
LINEAR_SCHEDULE_KEYS = frozenset({"r", "inflection"})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"RapidConfig.{name}={value!r} is invalid: expected {allowed}")


@dataclass(frozen=True)
class RapidConfig:
    """Token-reduction settings of a Rapid model (docs/METHOD.md); defaults are the paper's.

    Args:
        method: "rapid" (prune shallow, importance-aware merge deep), "tome", "tofu", "crucial" (merge the least
            important tokens into the most important, crucial, ones), "pitome" (PiToMe: merge the highest-energy
            tokens, protect the low-energy ones), "topk" (keep the most important tokens, fuse the least important
            into one, EViT-style), or "none" (no reduction).
        r: tokens removed per layer, in ToMe's conventions: an int (constant), a *list* of per-layer ints, or a
            *tuple* `(r, inflection)`: ToMe's linear schedule (inflection in [-1, 1]; int or float, `(8, 1)`
            is `(8, 1.0)`): 0 constant, +1 increasing from 0 to `2r`, -1 decreasing from `2r` to 0. A tuple is
            always the linear schedule and a list always per-layer; config.json writes the tuple as
            `{"r": 8, "inflection": 1.0}` (the older saved form `[8, 1.0]` still reads as the tuple).
        output_tokens: instead of `r`, the number of tokens that should leave the last layer; solved to a
            near-constant schedule for the actual input size.
        reduce_every: reduce at every n-th layer only (layers 0, n, 2n, ...): a few reduction steps instead of one
            per layer, for runtimes where a step's fixed cost is large (batch 1). An int `r` or an
            `(r, inflection)` schedule then applies per reducing layer (r=24 with reduce_every=3 removes what r=8
            removes on every layer), and `output_tokens` is solved over the reducing layers (so each removes about
            n times as many); a per-layer list already says where to reduce, so it needs 1.
        switch_layer: first merging layer (RAPID's K, ToFu's switch). None: 4 for RAPID (the paper's K for
            12 layers, scaled as round(L/3) for other depths); for ToFu `L // 2 + 1`, the public
            reimplementation's split: prune in layers 0..L//2, merge after (12 layers: 7 prune, 5 merge).
            "auto": chosen from the model's own tokens on calibration images
            (`rapid_hf.calibration.resolve_auto_switch_layer`), which must resolve it to an int before the
            model runs.
        prune_threshold: RAPID's tau in eq. (1), a cosine similarity in [-1, 1].
        importance_ratio: RAPID's rho: the top fraction of patch tokens (by CLS attention) that sets theta
            (and, with importance_mode="protect", that is protected from merging); for "crucial", the fraction
            of patch tokens that are crucial (merge destinations).
        importance_weight: RAPID's lambda in eq. (2), >= 0.
        importance_mode: how RAPID's merging stage uses importance. "shift" (default): eq. (2) as written,
            `S'_ij = S_ij - lambda (a_i - theta)`; theta shifts every score of an image equally, so rho cannot
            change the plan. "protect": the same scores, and in addition the top-rho fraction of patch tokens
            by CLS attention never leave as merge sources (they can still receive merges), so rho matters.
        importance_source: where RAPID's (and crucial merging's) importance `a_i` comes from. "attention"
            (default): the CLS token's attention to token i, averaged over heads (eq. 2). "per_patch": that
            attention divided by the number of patches token i stands for and renormalised, undoing proportional
            attention's `+log(size)` so a merged token does not count as more important for being large.
        prop_attn: add `log(size)` of each key to attention logits (ToMe's proportional attention).
        merge_mode: "mean" (size-weighted) or "mlerp" (ToFu's norm-preserving). None: "mlerp" for ToFu,
            "mean" otherwise.
    """

    method: Method = "rapid"
    r: int | list[int] | tuple[int, float] = 0
    output_tokens: int | None = None
    reduce_every: int = 1
    switch_layer: int | Literal["auto"] | None = None
    prune_threshold: float = 0.7
    importance_ratio: float = 0.2
    importance_weight: float = 50.0
    importance_mode: ImportanceMode = "shift"
    importance_source: ImportanceSource = "attention"
    prop_attn: bool = True
    merge_mode: MergeMode | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            _fail("method", self.method, f"one of {', '.join(METHODS)}")
        object.__setattr__(self, "r", _normalise_r(self.r))
        if self.output_tokens is not None:
            if not _is_int(self.output_tokens) or self.output_tokens < 1:
                _fail("output_tokens", self.output_tokens, "an int >= 1 or None")
            if self.r != 0:
                _fail("output_tokens", self.output_tokens, "None when r is set (give r or output_tokens, not both)")
        if not _is_int(self.reduce_every) or self.reduce_every < 1:
            _fail("reduce_every", self.reduce_every, "an int >= 1 (1: every layer reduces)")
        if self.reduce_every > 1 and isinstance(self.r, list):
            _fail("reduce_every", self.reduce_every,
                  "1 when r is a per-layer list (the list already says which layers reduce: put 0 elsewhere)")
        if self.switch_layer not in (None, AUTO) and (not _is_int(self.switch_layer) or self.switch_layer < 0):
            _fail("switch_layer", self.switch_layer, "an int >= 0 (at most the number of layers), 'auto' or None")
        if not _is_number(self.prune_threshold) or not -1.0 <= self.prune_threshold <= 1.0:
            _fail("prune_threshold", self.prune_threshold, "a number in [-1, 1] (a cosine similarity)")
        if not _is_number(self.importance_ratio) or not 0.0 < self.importance_ratio <= 1.0:
            _fail("importance_ratio", self.importance_ratio, "a number in (0, 1]")
        if not _is_number(self.importance_weight) or self.importance_weight < 0:
            _fail("importance_weight", self.importance_weight, "a number >= 0")
        if self.importance_mode not in IMPORTANCE_MODES:
            _fail("importance_mode", self.importance_mode, "'shift' (eq. 2 as written) or 'protect'")
        if self.importance_source not in IMPORTANCE_SOURCES:
            _fail("importance_source", self.importance_source, "'attention' (CLS attention) or 'per_patch'")
        if not isinstance(self.prop_attn, bool):
            _fail("prop_attn", self.prop_attn, "True or False")
        if self.importance_source == "per_patch" and not self.prop_attn:
            _fail("importance_source", self.importance_source,
                  "'attention' when prop_attn=False ('per_patch' undoes proportional attention's size boost)")
        if self.merge_mode is not None and self.merge_mode not in MERGE_MODES:
            _fail("merge_mode", self.merge_mode, "'mean', 'mlerp' or None")

    def __hash__(self) -> int:
        """Hashable whatever `r` is (a per-layer list hashes as its values; equality still tells list from tuple)."""
        values = (getattr(self, name) for name in FIELD_NAMES)
        return hash(tuple(tuple(value) if isinstance(value, list) else value for value in values))

    @property
    def reduces(self) -> bool:
        """Whether any token can be removed at all."""
        if self.method == "none":
            return False
        if self.output_tokens is not None:
            return True
        if isinstance(self.r, tuple):
            return self.r[0] > 0
        return any(self.r) if isinstance(self.r, list) else self.r > 0

    def resolved_merge_mode(self) -> MergeMode:
        if self.merge_mode is not None:
            return self.merge_mode
        return "mlerp" if self.method == "tofu" else "mean"

    def resolved_switch_layer(self, num_layers: int) -> int:
        if self.switch_layer == AUTO:
            raise ValueError(
                "RapidConfig.switch_layer='auto' is not resolved yet: calibrate the model first "
                "(`rapid-hf calibrate`, or rapid_hf.calibration.resolve_auto_switch_layer(model, pixel_values))"
            )
        if self.switch_layer is not None:
            return self.switch_layer
        return num_layers // 2 + 1 if self.method == "tofu" else round(num_layers / 3)

    def validate_for_model(self, num_layers: int, num_tokens: int, num_protected: int) -> None:
        """Checks that need the model: list length, switch layer range, reachable output tokens."""
        from rapid_hf.reduction.schedule import schedule_for_output_tokens

        if self.reduce_every > num_layers:
            _fail("reduce_every", self.reduce_every, f"an int in [1, {num_layers}] for this {num_layers}-layer model")
        if isinstance(self.r, list) and len(self.r) != num_layers:
            _fail("r", self.r, f"a list of {num_layers} ints >= 0 (one per layer of this {num_layers}-layer model)")
        if _is_int(self.switch_layer) and self.switch_layer > num_layers:
            _fail("switch_layer", self.switch_layer, f"an int in [0, {num_layers}] for this {num_layers}-layer model")
        if self.output_tokens is not None and self.method != "none":
            points = len(reducing_layers(num_layers, self.reduce_every))
            schedule_for_output_tokens(num_tokens, points, num_protected, self.output_tokens)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (what `save_pretrained` writes under `rapid` in config.json).

        The linear schedule `(r, inflection)` becomes `{"r": r, "inflection": inflection}` (JSON has no tuples,
        and a list would read back as per-layer values); a per-layer list stays a list.
        """
        data = {name: getattr(self, name) for name in FIELD_NAMES}
        if isinstance(self.r, tuple):
            data["r"] = {"r": self.r[0], "inflection": float(self.r[1])}
        elif isinstance(self.r, list):
            data["r"] = list(self.r)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RapidConfig:
        """Inverse of `to_dict`; unknown keys are an error naming them."""
        if not isinstance(data, Mapping):
            raise ValueError(f"rapid settings must be a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - set(FIELD_NAMES))
        if unknown:
            raise ValueError(f"unknown RapidConfig field(s) {unknown}; known fields: {sorted(FIELD_NAMES)}")
        return cls(**dict(data))

    def replace(self, **changes: Any) -> RapidConfig:
        """A copy with some fields changed (validated again)."""
        return RapidConfig.from_dict({**self.to_dict(), **changes})


FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(RapidConfig))
"""`RapidConfig`'s field names, computed once (`dataclasses.fields` cannot be traced by torch.compile)."""


def reducing_layers(num_layers: int, reduce_every: int, offset: int = 0) -> list[int]:
    """The layers that may reduce under `reduce_every` (layers offset, offset + n, offset + 2n, ...)."""
    return list(range(offset, num_layers, reduce_every))


def static_ints(config: RapidConfig) -> RapidConfig:
    """`config` with each of its numbers made a compile-time constant; for use under `torch.compile` only.

    Settings reach a compiled forward as inputs (the model's `config.rapid` or a per-call `rapid=`), and dynamo's
    automatic dynamic shapes turns an input int that changed since the last compile (r=8, then r=16) into a
    symbol. Token counts derived from a symbolic r nest `N - min(r, (N - k) // 2)` once per layer, and the size
    expressions grow with every layer until compiling never finishes. `operator.index` makes dynamo specialise
    the value instead (a guard on it): one static graph per distinct setting. In eager mode it changes nothing.
    """

    def static(value: Any) -> Any:
        if _is_int(value):
            return operator.index(value)
        if isinstance(value, float):  # a float that changed between calls would become symbolic too
            numerator, denominator = value.as_integer_ratio()
            return operator.index(numerator) / operator.index(denominator)
        if isinstance(value, list):
            return [operator.index(item) for item in value]
        if isinstance(value, tuple):
            return (operator.index(value[0]), static(value[1]))
        return value

    return RapidConfig(**{name: static(getattr(config, name)) for name in FIELD_NAMES})


def _normalise_r(r: Any) -> int | list[int] | tuple[int, float]:
    """Accept the three r forms in ToMe's conventions, plus the saved JSON forms of the linear schedule.

    int: constant. list of ints: per layer. tuple `(r, inflection)` with an int or float inflection: ToMe's
    linear schedule, stored as `(int, float)`. Saved forms of that tuple: `{"r": r, "inflection": x}` (written
    by `to_dict`) and the older `[r, x]` with a float `x` (a per-layer list never holds floats). Anything else,
    including a tuple that is not `(r, inflection)`, is a ValueError.
    """
    allowed = (
        "an int >= 0, a list of ints >= 0 (one per layer), or an (r: int >= 0, inflection: float in [-1, 1]) tuple"
    )
    if _is_int(r):
        if r < 0:
            _fail("r", r, allowed)
        return r
    if isinstance(r, Mapping):
        if set(r) != LINEAR_SCHEDULE_KEYS:
            _fail("r", dict(r), f"{allowed} (saved as {{'r': int, 'inflection': float}})")
        return _linear_schedule(r, r["r"], r["inflection"], allowed)
    if isinstance(r, tuple):
        if len(r) != 2:
            _fail("r", r, f"{allowed}; a tuple is always (r, inflection): give per-layer values as a list")
        return _linear_schedule(r, r[0], r[1], allowed)
    if isinstance(r, list) and len(r) == 2 and isinstance(r[1], float):  # saved before the mapping form existed
        return _linear_schedule(r, r[0], r[1], allowed)
    if isinstance(r, list) and all(_is_int(v) and v >= 0 for v in r):
        return list(r)
    _fail("r", r, allowed)
    raise AssertionError  # unreachable


def _linear_schedule(given: Any, base: Any, inflection: Any, allowed: str) -> tuple[int, float]:
    if not _is_int(base) or base < 0 or not _is_number(inflection) or not -1.0 <= inflection <= 1.0:
        _fail("r", given, allowed)
    return (base, float(inflection))


__all__ = [
    "AUTO",
    "FIELD_NAMES",
    "IMPORTANCE_MODES",
    "IMPORTANCE_SOURCES",
    "MERGE_MODES",
    "METHODS",
    "ImportanceMode",
    "ImportanceSource",
    "MergeMode",
    "Method",
    "RapidConfig",
    "static_ints",
]
