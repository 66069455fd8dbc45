"""scripts/tiny/docs.py: measured blocks are replaced one at a time, markers and the rest of the file kept; every block a
script writes exists where it writes it."""

from __future__ import annotations

import pytest

from defectfill.errors import DefectFillError
from scripts.tiny.docs import block_names, read_block, write_block
from tests.conftest import REPO_ROOT, TINY_MODEL

PAGE = """# A page

Prose that names <!-- measured:example --> without starting a block.

<!-- measured:first -->
old figures
<!-- /measured -->

between

<!-- measured:second -->
two
lines
<!-- /measured -->
"""


def test_a_block_is_replaced_and_nothing_else(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(PAGE)
    assert block_names(page) == ["first", "second"]
    assert read_block(page, "second") == "two\nlines"
    write_block(page, "first", "new figures\n\nin two paragraphs")
    text = page.read_text()
    assert read_block(page, "first") == "new figures\n\nin two paragraphs" and read_block(page, "second") == "two\nlines"
    assert text.replace("new figures\n\nin two paragraphs", "old figures") == PAGE


def test_a_missing_block_or_end_marker_is_named(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(PAGE)
    with pytest.raises(DefectFillError, match=r"page\.md has no <!-- measured:third --> block"):
        write_block(page, "third", "x")
    with pytest.raises(DefectFillError, match="has no <!-- measured:example --> block"):
        read_block(page, "example")  # named in prose, not a block
    page.write_text("<!-- measured:open -->\nno end\n")
    with pytest.raises(DefectFillError, match="the <!-- measured:open --> block has no <!-- /measured -->"):
        read_block(page, "open")


@pytest.mark.parametrize("doc, name", [
    (REPO_ROOT / "README.md", "tiny-demo"),
    (REPO_ROOT / "docs" / "builder.md", "build-demo"),
    (REPO_ROOT / "docs" / "demo.md", "generalisation-summary"),
    (REPO_ROOT / "docs" / "demo.md", "downstream-demo-time"),
    (REPO_ROOT / "docs" / "downstream.md", "downstream-demo"),
    (REPO_ROOT / "docs" / "fast_synthesis.md", "solver-steps"),
    (TINY_MODEL / "README.md", "tiny-model"),
    (TINY_MODEL / "README.md", "generalisation"),
])
def test_the_blocks_the_scripts_write_exist(doc, name):
    assert read_block(doc, name).strip()
