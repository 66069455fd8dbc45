"""Finding the training runs a `--lora` value names, for every tool that takes one."""

from __future__ import annotations

from pathlib import Path

from defectfill.errors import RunFileError
from defectfill.runs.files import LORA_FILENAME


def find_runs(location: str) -> list[str]:
    """The run(s) `location` names: a run folder (holding the LoRA weights), a folder of run folders (what
    `train_defectfill.py --defect_type all` writes: every sub-folder holding LoRA weights, sorted), or a Hub repo
    id (returned as given; `read_run` says when it is not one)."""
    location = (location or "").strip()
    if not location:
        raise RunFileError("no run given: a train_defectfill.py output folder, a folder of runs, or a Hub repo id")
    path = Path(location)
    if not path.exists():
        return [location]
    if not path.is_dir():
        raise RunFileError(f"--lora {location} is a file; give a run folder (holding {LORA_FILENAME}) or a folder of them")
    if (path / LORA_FILENAME).is_file():
        return [str(path)]
    found = sorted(str(p) for p in path.iterdir() if p.is_dir() and (p / LORA_FILENAME).is_file())
    if not found:
        raise RunFileError(f"--lora {location} holds no training run: no {LORA_FILENAME} in it or in its subfolders "
                           "(expected the output folder of train_defectfill.py, e.g. with --defect_type all)")
    return found
