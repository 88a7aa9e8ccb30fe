"""The rows of an accuracy/speed table: a label plus the `RapidConfig` it runs.

A grid (methods x r values, or methods x output-token targets) gives the ordinary rows; named variants
(`NAME=SETTINGS`) add rows such as a calibrated RAPID beside the default one, at every grid point unless their
settings fix `r` or `output_tokens` themselves.

A model saved with its own settings (config.json `rapid`, e.g. a calibrated model) runs those settings in the
rows of its method; each row says where its settings came from (`settings_source`) and which fields the command
line changed (`overrides`), so a record never silently reports paper defaults for a calibrated model.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rapid_hf.reduction.config import METHODS, RapidConfig

REFERENCE = RapidConfig(method="none")
SETTINGS_SOURCES = ("defaults", "model", "variant")


@dataclass(frozen=True)
class Variant:
    """One table row: `label` (method name or variant name) and the reduction it runs.

    settings_source: "model" (the model's own saved settings), "defaults" (RapidConfig's paper defaults) or
        "variant" (a named --variant's settings).
    overrides: with "model", the fields whose value differs from the model's saved settings (command-line r,
        --rapid-config fields, ...), as `{field: value run}`.
    """

    label: str
    rapid: RapidConfig
    settings_source: str = "defaults"
    overrides: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.settings_source not in SETTINGS_SOURCES:
            raise ValueError(f"settings_source {self.settings_source!r} is invalid: choose from {SETTINGS_SOURCES}")

    @property
    def provenance(self) -> dict[str, Any]:
        """The record fields saying where the row's settings came from."""
        return {"settings_source": self.settings_source, "overrides": dict(self.overrides)}

    @property
    def setting(self) -> tuple[str, int | None]:
        """The reduction amount (r spec, output-token target): rows with equal settings are compared."""
        return json.dumps(self.rapid.to_dict()["r"]), self.rapid.output_tokens

    @property
    def requested_r(self) -> Any:
        """The r asked for (JSON form), or None when the row is set by an output-token target."""
        return None if self.rapid.output_tokens is not None else self.rapid.to_dict()["r"]


def parse_settings(text: str) -> dict[str, Any]:
    """RapidConfig fields from inline JSON or a JSON file path.

    The JSON is an object of `RapidConfig` fields, or an object holding them under the key `rapid` (e.g. a Rapid
    model's config.json or a calibration result). Unknown fields are an error naming them.
    """
    source = "inline JSON"
    stripped = text.strip()
    if not stripped.startswith("{"):
        path = Path(stripped)
        if not path.is_file():
            raise ValueError(f"rapid settings {text!r} are neither inline JSON (an object) nor an existing JSON file")
        source, stripped = str(path), path.read_text()
    try:
        data = json.loads(stripped)
    except json.JSONDecodeError as error:
        raise ValueError(f"rapid settings in {source} are not valid JSON: {error}") from None
    if isinstance(data, Mapping) and isinstance(data.get("rapid"), Mapping):
        data = data["rapid"]
    if not isinstance(data, Mapping):
        raise ValueError(f"rapid settings in {source} must be a JSON object of RapidConfig fields")
    RapidConfig.from_dict(data)  # validate now, naming any bad field
    return dict(data)


def parse_named_variant(text: str) -> tuple[str, dict[str, Any]]:
    """`NAME=SETTINGS` -> (name, settings); settings as in `parse_settings`."""
    name, sep, settings = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise ValueError(f"variant {text!r} must look like NAME=JSON (e.g. 'rapid-cal={{\"switch_layer\": 3}}')")
    return name, parse_settings(settings)


def saved_amount(saved: RapidConfig) -> dict[str, Any] | None:
    """The reduction amount a model was saved with (`{"r": ...}` or `{"output_tokens": ...}`), None if it has none."""
    if saved.output_tokens is not None:
        return {"output_tokens": saved.output_tokens}
    data = saved.to_dict()
    return None if saved.method == "none" or data["r"] in (0, [0]) else {"r": data["r"]}


