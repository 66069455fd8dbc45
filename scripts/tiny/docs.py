"""Measured figures in the documentation, written by the scripts that measure them.

A figure quoted in a README or a doc page lives between markers that name what wrote it:

    <!-- measured:tiny-demo -->
    ...written by `python scripts/measure_tiny_model.py --update_readme`...
    <!-- /measured -->

and the script that measures it replaces the block (`write_block`), so one change of a config is one script
run and one commit. Tests read blocks back (`read_block`) rather than repeating the figures.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from defectfill.errors import DefectFillError
from defectfill.fileio import write_text_atomic

END = "<!-- /measured -->"


def start_marker(name: str) -> str:
    return f"<!-- measured:{name} -->"


def _span(text: str, name: str, path) -> tuple[int, int]:
    """(start, end) of the block's content in `text`: the lines between its start marker's line and its end
    marker's (each on a line of its own, so prose can name a marker without starting a block)."""
    start = re.search(rf"^{re.escape(start_marker(name))}$", text, re.M)
    if start is None:
        raise DefectFillError(f"{path} has no {start_marker(name)} block")
    end = re.compile(rf"^{re.escape(END)}$", re.M).search(text, start.end())
    if end is None:
        raise DefectFillError(f"{path}: the {start_marker(name)} block has no {END}")
    return start.end() + 1, end.start()


def read_block(path: str | os.PathLike, name: str) -> str:
    """The content of a measured block (without its markers)."""
    text = Path(path).read_text()
    start, end = _span(text, name, path)
    return text[start:end].strip("\n")


def write_block(path: str | os.PathLike, name: str, markdown: str) -> Path:
    """Replace a measured block's content with `markdown` (atomically); the markers and the rest stay."""
    text = Path(path).read_text()
    start, end = _span(text, name, path)
    return write_text_atomic(path, text[:start] + markdown.strip("\n") + "\n" + text[end:])


def block_names(path: str | os.PathLike) -> list[str]:
    """The names of every measured block of a file, in order."""
    return re.findall(r"^<!-- measured:([\w.-]+) -->$", Path(path).read_text(), re.M)
