"""The two dev sets as labelled rows, split into calibration (index % 5 == 0) and report rows (all the others).

`imagenet-val-dev` holds ILSVRC2012 *validation* file names, from which `datasets`' imagefolder infers a
"validation" split and then drops `metadata.csv` (the labels) when loaded with `data_dir`; listing the files
explicitly keeps the labels. Both sets are therefore loaded the same way here: every file of the folder, rows in
file-name order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rapid_hf.evaluation.data import IndexedRows, make_dataloader
from rapid_hf.evaluation.splits import subset_indices


def load_labelled_folder(folder: str | Path) -> Any:
    """A `datasets.Dataset` (image, label) of an imagefolder directory with metadata.csv."""
    import datasets

    files = sorted(str(path) for path in Path(folder).iterdir() if path.is_file())
    dataset = datasets.load_dataset("imagefolder", data_files={"train": files}, split="train")
    if "label" not in dataset.column_names:
        raise ValueError(f"{folder} has no labels (metadata.csv with file_name,label)")
    return dataset


def rows_of(folder: str | Path, subset: str) -> IndexedRows:
    """The `subset` ("calibration", "report" or "all") rows of a folder, each with its row index."""
    dataset = load_labelled_folder(folder)
    return IndexedRows(dataset, subset_indices(len(dataset), subset))


def pixel_rows(
    folders: list[str], subset: str, image_processor: Any, batch_size: int = 64
) -> tuple[Tensor, Tensor, list[tuple[str, int]]]:
    """Pixel values and labels of the `subset` rows of every folder, concatenated, with (folder, row) of each."""
    pixels, labels, where = [], [], []
    for folder in folders:
        for batch in make_dataloader(rows_of(folder, subset), image_processor, batch_size, num_workers=0):
            pixels.append(batch["pixel_values"])
            labels.append(batch["labels"])
            where += [(Path(folder).name, int(index)) for index in batch["index"]]
    return torch.cat(pixels), torch.cat(labels), where
