"""A writer process of synthesis folders, for the test that two of them fill one folder at once
(tests/test_run_files.py). Imports only the folder module, so a spawned process starts in a fraction of a second."""

from __future__ import annotations

import numpy as np
from PIL import Image

from defectfill.runs.folder import SynthesisFolder


def fill(numbered: str, appended: str, writer: int, count: int, start) -> None:
    """`count` outputs into `numbered` at numbers of this writer's own (2 i + writer, as the builder's processes
    share the items: `save_result`, then `add_rows` merges the row under the lock), and `count` into `appended` at
    the next free number (`append`, which takes it under the lock); every row names its writer and item. `start`
    (an Event) lets the writers begin together."""
    image = Image.new("RGB", (8, 8), (writer * 200, 0, 0))
    mask = np.zeros((8, 8), dtype=bool)
    start.wait()
    for item in range(count):
        row = {"writer": writer, "item": item}
        SynthesisFolder(appended).append(image, mask, row)
        folder = SynthesisFolder(numbered)
        folder.add_rows([folder.save_result(2 * item + writer, image, mask, row)])
