"""The MVTec export's `samples.csv`: anomalib's Tabular layout (image_path, label_index, split, mask_path), one row per
image of the export, read back here with the csv module (anomalib itself is not a dependency)."""

from __future__ import annotations

import csv

from PIL import Image

from defectfill.build.export import TABULAR_COLUMNS, TABULAR_FILENAME, export_mvtec
from defectfill.data.mvtec import list_good_images
from tests.conftest import SYNTHETIC_DATA


def test_the_export_lists_every_image_with_its_label_split_and_mask(tmp_path):
    folder = tmp_path / "synthetic"
    rows = {}
    for index, label in enumerate(["color", "scratch", "color", "combined"]):
        for kind in ("images", "masks"):
            (folder / kind).mkdir(parents=True, exist_ok=True)
            Image.new("RGB" if kind == "images" else "L", (8, 8), index * 40).save(folder / kind / f"{index:05d}.png")
        rows[f"{index:05d}"] = {"defect_type": label, "file_name": f"images/{index:05d}.png", "mask_file_name": f"masks/{index:05d}.png"}
    class_dir = export_mvtec(folder, rows, tmp_path / "export", "metal_nut", str(SYNTHETIC_DATA), None, "copy")

    with open(class_dir / TABULAR_FILENAME, newline="") as handle:
        table = list(csv.DictReader(handle))
    assert tuple(table[0]) == TABULAR_COLUMNS
    exported = sorted(p.relative_to(class_dir).as_posix() for p in class_dir.glob("*/*/*.png") if p.parts[-3] != "ground_truth")
    assert sorted(row["image_path"] for row in table) == exported  # every image of the export, once
    for row in table:
        split, label = row["image_path"].split("/")[:2]
        assert row["split"] == split
        if label == "good":
            assert row["label_index"] == "0" and row["mask_path"] == ""
        else:
            assert row["label_index"] == "1" and row["split"] == "test"
            mask = class_dir / row["mask_path"]
            assert mask == class_dir / "ground_truth" / label / f"{row['image_path'].split('/')[-1][:-4]}_mask.png" and mask.is_file()
    goods = {split: sum(r["split"] == split and r["label_index"] == "0" for r in table) for split in ("train", "test")}
    assert goods == {split: len(list_good_images(SYNTHETIC_DATA, "metal_nut", (split,))) for split in ("train", "test")}
    by_label = sorted(row["image_path"].split("/")[1] for row in table if row["label_index"] == "1")
    assert by_label == ["color", "color", "combined", "scratch"]
