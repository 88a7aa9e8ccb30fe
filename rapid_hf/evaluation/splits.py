"""The fixed split of a small labelled set into calibration and reporting images.

Calibration (issue: choosing hyper-parameters) must never see the images results are reported on. Rows whose
index is a multiple of `every` calibrate; all the others report. With the 500 dev photos and every=5 that is
100 calibration and 400 reporting images.
"""

from __future__ import annotations

CALIBRATION_EVERY = 5


def calibration_indices(num_rows: int, every: int = CALIBRATION_EVERY) -> list[int]:
    """Row indices used for calibration."""
    return list(range(0, num_rows, every))


def report_indices(num_rows: int, every: int = CALIBRATION_EVERY) -> list[int]:
    """Row indices used for reported results: every row not used for calibration."""
    return [index for index in range(num_rows) if index % every]


SUBSETS: tuple[str, ...] = ("all", "report", "calibration")


def in_subset(index: int, subset: str, every: int = CALIBRATION_EVERY) -> bool:
    """Whether row `index` belongs to `subset` ("all", "report" or "calibration"); for streamed datasets."""
    if subset not in SUBSETS:
        raise ValueError(f"subset {subset!r} is invalid: choose from {', '.join(SUBSETS)}")
    return subset == "all" or (index % every == 0) == (subset == "calibration")


def subset_indices(num_rows: int, subset: str, every: int = CALIBRATION_EVERY) -> list[int]:
    """Row indices of `subset` ("all", "report" or "calibration") in a dataset of `num_rows` rows."""
    return [index for index in range(num_rows) if in_subset(index, subset, every)]
