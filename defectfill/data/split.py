"""The paper's few-shot split, per defect type: which real defect images train the generator and which are
held out (their masks drive generation, their images are the real references of evaluation and the test set
of the downstream check). A split is a plain JSON dict, saved next to every run (`few_shot_split.json`) and
in every synthesis folder's `synthesis.json`, so no tool ever makes a new one."""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from typing import Sequence

from defectfill.errors import DatasetError
from defectfill.fileio import write_json_atomic


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
    references for evaluation). The split records the product (``object_class``) and the dataset layout its
    image names are in (``layout``: None for a `load_dataset` dataset), so every tool reads them back alike."""
    if strategy not in ("ordered", "random"):
        raise DatasetError(f"--split_strategy must be 'ordered' or 'random', got {strategy!r}")
    by_defect: dict[str, list[str]] = {}
    for defect, path in zip(dataset["defect_type"], dataset["image_path"]):
        by_defect.setdefault(defect, []).append(path)
    split = {"strategy": strategy, "fraction": fraction, "count": count, "seed": seed,
             "object_class": _single(dataset, "object_class"), "layout": _single(dataset, "layout"), "defect_types": {}}
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


def _single(dataset, column: str) -> str | None:
    """The one value of `column` in `dataset` (None when the column is absent, empty or holds several)."""
    if column not in dataset.column_names:
        return None
    values = set(dataset[column])
    return values.pop() if len(values) == 1 else None


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


def merge_splits(splits: Sequence[tuple[str, dict]]) -> dict:
    """One split from several saved ones (each run saves the entry of its own defect type). `splits` is a
    list of (where it came from, split). The same defect type in two with different lists is an error."""
    merged: dict[str, dict] = {}
    origin: dict[str, str] = {}
    layouts = {split.get("layout") for _, split in splits} - {None}
    if len(layouts) > 1:
        raise DatasetError(f"the splits come from folders of different layouts ({', '.join(sorted(layouts))}); "
                           "every set compared must come from the same few-shot split")
    for where, split in splits:
        for defect, entry in split["defect_types"].items():
            entry = {"train": sorted(entry["train"]), "heldout": sorted(entry["heldout"])}
            if defect in merged and merged[defect] != entry:
                raise DatasetError(f"the splits in {origin[defect]} and {where} differ for defect type {defect!r}; "
                                      "every set compared must come from the same few-shot split")
            merged[defect], origin[defect] = entry, where
    classes = {split.get("object_class") for _, split in splits} - {None}
    return {"object_class": classes.pop() if len(classes) == 1 else None, "layout": layouts.pop() if layouts else None,
            "defect_types": dict(sorted(merged.items())), "sources": sorted(set(origin.values()))}