def _from_saved(saved: RapidConfig, changes: Mapping[str, Any]) -> tuple[RapidConfig, dict[str, Any]]:
    """`saved` with `changes` applied (an amount replaces the saved amount) and the fields that now differ."""
    base = saved.to_dict()
    if "r" in changes or "output_tokens" in changes:  # where to reduce is part of the amount
        base.update(r=0, output_tokens=None, reduce_every=1)
    rapid = RapidConfig.from_dict({**base, **changes})
    saved_fields, run = saved.to_dict(), rapid.to_dict()
    return rapid, {key: run[key] for key in run if run[key] != saved_fields[key]}


def grid_variants(
    methods: Sequence[str],
    r_values: Sequence[int] = (),
    output_tokens: Sequence[int] = (),
    rapid_settings: Mapping[str, Any] | None = None,
    named: Sequence[tuple[str, Mapping[str, Any]]] = (),
    saved: RapidConfig | None = None,
) -> list[Variant]:
    """Rows for every method at every r (or output-token target), then the named variants.

    `none` appears once (it has no reduction amount). `rapid_settings` changes what the `rapid` rows run
    (e.g. a calibrated switch layer); named variants default to method "rapid" and run at every grid point
    unless their settings give `r` or `output_tokens`. `saved` is the model's own settings (None for a plain
    checkpoint): the rows of its method start from them, and without r values or targets the grid runs at its
    saved amount.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods {list(methods)} repeat a method")
    if r_values and output_tokens:
        raise ValueError("give r values or output-token targets, not both")
    reductions = [{"r": r} for r in r_values] + [{"output_tokens": n} for n in output_tokens]
    from_model = not reductions and saved is not None and saved_amount(saved) is not None
    if from_model:
        reductions = [saved_amount(saved)]
    unfixed = [label for label, settings in named if "r" not in settings and "output_tokens" not in settings]
    if not reductions and (set(methods) - {"none"} or unfixed):
        raise ValueError("reducing methods and variants without their own r need an r value or output-token target"
                         + ("" if saved is None else " (the model's saved settings reduce nothing)"))

    variants = [Variant("none", REFERENCE)] if "none" in methods else []
    for amount in reductions:
        for method in methods:
            if method == "none":
                continue
            extra = dict(rapid_settings or {}) if method == "rapid" else {}
            if saved is not None and method == saved.method:
                changes = {**extra, **({} if from_model else amount)}
                rapid, overrides = _from_saved(saved, changes)
                variants.append(Variant(method, rapid, "model", overrides))
            else:
                variants.append(Variant(method, RapidConfig.from_dict({**extra, "method": method, **amount})))
    for label, settings in named:
        if label in METHODS:
            raise ValueError(f"variant name {label!r} is a method name; pick another (e.g. '{label}-custom')")
        for amount in reductions if label in unfixed else [{}]:
            variants.append(
                Variant(label, RapidConfig.from_dict({"method": "rapid", **settings, **amount}), "variant")
            )
    seen: set[tuple[str, tuple]] = set()
    for variant in variants:
        key = (variant.label, variant.setting)
        if key in seen:
            raise ValueError(f"row {variant.label!r} at r={variant.requested_r} appears twice")
        seen.add(key)
    return variants


def removed_per_layer(input_tokens: int, token_counts: Sequence[int]) -> list[int]:
    """Tokens each layer actually removed, from the tokens entering the encoder and those left after each layer."""
    counts = [int(input_tokens), *(int(count) for count in token_counts)]
    return [before - after for before, after in itertools.pairwise(counts)]


def _simulated_counts(input_tokens: int, requested: Sequence[int], protected: int) -> list[int]:
    """Tokens after each layer under the cap every method follows: `N_l = N_{l-1} - min(r_l, (N_{l-1} - p) // 2)`."""
    counts, tokens = [], input_tokens
    for asked in requested:
        tokens -= min(asked, max(0, (tokens - protected) // 2))
        counts.append(tokens)
    return counts


def removal_limit(input_tokens: int, requested: Sequence[int], token_counts: Sequence[int]) -> int:
    """The most tokens one layer can remove, `(N - protected) // 2`, with the protected count (CLS, distillation,
    registers) read off the counts the model reported (the smallest count consistent with them)."""
    for protected in range(input_tokens):
        if _simulated_counts(input_tokens, requested, protected) == list(token_counts):
            return (input_tokens - protected) // 2
    return input_tokens // 2


def schedule_fields(rapid: RapidConfig | Mapping[str, Any], input_tokens: int | None,
                    token_counts: Sequence[int]) -> dict[str, Any]:
    """The record fields saying what a row actually removed.

    input_tokens: tokens entering the encoder. removed_per_layer: tokens each layer removed. capped_layers: the
    layers that removed fewer than `r` asked, because a layer removes at most half of its unprotected tokens (ToMe's
    convention: r=16 on a 197-token ViT-B/DeiT is capped in its last layer, leaving 11 tokens). capped: whether `r`
    asks for more than any layer can remove (e.g. `--r 1000`), the case a row's `r` says nothing about what ran;
    tables then print the removed tokens beside it. Empty when the input token count is unknown.
    """
    from rapid_hf.reduction.steps import requested_schedule

    if input_tokens is None or not token_counts:
        return {}
    rapid = rapid if isinstance(rapid, RapidConfig) else RapidConfig.from_dict(rapid)
    removed = removed_per_layer(input_tokens, token_counts)
    requested = removed
    if rapid.method != "none" and rapid.output_tokens is None:
        try:
            requested = requested_schedule(rapid, input_tokens, len(removed), num_protected=0)  # r: no solve
        except ValueError:  # a per-layer list for another depth: the model refused it before any record
            requested = removed
    short = [layer for layer, (done, asked) in enumerate(zip(removed, requested, strict=True)) if done < asked]
    limit = removal_limit(input_tokens, requested, token_counts) if short else None
    return {"input_tokens": int(input_tokens), "removed_per_layer": removed, "capped_layers": short,
            "capped": limit is not None and max(requested) > limit}


def _input_tokens(records: Sequence[Mapping[str, Any]]) -> int | None:
    """The tokens entering the encoder, from a record that knows it or the unreduced row's token counts."""
    for record in records:
        if record.get("input_tokens") is not None:
            return int(record["input_tokens"])
    for record in records:
        if record.get("method") == "none" and record.get("token_counts"):
            return int(record["token_counts"][0])
    return None


