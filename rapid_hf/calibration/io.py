"""Calibration images in, calibrated model out: load the calibration rows, save the chosen config with the model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rapid_hf.calibration.search import CalibrationResult

CALIBRATION_LOG = "calibration.json"


def calibration_rows(
    data_dir: str | None = None,
    dataset: str | None = None,
    split: str | None = None,
    num_images: int | None = 100,
    image_column: str = "image",
    label_column: str = "label",
) -> Any:
    """The calibration rows (index % 5 == 0, never the reported rows) of a dataset, the first `num_images` of them
    (None: all), as `rapid_hf.evaluation.data.IndexedRows` (nothing decoded yet)."""
    from rapid_hf.evaluation.data import DataSpec, load_rows

    spec = DataSpec(dataset=dataset, data_dir=data_dir, split=split, subset="calibration", max_samples=num_images,
                    image_column=image_column, label_column=label_column)
    return load_rows(spec)


def load_calibration_images(
    image_processor: Any,
    data_dir: str | None = None,
    dataset: str | None = None,
    split: str | None = None,
    num_images: int | None = 100,
    batch_size: int = 50,
    num_workers: int = 0,
    rows: Any = None,
) -> tuple[Tensor, list[int]]:
    """Pixel values of the calibration rows (index % 5 == 0, never the reported rows) and their row indices.

    `num_images` keeps the first calibration rows (None: all of them); `rows` (from `calibration_rows`) gives them
    instead of `data_dir` / `dataset`.
    """
    from rapid_hf.evaluation.data import make_dataloader

    if rows is None:
        rows = calibration_rows(data_dir, dataset, split, num_images)
    batches = list(make_dataloader(rows, image_processor, batch_size, num_workers, rows.image_column))
    pixel_values = torch.cat([batch["pixel_values"] for batch in batches])
    rows = torch.cat([batch["index"] for batch in batches]).tolist()
    return pixel_values, rows


def save_calibrated(
    model: Any,
    result: CalibrationResult,
    output_dir: str | Path,
    image_processor: Any = None,
    context: dict[str, Any] | None = None,
) -> Path:
    """Set the chosen config on `model`, `save_pretrained` it (config.json holds the values) and log the search.

    Writes `output_dir/calibration.json`: the search log plus `context` (e.g. model, data and rows used).
    """
    output_dir = Path(output_dir)
    model.set_rapid(result.rapid)
    model.save_pretrained(output_dir)
    if image_processor is not None:
        image_processor.save_pretrained(output_dir)
    log = {**(context or {}), **result.to_dict()}
    (output_dir / CALIBRATION_LOG).write_text(json.dumps(log, indent=2) + "\n")
    return output_dir
