"""The rows of an accuracy/speed table: a label plus the `RapidConfig` it runs.

A grid (methods x r values, or methods x output-token targets) gives the ordinary rows; named variants
(`NAME=SETTINGS`) add rows such as a calibrated RAPID beside the default one, at every grid point unless their
settings fix `r` or `output_tokens` themselves.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rapid_hf.reduction.config import METHODS, RapidConfig

REFERENCE = RapidConfig(method="none")


@dataclass(frozen=True)
class Variant:
    """One table row: `label` (method name or variant name) and the reduction it runs."""

    label: str
    rapid: RapidConfig

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


def grid_variants(
    methods: Sequence[str],
    r_values: Sequence[int] = (),
    output_tokens: Sequence[int] = (),
    rapid_settings: Mapping[str, Any] | None = None,
    named: Sequence[tuple[str, Mapping[str, Any]]] = (),
) -> list[Variant]:
    """Rows for every method at every r (or output-token target), then the named variants.

    `none` appears once (it has no reduction amount). `rapid_settings` changes what the `rapid` rows run
    (e.g. a calibrated switch layer); named variants default to method "rapid" and run at every grid point
    unless their settings give `r` or `output_tokens`.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods {list(methods)} repeat a method")
    if r_values and output_tokens:
        raise ValueError("give r values or output-token targets, not both")
    reductions = [{"r": r} for r in r_values] + [{"output_tokens": n} for n in output_tokens]
    unfixed = [label for label, settings in named if "r" not in settings and "output_tokens" not in settings]
    if not reductions and (set(methods) - {"none"} or unfixed):
        raise ValueError("reducing methods and variants without their own r need an r value or output-token target")

    variants = [Variant("none", REFERENCE)] if "none" in methods else []
    for amount in reductions:
        for method in methods:
            if method == "none":
                continue
            extra = dict(rapid_settings or {}) if method == "rapid" else {}
            variants.append(Variant(method, RapidConfig.from_dict({**extra, "method": method, **amount})))
    for label, settings in named:
        if label in METHODS:
            raise ValueError(f"variant name {label!r} is a method name; pick another (e.g. '{label}-custom')")
        for amount in reductions if label in unfixed else [{}]:
            variants.append(Variant(label, RapidConfig.from_dict({"method": "rapid", **settings, **amount})))
    seen: set[tuple[str, tuple]] = set()
    for variant in variants:
        key = (variant.label, variant.setting)
        if key in seen:
            raise ValueError(f"row {variant.label!r} at r={variant.requested_r} appears twice")
        seen.add(key)
    return variants