def annotate_records(records: Sequence[dict[str, Any]], variants: Sequence[Variant]) -> list[dict[str, Any]]:
    """Records with each row's `settings_source` and `overrides` added (matched by label and settings), and what
    each row actually removed (`schedule_fields`, when the records hold the unreduced row or the input count)."""
    by_row = {(v.label, json.dumps(v.rapid.to_dict(), sort_keys=True)): v for v in variants}
    input_tokens = _input_tokens(records)
    annotated = []
    for record in records:
        variant = by_row.get((record.get("label"), json.dumps(record.get("rapid"), sort_keys=True)))
        provenance = variant.provenance if variant is not None else Variant("none", REFERENCE).provenance
        schedule = {} if "removed_per_layer" in record or record.get("rapid") is None else \
            schedule_fields(record["rapid"], input_tokens, record.get("token_counts") or [])
        annotated.append({**record, **schedule, **provenance})
    return annotated


def capped_notes(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per reduction amount some row could not reach (`capped` records): what it removed instead."""
    notes: dict[tuple[str, tuple[int, ...], int], list[str]] = {}
    for record in records:
        if record.get("capped"):
            key = (json.dumps(record["r"]).replace(" ", ""), tuple(record["removed_per_layer"]),
                   int(record["token_counts"][-1]))
            label = str(record.get("label", record["method"]))
            if label not in notes.setdefault(key, []):
                notes[key].append(label)
    return [
        f"warning: r={amount} asks for more tokens than the layers can remove (each removes at most half of its "
        f"unprotected tokens): {', '.join(labels)} removed {','.join(map(str, removed))} per layer, leaving {left} "
        "token(s); the records say so (removed_per_layer, capped)"
        for (amount, removed, left), labels in notes.items()
    ]
