"""`evaluate` metric modules shipped with rapid_hf, loaded by path so no Hub access is needed."""

from __future__ import annotations

from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent


def metric_path(name: str) -> Path:
    """Folder of a shipped metric module (what `evaluate.load` takes)."""
    path = METRICS_DIR / name
    if not (path / f"{name}.py").is_file():
        available = sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())
        raise ValueError(f"no shipped metric {name!r}; available: {available}")
    return path


def load_metric(name: str):
    """`evaluate.load` of a shipped metric, kept in memory (no cache files, safe in parallel processes)."""
    import evaluate

    return evaluate.load(str(metric_path(name)), keep_in_memory=True)
