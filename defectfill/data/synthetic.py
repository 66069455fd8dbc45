"""A synthesis folder (what `infer_defectfill.py`, the builder and the app write) as the same
`datasets.Dataset` the real MVTec data loads as, so every tool that reads real defects reads synthetic ones."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from defectfill.data.mvtec import features
from defectfill.errors import DatasetError, RunFileError
from defectfill.runs.files import METADATA_FILENAME
from defectfill.runs.folder import read_metadata


def load_synthetic(folder: str | os.PathLike, object_class: str | None = None, defect_types: Iterable[str] | None = None):
    """A synthesis output folder (imagefolder layout: ``metadata.jsonl`` with ``file_name`` and
    ``mask_file_name`` rows, as `infer_defectfill.py` writes it) as the same `datasets.Dataset` the real
    data loads as: image, mask, object_class, defect_type, image_path (the file name in the folder).
    Rows sorted by file name; optionally filtered to one class and some defect types."""
    import datasets

    root = Path(folder)
    if not (root / METADATA_FILENAME).is_file():
        raise DatasetError(f"{root} has no {METADATA_FILENAME}: is it an output folder of infer_defectfill.py?")
    try:
        rows = read_metadata(root, require_files=False)
    except RunFileError as error:
        raise DatasetError(str(error)) from error
    columns: dict[str, list] = {name: [] for name in features()}
    for name in sorted(rows):
        row = rows[name]
        for key in ("file_name", "mask_file_name"):
            if not (root / row[key]).is_file():
                raise DatasetError(f"{root / METADATA_FILENAME} lists {row[key]}, which is not in {root}")
        if object_class is not None and row.get("object_class") != object_class:
            continue
        if defect_types is not None and row.get("defect_type") not in set(defect_types):
            continue
        columns["image"].append(str(root / row["file_name"]))
        columns["mask"].append(str(root / row["mask_file_name"]))
        columns["object_class"].append(row.get("object_class") or "")
        columns["defect_type"].append(row.get("defect_type") or "")
        columns["image_path"].append(row["file_name"])
    return datasets.Dataset.from_dict(columns, features=features())
