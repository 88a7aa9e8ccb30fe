"""`evaluate` metric modules shipped with rapid_hf, loaded by path so no Hub access is needed."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType

METRICS_DIR = Path(__file__).resolve().parent


def metric_path(name: str) -> Path:
    """Folder of a shipped metric module (what `evaluate.load` takes)."""
    path = METRICS_DIR / name
    if not (path / f"{name}.py").is_file():
        available = sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())
        raise ValueError(f"no shipped metric {name!r}; available: {available}")
    return path


def evaluate_library() -> ModuleType:
    """The `evaluate` library, even where a file named evaluate.py shadows it.

    `python scripts/<name>.py` puts scripts/ first on `sys.path`, and `scripts/evaluate.py` has the library's
    name; its folder is skipped for this one import (the library then stays in `sys.modules`).
    """
    module = importlib.import_module("evaluate")
    if hasattr(module, "load"):
        return module
    shadow = Path(module.__file__).resolve().parent
    del sys.modules["evaluate"]
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != shadow]
    try:
        return importlib.import_module("evaluate")
    finally:
        sys.path[:] = saved


def load_metric(name: str):
    """`evaluate.load` of a shipped metric, kept in memory (no cache files, safe in parallel processes)."""
    return evaluate_library().load(str(metric_path(name)), keep_in_memory=True)
