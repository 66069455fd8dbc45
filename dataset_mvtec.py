"""MVTec AD as a `datasets.Dataset`: the few-shot defect images and masks DefectFill trains on, the
paper's few-shot split, the paired image/mask transform, and the listings inference needs.

Layouts read (detected per category):
- the official MVTec AD layout: ``<category>/test/<defect>/NNN.png`` with
  ``<category>/ground_truth/<defect>/NNN_mask.png``, good images in ``<category>/{train,test}/good``;
- the DefectFill2 layout (seed README): ``<category>/train/defective/<defect>/NNN.png`` with
  ``<category>/train/defective_masks/<defect>/NNN_mask.png``;
- any Hub or local dataset with the columns image / mask / object_class / defect_type, through
  `datasets.load_dataset` (`load_defect_dataset(dataset_name=...)`).

Columns: ``image`` (RGB) and ``mask`` (L) as `datasets.Image`, ``object_class``, ``defect_type``,
``image_path``. A mask pixel is a defect when its value is >= `MASK_THRESHOLD` (128, half of the 8-bit
range, as MVTec's masks are 0/255 and resampled masks are rarely exactly either).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from fileio import write_json_atomic

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MASK_THRESHOLD = 128
GOOD = "good"
REQUIRED_COLUMNS = ("image", "mask", "object_class", "defect_type")
SPLIT_FILENAME = "few_shot_split.json"

# The 15 MVTec AD categories (the tiny tokenizer's vocabulary is built from them).
MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)


class DatasetError(ValueError):
    """Bad dataset input; the message names the file or folder and what was expected."""


# ----------------------------------------------------------------------------------------------------
# Reading folders
# ----------------------------------------------------------------------------------------------------


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def image_files(folder: Path) -> list[Path]:
    """Image files of a folder, sorted by name; other files (README, .DS_Store, ...) are ignored."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if is_image_file(p)), key=lambda p: p.name)


def list_categories(data_dir: str | os.PathLike) -> list[str]:
    root = Path(data_dir)
    return sorted(p.name for p in root.iterdir() if p.is_dir() and detect_layout(p) is not None)


def detect_layout(category_dir: Path) -> str | None:
    """"mvtec", "defectfill2" or None when the folder is neither."""
    if (category_dir / "ground_truth").is_dir() or (category_dir / "test").is_dir():
        return "mvtec"
    if (category_dir / "train" / "defective").is_dir():
        return "defectfill2"
    return None


def category_dir(data_dir: str | os.PathLike, object_class: str) -> Path:
    root = Path(data_dir)
    if not root.is_dir():
        raise DatasetError(f"--data_dir {root} does not exist or is not a folder")
    folder = root / object_class
    if not folder.is_dir() or detect_layout(folder) is None:
        found = list_categories(root)
        raise DatasetError(
            f"category {object_class!r} not found under {root} (expected {folder}/test/<defect> or "
            f"{folder}/train/defective/<defect>); categories found: {', '.join(found) or 'none'}"
        )
    return folder


def _defect_folders(folder: Path) -> tuple[Path, Path, str]:
    """(images root, masks root, mask-name suffix) of a category in its detected layout."""
    if detect_layout(folder) == "defectfill2":
        return folder / "train" / "defective", folder / "train" / "defective_masks", "_mask"
    return folder / "test", folder / "ground_truth", "_mask"


def list_defect_types(data_dir: str | os.PathLike, object_class: str) -> list[str]:
    images_root, _, _ = _defect_folders(category_dir(data_dir, object_class))
    return sorted(p.name for p in images_root.iterdir() if p.is_dir() and p.name != GOOD and image_files(p))


def mask_path_for(image_path: Path, masks_root: Path, suffix: str = "_mask") -> Path | None:
    """The mask of ``<defect>/NNN.png`` is ``<masks_root>/<defect>/NNN_mask.png`` (any image extension)."""
    folder = masks_root / image_path.parent.name
    for candidate in [image_path.suffix, *IMAGE_EXTENSIONS]:
        path = folder / f"{image_path.stem}{suffix}{candidate}"
        if path.is_file():
            return path
    return None


