"""Tiny datasets in every layout the reader knows, written from the bundled synthetic metal_nut images exactly as
each dataset ships (VisA: JPG images, 0/1/2 masks and its two CSV tables; MVTec LOCO: grey masks split over several
files; BTAD: .bmp and .png mixed; KolektorSDD2: all-zero masks for good images; ...).

`write_layout(name, root)` writes one under `root` and returns a `Written`: what a reader must find there (every
defect image with its defect type and whole mask, the good images per split)."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import SYNTHETIC_DATA

SOURCE = SYNTHETIC_DATA / "metal_nut"
SOURCE_TYPES = ("color", "scratch")


@dataclass
class Written:
    root: Path
    object_class: str
    layout: str
    defects: dict[str, tuple[str, np.ndarray]] = field(default_factory=dict)  # image path -> (defect type, mask)
    goods: dict[str, list[str]] = field(default_factory=lambda: {"train": [], "test": []})  # split -> image paths
    top: Path | None = None  # the folder written, when --data_dir (root) lies inside it

    @property
    def written_folder(self) -> Path:
        return self.top or self.root

    def add_defect(self, path: Path, defect_type: str, mask: np.ndarray) -> None:
        self.defects[path.relative_to(self.root).as_posix()] = (defect_type, mask)

    def add_good(self, path: Path, split: str) -> None:
        self.goods[split].append(path.relative_to(self.root).as_posix())


def source_defects(defect_type: str, count: int = 3) -> list[tuple[Image.Image, np.ndarray]]:
    """(RGB image, boolean mask) of the first `count` bundled defects of a type."""
    pairs = []
    for index in range(count):
        image = Image.open(SOURCE / "test" / defect_type / f"{index:03d}.png").convert("RGB")
        mask = np.asarray(Image.open(SOURCE / "ground_truth" / defect_type / f"{index:03d}_mask.png")) >= 128
        pairs.append((image, mask))
    return pairs


def source_goods(split: str, count: int = 2) -> list[Image.Image]:
    return [Image.open(path).convert("RGB") for path in sorted((SOURCE / split / "good").glob("*.png"))[:count]]


def save(image: Image.Image | np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (Image.fromarray(image) if isinstance(image, np.ndarray) else image).save(path)
    return path


def as_values(mask: np.ndarray, value: int) -> np.ndarray:
    return (mask * value).astype(np.uint8)


def write_goods(written: Written, folders: dict[str, Path], extension: str = ".png") -> None:
    """Good images: `folders` maps a folder to the split the reader must put it in (keys "train", "test",
    "train:<n>" for a second train folder)."""
    for key, folder in folders.items():
        split = key.split(":")[0]
        for index, image in enumerate(source_goods("train" if split == "train" else "test")):
            written.add_good(save(image, folder / f"{index:03d}{extension}"), split)


# ----------------------------------------------------------------------------------------------------------------
# The public datasets
# ----------------------------------------------------------------------------------------------------------------


def write_mvtec(root: Path) -> Written:
    written, folder = Written(root, "metal_nut", "mvtec"), root / "metal_nut"
    write_goods(written, {"train": folder / "train" / "good", "test": folder / "test" / "good"})
    for defect_type in SOURCE_TYPES:
        for index, (image, mask) in enumerate(source_defects(defect_type)):
            save(as_values(mask, 255), folder / "ground_truth" / defect_type / f"{index:03d}_mask.png")
            written.add_defect(save(image, folder / "test" / defect_type / f"{index:03d}.png"), defect_type, mask)
    return written


def write_defectfill2(root: Path) -> Written:
    written, folder = Written(root, "metal_nut", "defectfill2"), root / "metal_nut"
    write_goods(written, {"train": folder})
    for defect_type in SOURCE_TYPES:
        for index, (image, mask) in enumerate(source_defects(defect_type)):
            save(as_values(mask, 255), folder / "train" / "defective_masks" / defect_type / f"{index:03d}_mask.png")
            written.add_defect(save(image, folder / "train" / "defective" / defect_type / f"{index:03d}.png"), defect_type, mask)
    return written


VISA_LABELS = {"color": "different colour spot", "scratch": "Scratch"}


def write_visa(root: Path) -> Written:
    """The raw download: Data/Images/{Normal,Anomaly}/*.JPG, Data/Masks/Anomaly/*.png with values 0, 1, 2,
    <class>/image_anno.csv (image, label, mask) and split_csv/1cls.csv (object, split, label, image, mask),
    paths relative to the data root. The last defect has two labels: its type is "different_colour_spot+scratch"."""
    written, name = Written(root, "candle", "visa"), "candle"
    images, masks = root / name / "Data" / "Images", root / name / "Data" / "Masks" / "Anomaly"
    annotations, split_rows = [("image", "label", "mask")], [("object", "split", "label", "image", "mask")]
    for index, image in enumerate(source_goods("train") + source_goods("test")):
        split = "train" if index < 2 else "test"
        path = save(image, images / "Normal" / f"{index:04d}.JPG")
        written.add_good(path, split)
        relative = path.relative_to(root).as_posix()
        annotations.append((relative, "normal", ""))
        split_rows.append((name, split, "normal", relative, ""))
    pairs = [(t, pair) for t in SOURCE_TYPES for pair in source_defects(t, 2)]
    for index, (source_type, (image, mask)) in enumerate(pairs):
        path, mask_path = images / "Anomaly" / f"{index:03d}.JPG", masks / f"{index:03d}.png"
        save(image, path)
        save(as_values(mask, 1 + index % 2), mask_path)  # the defect's values: 1 or 2, never 255
        label = VISA_LABELS[source_type] if index < len(pairs) - 1 else "scratch,different colour spot"
        written.add_defect(path, "different_colour_spot+scratch" if "," in label else label.lower().replace(" ", "_"), mask)
        relative, mask_relative = path.relative_to(root).as_posix(), mask_path.relative_to(root).as_posix()
        annotations.append((relative, label, mask_relative))
        split_rows.append((name, "test", "anomaly", relative, mask_relative))
    split_rows.append(("capsules", "train", "normal", "capsules/Data/Images/Normal/0000.JPG", ""))  # another class
    write_csv(root / name / "image_anno.csv", annotations)
    write_csv(root / "split_csv" / "1cls.csv", split_rows)
    return written


def write_csv(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        csv.writer(file).writerows(rows)
    return path


def write_mvtec_ad2(root: Path) -> Written:
    """train/good, validation/good, test_public/{good,bad}, masks test_public/ground_truth/bad/<stem>_mask.png, and
    a private test set without masks (not read)."""
    written, folder = Written(root, "sheet_metal", "mvtec_ad2"), root / "sheet_metal"
    write_goods(written, {"train": folder / "train" / "good", "train:validation": folder / "validation" / "good",
                          "test": folder / "test_public" / "good"})
    for index, (image, mask) in enumerate(source_defects("scratch") + source_defects("color", 1)):
        save(as_values(mask, 255), folder / "test_public" / "ground_truth" / "bad" / f"{index:03d}_mask.png")
        written.add_defect(save(image, folder / "test_public" / "bad" / f"{index:03d}.png"), "defect", mask)
    save(source_goods("test")[0], folder / "test_private" / "000.png")
    save(source_goods("test")[1], folder / "test_private_mixed" / "000.png")
    return written


def split_mask(mask: np.ndarray) -> list[np.ndarray]:
    """A mask as two files: its upper rows and the rest (their union is the mask)."""
    rows = np.nonzero(mask.any(axis=1))[0]
    middle = (rows.min() + rows.max() + 1) // 2
    upper, lower = mask.copy(), mask.copy()
    upper[middle:], lower[:middle] = False, False
    return [upper, lower]


def write_mvtec_loco(root: Path) -> Written:
    """test/{logical,structural}_anomalies/NNN.png, each with ground_truth/<kind>/NNN/000.png, 001.png in grey
    values below 255 (their union is the defect)."""
    written, folder = Written(root, "pushpins", "mvtec_loco"), root / "pushpins"
    write_goods(written, {"train": folder / "train" / "good", "train:validation": folder / "validation" / "good",
                          "test": folder / "test" / "good"})
    for kind, source_type in zip(("logical_anomalies", "structural_anomalies"), SOURCE_TYPES):
        for index, (image, mask) in enumerate(source_defects(source_type)):
            for part, (piece, grey) in enumerate(zip(split_mask(mask), (254, 60))):
                save(as_values(piece, grey), folder / "ground_truth" / kind / f"{index:03d}" / f"{part:03d}.png")
            written.add_defect(save(image, folder / "test" / kind / f"{index:03d}.png"), kind, mask)
    return written


def write_btad(root: Path) -> Written:
    """train/ok, test/ok, test/ko with .bmp and .png images mixed; masks ground_truth/ko/<stem> with the other
    extension."""
    written, folder = Written(root, "01", "btad"), root / "01"
    write_goods(written, {"train": folder / "train" / "ok", "test": folder / "test" / "ok"}, ".bmp")
    for index, (image, mask) in enumerate(source_defects("scratch")):
        image_ext, mask_ext = (".png", ".bmp") if index == 1 else (".bmp", ".png")
        save(as_values(mask, 255), folder / "ground_truth" / "ko" / f"{index:04d}{mask_ext}")
        written.add_defect(save(image, folder / "test" / "ko" / f"{index:04d}{image_ext}"), "defect", mask)
    return written


def write_kolektorsdd2(root: Path) -> Written:
    """Flat train/ and test/: NNNNN.png with NNNNN_GT.png, all-zero for the good images; no class folder."""
    written = Written(root, "commutator", "kolektorsdd2")
    number = 10000
    for split in ("train", "test"):
        for image in source_goods(split):
            save(np.zeros(image.size[::-1], dtype=np.uint8), root / split / f"{number}_GT.png")
            written.add_good(save(image, root / split / f"{number}.png"), split)
            number += 1
        for image, mask in source_defects("scratch" if split == "train" else "color", 2):
            save(as_values(mask, 255), root / split / f"{number}_GT.png")
            written.add_defect(save(image, root / split / f"{number}.png"), "defect", mask)
            number += 1
    return written


def write_realiad(root: Path) -> Written:
    """realiad_256/<class>/OK/S0000/*_C1.jpg (good) and NG/<code>/S000N/*_C1.jpg with *_C1_mask.png; the NG samples'
    second view shows no defect (no mask; the split JSON labels it OK); the split JSON in
    realiad_jsons/realiad_jsons/<class>.json beside the resolution folder, which is --data_dir."""
    written, name = Written(root / "realiad_256", "audiojack", "realiad", top=root), "audiojack"
    folder, entries = root / "realiad_256" / name, {"train": [], "test": []}
    for index, image in enumerate(source_goods("train") + source_goods("test")):
        split = "train" if index < 2 else "test"
        path = save(image, folder / "OK" / f"S{index:04d}" / f"{name}_{index:04d}_OK_C1_2023.jpg")
        written.add_good(path, split)
        entries[split].append({"category": name, "anomaly_class": "OK", "image_path": path.relative_to(folder).as_posix(),
                               "mask_path": None})
    pairs = [("HS", pair) for pair in source_defects("scratch", 2)] + [("ZW", pair) for pair in source_defects("color", 2)]
    for index, (code, (image, mask)) in enumerate(pairs, start=10):
        sample = folder / "NG" / code / f"S{index:04d}"
        path = save(image, sample / f"{name}_{index:04d}_NG_C1_2023.jpg")
        mask_path = save(as_values(mask, 255), sample / f"{name}_{index:04d}_NG_C1_2023_mask.png")
        written.add_defect(path, "scratch" if code == "HS" else "contamination", mask)
        other_view = save(source_goods("test")[0], sample / f"{name}_{index:04d}_NG_C2_2023.jpg")
        written.add_good(other_view, "test")
        entries["test"] += [
            {"category": name, "anomaly_class": code, "image_path": path.relative_to(folder).as_posix(),
             "mask_path": mask_path.relative_to(folder).as_posix()},
            {"category": name, "anomaly_class": "OK", "image_path": other_view.relative_to(folder).as_posix(), "mask_path": None},
        ]
    json_path = root / "realiad_jsons" / "realiad_jsons" / f"{name}.json"
    json_path.parent.mkdir(parents=True)
    json_path.write_text(json.dumps({"meta": {"normal_class": "OK", "prefix": ""}, **entries}))
    return written


# ----------------------------------------------------------------------------------------------------------------
# Your own data
# ----------------------------------------------------------------------------------------------------------------


def write_folder(root: Path) -> Written:
    """good/, good_test/, defect/<type>/ with masks masks/<type>/<stem>.png in several forms: 0/255, an RGB mask,
    a palette mask, and a folder of two masks (their union)."""
    written, folder = Written(root, "widget", "folder"), root / "widget"
    write_goods(written, {"train": folder / "good", "test": folder / "good_test"}, ".jpg")
    for defect_type in SOURCE_TYPES:
        for index, (image, mask) in enumerate(source_defects(defect_type)):
            masks = folder / "masks" / defect_type
            if index == 0:
                save(np.stack([as_values(mask, 200), np.zeros_like(mask, np.uint8), np.zeros_like(mask, np.uint8)], -1),
                     masks / f"part{index}.png")
            elif index == 1 and defect_type == "scratch":
                for part, piece in enumerate(split_mask(mask)):
                    save(as_values(piece, 255), masks / f"part{index}" / f"{part}.png")
            else:
                save(Image.fromarray(as_values(mask, 3)).convert("P"), masks / f"part{index}_mask.png")
            written.add_defect(save(image, folder / "defect" / defect_type / f"part{index}.png"), defect_type, mask)
    return written


def write_csv_table(root: Path) -> Written:
    """<root>/widget.csv listing images anywhere under root: good rows without a mask, one with split test, a
    defect whose mask is a folder of two files, a defect without a type ("defect")."""
    written, rows = Written(root, "widget", "csv"), [("image", "mask", "defect_type", "split")]
    for index, image in enumerate(source_goods("train") + source_goods("test", 1)):
        split = "train" if index < 2 else "test"
        path = save(image, root / "photos" / f"ok_{index}.png")
        written.add_good(path, split)
        rows.append((path.relative_to(root).as_posix(), "", "good" if index else "", "test" if split == "test" else ""))
    pairs = [(t, pair) for t in SOURCE_TYPES for pair in source_defects(t, 2)]
    for index, (defect_type, (image, mask)) in enumerate(pairs):
        path = save(image, root / "photos" / f"nok_{index}.png")
        if index == 1:
            mask_path = root / "labels" / f"nok_{index}"
            for part, piece in enumerate(split_mask(mask)):
                save(as_values(piece, 1), mask_path / f"{part}.png")
        else:
            mask_path = save(as_values(mask, 255), root / "labels" / f"nok_{index}.png")
        listed_type = "" if index == len(pairs) - 1 else defect_type
        written.add_defect(path, listed_type or "defect", mask)
        rows.append((path.relative_to(root).as_posix(), mask_path.relative_to(root).as_posix(), listed_type, ""))
    write_csv(root / "widget.csv", rows)
    return written


WRITERS = {
    "mvtec": write_mvtec, "defectfill2": write_defectfill2, "visa": write_visa, "mvtec_ad2": write_mvtec_ad2,
    "mvtec_loco": write_mvtec_loco, "btad": write_btad, "kolektorsdd2": write_kolektorsdd2, "folder": write_folder,
    "csv": write_csv_table, "realiad": write_realiad,
}


def write_layout(name: str, root: Path) -> Written:
    root.mkdir(parents=True, exist_ok=True)
    return WRITERS[name](root)


def copy_tree(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target
