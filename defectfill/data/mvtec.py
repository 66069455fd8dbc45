"""The real data as a `datasets.Dataset`: the few-shot defect images and masks DefectFill trains on, and the
listings synthesis and evaluation need (good images, held-out masks), for every dataset layout.

Local folders are read through `defectfill.data.layouts` (MVTec AD, DefectFill2, VisA, MVTec AD 2, MVTec LOCO,
BTAD, KolektorSDD2, Real-IAD, a plain folder of your own, a CSV table: detected from ``--data_dir`` and
``--object_class``, or forced with `layout`); any Hub or local dataset with the columns image / mask / object_class
/ defect_type through `datasets.load_dataset` (`load_defect_dataset(dataset_name=...)`).

Columns: ``image`` (RGB) and ``mask`` (L, 0 / 255: the union of the image's mask files, a pixel a defect where a
file is non-zero, `defectfill.data.mask_files`) as `datasets.Image`, ``object_class``, ``defect_type``,
``image_path`` (relative to ``--data_dir``: the name the few-shot split records); rows read from a folder add
``mask_paths`` (the image's mask files, relative to ``--data_dir``) and ``layout``. The listings return files:
good images, and a mask per defect image that is a file or a folder of files (read it with
`defectfill.data.mask_files.read_mask`). The few-shot split is `defectfill.data.split`, the paired transform
`defectfill.data.transform`, synthesis folders as the same Dataset `defectfill.data.synthetic`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

from defectfill.data.layouts import Sample, Table, list_classes, read_table, resolve_layout
from defectfill.data.layouts.base import find_file
from defectfill.data.layouts.kolektorsdd2 import dataset_folder
from defectfill.data.mask_files import mask_files, png_bytes, read_mask
from defectfill.errors import DatasetError
from defectfill.images import HIGH_BIT_DEPTH_MODES, IMAGE_EXTENSIONS, image_files, open_checked

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
    """The products of a data folder (`defectfill.data.layouts.list_classes`)."""
    return list_classes(data_dir)


def detect_layout(category_dir: Path, object_class: str | None = None) -> str | None:
    """The name of the layout ``<data_dir>/<object_class>`` holds (`category_dir` is ``<data_dir>/<class>`` when
    `object_class` is None, else ``<data_dir>``), or None when it holds none."""
    root, name = (Path(category_dir).parent, Path(category_dir).name) if object_class is None else (Path(category_dir), object_class)
    try:
        return resolve_layout(root, name).name
    except DatasetError:
        return None


def category_dir(data_dir: str | os.PathLike, object_class: str, layout: str | None = None) -> Path:
    """The product's folder: ``<data_dir>/<class>``, or ``--data_dir`` itself for a CSV table and a flat
    KolektorSDD2 folder. No layout matching is an error that names every layout tried."""
    root = Path(data_dir)
    chosen = resolve_layout(root, object_class, layout)
    if chosen.name == "kolektorsdd2":
        return dataset_folder(root, object_class)
    return root / object_class if chosen.class_folder else root


def list_defect_types(data_dir: str | os.PathLike, object_class: str, layout: str | None = None) -> list[str]:
    return read_table(data_dir, object_class, layout).defect_types()


def mask_path_for(image_path: Path, masks_root: Path, suffix: str = "_mask") -> Path | None:
    """The mask of ``<defect>/NNN.png`` in the MVTec AD layout: ``<masks_root>/<defect>/NNN_mask.png`` (any image
    extension; ``NNN.png`` too)."""
    return find_file(masks_root / image_path.parent.name, image_path.stem, (suffix, ""))


def validate_pair(image_path: Path, mask_source: Path):
    """The defect mask (boolean) of a defective image: the image readable as 8 bits, every mask file of its
    size, their union not empty; any of these failing is an error naming the files."""
    with open_checked(image_path, "image") as image:
        if image.mode in HIGH_BIT_DEPTH_MODES:
            raise DatasetError(
                f"image {image_path} has {image.mode} pixels (more than 8 bits); training reads 8-bit images, and "
                "a plain conversion would clip it to white: save it as 8-bit (value * 255 / its maximum)"
            )
        size = image.size
    mask = read_mask(mask_source, image_path, size)
    if not mask.any():
        raise DatasetError(f"mask {mask_source} is empty (no non-zero pixel); a defect image needs a non-empty mask")
    return mask


def _defect_row(table: Table, sample: Sample) -> dict:
    mask = validate_pair(sample.image, sample.mask)
    return {
        "image": str(sample.image), "mask": {"bytes": png_bytes(mask), "path": None}, "object_class": table.object_class,
        "defect_type": sample.defect_type, "image_path": table.name(sample.image),
        "mask_paths": [table.name(p) for p in mask_files(sample.mask)], "layout": table.layout,
    }


def features(folder_columns: bool = False):
    """The columns every defect Dataset has; `folder_columns` adds those of rows read from a folder (mask_paths,
    layout)."""
    import datasets

    columns = {
        "image": datasets.Image(mode="RGB"),
        "mask": datasets.Image(mode="L"),
        "object_class": datasets.Value("string"),
        "defect_type": datasets.Value("string"),
        "image_path": datasets.Value("string"),
    }
    if folder_columns:
        columns.update({"mask_paths": datasets.Sequence(datasets.Value("string")), "layout": datasets.Value("string")})
    return datasets.Features(columns)


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


def load_folder_defects(
    data_dir: str | os.PathLike, object_class: str, defect_types: Iterable[str] | None = None, layout: str | None = None
):
    """The defect images and masks of one product in a local folder of any layout (detected, or `layout`) as a
    `datasets.Dataset` (all its defect types unless `defect_types` is given), rows sorted by defect type and
    path. Every image is read now: an unreadable file, a missing or empty mask or one of another size is an
    error naming the files."""
    import datasets

    table = read_table(data_dir, object_class, layout)
    chosen = check_defect_types(defect_types, table.defect_types(), str(category_dir(data_dir, object_class, table.layout)))
    rows = [_defect_row(table, sample) for defect in chosen for sample in table.defects([defect])]
    columns = {name: [row[name] for row in rows] for name in features(folder_columns=True)}
    return datasets.Dataset.from_dict(columns, features=features(folder_columns=True))


# The name the tools have always called it by; it reads every layout.
load_mvtec_defects = load_folder_defects


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
    layout: str | None = None,
    **hub_kwargs,
):
    """One entry point for training and inference: a local folder (`data_dir`, its layout detected or `layout`)
    or `load_dataset` (`dataset_name`)."""
    if (data_dir is None) == (dataset_name is None):
        raise DatasetError("give exactly one of --data_dir (a local dataset folder) or --dataset_name (a datasets repo)")
    if dataset_name is not None:
        if layout is not None:
            raise DatasetError(f"--layout {layout} reads a local folder (--data_dir), not --dataset_name {dataset_name}")
        return load_hub_defects(dataset_name, object_class, defect_types, **hub_kwargs)
    return load_folder_defects(data_dir, object_class, defect_types, layout)


# ----------------------------------------------------------------------------------------------------
# Listings for synthesis and evaluation
# ----------------------------------------------------------------------------------------------------


def list_good_images(data_dir: str | os.PathLike, object_class: str, splits: Sequence[str] = ("train", "test"),
                     layout: str | None = None) -> list[Path]:
    """Defect-free images of a product in the dataset's own `splits` ("train": MVTec's ``train/good``,
    validation sets, DefectFill2's loose images...; "test": the test set's good images), in path order."""
    return [sample.image for sample in read_table(data_dir, object_class, layout).goods(tuple(splits))]


def split_layout(split: dict | None, layout: str | None = None) -> str | None:
    """The layout a tool reads a run's data folder in: `layout` (``--layout``) when given, else the one the run's
    few-shot split recorded, else None (detected from the folder)."""
    return layout or (split or {}).get("layout")



def list_split_masks(data_dir: str | os.PathLike, split: dict, defect_type: str, part: str, layout: str | None = None,
                     object_class: str | None = None) -> list[Path]:
    """The mask of each image of `defect_type` in the `part` ("train" or "heldout") of a saved split (local
    folders only): a file, or a folder of several files whose union is the mask (read it with
    `defectfill.data.mask_files.read_mask`: any non-zero pixel is a defect). The layout and product are the
    split's (a split without them: detected, and the first folder of its image names)."""
    entries = split["defect_types"]
    if defect_type not in entries:
        raise DatasetError(f"defect type {defect_type!r} not in the split; found: {', '.join(sorted(entries))}")
    names = entries[defect_type][part]
    if not names:
        return []
    object_class = object_class or split.get("object_class") or Path(names[0]).parts[0]
    table = read_table(data_dir, object_class, layout or split.get("layout"))
    by_name = {table.name(sample.image): sample for sample in table.defects()}
    masks = []
    for name in names:
        if name not in by_name:
            what = "held-out" if part == "heldout" else "training"
            raise DatasetError(f"{what} image {Path(data_dir) / name} of the split is not a defect image of {object_class} in "
                               f"{data_dir} ({table.layout} layout): is --data_dir the folder the split was made from?")
        masks.append(by_name[name].mask)
    return masks


def list_heldout_masks(data_dir: str | os.PathLike, split: dict, defect_type: str, layout: str | None = None,
                       object_class: str | None = None) -> list[Path]:
    """The masks of the held-out images of `defect_type` in a saved split (the test set's masks)."""
    return list_split_masks(data_dir, split, defect_type, "heldout", layout, object_class)


def good_images(data_dir: str | os.PathLike | None, object_class: str | None, good_split: str = "train",
                image_dir: str | os.PathLike | None = None, layout: str | None = None) -> list[Path]:
    """The defect-free images to paint on: every image of `image_dir` (``--image_dir``) when given, else the
    product's good images of `good_split` ("train", "test" or "all"; `list_good_images`). None found is an error that
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
    goods = list_good_images(data_dir, object_class, GOOD_SPLITS[good_split], layout)
    if not goods:
        raise DatasetError(f"no good images of {object_class} in {data_dir} (--good_split {good_split})")
    return goods
