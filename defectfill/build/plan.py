"""What a build makes, decided before anything is painted: the runs (one per defect type), the items (one
output image each, with the defect types painted into it, drawn from the item's own seed), and how the items
are shared between processes so that any number of them writes the same images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from defectfill.bases import canonical_base
from defectfill.errors import BuildError
from defectfill.runs.discovery import find_runs
from defectfill.runs.files import RUN_FILENAME
from defectfill.runs.records import read_run
from defectfill.runs.settings import RunOverrides, RunPlan, plan_run

COMBINED = "combined"  # MVTec AD's name for images with several defect types
MAX_DEFECTS_PER_IMAGE = 8  # a defect's job index is item * 8 + slot (its own candidate seeds)


def parse_defects_per_image(text: str) -> dict[int, float]:
    """'2' -> {2: 1.0}; '1:0.8,2:0.2' -> {1: 0.8, 2: 0.2} (normalised)."""
    try:
        if ":" not in text:
            distribution = {int(text): 1.0}
        else:
            distribution = {int(k): float(v) for k, v in (part.split(":") for part in text.split(","))}
    except ValueError:
        raise BuildError(f"--defects_per_image {text!r}: expected K or K:p,K:p (e.g. 1:0.8,2:0.2)") from None
    if not distribution or any(k < 1 or k > MAX_DEFECTS_PER_IMAGE for k in distribution) or any(v < 0 for v in distribution.values()) \
            or sum(distribution.values()) <= 0:
        raise BuildError(f"--defects_per_image {text!r}: counts 1..{MAX_DEFECTS_PER_IMAGE} with non-negative weights")
    total = sum(distribution.values())
    return {k: v / total for k, v in sorted(distribution.items())}



def discover_runs(loras: Sequence[str], defect_types: Sequence[str] | None = None,
                  overrides: RunOverrides | None = None, **sampling) -> list[RunPlan]:
    """Every run of the --lora values (`find_runs`), one per defect type, checked to share one base model and
    one class, each resolved for synthesis with the flags' `overrides` and `sampling` (`plan_run`)."""
    runs: list[RunPlan] = []
    for value in loras:
        for folder in find_runs(value):
            record = read_run(folder)
            if record is None:
                raise BuildError(f"--lora {folder} has no {RUN_FILENAME}: the builder needs the run's defect type, class and split")
            runs.append(plan_run(folder, record, overrides, composite=True, **sampling))
    seen: dict[str, str] = {}
    for run in runs:
        if run.defect_type in seen:
            raise BuildError(f"two runs for defect type {run.defect_type!r}: {seen[run.defect_type]} and {run.lora}; give one")
        seen[run.defect_type] = run.lora
    for what in ("base_model", "object_class"):  # bases compared by the model they load (a withdrawn id is its mirror)
        values = {canonical_base(r.record.base_model) if what == "base_model" else getattr(r.record, what) for r in runs}
        if len(values) > 1:
            listing = "; ".join(f"{r.lora}: {getattr(r.record, what)}" for r in runs)
            raise BuildError(f"the runs mix {what}s ({listing}); one build takes the runs of one {what.replace('_', ' ')}")
    if defect_types:
        missing = sorted(set(defect_types) - set(seen))
        if missing:
            raise BuildError(f"--defect_types {', '.join(missing)}: no run for it; the runs have {', '.join(sorted(seen))}")
        runs = [r for r in runs if r.defect_type in set(defect_types)]
    return sorted(runs, key=lambda r: r.defect_type)


def defect_index_table(runs: Sequence[RunPlan]) -> dict[str, int]:
    """Semantic mask values: 0 is defect-free, the defect types 1..N in name order."""
    return {run.defect_type: i + 1 for i, run in enumerate(runs)}


@dataclass(frozen=True)
class Item:
    index: int
    image_path: Path
    defect_types: tuple[str, ...]


def item_rng(seed: int, index: int, stream: int) -> np.random.Generator:
    """The random draws of one item (stream 1: its defect types, 2: its masks): the same on any process."""
    return np.random.default_rng([seed, index, stream])


def make_items(defect_types: Sequence[str], goods: Sequence[Path], num_images: int, per_image: dict[int, float],
               seed: int) -> list[Item]:
    """`num_images` items per defect type, that type painted first; item k paints on good image k (cycled)
    and draws how many defects it gets, and which other types, from its own seed."""
    items = []
    counts, weights = list(per_image), list(per_image.values())
    for t, primary in enumerate(defect_types):
        for i in range(num_images):
            index = t * num_images + i
            rng = item_rng(seed, index, 1)
            k = counts[int(rng.choice(len(counts), p=weights))]
            others = [d for d in defect_types if d != primary] or [primary]
            order = [others[j] for j in rng.permutation(len(others))]
            extra = [order[j % len(order)] for j in range(k - 1)]
            items.append(Item(index, Path(goods[index % len(goods)]), (primary, *extra)))
    return items


def process_share(items: Sequence[Item], batch_size: int, done: set[int], process_index: int,
                  num_processes: int) -> list[list[Item]]:
    """This process's batches of the items not yet done. Batches are cut from the whole item list, then dealt
    to the processes: a batch is the same on any number of processes, so every image is too."""
    batches = [list(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]
    mine = [[item for item in batch if item.index not in done] for batch in batches[process_index::num_processes]]
    return [batch for batch in mine if batch]