def binarize_mask(mask: Image.Image) -> np.ndarray:
    """Boolean defect mask: value >= MASK_THRESHOLD in the mask's luminance."""
    return np.asarray(mask.convert("L")) >= MASK_THRESHOLD


HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def to_8bit(image: Image.Image) -> Image.Image:
    """An 8-bit image for any PIL mode: 16-bit grayscale (``I;16*``) is scaled by its type's range (/257);
    ``I`` (32-bit int) and ``F`` (float) by the range their values use: [0, 1] floats and values up to 255
    are taken as 8-bit scale, up to 65535 as 16-bit, beyond by their maximum. PIL's own ``convert`` clips
    instead, so a 16-bit image would turn white. 8-bit modes are returned as they are."""
    if image.mode not in HIGH_BIT_DEPTH_MODES:
        return image
    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        scale = 65535.0
    else:
        peak = float(values.max()) if values.size else 0.0
        scale = 1.0 if image.mode == "F" and peak <= 1.0 else 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else peak
    return Image.fromarray(np.clip(np.round(values / scale * 255.0), 0, 255).astype(np.uint8), mode="L")


def open_checked(path: Path, what: str) -> Image.Image:
    """The image at `path`, fully decoded now (a truncated or corrupt file fails here, named, not at the first
    training step)."""
    try:
        image = Image.open(path)
        image.load()
    except (OSError, SyntaxError, ValueError) as error:
        raise DatasetError(f"{what} {path} cannot be read as an image ({error})") from error
    return image


def validate_pair(image_path: Path, mask_path: Path) -> None:
    with open_checked(image_path, "image") as image, open_checked(mask_path, "mask") as mask:
        if image.mode in HIGH_BIT_DEPTH_MODES:
            raise DatasetError(
                f"image {image_path} has {image.mode} pixels (more than 8 bits); training reads 8-bit images, and "
                "a plain conversion would clip it to white: save it as 8-bit (value * 255 / its maximum)"
            )
        if image.size != mask.size:
            raise DatasetError(
                f"mask {mask_path} is {mask.size[0]}x{mask.size[1]} but its image {image_path} is "
                f"{image.size[0]}x{image.size[1]}; they must be the same size"
            )
        if not binarize_mask(mask).any():
            raise DatasetError(
                f"mask {mask_path} is empty (no pixel >= {MASK_THRESHOLD}); a defect image needs a non-empty mask"
            )


def _defect_rows(data_dir: Path, object_class: str, defect_type: str) -> dict[str, list[str]]:
    images_root, masks_root, suffix = _defect_folders(data_dir / object_class)
    rows: dict[str, list[str]] = {"image": [], "mask": [], "image_path": []}
    for image_path in image_files(images_root / defect_type):
        mask_path = mask_path_for(image_path, masks_root, suffix)
        if mask_path is None:
            expected = masks_root / defect_type / f"{image_path.stem}{suffix}{image_path.suffix}"
            raise DatasetError(f"image {image_path} has no mask; expected {expected}")
        validate_pair(image_path, mask_path)
        rows["image"].append(str(image_path))
        rows["mask"].append(str(mask_path))
        rows["image_path"].append(image_path.relative_to(data_dir).as_posix())
    return rows


def _features():
    import datasets

    return datasets.Features(
        {
            "image": datasets.Image(mode="RGB"),
            "mask": datasets.Image(mode="L"),
            "object_class": datasets.Value("string"),
            "defect_type": datasets.Value("string"),
            "image_path": datasets.Value("string"),
        }
    )


def check_defect_types(requested: Iterable[str] | None, available: Sequence[str], where: str) -> list[str]:
    if requested is None:
        return list(available)
    requested = list(requested)
    missing = [d for d in requested if d not in available]
    if missing:
        raise DatasetError(
            f"defect type(s) {', '.join(map(repr, missing))} not found in {where}; "
            f"defect types found: {', '.join(available) or 'none'}"
        )
    return requested


