"""Resumable checkpoints of a training run: ``checkpoint-N`` folders that appear whole or not at all, pruned
only after a new one exists, and the one to resume from.

A checkpoint is what `accelerate.save_state` writes (optimizer, scheduler, RNG states) with the LoRA in
diffusers format in place of the full model weights (`defectfill.training.setup.register_state_hooks`)."""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from defectfill.runs.files import CHECKPOINT_PREFIX, LORA_FILENAME

logger = logging.getLogger("defectfill")


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step}"


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step of a ``checkpoint-N`` folder name, None for any other name."""
    match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """``checkpoint-N`` folders of a run, oldest first."""
    found = [p for p in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def save_checkpoint(accelerator, output_dir: Path, step: int, limit: int | None) -> Path:
    """A resumable checkpoint that appears complete or not at all: written under a hidden temporary name
    and renamed to ``checkpoint-N`` once every process has written its part; older ones are pruned to
    `limit` only after the new one exists."""
    final = output_dir / checkpoint_name(step)
    partial = output_dir / f".{final.name}.partial"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)  # left by a run killed while saving
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        prune_checkpoints(output_dir, limit)
    accelerator.wait_for_everyone()
    return final


CHECKPOINT_FILES = (LORA_FILENAME, "optimizer.bin", "random_states_0.pkl")


def is_complete_checkpoint(path: Path) -> bool:
    return all((path / name).is_file() for name in CHECKPOINT_FILES)


def prune_checkpoints(output_dir: Path, limit: int | None) -> None:
    """Keep the newest `limit` complete checkpoints (called after a new one is saved)."""
    if limit is None:
        return
    complete = [p for p in list_checkpoints(output_dir) if is_complete_checkpoint(p)]
    for old in complete[: max(0, len(complete) - limit)]:
        logger.info("removing checkpoint %s (checkpoints_total_limit=%d)", old, limit)
        shutil.rmtree(old)


def resolve_resume_path(resume_from_checkpoint: str | None, output_dir: Path) -> Path | None:
    """The checkpoint to resume from (--resume_from_checkpoint): the one named, or with 'latest' the newest complete
    one in the run folder (incomplete ones, e.g. from a run killed while saving, are skipped and named in the log)."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint != "latest":
        return Path(resume_from_checkpoint)
    checkpoints = list_checkpoints(output_dir)
    for path in reversed(checkpoints):
        if is_complete_checkpoint(path):
            return path
        logger.warning("--resume_from_checkpoint latest: skipping %s, an incomplete checkpoint (no %s)", path,
                       ", ".join(name for name in CHECKPOINT_FILES if not (path / name).is_file()))
    logger.warning("--resume_from_checkpoint latest: no complete checkpoint in %s, starting a new run", output_dir)
    return None
