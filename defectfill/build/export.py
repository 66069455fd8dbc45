"""Exporting a synthesis folder to the MVTec AD layout, which inspection tools (anomalib's `MVTecAD` and
`Folder` datamodules, `dataset_mvtec.py`) read as they read MVTec AD."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path

from defectfill.data.mvtec import GOOD, list_good_images
from defectfill.fileio import write_json_atomic
from defectfill.images import image_files


def default_export_dir(output_dir: Path) -> Path:
    return output_dir.with_name(f"{output_dir.name}-mvtec")


def export_mvtec(output_dir: Path, rows: dict[str, dict], export_dir: Path, object_class: str, data_dir: str | None,
                 image_dir: str | None, good: str) -> Path:
    """The MVTec AD layout: <class>/test/<label>/NNN.png, <class>/ground_truth/<label>/NNN_mask.png (the union
    mask), <class>/train/good and test/good (copied or linked), written beside the target and renamed into
    place (a reader never sees half an export). Returns the class folder."""
    staging = export_dir.with_name(f".{export_dir.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    root = staging / object_class
    numbers: Counter = Counter()
    sources = {}
    for name in sorted(rows):
        row = rows[name]
        label = row["defect_type"]
        number = numbers[label]
        numbers[label] += 1
        image_target = root / "test" / label / f"{number:03d}.png"
        mask_target = root / "ground_truth" / label / f"{number:03d}_mask.png"
        for source, target in ((output_dir / row["file_name"], image_target), (output_dir / row["mask_file_name"], mask_target)):
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        sources[f"test/{label}/{number:03d}.png"] = row["file_name"]
    goods: dict[str, list[Path]] = {}
    if image_dir:
        goods["train"] = image_files(Path(image_dir))
    elif data_dir:
        for split in ("train", "test"):
            goods[split] = list_good_images(data_dir, object_class, (split,))
    if good != "none":
        for split, files in goods.items():
            for path in files:
                target = root / split / GOOD / path.name
                target.parent.mkdir(parents=True, exist_ok=True)
                if good == "symlink":
                    target.symlink_to(path.resolve())
                else:
                    shutil.copyfile(path, target)
    write_json_atomic(root / "defectfill_export.json", {"source": str(output_dir), "files": sources})
    if export_dir.exists():
        old = export_dir.with_name(f".{export_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(export_dir, old)
        os.replace(staging, export_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        export_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, export_dir)
    return export_dir / object_class
