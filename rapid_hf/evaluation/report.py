"""JSON and Markdown output of evaluation and benchmark records."""

from __future__ import annotations

import datetime
import json
import platform
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

Column = tuple[str, Callable[[dict[str, Any]], str]]


def run_info() -> dict[str, Any]:
    """When and where numbers were measured (copied into each record)."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "num_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}".strip(),
    }


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that is running, as a user would type it (`python experiments/x/study.py --flag value`)."""
    return "python " + " ".join(shlex.quote(part) for part in (sys.argv if argv is None else argv))


def write_markdown(text: str, path: str | Path, command: str | None = None) -> Path:
    """Write a Markdown file, starting with the command that produced it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = f"Produced by:\n\n```\n{command}\n```\n\n" if command else ""
    path.write_text(header + text)
    return path


def write_json(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write records as a JSON list (creating parent folders)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(list(records), indent=2) + "\n")
    return path


def read_json(path: str | Path) -> list[dict[str, Any]]:
    """Records written by `write_json`."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, list):
        raise ValueError(f"{path} must hold a JSON list of records")
    return data


def setting(record: dict[str, Any]) -> str:
    """How much a row reduces: `r=8`, `out=65` (output-token target) or `-` for the unreduced model."""
    if record["method"] == "none":
        return "-"
    if record["r"] is None:
        return f"out={record['rapid']['output_tokens']}"
    return f"r={json.dumps(record['r']).replace(' ', '')}"


def setting_label(record: dict[str, Any]) -> str:
    """`setting`, followed by what each layer actually removed when the row could not remove r tokens per layer
    (`capped` records): `r=1000 (capped: 32,16,8,4)`."""
    if not record.get("capped"):
        return setting(record)
    return f"{setting(record)} (capped: {','.join(map(str, record['removed_per_layer']))})"


def _percent(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}"


def _delta(record: dict[str, Any]) -> str:
    if record.get("delta_top1_vs_tome") is None:
        return "-"
    low, high = record["delta_top1_vs_tome_ci95"]
    return f"{100 * record['delta_top1_vs_tome']:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}]"


ACCURACY_COLUMNS: list[Column] = [
    ("method", lambda r: r["label"]),
    ("setting", setting_label),
    ("out tokens", lambda r: str(r["output_tokens"])),
    ("top-1 %", lambda r: _percent(r["top1"])),
    ("top-5 %", lambda r: _percent(r["top5"])),
    ("Δ top-1 vs ToMe [95% CI]", _delta),
    ("agreement %", lambda r: _percent(r["agreement"])),
    ("KL", lambda r: f"{r['kl']:.4f}"),
    ("n", lambda r: str(r["n_samples"])),
]

BENCHMARK_COLUMNS: list[Column] = [
    ("method", lambda r: r["label"]),
    ("setting", setting_label),
    ("out tokens", lambda r: str(r["output_tokens"])),
    ("img/s", lambda r: f"{r['throughput']:.1f}"),
    ("speedup", lambda r: f"{r['speedup']:.3f}"),
    ("GFLOPs", lambda r: f"{r['gflops']:.3f}"),
    ("FLOP ratio", lambda r: f"{r['flop_ratio']:.3f}"),
    ("speedup / FLOP ratio", lambda r: f"{r['speedup_over_flop_ratio']:.3f}"),
    ("peak MB", lambda r: f"{r['peak_memory_mb']:.1f}"),
    ("reduction % of time", lambda r: _percent(r.get("reduction_share"))),
]


def markdown_table(records: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """A GitHub Markdown table with one row per record."""
    lines = ["| " + " | ".join(name for name, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(record) for _, cell in columns) + " |" for record in records]
    return "\n".join(lines) + "\n"


def row_key(record: dict[str, Any]) -> tuple[str, str]:
    """(label, setting): what identifies the same row in accuracy and benchmark records."""
    return record["label"], setting(record)


def combined_table(accuracy: Sequence[dict[str, Any]], bench: Sequence[dict[str, Any]]) -> str:
    """Accuracy rows joined with the benchmark's throughput / speedup / GFLOPs (rows it lacks are left out)."""
    by_key = {row_key(b): b for b in bench}
    joined = [{**by_key[row_key(a)], **a} for a in accuracy if row_key(a) in by_key]
    columns = [c for c in ACCURACY_COLUMNS if c[0] not in ("top-5 %", "n")]
    columns += [c for c in BENCHMARK_COLUMNS if c[0] in ("img/s", "speedup", "GFLOPs")]
    return markdown_table(joined, columns)
