"""Labelled images through `datasets` (Hub id, optionally streamed, or an `imagefolder` directory) as batches.

Every example keeps its row index in the source split, so results can be checked for duplicated or dropped
images after a distributed run and reordered to the single-process order. Images are preprocessed by the model's
own image processor inside the DataLoader workers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from rapid_hf.evaluation.splits import SUBSETS, in_subset, subset_indices

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataSpec:
    """Where the labelled images come from and which rows to use.

    Exactly one of `dataset` (a Hub id, e.g. "imagenet-1k") and `data_dir` (an `imagefolder` directory with
    metadata.csv) is set. `split` defaults to "validation" for a Hub id and "train" for a directory (what
    `imagefolder` calls a folder without split subfolders). `subset` picks rows by index with
    `rapid_hf.evaluation.splits` ("report" rows for results, "calibration" rows for tuning); `max_samples` then
    keeps the first rows of that subset.
    """

    dataset: str | None = None
    data_dir: str | None = None
    split: str | None = None
    subset: str = "all"
    max_samples: int | None = None
    streaming: bool = False
    image_column: str = "image"
    label_column: str = "label"

    def __post_init__(self) -> None:
        if (self.dataset is None) == (self.data_dir is None):
            raise ValueError("give exactly one of a dataset id (--dataset) and an imagefolder directory (--data-dir)")
        if self.data_dir is not None:
            check_image_folder(self.data_dir)
        if self.subset not in SUBSETS:
            raise ValueError(f"subset {self.subset!r} is invalid: choose from {', '.join(SUBSETS)}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {self.max_samples}")

    @property
    def resolved_split(self) -> str:
        return self.split or ("validation" if self.dataset is not None else "train")

    @property
    def name(self) -> str:
        return self.dataset if self.dataset is not None else str(self.data_dir)


METADATA_FILES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")


def check_image_folder(data_dir: str | Path) -> None:
    """An `imagefolder` directory must exist and hold its labels: `metadata.csv` (file_name,label) beside the images,
    or in its split subfolders (train/, validation/). ValueError naming what is missing."""
    folder = Path(data_dir).expanduser()
    if not folder.is_dir():
        raise ValueError(f"--data-dir {str(data_dir)!r} is not a directory")
    places = [folder, *(child for child in folder.iterdir() if child.is_dir())]
    if not any((place / name).is_file() for place in places for name in METADATA_FILES):
        raise ValueError(f"--data-dir {str(data_dir)!r} has no metadata.csv: the labels come from a metadata.csv "
                         "beside the images, with a file_name,label row per image (label: the model's class index)")


class UnreadableImageError(ValueError):
    """An image file that cannot be decoded (truncated, corrupt, not an image); the message names the file."""


def _image_path(dataset: Any, row: int, column: str) -> str:
    """The file behind row `row`'s image, read without decoding it."""
    import datasets

    try:
        value = dataset.cast_column(column, datasets.Image(decode=False))[row][column]
    except Exception:  # not an Image column, or no path: say what is known
        return f"row {row}"
    return str(value.get("path") or f"row {row}") if isinstance(value, dict) else f"row {row}"


class IndexedRows(Dataset):
    """Selected rows of a map-style `datasets.Dataset`, each returned with its row index under "index"."""

    def __init__(self, dataset: Any, rows: list[int], image_column: str = "image") -> None:
        self.dataset, self.rows, self.image_column = dataset, rows, image_column

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position: int) -> dict[str, Any]:
        row = self.rows[position]
        try:
            example = self.dataset[row]
            image = example.get(self.image_column)
            if hasattr(image, "load"):
                image.load()  # decode now, where the file is known (PIL opens lazily)
        except (OSError, SyntaxError, ValueError) as error:  # PIL: truncated or corrupt files, unknown formats
            raise UnreadableImageError(
                f"image {_image_path(self.dataset, row, self.image_column)} cannot be read "
                f"({str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}): "
                "replace or remove it"
            ) from None
        return {**example, "index": row}


class StreamedRows(IterableDataset):
    """Rows of a streamed dataset numbered in stream order, filtered to a subset, cut at `max_samples`.

    Numbering happens in one process (load it with `num_workers=0`), so indices match the map-style ones.
    """

    def __init__(self, dataset: Any, subset: str, max_samples: int | None) -> None:
        self.dataset, self.subset, self.max_samples = dataset, subset, max_samples

    def __iter__(self) -> Iterator[dict[str, Any]]:
        taken = 0
        for index, example in enumerate(self.dataset):
            if in_subset(index, self.subset):
                yield {**example, "index": index}
                taken += 1
                if taken == self.max_samples:
                    return


def _check_columns(columns: list[str] | None, spec: DataSpec) -> None:
    if columns is None:
        return
    missing = [c for c in (spec.image_column, spec.label_column) if c not in columns]
    if missing:
        raise ValueError(
            f"dataset {spec.name!r} has no column(s) {missing} (columns: {columns}); name the image and label "
            "columns with --image-column / --label-column"
        )


def load_rows(spec: DataSpec) -> IndexedRows | StreamedRows:
    """The selected rows of the dataset, each a dict with the image, the label and "index"."""
    import datasets

    if spec.dataset is not None:
        source: dict[str, Any] = {"path": spec.dataset}
    elif any(child.is_dir() for child in Path(spec.data_dir).iterdir()):  # split subfolders (train/, validation/)
        source = {"path": "imagefolder", "data_dir": spec.data_dir}
    else:  # a flat folder is one split whatever its file names say (`datasets` would take a split from names
        # like `..._val_...` and then drop metadata.csv, i.e. the labels)
        source = {"path": "imagefolder", "data_files": {spec.resolved_split: str(Path(spec.data_dir) / "*")}}
    dataset = datasets.load_dataset(**source, split=spec.resolved_split, streaming=spec.streaming)
    _check_columns(dataset.column_names, spec)
    if spec.streaming:
        return StreamedRows(dataset, spec.subset, spec.max_samples)
    rows = subset_indices(len(dataset), spec.subset)[: spec.max_samples]
    if not rows:
        raise ValueError(f"dataset {spec.name!r} split {spec.resolved_split!r} subset {spec.subset!r} has no rows")
    return IndexedRows(dataset, rows, spec.image_column)


class ImageBatchCollator:
    """Turn a list of examples into `pixel_values`, `labels` and `index` tensors with the image processor.

    Runs in the DataLoader workers, so decoding and resizing happen in parallel with the model.
    """

    def __init__(self, image_processor: Any, image_column: str = "image", label_column: str = "label") -> None:
        self.image_processor = image_processor
        self.image_column, self.label_column = image_column, label_column

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images = [example[self.image_column].convert("RGB") for example in examples]
        pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return {
            "pixel_values": pixel_values,
            "labels": torch.tensor([int(example[self.label_column]) for example in examples], dtype=torch.long),
            "index": torch.tensor([int(example["index"]) for example in examples], dtype=torch.long),
        }


def make_dataloader(
    rows: IndexedRows | StreamedRows,
    image_processor: Any,
    batch_size: int,
    num_workers: int = 2,
    image_column: str = "image",
    label_column: str = "label",
) -> DataLoader:
    """A DataLoader over `rows` in row order (no shuffling, last batch kept)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if isinstance(rows, StreamedRows) and num_workers:
        logger.warning("streamed rows are numbered in the main process: using num_workers=0 (was %d)", num_workers)
        num_workers = 0
    return DataLoader(
        rows,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=ImageBatchCollator(image_processor, image_column, label_column),
    )
