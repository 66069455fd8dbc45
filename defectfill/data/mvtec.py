"""MVTec AD as a `datasets.Dataset`: the few-shot defect images and masks DefectFill trains on, and the
listings synthesis and evaluation need (good images, held-out masks).

Layouts read (detected per category):
- the official MVTec AD layout: ``<category>/test/<defect>/NNN.png`` with
  ``<category>/ground_truth/<defect>/NNN_mask.png``, good images in ``<category>/{train,test}/good``;
- the DefectFill2 layout: ``<category>/train/defective/<defect>/NNN.png`` with
  ``<category>/train/defective_masks/<defect>/NNN_mask.png``;
- any Hub or local dataset with the columns image / mask / object_class / defect_type, through
  `datasets.load_dataset` (`load_defect_dataset(dataset_name=...)`).

Columns: ``image`` (RGB) and ``mask`` (L) as `datasets.Image`, ``object_class``, ``defect_type``,
``image_path``. A mask pixel is a defect when its value is >= `defectfill.masks.MASK_THRESHOLD`. The few-shot
split is `defectfill.data.split`, the paired transform `defectfill.data.transform`, synthesis folders as the
same Dataset `defectfill.data.synthetic`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

from defectfill.errors import DatasetError
from defectfill.images import HIGH_BIT_DEPTH_MODES, IMAGE_EXTENSIONS, image_files, open_checked
from defectfill.masks import MASK_THRESHOLD, binarize_mask

GOOD = "good"
REQUIRED_COLUMNS = ("image", "mask", "object_class", "defect_type")
# Which good images `--good_split` names.
GOOD_SPLITS = {"train": ("train",), "test": ("test",), "all": ("train", "test")}

# The 15 MVTec AD categories (the tiny tokenizer's vocabulary is built from them).
MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)


# ----------------------------------------------------------------------------------------------------
# Reading folders
# ----------------------------------------------------------------------------------------------------


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


def features():
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
    columns: dict[str, list[str]] = {name: [] for name in features()}
    for defect in chosen:
        rows = _defect_rows(root, object_class, defect)
        for name, values in rows.items():
            columns[name].extend(values)
        columns["object_class"].extend([object_class] * len(rows["image"]))
        columns["defect_type"].extend([defect] * len(rows["image"]))
    return datasets.Dataset.from_dict(columns, features=features())


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
    ds = ds.select_columns(list(features())).cast(features())
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
# Listings for synthesis and evaluation
# ----------------------------------------------------------------------------------------------------


def list_good_images(data_dir: str | os.PathLike, object_class: str, splits: Sequence[str] = ("train", "test")) -> list[Path]:
    """Defect-free images of a category: ``<split>/good`` for each split; in the DefectFill2 layout
    images directly under the category folder count too."""
    folder = category_dir(data_dir, object_class)
    paths = [p for split_name in splits for p in image_files(folder / split_name / GOOD)]
    if detect_layout(folder) == "defectfill2":
        paths += image_files(folder)
    return paths


# The parts of a saved split whose masks synthesis may paint in (`--mask_from`): the generator's training third,
# or the held-out two thirds, which are the downstream test set's masks.
MASK_FROM = ("train", "heldout")


def list_split_masks(data_dir: str | os.PathLike, split: dict, defect_type: str, part: str) -> list[Path]:
    """Mask files of the images of `defect_type` in the `part` ("train" or "heldout") of a saved split (local
    folders only)."""
    entries = split["defect_types"]
    if defect_type not in entries:
        raise DatasetError(f"defect type {defect_type!r} not in the split; found: {', '.join(sorted(entries))}")
    root = Path(data_dir)
    masks = []
    for relative in entries[defect_type][part]:
        image_path = root / relative
        _, masks_root, suffix = _defect_folders(root / Path(relative).parts[0])
        mask = mask_path_for(image_path, masks_root, suffix)
        if mask is None:
            raise DatasetError(f"{'held-out' if part == 'heldout' else 'training'} image {image_path} has no mask under {masks_root}")
        masks.append(mask)
    return masks


def list_heldout_masks(data_dir: str | os.PathLike, split: dict, defect_type: str) -> list[Path]:
    """Mask files of the held-out images of `defect_type` in a saved split (the test set's masks)."""
    return list_split_masks(data_dir, split, defect_type, "heldout")


def good_images(data_dir: str | os.PathLike | None, object_class: str | None, good_split: str = "train",
                image_dir: str | os.PathLike | None = None) -> list[Path]:
    """The defect-free images to paint on: every image of `image_dir` (``--image_dir``) when given, else the
    class's ``<split>/good`` images for `good_split` ("train", "test" or "all"). None found is an error that
    says which flag to give."""
    if image_dir:
        goods = image_files(Path(image_dir))
        if not goods:
            raise DatasetError(f"--image_dir {image_dir} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
        return goods
    if not data_dir:
        raise DatasetError("no good images: give --data_dir (the run records none) or --image_dir")
    if object_class is None:
        raise DatasetError(f"--object_class is needed to find the good images in {data_dir} (the run names none)")
    goods = list_good_images(data_dir, object_class, GOOD_SPLITS[good_split])
    if not goods:
        raise DatasetError(f"no good images of {object_class} in {data_dir} (--good_split {good_split})")
    return goods
