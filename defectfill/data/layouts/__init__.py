"""The dataset layouts, and the one place that tells them apart.

Each module reads one folder convention into the same table of `Sample`s (image, mask, defect type, split);
`resolve_layout` detects which one a folder holds (``--data_dir`` and ``--object_class``), or checks the one
forced by ``--layout``; `read_table` reads it. Detection tries the layouts in `LAYOUTS` order, the most specific
folder names first; the first that matches is used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from defectfill.data.layouts import btad, folder, kolektorsdd2, mvtec_ad2, mvtec_loco, realiad, table, visa
from defectfill.data.layouts.base import DEFECT, Layout, Sample
from defectfill.data.layouts.mvtec_ad import DEFECTFILL2, MVTEC
from defectfill.errors import DatasetError

LAYOUTS = (mvtec_loco.LAYOUT, mvtec_ad2.LAYOUT, btad.LAYOUT, visa.LAYOUT, realiad.LAYOUT, MVTEC, DEFECTFILL2, folder.LAYOUT,
           table.LAYOUT, kolektorsdd2.LAYOUT)
LAYOUT_NAMES = tuple(layout.name for layout in LAYOUTS)

__all__ = ["DEFECT", "LAYOUTS", "LAYOUT_NAMES", "Layout", "Sample", "Table", "get_layout", "list_classes", "read_table",
           "resolve_layout"]


@dataclass(frozen=True)
class Table:
    """A product's images as its layout lists them: `root` is ``--data_dir`` (image names are relative to it)."""

    layout: str
    root: Path
    object_class: str
    samples: tuple[Sample, ...]

    def defects(self, defect_types=None) -> list[Sample]:
        return [s for s in self.samples if not s.is_good and (defect_types is None or s.defect_type in defect_types)]

    def goods(self, splits=("train", "test")) -> list[Sample]:
        """The good images of `splits`, split by split in the order given (each in path order)."""
        return [s for split in splits for s in self.samples if s.is_good and s.split == split]

    def defect_types(self) -> list[str]:
        return sorted({s.defect_type for s in self.defects()})

    def name(self, path: Path) -> str:
        """A file's name in records: its path relative to ``--data_dir`` (absolute when it lies outside)."""
        return Path(os.path.relpath(path, self.root)).as_posix() if _inside(path, self.root) else Path(path).as_posix()


def _inside(path: Path, root: Path) -> bool:
    try:
        Path(os.path.abspath(path)).relative_to(os.path.abspath(root))
        return True
    except ValueError:
        return False


def get_layout(name: str) -> Layout:
    for layout in LAYOUTS:
        if layout.name == name:
            return layout
    raise DatasetError(f"--layout {name!r} is not a dataset layout; layouts: {', '.join(LAYOUT_NAMES)}")


def _expected(layout: Layout, object_class: str) -> str:
    return f"{layout.name}: {layout.expects.replace('<class>', object_class)}"


def list_classes(data_dir: str | os.PathLike) -> list[str]:
    """The products a data folder holds: its subfolders in a layout with class folders, and its ``<class>.csv``
    tables. (A KolektorSDD2 folder has none: its product is only a name.)"""
    root = Path(data_dir)
    if not root.is_dir():
        return []
    found = {p.name for p in root.iterdir() if p.is_dir() and any(lay.class_folder and lay.matches(root, p.name) for lay in LAYOUTS)}
    found |= {p.stem for p in root.glob("*.csv") if p.is_file()}
    return sorted(found)


def resolve_layout(data_dir: str | os.PathLike, object_class: str, layout: str | None = None) -> Layout:
    """The layout of ``<data_dir>/<object_class>``: `layout` when given (an error when the folder does not hold
    it), else the first of `LAYOUTS` that matches (an error naming every layout tried and what it expected)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DatasetError(f"--data_dir {root} does not exist or is not a folder")
    if layout is not None:
        chosen = get_layout(layout)
        if not chosen.matches(root, object_class):
            raise DatasetError(f"--layout {layout}: {root} does not hold {object_class!r} in that layout "
                               f"(expected {_expected(chosen, object_class)})")
        return chosen
    for candidate in LAYOUTS:
        if candidate.matches(root, object_class):
            return candidate
    tried = "; ".join(_expected(candidate, object_class) for candidate in LAYOUTS)
    raise DatasetError(f"category {object_class!r} not found under {root}: no dataset layout matches "
                       f"(layouts tried: {tried}); categories found: {', '.join(list_classes(root)) or 'none'}")


def read_table(data_dir: str | os.PathLike, object_class: str, layout: str | None = None) -> Table:
    """Every image of a product as its layout lists it, sorted by defect type (good images first) and path."""
    chosen = resolve_layout(data_dir, object_class, layout)
    root = Path(data_dir)
    samples = sorted(chosen.read(root, object_class), key=lambda s: (s.defect_type or "", str(s.image)))
    return Table(chosen.name, root, object_class, tuple(samples))
