"""The synthetic training sets a downstream comparison takes (`--synthetic NAME=DIR[,DIR...]`: synthesis
folders of infer_defectfill.py or the builder), what they agree on (data folder, class, the saved few-shot
split, merged over every run), their images, and how many of them were made from the test set (held-out masks,
masks augmented from them, `test/good` images)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from defectfill.data.mvtec import GOOD, list_good_images, list_split_masks, split_layout
from defectfill.data.split import load_split, merge_splits
from defectfill.data.synthetic import load_synthetic
from defectfill.downstream.data import ImageSet, Part, concat_sets, dataset_to_set, mask_center, square_mask
from defectfill.errors import DownstreamError
from defectfill.images import open_checked
from defectfill.masks import MaskSource
from defectfill.runs.files import METADATA_FILENAME, SPLIT_FILENAME, SYNTHESIS_FILENAME
from defectfill.runs.folder import read_metadata
from defectfill.runs.records import SynthesisRecord

BASELINES = ("untrained", "real_only", "copy_paste")
REAL_PLUS = "real+"  # prefix of a set that adds the real training defects to a generated one


@dataclass
class SyntheticSource:
    name: str
    folders: list[Path]
    records: list[SynthesisRecord | None]
    # each folder's synthesis.json as written (the builder adds every run's split under "runs"); {} without one
    raw_records: list[dict] = field(default_factory=list)


def parse_synthetic_entry(entry: str) -> tuple[str, list[Path]]:
    """``NAME=DIR[,DIR...]`` or ``DIR[,DIR...]`` -> (name, folders); the name defaults to the first folder's."""
    name, _, folders = entry.rpartition("=") if "=" in entry else ("", "", entry)
    paths = [Path(f) for f in folders.split(",") if f]
    if not paths:
        raise DownstreamError(f"--synthetic {entry!r} names no folder")
    return name or paths[0].name, paths


def read_raw_record(folder: Path) -> dict:
    path = folder / SYNTHESIS_FILENAME
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DownstreamError(f"{path} is not JSON ({error})") from error


def read_synthetic_sources(entries: list[str] | None) -> list[SyntheticSource]:
    sources = []
    for entry in entries or []:
        name, folders = parse_synthetic_entry(entry)
        for folder in folders:
            if not (folder / METADATA_FILENAME).is_file():
                raise DownstreamError(f"--synthetic {folder} has no {METADATA_FILENAME}: expected an output folder of "
                                      "infer_defectfill.py or build_dataset_defectfill.py")
        records = [SynthesisRecord.read(folder) for folder in folders]
        if name in BASELINES or name.startswith(REAL_PLUS) or name in {s.name for s in sources}:
            raise DownstreamError(f"--synthetic name {name!r} is taken (a baseline's, another set's, or {REAL_PLUS}...); "
                                  "give NAME=DIR")
        sources.append(SyntheticSource(name, folders, records, [read_raw_record(folder) for folder in folders]))
    return sources


def agreed_value(flag: str, given, sources: list[SyntheticSource], field_name: str):
    """The flag's value, else the one value the synthesis records agree on."""
    if given is not None:
        return given
    found = {getattr(r, field_name) for s in sources for r in s.records if r is not None and getattr(r, field_name)}
    if len(found) > 1:
        raise DownstreamError(f"the synthesis folders disagree on {field_name} ({', '.join(map(str, sorted(found)))}): give {flag}")
    if not found:
        raise DownstreamError(f"give {flag} (no synthesis.json names it)")
    return found.pop()


def recorded_splits(source: SyntheticSource) -> list[tuple[str, dict]]:
    """Every split a source's synthesis.json files hold: the record's, and each run's of a build (older builds
    recorded only the first run's as the record's split)."""
    splits = []
    for folder, record, raw in zip(source.folders, source.records, source.raw_records or [{}] * len(source.folders)):
        if record is not None and record.split:
            splits.append((str(folder), record.split))
        for defect_type, run in (raw.get("runs") or {}).items():
            if isinstance(run, dict) and run.get("split"):
                splits.append((f"{folder} (run of {defect_type})", run["split"]))
    return splits


def collect_split(split_files: list[str] | None, sources: list[SyntheticSource]) -> dict:
    """The merged saved split: --split_file files (or run folders) and every split the synthesis records hold."""
    splits = []
    for given in split_files or []:
        path = Path(given)
        path = path / SPLIT_FILENAME if path.is_dir() else path
        splits.append((str(path), load_split(path)))
    for source in sources:
        splits += recorded_splits(source)
    if not splits:
        raise DownstreamError("no few-shot split: give --split_file (the run's few_shot_split.json or the run folder); "
                              "the protocol tests on the held-out part of the split the generator was trained with")
    return merge_splits(splits)


