#!/usr/bin/env python
"""A defect dataset as a `datasets.Dataset`: the few-shot defect images and masks DefectFill trains on, the paper's
few-shot split, the paired transform, and synthesis folders read as the same Dataset. Local folders in the layouts
of MVTec AD, DefectFill2, VisA, MVTec AD 2, MVTec LOCO, BTAD, KolektorSDD2 and Real-IAD, your own plain folder or
CSV table, detected from the folder (`defectfill.data.layouts`).

    python dataset_mvtec.py --data_dir /data/mvtec_ad --object_class bottle   # prints the Dataset and its split
    python dataset_mvtec.py --data_dir /data/VisA --object_class candle      # the VisA download, as it is

    import dataset_mvtec
    ds = dataset_mvtec.load_mvtec_defects("/data/mvtec_ad", "bottle")
    split = dataset_mvtec.few_shot_split(ds)                      # per defect type: the first third trains
    synthetic = dataset_mvtec.load_synthetic("synthetic/bottle-broken_large")

The implementation is `defectfill.data` (`mvtec`: the loader and listings, `layouts`: one module per layout,
`mask_files`: masks as users have them, `split`, `transform`, `synthetic`);
this module is its public face and its command line.
"""

from __future__ import annotations

import argparse
import json

from defectfill.cli import check_minimums, run_main
from defectfill.data.layouts import LAYOUT_NAMES
from defectfill.data.mask_files import read_mask
from defectfill.data.mvtec import (
    GOOD,
    MVTEC_CATEGORIES,
    REQUIRED_COLUMNS,
    category_dir,
    check_defect_types,
    detect_layout,
    good_images,
    list_categories,
    list_defect_types,
    list_good_images,
    list_heldout_masks,
    list_split_masks,
    load_defect_dataset,
    load_hub_defects,
    load_mvtec_defects,
    mask_path_for,
    validate_pair,
)
from defectfill.data.split import few_shot_split, load_split, merge_splits, num_train_images, save_split, select_split
from defectfill.data.synthetic import load_synthetic
from defectfill.data.transform import PairTransform
from defectfill.errors import DatasetError
from defectfill.images import IMAGE_EXTENSIONS, image_files, is_image_file, open_checked, to_8bit, to_signed_tensor
from defectfill.masks import MASK_THRESHOLD, binarize_mask, mask_crop_box

__all__ = [
    "GOOD", "IMAGE_EXTENSIONS", "LAYOUT_NAMES", "MASK_THRESHOLD", "MVTEC_CATEGORIES", "REQUIRED_COLUMNS", "DatasetError", "PairTransform",
    "binarize_mask", "category_dir", "check_defect_types", "detect_layout", "few_shot_split", "good_images", "image_files",
    "is_image_file", "list_categories", "list_defect_types", "list_good_images", "list_heldout_masks", "list_split_masks",
    "load_defect_dataset",
    "load_hub_defects", "load_mvtec_defects", "load_split", "load_synthetic", "mask_crop_box", "mask_path_for",
    "merge_splits", "num_train_images", "open_checked", "read_mask", "save_split", "select_split", "to_8bit", "to_signed_tensor",
    "validate_pair",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Print a product's defects as a datasets.Dataset and its few-shot split.")
    parser.add_argument("--data_dir", required=True, help="Dataset root folder (MVTec AD, VisA, ... or your own folder or CSV table).")
    parser.add_argument("--object_class", required=True, help="Product: its folder name, e.g. bottle or metal_nut (the name "
                        "of the product for a KolektorSDD2 folder, the table's name for <data_dir>/<class>.csv).")
    parser.add_argument("--layout", default=None, choices=LAYOUT_NAMES, help="Dataset layout; default: detected from the folder.")
    parser.add_argument("--defect_type", action="append", default=None, help="Defect type(s); default: all.")
    parser.add_argument("--split_strategy", default="ordered", choices=("ordered", "random"), help="Few-shot split rule.")
    parser.add_argument("--train_fraction", type=float, default=1 / 3, help="Fraction of each defect type that trains.")
    parser.add_argument("--train_count", type=int, default=None, help="Exact number of training images per defect type.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random split.")
    args = parser.parse_args(argv)
    check_minimums(parser, args, {"train_count": 1})
    return args


def main(args: argparse.Namespace) -> dict:
    ds = load_mvtec_defects(args.data_dir, args.object_class, args.defect_type, args.layout)
    print(ds)
    split = few_shot_split(ds, args.split_strategy, args.train_fraction, args.train_count, args.seed)
    print(json.dumps(split, indent=2))
    return split


if __name__ == "__main__":
    run_main(main, parse_args)