def load_mvtec_defects(
    data_dir: str | os.PathLike, object_class: str, defect_types: Iterable[str] | None = None
):
    """The defect images and masks of one category as a `datasets.Dataset` (all its defect types
    unless `defect_types` is given), rows sorted by defect type and file name."""
    import datasets

    root = Path(data_dir)
    available = list_defect_types(root, object_class)
    chosen = check_defect_types(defect_types, available, f"{root / object_class}")
    columns: dict[str, list[str]] = {name: [] for name in _features()}
    for defect in chosen:
        rows = _defect_rows(root, object_class, defect)
        for name, values in rows.items():
            columns[name].extend(values)
        columns["object_class"].extend([object_class] * len(rows["image"]))
        columns["defect_type"].extend([defect] * len(rows["image"]))
    return datasets.Dataset.from_dict(columns, features=_features())


def load_hub_defects(
    dataset_name: str,
    object_class: str,
    defect_types: Iterable[str] | None = None,
    split: str = "train",
    config_name: str | None = None,
    cache_dir: str | None = None,
    data_files=None,
):
    """A Hub (or local `load_dataset`-readable) dataset with the columns image / mask / object_class /
    defect_type, filtered to one object class (and defect types), with our column types."""
    import datasets

    ds = datasets.load_dataset(dataset_name, config_name, split=split, cache_dir=cache_dir, data_files=data_files)
    missing = [c for c in REQUIRED_COLUMNS if c not in ds.column_names]
    if missing:
        raise DatasetError(
            f"--dataset_name {dataset_name}: missing column(s) {', '.join(missing)}; "
            f"expected {', '.join(REQUIRED_COLUMNS)}, found {', '.join(ds.column_names)}"
        )
    classes = sorted(set(ds["object_class"]))
    if object_class not in classes:
        raise DatasetError(f"--dataset_name {dataset_name} has no object_class {object_class!r}; found: {', '.join(classes)}")
    ds = ds.filter(lambda row: row == object_class, input_columns="object_class")
    chosen = check_defect_types(defect_types, sorted(set(ds["defect_type"]) - {GOOD}), f"--dataset_name {dataset_name}")
    ds = ds.filter(lambda row: row in chosen, input_columns="defect_type")
    if "image_path" not in ds.column_names:
        ds = ds.add_column("image_path", [f"{dataset_name}/{split}/{i:06d}" for i in range(len(ds))])
    ds = ds.select_columns(list(_features())).cast(_features())
    return ds.sort(["defect_type", "image_path"])


def load_defect_dataset(
    object_class: str,
    data_dir: str | None = None,
    dataset_name: str | None = None,
    defect_types: Iterable[str] | None = None,
    **hub_kwargs,
):
    """One entry point for training and inference: a local folder (`data_dir`) or `load_dataset` (`dataset_name`)."""
    if (data_dir is None) == (dataset_name is None):
        raise DatasetError("give exactly one of --data_dir (a local MVTec AD folder) or --dataset_name (a datasets repo)")
    if dataset_name is not None:
        return load_hub_defects(dataset_name, object_class, defect_types, **hub_kwargs)
    return load_mvtec_defects(data_dir, object_class, defect_types)


# ----------------------------------------------------------------------------------------------------
# Few-shot split
# ----------------------------------------------------------------------------------------------------


def num_train_images(total: int, fraction: float, count: int | None) -> int:
    """How many of `total` images train: `count` if given, else ceil(total * fraction); at least one,
    and at least one left out for evaluation when there are two or more. (Rounding up and the two
    floors are ours: "the first third" does not say how to round.)"""
    if count is not None and count < 1:
        raise DatasetError(f"--train_count must be >= 1, got {count}")
    if count is None and not 0 < fraction <= 1:
        raise DatasetError(f"--train_fraction must be in (0, 1], got {fraction}")
    wanted = count if count is not None else math.ceil(total * fraction)
    upper = total - 1 if total > 1 else total
    return max(1, min(wanted, upper))