def row_parts(row: dict, folder: Path, resolution: int) -> list[Part]:
    """A builder row's defects, (type, mask centre at `resolution`) each, from its per-defect masks; [] for a row
    without them (infer_defectfill.py's: one defect, its mask is the row's)."""
    names, types = row.get("defect_mask_file_names") or [], row.get("defect_types") or []
    parts = []
    for name, defect_type in zip(names, types):
        with open_checked(folder / name, "defect mask") as mask_image:
            mask = square_mask(mask_image, resolution)
        if mask.any():
            parts.append((defect_type, mask_center(mask)))
    return parts


def load_synthetic_set(source: SyntheticSource, object_class: str, resolution: int) -> ImageSet:
    """The images of a source's folders of `object_class`, with the union mask of each (a builder's `combined`
    image: every defect's) and its defects' types and positions (the copy-paste baseline copies them)."""
    sets = []
    for folder in source.folders:
        rows = load_synthetic(folder)
        # Rows without an object class (another generator's folder) count as this class.
        rows = rows.filter(lambda value: value in ("", object_class), input_columns="object_class")
        if len(rows) == 0:
            raise DownstreamError(f"--synthetic {folder} has no image of object class {object_class!r}")
        part = dataset_to_set(rows, resolution)
        metadata = read_metadata(folder, require_files=False)
        part.parts = [row_parts(metadata[name], folder, resolution) for name in part.names]
        part.names = [f"{folder.name}/{n}" for n in part.names]
        sets.append(part)
    return concat_sets(sets)


def mask_key(path: str | Path) -> tuple[str, ...]:
    """A mask file (or a folder of masks, or an image) by its last four path parts (class/ground_truth/defect/name):
    the same real mask wherever the data folder was when the synthetic set was made."""
    return Path(path).parts[-4:]


def heldout_mask_keys(data_dir: str | Path, split: dict, layout: str | None = None) -> set[tuple[str, ...]]:
    """The masks of the split's held-out images (the test set's defects): files, or folders of several (MVTec
    LOCO's ``ground_truth/<kind>/NNN/``), whose key is the folder's."""
    return {mask_key(p) for defect_type in split["defect_types"]
            for p in list_split_masks(data_dir, split, defect_type, MaskSource.HELDOUT.value, layout)}


def good_keys_of_test_set(data_dir: str | Path, object_class: str | None, layout: str | None = None) -> set[tuple[str, ...]]:
    """The good images of the dataset's test set (any layout), by the same key as the masks."""
    if not object_class:
        return set()
    return {mask_key(p) for p in list_good_images(data_dir, object_class, ("test",), layout)}


def count_test_set_reuse(source: SyntheticSource, split: dict, data_dir: str | Path, object_class: str | None = None,
                         layout: str | None = None) -> dict[str, int]:
    """How many rows of a synthetic set were made from the test set: ``masks``, with a defect painted in a
    held-out test mask of the split, or in a mask augmented from one (the localizer then trains on the test
    defects' shapes and positions): a row's ``source_mask`` (infer_defectfill.py) or any of its
    ``source_masks`` (the builder's, for augmented masks the real mask each came from), or a row that records
    ``mask_from: heldout``; ``images``, painted on a good image of the test set (``test/good``, or the layout's:
    ``--good_split test|all``: the test's defect-free images were seen in training). ``rows``: all rows. The layout
    is `layout`, else the split's; the product `object_class`, else the split's."""
    layout = split_layout(split, layout)
    heldout = heldout_mask_keys(data_dir, split, layout)
    test_goods = good_keys_of_test_set(data_dir, object_class or split.get("object_class"), layout)
    counts = {"masks": 0, "images": 0, "rows": 0}
    for folder in source.folders:
        for row in read_metadata(folder, require_files=False).values():
            counts["rows"] += 1
            masks = [m for m in [row.get("source_mask"), *(row.get("source_masks") or [])] if m]
            if row.get("mask_from") == MaskSource.HELDOUT or any(mask_key(m) in heldout for m in masks):
                counts["masks"] += 1
            image = row.get("source_image")
            if image and (Path(image).parts[-3:-1] == ("test", GOOD) or mask_key(image) in test_goods):
                counts["images"] += 1
    return counts


def leak_error(name: str, reuse: dict[str, int]) -> str | None:
    """What stops a leaky set (None for a clean one): the counts and how to make it clean."""
    problems = []
    if reuse["masks"]:
        problems.append(f"{reuse['masks']} of {reuse['rows']} images have a defect painted in a held-out test mask "
                        "or in a mask augmented from one (the test defects' shapes and positions)")
    if reuse["images"]:
        problems.append(f"{reuse['images']} of {reuse['rows']} images were painted on test/good images")
    if not problems:
        return None
    return (f"--synthetic {name}: {'; '.join(problems)}: a detector trained on it is scored on what it has seen. "
            "Make the set from the training third of the split (build_dataset_defectfill.py --mask_from train, its "
            "default; infer_defectfill.py --mask_from train) and train/good images (--good_split train), or give "
            "--allow_test_leak to run anyway (the table's title then says leaky).")
