"""Measured results for a model card: read the harness's results files and pick the records of one model.

`rapid-hf evaluate` writes evaluation records (`top1`, `top5`, `agreement`, `kl`, `n_samples`,
`output_tokens`, ...) and `rapid-hf benchmark` benchmark records (`throughput`, `speedup`, `gflops`,
`flop_ratio`, ...); both carry `method`, `r` and `model`. A file is a JSON list of records, or an object with a
`records` list (and optionally the `command` that produced it; else the command is read from the Markdown table
the harness writes next to the JSON). Every number a card shows comes from here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rapid_hf.reduction.config import RapidConfig

EVALUATION_KEYS = ("top1", "n_samples", "output_tokens")
BENCHMARK_KEYS = ("speedup",)


@dataclass(frozen=True)
class ResultsFile:
    """One results file as read: its path, records and the command that produced it (if it says)."""

    path: Path
    records: tuple[dict[str, Any], ...]
    command: str | None = None


@dataclass(frozen=True)
class MeasuredResults:
    """The records a card reports for one model and reduction setting.

    evaluation: the accuracy record (or None if no evaluation file was given).
    benchmark: the speed record (or None if no benchmark file was given).
    reference: the unreduced model's records from the same files (evaluation and benchmark fields merged), when
        it was measured.
    sources: the files the records came from.
    """

    evaluation: dict[str, Any] | None = None
    benchmark: dict[str, Any] | None = None
    reference: dict[str, Any] | None = None
    sources: tuple[ResultsFile, ...] = field(default_factory=tuple)


def read_results_file(path: str | Path) -> ResultsFile:
    """Read one results file, refusing anything that is not a list of records with `method`, `r` and `model`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file {path} does not exist (write it with `rapid-hf evaluate` or "
                                "`rapid-hf benchmark`, or leave --results out)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"results file {path} is not valid JSON: {error}") from error
    command = None
    if isinstance(data, Mapping):
        command = data.get("command")
        data = data.get("records")
    if not isinstance(data, list) or not all(isinstance(record, Mapping) for record in data):
        raise ValueError(f"results file {path} must hold a JSON list of result records (or an object with a "
                         "'records' list)")
    for index, record in enumerate(data):
        missing = [key for key in ("method", "r", "model") if key not in record]
        if missing:
            raise ValueError(f"results file {path}: record {index} lacks {missing}")
    command = command if isinstance(command, str) else _markdown_command(path)
    return ResultsFile(path, tuple(dict(record) for record in data), command)


def _markdown_command(path: Path) -> str | None:
    """The command in the Markdown table the harness writes next to its JSON (`rapid_hf.evaluation.report`)."""
    markdown = path.with_suffix(".md")
    if not markdown.is_file():
        return None
    match = re.match(r"Produced by:\n\n```\n(.+)\n```", markdown.read_text(encoding="utf-8"))
    return match.group(1) if match else None


def same_model(recorded: str, requested: str) -> bool:
    """Whether a record's `model` names the model being pushed: same local folder, or the same Hub id."""
    recorded_path, requested_path = Path(recorded).expanduser(), Path(requested).expanduser()
    if recorded_path.exists() and requested_path.exists():
        return recorded_path.resolve() == requested_path.resolve()
    return str(recorded).strip().rstrip("/") == str(requested).strip().rstrip("/")


def setting_text(rapid: RapidConfig) -> str:
    """`method=rapid r=16` (or `output_tokens=...`): how the CLI and the messages name a setting."""
    if rapid.output_tokens is not None:
        return f"method={rapid.method} output_tokens={rapid.output_tokens}"
    return f"method={rapid.method} r={rapid.r}"


def _same_amount(record: Mapping[str, Any], rapid: RapidConfig) -> bool:
    """Same r (any of its forms), or the same output-token target (the harness then records r=None)."""
    if rapid.output_tokens is not None:
        return record["r"] is None and (record.get("rapid") or {}).get("output_tokens") == rapid.output_tokens
    try:
        return RapidConfig(r=record["r"]).r == rapid.r  # normalises the JSON list form of (r, inflection)
    except ValueError:
        return False


def _record_kind(record: Mapping[str, Any]) -> str | None:
    if "top1" in record:
        return "evaluation"
    if "speedup" in record or "throughput" in record:
        return "benchmark"
    return None


def _settings_differ(record: Mapping[str, Any], rapid: RapidConfig) -> list[str]:
    """Fields of the record's `rapid` settings that differ from `rapid` (empty if equal or not recorded)."""
    recorded = record.get("rapid")
    if recorded is None:
        return []
    try:
        recorded = RapidConfig.from_dict(recorded).to_dict()
    except ValueError as error:
        return [f"unreadable settings ({error})"]
    expected = rapid.to_dict()
    return [f"{key}={recorded[key]!r} (pushing {expected[key]!r})" for key in expected
            if recorded[key] != expected[key]]


CELL_KEYS = ("batch_size", "num_threads")
"""What tells apart the benchmark records of one setting in a file measured at several batch sizes / threads."""
CELL_FLAGS = {"batch_size": "--benchmark-batch-size", "num_threads": "--benchmark-threads"}


def _cell(record: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(record.get(key) for key in CELL_KEYS)


def _in_cell(record: Mapping[str, Any], cell: Mapping[str, Any] | None) -> bool:
    return all(record.get(key) == value for key, value in (cell or {}).items() if value is not None)


def _only(records: list[dict[str, Any]], kind: str, results: ResultsFile, setting: str,
          cell: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    chosen = [record for record in records if _record_kind(record) == kind]
    if kind == "benchmark" and chosen:
        in_cell = [record for record in chosen if _in_cell(record, cell)]
        if not in_cell:
            wanted = ", ".join(f"{key}={value}" for key, value in (cell or {}).items() if value is not None)
            raise ValueError(f"{results.path} has no benchmark record for {setting} at {wanted} (measured: "
                             f"{_cells_text(chosen)})")
        chosen = in_cell
        if len({_cell(record) for record in chosen}) > 1:
            varying = [key for key in CELL_KEYS if len({record.get(key) for record in chosen}) > 1]
            raise ValueError(f"{results.path} has {setting} benchmark records at {_cells_text(chosen)}: pass "
                             f"{' and '.join(CELL_FLAGS[key] for key in varying)} to choose the one the card quotes")
    if len(chosen) > 1:
        labels = [record.get("label", record.get("method")) for record in chosen]
        raise ValueError(f"{results.path} has {len(chosen)} {kind} records for {setting} ({labels}); "
                         "keep one per setting so the card cannot pick the wrong numbers")
    return chosen[0] if chosen else None


def _cells_text(records: Sequence[Mapping[str, Any]]) -> str:
    """`batch_size 1, 4 and 16; num_threads 1 and 2`: the values the records were measured at."""
    parts = []
    for key in CELL_KEYS:
        values = {record.get(key) for record in records}
        text = [str(value) for value in sorted(values, key=lambda v: (not isinstance(v, int), v if isinstance(v, int)
                                                                        else str(v)))]
        parts.append(f"{key} {', '.join(text[:-1]) + ' and ' + text[-1] if len(text) > 1 else text[0]}")
    return "; ".join(parts)


def select_results(files: Sequence[ResultsFile], model: str, rapid: RapidConfig,
                   benchmark_cell: Mapping[str, Any] | None = None) -> MeasuredResults:
    """The evaluation / benchmark records of `model` with exactly the settings `rapid`, one of each at most.

    A benchmark file measured at several batch sizes or thread counts (`rapid-hf benchmark --batch-size 1,4,16
    --threads 1,2`) gives one record per cell: `benchmark_cell` (`{"batch_size": 4, "num_threads": 2}`, either may
    be None) picks the one the card quotes. Raises ValueError naming the file when a file has no record for this
    method and r, was measured on another model, only has records for other settings, or has several candidates
    of one kind (for a benchmark: several cells and no `benchmark_cell` choosing one).
    """
    setting = setting_text(rapid)
    chosen: dict[str, dict[str, Any]] = {}
    reference = None
    for results in files:
        candidates = [rec for rec in results.records if rec["method"] == rapid.method and _same_amount(rec, rapid)]
        if not candidates:
            raise ValueError(f"no measured results for {setting} in {results.path}")
        for_model = [rec for rec in candidates if same_model(str(rec["model"]), model)]
        if not for_model:
            measured = sorted({str(rec["model"]) for rec in candidates})
            raise ValueError(f"{results.path} holds results for model {', '.join(measured)}, not for --model {model}: "
                             "pass the results measured on the model you push")
        matching = [rec for rec in for_model if not _settings_differ(rec, rapid)]
        if not matching:
            raise ValueError(f"{results.path} has {setting} results only for other settings: "
                             f"{'; '.join(_settings_differ(for_model[0], rapid))}")
        if not any(_record_kind(rec) for rec in matching):
            raise ValueError(f"{results.path}: the {setting} records have neither 'top1' (evaluation) nor "
                             "'speedup' (benchmark)")
        for kind, required in (("evaluation", EVALUATION_KEYS), ("benchmark", BENCHMARK_KEYS)):
            record = _only(matching, kind, results, setting, benchmark_cell)
            if record is None:
                continue
            missing = [key for key in required if record.get(key) is None]
            if missing:
                raise ValueError(f"{results.path}: the {setting} {kind} record lacks {missing}")
            if kind in chosen:
                raise ValueError(f"{setting} has {kind} records in more than one results file; pass one of them")
            chosen[kind] = record
        for kind in ("benchmark", "evaluation"):  # the evaluation's fields win where both have one
            unreduced = [rec for rec in results.records if rec["method"] == "none" and _record_kind(rec) == kind
                         and same_model(str(rec["model"]), model)]
            if kind == "benchmark" and len(unreduced) > 1 and "benchmark" in chosen:  # the same cell's baseline
                unreduced = [rec for rec in unreduced if _cell(rec) == _cell(chosen["benchmark"])]
            if len(unreduced) == 1 and rapid.method != "none":
                reference = {**(reference or {}), **unreduced[0]}
    return MeasuredResults(chosen.get("evaluation"), chosen.get("benchmark"), reference, tuple(files))


def load_results(paths: Sequence[str | Path], model: str, rapid: RapidConfig,
                 benchmark_cell: Mapping[str, Any] | None = None) -> MeasuredResults:
    """`read_results_file` on each path, then `select_results`."""
    return select_results([read_results_file(path) for path in paths], model, rapid, benchmark_cell)


__all__ = [
    "MeasuredResults",
    "ResultsFile",
    "load_results",
    "read_results_file",
    "same_model",
    "select_results",
    "setting_text",
]