def few_shot_split(
    dataset, strategy: str = "ordered", fraction: float = 1 / 3, count: int | None = None, seed: int = 0
) -> dict:
    """The paper's few-shot protocol, per defect type: the first `fraction` of the images sorted by
    file name train (``ordered``, the protocol peers report on), or a seeded random choice
    (``random``); the rest are held out (their masks drive generation, their images are the real
    references for evaluation)."""
    if strategy not in ("ordered", "random"):
        raise DatasetError(f"--split_strategy must be 'ordered' or 'random', got {strategy!r}")
    by_defect: dict[str, list[str]] = {}
    for defect, path in zip(dataset["defect_type"], dataset["image_path"]):
        by_defect.setdefault(defect, []).append(path)
    split = {"strategy": strategy, "fraction": fraction, "count": count, "seed": seed, "defect_types": {}}
    for defect, paths in sorted(by_defect.items()):
        paths = sorted(paths, key=lambda p: (Path(p).name, p))
        n_train = num_train_images(len(paths), fraction, count)
        if strategy == "random":
            chosen = set(random.Random(f"{seed}:{defect}").sample(paths, n_train))
        else:
            chosen = set(paths[:n_train])
        split["defect_types"][defect] = {
            "train": [p for p in paths if p in chosen],
            "heldout": [p for p in paths if p not in chosen],
        }
    return split


def save_split(split: dict, path: str | os.PathLike) -> Path:
    return write_json_atomic(path, split)


