"""A synthesis folder: the imagefolder dataset that `infer_defectfill.py`, the dataset builder and the app
write, and the one protocol all three follow to fill it.

    images/00012.png, masks/00012_mask.png    output number 12 (the image is written last: it marks the output done)
    metadata.jsonl                            one row per output (`file_name`, `mask_file_name`, its provenance)
    synthesis.json                            the settings (`SynthesisRecord`)
    build.json                                the fingerprint of what made the outputs, to resume on the same terms
    preview.png                               clean | mask | generated, one row per output
    skipped.json                              items that produced no output (the builder), so a resume skips them too

The protocol:
- `claim(fingerprint)` before the first image: a folder made with the same fingerprint is resumed (the files of
  an output that was interrupted before its row was written are removed), one made with another fingerprint is
  refused (or emptied, with `overwrite`), and the fingerprint is recorded;
- rows are merged under a file lock (`add_rows`), so several processes can fill one folder;
- `append` adds one output at the next free number (the app's "add to dataset", which claims nothing);
- `writing()` holds the folder for one run, from before its claim to its last file: a second run started on the
  folder meanwhile is told it is busy; a run that fails before its first output leaves the folder as it found it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

from defectfill.errors import FolderBusyError, RunFileError, SynthesisError
from defectfill.fileio import save_image_atomic, write_json_atomic, write_text_atomic
from defectfill.runs.files import (
    FINGERPRINT_FILENAME,
    LOCK_FILENAME,
    METADATA_FILENAME,
    PREVIEW_FILENAME,
    SKIPPED_FILENAME,
    SUMMARY_FILENAME,
    SYNTHESIS_FILENAME,
    WRITER_LOCK_FILENAME,
)
from defectfill.runs.records import FORMAT_VERSION_KEY, found_format

logger = logging.getLogger("defectfill")

# Format 2: `format_version` (1: `version`).
FINGERPRINT_VERSION = 2
# Folders whose files belong to one output each (named by its number); removed with an unfinished output.
OUTPUT_FOLDERS = ("images", "masks", "candidates", "defect_masks", "semantic", "sources")


def output_names(index: int) -> tuple[str, str]:
    """(image, mask) file names of output number `index`, relative to the folder."""
    return f"images/{index:05d}.png", f"masks/{index:05d}_mask.png"


def item_of_file(name: str) -> int | None:
    """The output number of a file of the folder (`images/00012.png`, `.00012_mask.png.tmp`: its first 5 digits),
    None for other files."""
    head = Path(name).name.lstrip(".")[:5]
    return int(head) if head.isdigit() else None


def read_metadata(folder: str | os.PathLike, require_files: bool = True) -> dict[str, dict]:
    """Rows keyed by image file name; with `require_files`, only rows whose image and mask exist (resume)."""
    folder = Path(folder)
    path = folder / METADATA_FILENAME
    if not path.is_file():
        return {}
    rows = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise RunFileError(f"{path}, line {number}: not JSON ({error})") from error
        if "file_name" not in row or "mask_file_name" not in row:
            raise RunFileError(f"{path}, line {number}: a row needs 'file_name' and 'mask_file_name'")
        if not require_files or ((folder / row["file_name"]).is_file() and (folder / row["mask_file_name"]).is_file()):
            rows[row["file_name"]] = row
    return rows


def fingerprint_differences(recorded: dict, current: dict) -> list[str]:
    """"name: old -> new" for every entry that differs (compared as JSON, so tuples equal lists)."""
    recorded, current = json.loads(json.dumps(recorded)), json.loads(json.dumps(current))
    return [f"{name}: {recorded.get(name)!r} -> {current.get(name)!r}" for name in sorted(set(recorded) | set(current))
            if recorded.get(name) != current.get(name)]


class SynthesisFolder:
    """One synthesis folder on disk; every writer goes through these methods."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    # -- reading ---------------------------------------------------------------------------------------

    def rows(self, require_files: bool = True) -> dict[str, dict]:
        return read_metadata(self.path, require_files)

    def skipped(self) -> dict[str, dict]:
        path = self.path / SKIPPED_FILENAME
        return json.loads(path.read_text()) if path.is_file() else {}

    def done(self) -> set[int]:
        """Output numbers finished: a row with both files, or recorded as skipped."""
        return {item_of_file(name) for name in self.rows()} | {int(key) for key in self.skipped()}

    def has_outputs(self) -> bool:
        return bool(self.rows(require_files=False)) or any((self.path / "images").glob("*.png"))

    def recorded_fingerprint(self) -> tuple[object, dict] | None:
        """(format version, fingerprint) the folder was claimed with; None when it records none."""
        path = self.path / FINGERPRINT_FILENAME
        if not path.is_file():
            return None
        try:
            payload = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise SynthesisError(f"{path} is not JSON ({error}); use another --output_dir") from error
        return found_format(payload), payload.get("fingerprint", {})

    # -- the resume protocol ---------------------------------------------------------------------------

    def check(self, fingerprint: dict, overwrite: bool | None = None) -> list[str]:
        """Read only (call it before loading anything): what differs between the folder's outputs and
        `fingerprint`; an error unless the folder is new, empty, made with the same fingerprint, or `overwrite`
        (None: the writer has no --overwrite)."""
        if self.path.exists() and not self.path.is_dir():
            raise SynthesisError(f"--output_dir {self.path} exists and is not a folder")
        if not self.path.exists():
            return []
        recorded = self.recorded_fingerprint()
        if recorded is None:
            changes = ["(no record of what made its outputs)"] if self.has_outputs() else []
        elif recorded[0] != FINGERPRINT_VERSION:
            changes = [f"(its {FINGERPRINT_FILENAME} is format {recorded[0]}, from another defectfill; this one writes format "
                       f"{FINGERPRINT_VERSION})"]
        else:
            changes = fingerprint_differences(recorded[1], fingerprint)
        if changes and not overwrite:
            remedy = "the same flags to resume it" if overwrite is None else "--overwrite to delete them"
            raise SynthesisError(f"--output_dir {self.path} holds outputs made with other settings ({'; '.join(changes)}); "
                                 f"use a new --output_dir, or {remedy}")
        return changes

    def claim(self, fingerprint: dict, overwrite: bool | None = None) -> set[int]:
        """Make the folder this fingerprint's, under the lock: resume it (remove the files of unfinished outputs),
        refuse another's (or empty it with `overwrite`), and record the fingerprint. Returns the outputs done."""
        self.path.mkdir(parents=True, exist_ok=True)
        with self.lock():
            if self.check(fingerprint, overwrite):
                self.clear()
            done = self.done()
            removed = self.remove_orphans(done)
            if removed:
                logger.info("%s: removed %d files of unfinished outputs (the run was interrupted)", self.path, removed)
            write_json_atomic(self.path / FINGERPRINT_FILENAME, {FORMAT_VERSION_KEY: FINGERPRINT_VERSION, "fingerprint": fingerprint})
        return done

    def clear(self) -> None:
        """Delete every output and record (`--overwrite`)."""
        for name in OUTPUT_FOLDERS:
            shutil.rmtree(self.path / name, ignore_errors=True)
        for name in (METADATA_FILENAME, PREVIEW_FILENAME, SYNTHESIS_FILENAME, FINGERPRINT_FILENAME, SKIPPED_FILENAME,
                     SUMMARY_FILENAME):
            (self.path / name).unlink(missing_ok=True)

    def remove_orphans(self, done: set[int]) -> int:
        """Remove every file of an output not in `done` (killed between its files and its row) and every temporary
        file; returns how many were removed."""
        removed = 0
        for name in OUTPUT_FOLDERS:
            folder = self.path / name
            for path in folder.glob("*") if folder.is_dir() else []:
                if path.is_file() and (path.name.endswith(".tmp") or item_of_file(path.name) not in done):
                    path.unlink()
                    removed += 1
        for path in self.path.glob(".*.tmp"):
            path.unlink()
            removed += 1
        return removed

    # -- writing ---------------------------------------------------------------------------------------

    @contextmanager
    def lock(self) -> Iterator[None]:
        """An exclusive lock on the folder's records (a hidden lock file, `filelock.FileLock`: the operating system's
        file lock, on POSIX and Windows), so several processes that add rows merge them instead of overwriting each
        other's. A writer waits as long as another holds it."""
        from filelock import FileLock

        self.path.mkdir(parents=True, exist_ok=True)
        with FileLock(self.path / LOCK_FILENAME):
            yield

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the folder for one run (a second lock file, taken without waiting): a run that starts while another
        writes here is refused with `FolderBusyError` instead of doing the same work beside it. Several processes
        of one run share the hold of the process that took it. A run that fails before its first output (or
        skipped item) removes what it added (its fingerprint and synthesis.json, and the folder itself when it found
        it new or empty), so a re-run with other settings does not find the folder taken."""
        from filelock import FileLock, Timeout

        created = not self.path.exists() or not any(self.path.iterdir())  # new, or nothing in it to keep
        self.path.mkdir(parents=True, exist_ok=True)
        before = {name for name in (FINGERPRINT_FILENAME, SYNTHESIS_FILENAME) if (self.path / name).exists()}
        hold = FileLock(self.path / WRITER_LOCK_FILENAME)
        try:
            hold.acquire(timeout=0)
        except Timeout:
            raise FolderBusyError(f"--output_dir {self.path} is busy: another run is writing to it now (it holds "
                                  f"{self.path / WRITER_LOCK_FILENAME}); wait for that run to end, or use another "
                                  f"--output_dir") from None
        try:
            yield
        except BaseException:
            try:
                empty = not self.has_outputs() and not self.skipped()
            except Exception:  # unreadable records: keep everything, the run's own error is what to report
                empty = False
            if empty:
                for name in {FINGERPRINT_FILENAME, SYNTHESIS_FILENAME} - before:
                    (self.path / name).unlink(missing_ok=True)
            hold.release()
            if empty and created:
                self.remove_if_empty()
            raise
        hold.release()

    def remove_if_empty(self) -> None:
        """Remove the folder if it holds nothing but lock files and empty output folders."""
        for name in (LOCK_FILENAME, WRITER_LOCK_FILENAME):
            (self.path / name).unlink(missing_ok=True)
        for name in OUTPUT_FOLDERS:
            folder = self.path / name
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        if not any(self.path.iterdir()):
            self.path.rmdir()

    def write_rows(self, rows: dict[str, dict]) -> Path:
        return write_text_atomic(self.path / METADATA_FILENAME, "".join(json.dumps(rows[name]) + "\n" for name in sorted(rows)))

    def add_rows(self, new_rows: Iterable[dict]) -> dict[str, dict]:
        """Merge rows into metadata.jsonl under the lock (read, merge, atomic write); returns every row. Rows whose
        files another writer already removed are dropped, as `rows` does."""
        with self.lock():
            rows = self.rows()
            rows.update({row["file_name"]: row for row in new_rows})
            self.write_rows(rows)
            return rows

    def add_skipped(self, entries: dict[str, dict]) -> dict[str, dict]:
        """Merge items that produced no output into skipped.json under the lock."""
        with self.lock():
            skipped = self.skipped()
            skipped.update(entries)
            write_json_atomic(self.path / SKIPPED_FILENAME, skipped)
            return skipped

    def next_free_index(self) -> int:
        """The first output number after every image already in the folder (listed or not)."""
        taken = [int(p.stem) for p in (self.path / "images").glob("*.png") if p.stem.isdigit()]
        return max(taken, default=-1) + 1

    def save_result(self, index: int, image: Image.Image, mask, row: dict, candidates: list | None = None) -> dict:
        """Write one output's label mask (bool array or PIL image), its candidates when given, then its image
        (last: its presence marks the output done); returns its metadata row, `row` plus the file names."""
        image_name, mask_name = output_names(index)
        if isinstance(mask, np.ndarray):
            mask = Image.fromarray(mask.astype(np.uint8) * 255)
        save_image_atomic(mask, self.path / mask_name)
        for c, candidate in enumerate(candidates or []):
            save_image_atomic(candidate, self.path / "candidates" / f"{index:05d}_{c}.png")
        save_image_atomic(image, self.path / image_name)
        return {"file_name": image_name, "mask_file_name": mask_name, **row}

    def append(self, image: Image.Image, mask, row: dict, source: Image.Image | None = None,
               mask_is_source: bool = False) -> tuple[dict, dict[str, dict]]:
        """Add one output at the next free number, under the lock (several writers never take one number). With
        `source` (an image that has no file of its own, e.g. an upload), it is saved under sources/ and the row's
        `source_image` names it; with `mask_is_source` (a mask drawn by hand), the row's `source_mask` names the
        label mask itself. Returns (the new row, every row)."""
        with self.lock():
            index = self.next_free_index()
            row = dict(row)
            if source is not None:
                source_path = self.path / "sources" / f"{index:05d}.png"
                save_image_atomic(source, source_path)
                row["source_image"] = str(source_path)
            if mask_is_source:
                row["source_mask"] = str(self.path / output_names(index)[1])
            saved = self.save_result(index, image, mask, row)
            rows = self.rows()
            rows[saved["file_name"]] = saved
            self.write_rows(rows)
        return saved, rows

    def write_record(self, record, extra: dict | None = None) -> Path:
        """synthesis.json: a `SynthesisRecord`, with writer-specific fields added (the builder's index table)."""
        return write_json_atomic(self.path / SYNTHESIS_FILENAME, {**record.to_dict(), **(extra or {})})

    def save_preview(self, rows: dict[str, dict], max_rows: int = 8, tile: int = 192) -> Path | None:
        """preview.png, one row per output (the first `max_rows` of `rows`): clean source | mask | generated."""
        chosen = [rows[name] for name in sorted(rows)[:max_rows]]
        if not chosen:
            return None
        grid = Image.new("RGB", (3 * tile, tile * len(chosen)), (255, 255, 255))
        for row_index, row in enumerate(chosen):
            paths = (row["source_image"], self.path / row["mask_file_name"], self.path / row["file_name"])
            for column, path in enumerate(paths):
                with Image.open(path) as panel:
                    grid.paste(panel.convert("RGB").resize((tile, tile), Image.BICUBIC), (column * tile, row_index * tile))
        return save_image_atomic(grid, self.path / PREVIEW_FILENAME)
