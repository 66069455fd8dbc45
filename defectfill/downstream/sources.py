"""The synthetic training sets a downstream comparison takes (`--synthetic NAME=DIR[,DIR...]`: synthesis
folders), what they agree on (data folder, class, the saved few-shot split), their images, and how many of
them were made from the test set (held-out masks, `test/good` images)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from defectfill.data.mvtec import GOOD
from defectfill.data.split import load_split, merge_splits
from defectfill.data.synthetic import load_synthetic
from defectfill.downstream.data import ImageSet, concat_sets, dataset_to_set
from defectfill.errors import DownstreamError
from defectfill.runs.files import METADATA_FILENAME, SPLIT_FILENAME
from defectfill.runs.folder import read_metadata
from defectfill.runs.records import SynthesisRecord

BASELINES = ("untrained", "real_only", "copy_paste")


@dataclass
class SyntheticSource:
    name: str
    folders: list[Path]
    records: list[SynthesisRecord | None]


def parse_synthetic_entry(entry: str) -> tuple[str, list[Path]]:
    """``NAME=DIR[,DIR...]`` or ``DIR[,DIR...]`` -> (name, folders); the name defaults to the first folder's."""
    name, _, folders = entry.rpartition("=") if "=" in entry else ("", "", entry)
    paths = [Path(f) for f in folders.split(",") if f]
    if not paths:
        raise DownstreamError(f"--synthetic {entry!r} names no folder")
    return name or paths[0].name, paths


def read_synthetic_sources(entries: list[str] | None) -> list[SyntheticSource]:
    sources = []
    for entry in entries or []:
        name, folders = parse_synthetic_entry(entry)
        for folder in folders:
            if not (folder / METADATA_FILENAME).is_file():
                raise DownstreamError(f"--synthetic {folder} has no {METADATA_FILENAME}: expected an output folder of infer_defectfill.py")
        records = [SynthesisRecord.read(folder) for folder in folders]
        if name in BASELINES or name in {s.name for s in sources}:
            raise DownstreamError(f"--synthetic name {name!r} is taken; give NAME=DIR")
        sources.append(SyntheticSource(name, folders, records))
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


def collect_split(split_files: list[str] | None, sources: list[SyntheticSource]) -> dict:
    """The merged saved split: --split_file files (or run folders) and the synthesis records' splits."""
    splits = []
    for given in split_files or []:
        path = Path(given)
        path = path / SPLIT_FILENAME if path.is_dir() else path
        splits.append((str(path), load_split(path)))
    for source in sources:
        for folder, record in zip(source.folders, source.records):
            if record is not None and record.split:
                splits.append((str(folder), record.split))
    if not splits:
        raise DownstreamError("no few-shot split: give --split_file (the run's few_shot_split.json or the run folder); "
                              "the protocol tests on the held-out part of the split the generator was trained with")
    return merge_splits(splits)


def load_synthetic_set(source: SyntheticSource, object_class: str, resolution: int) -> ImageSet:
    sets = []
    for folder in source.folders:
        rows = load_synthetic(folder)
        # Rows without an object class (another generator's folder) count as this class.
        rows = rows.filter(lambda value: value in ("", object_class), input_columns="object_class")
        if len(rows) == 0:
            raise DownstreamError(f"--synthetic {folder} has no image of object class {object_class!r}")
        part = dataset_to_set(rows, resolution)
        part.names = [f"{folder.name}/{n}" for n in part.names]
        sets.append(part)
    return concat_sets(sets)


def count_test_set_reuse(source: SyntheticSource, split: dict) -> dict[str, int]:
    """How many rows of a synthetic set were made from the test set: ``masks``, painted in a held-out test
    mask of the split (infer_defectfill.py's default: the localizer then trains on the test defects' shapes
    and positions); ``images``, painted on a ``test/good`` image (``--good_split test|all``: the test's
    defect-free images were seen in training). ``rows``: all rows."""
    heldout = {(Path(p).parent.name, Path(p).stem) for e in split["defect_types"].values() for p in e["heldout"]}
    counts = {"masks": 0, "images": 0, "rows": 0}
    for folder in source.folders:
        for row in read_metadata(folder, require_files=False).values():
            counts["rows"] += 1
            mask, image = row.get("source_mask"), row.get("source_image")
            if mask and (Path(mask).parent.name, Path(mask).stem.removesuffix("_mask")) in heldout:
                counts["masks"] += 1
            if image and Path(image).parts[-3:-1] == ("test", GOOD):
                counts["images"] += 1
    return counts