def load_split(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        split = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DatasetError(f"cannot read the split file {path}: {error}") from error
    if "defect_types" not in split:
        raise DatasetError(f"{path} is not a few-shot split file (no 'defect_types' key)")
    return split


def select_split(dataset, split: dict, part: str = "train"):
    """The rows of `dataset` in the split's `part` ("train" or "heldout")."""
    wanted = {p for entry in split["defect_types"].values() for p in entry[part]}
    return dataset.filter(lambda path: path in wanted, input_columns="image_path")


# ----------------------------------------------------------------------------------------------------
# Transform
# ----------------------------------------------------------------------------------------------------


def mask_crop_box(mask: np.ndarray, min_size: int, context: float = 0.5) -> tuple[int, int, int, int] | None:
    """A square (left, top, right, bottom) box around the mask's bounding box, `context` times larger,
    at least `min_size` pixels, moved to lie inside the image. None when no square fits the mask (its
    box is wider or taller than the image's short side) or the mask is empty: use the whole image then.
    Shared by inference (generate at full resolution around the defect) and training (the same scale)."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    height, width = mask.shape
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    side = max(int(math.ceil(max(bottom - top, right - left) * (1 + context))), min_size)
    side = min(side, height, width)
    if side < max(bottom - top, right - left):
        return None
    center_y, center_x = (top + bottom) / 2, (left + right) / 2
    box_top = int(min(max(round(center_y - side / 2), 0), height - side))
    box_left = int(min(max(round(center_x - side / 2), 0), width - side))
    return box_left, box_top, box_left + side, box_top + side


def to_signed_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as a (3, H, W) float tensor in [-1, 1], the range the VAE and LPIPS take."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()


@dataclass
class PairTransform:
    """Image and mask to `resolution` together, with the same random augmentation.

    Augmentation (SPEC): a random resize by a factor in `scale_range` then a random crop back to
    `resolution`, and an optional horizontal flip (off by default: some defects are orientation-specific).
    With `defect_crop_probability`, a square crop around the defect (`mask_crop_box`) is taken first, so
    training sees defects at the scale inference generates them (ours, not the paper's; off by default).
    Output: image (3, R, R) in [-1, 1]; mask (1, R, R) in {0, 1}.
    """

    resolution: int
    scale_range: tuple[float, float] = (1.0, 1.0)
    hflip: bool = False
    defect_crop_probability: float = 0.0
    defect_crop_context: float = 0.5

    def __call__(self, image: Image.Image, mask: Image.Image, rng: random.Random | None = None):
        rng = rng or random
        if self.defect_crop_probability > 0 and rng.random() < self.defect_crop_probability:
            # The defect at full resolution, as inference generates it with --crop_to_mask.
            box = mask_crop_box(binarize_mask(mask), self.resolution, self.defect_crop_context)
            if box is not None:
                image, mask = image.crop(box), mask.crop(box)
        size = round(self.resolution * rng.uniform(*self.scale_range))
        size = max(size, self.resolution)
        image = image.convert("RGB").resize((size, size), Image.BICUBIC)
        mask = mask.convert("L").resize((size, size), Image.NEAREST)
        left, top = rng.randint(0, size - self.resolution), rng.randint(0, size - self.resolution)
        box = (left, top, left + self.resolution, top + self.resolution)
        image, mask = image.crop(box), mask.crop(box)
        if self.hflip and rng.random() < 0.5:
            image, mask = image.transpose(Image.FLIP_LEFT_RIGHT), mask.transpose(Image.FLIP_LEFT_RIGHT)
        image_tensor = to_signed_tensor(image)
        mask_tensor = torch.from_numpy(binarize_mask(mask).astype(np.float32))[None]
        return image_tensor.contiguous(), mask_tensor


# ----------------------------------------------------------------------------------------------------
# Listings for inference
# ----------------------------------------------------------------------------------------------------


def list_good_images(data_dir: str | os.PathLike, object_class: str, splits: Sequence[str] = ("train", "test")) -> list[Path]:
    """Defect-free images of a category: ``<split>/good`` for each split; in the DefectFill2 layout
    images directly under the category folder count too."""
    folder = category_dir(data_dir, object_class)
    paths = [p for split_name in splits for p in image_files(folder / split_name / GOOD)]
    if detect_layout(folder) == "defectfill2":
        paths += image_files(folder)
    return paths


def list_heldout_masks(data_dir: str | os.PathLike, split: dict, defect_type: str) -> list[Path]:
    """Mask files of the held-out images of `defect_type` in a saved split (local folders only)."""
    entries = split["defect_types"]
    if defect_type not in entries:
        raise DatasetError(f"defect type {defect_type!r} not in the split; found: {', '.join(sorted(entries))}")
    root = Path(data_dir)
    masks = []
    for relative in entries[defect_type]["heldout"]:
        image_path = root / relative
        _, masks_root, suffix = _defect_folders(root / Path(relative).parts[0])
        mask = mask_path_for(image_path, masks_root, suffix)
        if mask is None:
            raise DatasetError(f"held-out image {image_path} has no mask under {masks_root}")
        masks.append(mask)
    return masks


# ----------------------------------------------------------------------------------------------------
# Synthetic sets
# ----------------------------------------------------------------------------------------------------


def load_synthetic(folder: str | os.PathLike, object_class: str | None = None, defect_types: Iterable[str] | None = None):
    """A synthesis output folder (imagefolder layout: ``metadata.jsonl`` with ``file_name`` and
    ``mask_file_name`` rows, as `infer_defectfill.py` writes it) as the same `datasets.Dataset` the real
    data loads as: image, mask, object_class, defect_type, image_path (the file name in the folder).
    Rows sorted by file name; optionally filtered to one class and some defect types."""
    import datasets

    from run_files import METADATA_FILENAME, RunFileError, read_metadata

    root = Path(folder)
    if not (root / METADATA_FILENAME).is_file():
        raise DatasetError(f"{root} has no {METADATA_FILENAME}: is it an output folder of infer_defectfill.py?")
    try:
        rows = read_metadata(root, require_files=False)
    except RunFileError as error:
        raise DatasetError(str(error)) from error
    columns: dict[str, list] = {name: [] for name in _features()}
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
    return datasets.Dataset.from_dict(columns, features=_features())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print an MVTec AD category as a datasets.Dataset and its few-shot split.")
    parser.add_argument("--data_dir", required=True, help="MVTec AD root folder.")
    parser.add_argument("--object_class", required=True, help="Category folder name, e.g. bottle or metal_nut.")
    parser.add_argument("--defect_type", action="append", default=None, help="Defect type(s); default: all.")
    parser.add_argument("--split_strategy", default="ordered", choices=("ordered", "random"), help="Few-shot split rule.")
    parser.add_argument("--train_fraction", type=float, default=1 / 3, help="Fraction of each defect type that trains.")
    parser.add_argument("--train_count", type=int, default=None, help="Exact number of training images per defect type.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random split.")
    args = parser.parse_args(argv)
    ds = load_mvtec_defects(args.data_dir, args.object_class, args.defect_type)
    print(ds)
    split = few_shot_split(ds, args.split_strategy, args.train_fraction, args.train_count, args.seed)
    print(json.dumps(split, indent=2))


if __name__ == "__main__":
    try:
        main()
    except DatasetError as error:
        raise SystemExit(f"error: {error}") from None
