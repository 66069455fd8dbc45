"""Exporting a synthesis folder to the MVTec AD layout, which inspection tools (anomalib's `MVTecAD` and
`Folder` datamodules, `dataset_mvtec.py`) read as they read MVTec AD, with the table anomalib's `Tabular`
datamodule reads (`samples.csv`)."""

from __future__ import annotations

import csv
import io
import os
import shutil
from collections import Counter
from pathlib import Path

from defectfill.data.mvtec import GOOD, list_good_images
from defectfill.fileio import write_json_atomic, write_text_atomic
from defectfill.images import image_files


def default_export_dir(output_dir: Path) -> Path:
    return output_dir.with_name(f"{output_dir.name}-mvtec")


# anomalib's Tabular layout: one row per image, paths relative to the class folder, label 0 (good, no mask) or 1.
TABULAR_FILENAME = "samples.csv"
TABULAR_COLUMNS = ("image_path", "label_index", "split", "mask_path")


def write_tabular(root: Path, rows: list[tuple[str, int, str, str]]) -> Path:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(TABULAR_COLUMNS)
    writer.writerows(rows)
    return write_text_atomic(root / TABULAR_FILENAME, out.getvalue())


def good_name(path: Path, taken: set[str]) -> str:
    """A good image's file name in train/good or test/good: its own, or with its two folders' names before it when
    another image of the split has it (MVTec AD 2's train/good and validation/good both hold 000.png:
    validation_good_000.png)."""
    name = path.name
    if name in taken:
        name = "_".join([*path.parent.parts[-2:], path.name])
    index = 1
    while name in taken:
        name, index = f"{path.stem}_{index}{path.suffix}", index + 1
    taken.add(name)
    return name


def export_mvtec(output_dir: Path, rows: dict[str, dict], export_dir: Path, object_class: str, data_dir: str | None,
                 image_dir: str | None, good: str, layout: str | None = None) -> Path:
    """The MVTec AD layout, whatever the layout the data folder is in (`layout`, None: detected):
    <class>/test/<label>/NNN.png, <class>/ground_truth/<label>/NNN_mask.png (the union
    mask), <class>/train/good and test/good (copied or linked), and <class>/samples.csv (anomalib's
    `Tabular.from_file(name, "samples.csv", root=<class folder>)`), written beside the target and renamed into
    place (a reader never sees half an export). Returns the class folder."""
    staging = export_dir.with_name(f".{export_dir.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    root = staging / object_class
    numbers: Counter = Counter()
    sources = {}
    table = []
    for name in sorted(rows):
        row = rows[name]
        label = row["defect_type"]
        number = numbers[label]
        numbers[label] += 1
        image_name, mask_name = f"test/{label}/{number:03d}.png", f"ground_truth/{label}/{number:03d}_mask.png"
        for source, target in ((output_dir / row["file_name"], root / image_name), (output_dir / row["mask_file_name"], root / mask_name)):
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        sources[image_name] = row["file_name"]
        table.append((image_name, 1, "test", mask_name))
    goods: dict[str, list[Path]] = {}
    if image_dir:
        goods["train"] = image_files(Path(image_dir))
    elif data_dir:
        for split in ("train", "test"):
            goods[split] = list_good_images(data_dir, object_class, (split,), layout)
    if good != "none":
        for split, files in goods.items():
            taken: set[str] = set()
            for path in files:
                name = good_name(path, taken)
                target = root / split / GOOD / name
                target.parent.mkdir(parents=True, exist_ok=True)
                if good == "symlink":
                    target.symlink_to(path.resolve())
                else:
                    shutil.copyfile(path, target)
                table.append((f"{split}/{GOOD}/{name}", 0, split, ""))
    write_json_atomic(root / "defectfill_export.json", {"source": str(output_dir), "files": sources})
    write_tabular(root, table)
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
