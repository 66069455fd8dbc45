"""The typed records of a run and a synthesis folder: `RunRecord` (``defectfill_run.json`` next to the
LoRA: what synthesis needs to use the run) and `SynthesisRecord` (``synthesis.json``: the settings a
synthesis folder was made with), and `read_run`, which reads a run's record from a folder or a Hub repo.

Training writes these files; synthesis, evaluation and the downstream tools read them: each field is
defined here once. Records carry a `version`; files written before it existed (version 1) still load.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

from defectfill.errors import RunFileError
from defectfill.fileio import write_json_atomic
from defectfill.runs.files import LORA_FILENAME, RUN_FILENAME, SYNTHESIS_FILENAME

RUN_RECORD_VERSION = 2
SYNTHESIS_RECORD_VERSION = 2


# ----------------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------------


def _from_dict(cls, payload: dict, path: str | os.PathLike, required: Iterable[str]):
    if not isinstance(payload, dict):
        raise RunFileError(f"{path}: expected a JSON object, got {type(payload).__name__}")
    version = payload.get("version", 1)
    if not isinstance(version, int) or version > cls.LATEST_VERSION:
        raise RunFileError(f"{path}: version {version!r} is newer than this code reads ({cls.LATEST_VERSION}); update defectfill")
    missing = [name for name in required if payload.get(name) is None]
    if missing:
        raise RunFileError(f"{path}: missing field(s) {', '.join(missing)}")
    known = {f.name for f in fields(cls)}
    # Unknown keys are kept out (a newer writer may add some); version 1 files had no version field.
    return cls(**{k: v for k, v in payload.items() if k in known and k != "version"})


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise RunFileError(f"cannot read {path}: {error}") from error


class _JsonRecord:
    """A record stored as one JSON file in a folder, with a version field."""

    FILENAME = ""
    LATEST_VERSION = 1
    REQUIRED: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, payload: dict, path: str | os.PathLike | None = None):
        return _from_dict(cls, payload, path or cls.FILENAME, cls.REQUIRED)

    @classmethod
    def read_file(cls, folder: str | os.PathLike):
        path = Path(folder) / cls.FILENAME
        return cls.from_dict(_read_json(path), path)

    def to_dict(self) -> dict:
        return {**asdict(self), "version": self.LATEST_VERSION}

    def write(self, folder: str | os.PathLike) -> Path:
        return write_json_atomic(Path(folder) / self.FILENAME, self.to_dict())


@dataclass
class RunRecord(_JsonRecord):
    """What synthesis needs to use a training run (``defectfill_run.json`` next to the LoRA)."""

    FILENAME = RUN_FILENAME
    LATEST_VERSION = RUN_RECORD_VERSION

    base_model: str
    token: str
    object_class: str
    defect_type: str
    defect_prompt: str
    object_prompt: str
    resolution: int
    split: dict
    revision: str | None = None
    rank: int | None = None
    lora_alpha: int | None = None
    train_text_encoder: bool = True
    loss_weights: dict = field(default_factory=dict)
    max_train_steps: int | None = None
    seed: int | None = None
    data_dir: str | None = None
    dataset_name: str | None = None
    # The scale training saw defects at (version 2): synthesis follows it unless a flag overrides it.
    max_scale: float | None = None
    defect_crop_probability: float | None = None
    crop_context: float | None = None
    training_summary: dict | None = None
    # Every option that decided the LoRA (the training flags, without paths, logging or the Hub): how it was trained.
    training_options: dict | None = None
    version: int = RUN_RECORD_VERSION

    REQUIRED = ("base_model", "token", "object_class", "defect_type", "object_prompt", "resolution", "split")

    @classmethod
    def from_dict(cls, payload: dict, path: str | os.PathLike | None = None) -> "RunRecord":
        record = super().from_dict({"defect_prompt": None, **payload}, path)
        if "defect_types" not in record.split:
            raise RunFileError(f"{path or cls.FILENAME}: field 'split' is not a few-shot split (no 'defect_types')")
        return record

    @classmethod
    def read(cls, folder: str | os.PathLike) -> "RunRecord":
        return cls.read_file(folder)


@dataclass
class SynthesisRecord(_JsonRecord):
    """The settings a synthesis folder was made with (``synthesis.json``); evaluation reads its data
    folder and split (the held-out real images are the references)."""

    FILENAME = SYNTHESIS_FILENAME
    LATEST_VERSION = SYNTHESIS_RECORD_VERSION

    pretrained_model_name_or_path: str
    prompt: str
    resolution: int
    lora: str | None = None
    token: str | None = None
    object_class: str | None = None
    defect_type: str | None = None
    num_candidates: int = 1
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    composite: bool = True
    crop_to_mask: bool = False
    crop_context: float | None = None
    data_dir: str | None = None
    split: dict | None = None
    scale_source: str | None = None
    # The sampler, and what it costs per output image (candidates x the scheduler's denoising calls).
    scheduler: str | None = None
    unet_passes_per_image: float | None = None
    # Which real masks the images were painted in: "heldout" (the split's test masks), "train" (its training
    # masks, the only ones a downstream-grade set may use), "dir" (the user's folder), None (not recorded).
    mask_from: str | None = None
    version: int = SYNTHESIS_RECORD_VERSION

    REQUIRED = ("pretrained_model_name_or_path", "prompt", "resolution")

    @classmethod
    def read(cls, folder: str | os.PathLike) -> "SynthesisRecord | None":
        """The folder's record, or None when it has none (a folder made by another tool)."""
        return cls.read_file(folder) if (Path(folder) / cls.FILENAME).is_file() else None


# ----------------------------------------------------------------------------------------------------
# Reading a run (local folder or Hub repo)
# ----------------------------------------------------------------------------------------------------


def read_run(lora: str) -> RunRecord | None:
    """The run record of a LoRA: a local folder (which must hold the weights) or a Hub repo id. None for a
    LoRA trained elsewhere (no run file)."""
    path = Path(lora)
    if path.exists():
        if not (path / LORA_FILENAME).is_file():
            raise RunFileError(f"--lora {path} has no {LORA_FILENAME}; expected the output folder of train_defectfill.py")
        return RunRecord.read(path) if (path / RUN_FILENAME).is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError

    try:
        downloaded = Path(hf_hub_download(lora, RUN_FILENAME))
    except LocalEntryNotFoundError as error:  # offline and not cached (a subclass of EntryNotFoundError)
        raise RunFileError(f"--lora {lora} is not a local folder, and the Hub cannot be reached to fetch it ({error})") from error
    except EntryNotFoundError:  # a LoRA repo made elsewhere, without our run file
        return None
    except (HFValidationError, OSError) as error:  # offline, unknown repo, or not a repo id at all
        raise RunFileError(f"--lora {lora} is not a local folder, and its {RUN_FILENAME} could not be fetched from the Hub "
                           f"({error})") from error
    return RunRecord.from_dict(_read_json(downloaded), f"{lora}/{RUN_FILENAME}")


