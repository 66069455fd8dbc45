"""The typed records of a run and a synthesis folder: `RunRecord` (``defectfill_run.json`` next to the
LoRA: what synthesis needs to use the run, and how it was trained) and `SynthesisRecord` (``synthesis.json``:
the settings a synthesis folder was made with), and `read_run`, which reads a run's record from a folder or a Hub repo.

Training writes these files; synthesis, evaluation and the downstream tools read them: each field is
defined here once. Each file carries its `format_version`; a reader reads its own format only, and a file of
another format is refused with a message that says which format it is and what to do.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from defectfill import __version__
from defectfill.errors import RunFileError
from defectfill.fileio import write_json_atomic
from defectfill.runs.files import LORA_FILENAME, RUN_FILENAME, SYNTHESIS_FILENAME

FORMAT_VERSION_KEY = "format_version"
# Run record 3: the training settings once, under `training` (2: a `version`, the scale fields, `training_options`).
RUN_RECORD_VERSION = 3
# Synthesis record 3: `format_version` (2: `version`).
SYNTHESIS_RECORD_VERSION = 3
# The last release that reads the earlier formats (run and synthesis records 1 and 2, which named their format
# `version`, or, format 1, not at all).
EARLIER_FORMATS_RELEASE = "0.1"


# ----------------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------------


def found_format(payload: dict) -> object:
    """The format a record's payload says it has: `format_version`, else the earlier `version` (absent: 1)."""
    return payload[FORMAT_VERSION_KEY] if FORMAT_VERSION_KEY in payload else payload.get("version", 1)


def check_format(payload: dict, path: str | os.PathLike, expected: int, remedy: str) -> None:
    """Nothing when the payload is of format `expected`; otherwise a `RunFileError` that says which format the file
    is, which this defectfill reads, and what to do (`remedy`, for a file of an earlier format)."""
    found = found_format(payload)
    if found == expected:
        return
    reads = f"this defectfill ({__version__}) reads format {expected}"
    if not isinstance(found, int) or isinstance(found, bool):
        raise RunFileError(f"{path}: {FORMAT_VERSION_KEY} {found!r} is not a format number ({reads})")
    if found > expected:
        raise RunFileError(f"{path} is format {found}, written by a newer defectfill; {reads}: update defectfill")
    raise RunFileError(f"{path} is format {found}, written by an older defectfill (<= {EARLIER_FORMATS_RELEASE}); {reads}: "
                       f"{remedy}, or read it with defectfill {EARLIER_FORMATS_RELEASE}")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise RunFileError(f"cannot read {path}: {error}") from error


class _JsonRecord:
    """A record stored as one JSON file in a folder, with its format version."""

    FILENAME = ""
    FORMAT_VERSION = 0
    REQUIRED: tuple[str, ...] = ()
    # What to do with a file of an earlier format.
    EARLIER_FORMAT_REMEDY = ""

    @classmethod
    def from_dict(cls, payload: dict, path: str | os.PathLike | None = None):
        path = path or cls.FILENAME
        if not isinstance(payload, dict):
            raise RunFileError(f"{path}: expected a JSON object, got {type(payload).__name__}")
        check_format(payload, path, cls.FORMAT_VERSION, cls.EARLIER_FORMAT_REMEDY)
        missing = [name for name in cls.REQUIRED if payload.get(name) is None]
        if missing:
            raise RunFileError(f"{path}: missing field(s) {', '.join(missing)}")
        known = {f.name for f in fields(cls)}
        # Other keys are left out: a writer may add its own (the builder's index of runs in synthesis.json).
        return cls(**{k: v for k, v in payload.items() if k in known})

    @classmethod
    def read_file(cls, folder: str | os.PathLike):
        path = Path(folder) / cls.FILENAME
        return cls.from_dict(_read_json(path), path)

    def to_dict(self) -> dict:
        return {FORMAT_VERSION_KEY: self.FORMAT_VERSION, **asdict(self)}

    def write(self, folder: str | os.PathLike) -> Path:
        return write_json_atomic(Path(folder) / self.FILENAME, self.to_dict())


@dataclass
class RunRecord(_JsonRecord):
    """What synthesis needs to use a training run (``defectfill_run.json`` next to the LoRA), and how it was trained:
    `training` holds the training settings that decide the LoRA, by flag name (the ones chosen by
    `defectfill.training.settings.RECORDED_TRAINING_FIELDS`; none of them repeats a field of the record's own)."""

    FILENAME = RUN_FILENAME
    FORMAT_VERSION = RUN_RECORD_VERSION
    EARLIER_FORMAT_REMEDY = "train the run again with train_defectfill.py"

    base_model: str
    token: str
    object_class: str
    defect_type: str
    defect_prompt: str
    object_prompt: str
    resolution: int
    split: dict
    revision: str | None = None
    data_dir: str | None = None
    dataset_name: str | None = None
    training: dict = field(default_factory=dict)
    training_summary: dict | None = None
    # The base's family ("sd": SD 1.x / 2.x inpainting, "sdxl": SDXL inpainting; `defectfill.bases`) and the diffusers
    # pipeline class that paints with the LoRA. Still format 3: records written before these fields have neither
    # (None), and were all trained on SD 1.x / 2.x.
    base_family: str | None = None
    pipeline_class: str | None = None

    REQUIRED = ("base_model", "token", "object_class", "defect_type", "defect_prompt", "object_prompt", "resolution", "split")

    @classmethod
    def from_dict(cls, payload: dict, path: str | os.PathLike | None = None) -> "RunRecord":
        record = super().from_dict(payload, path)
        if "defect_types" not in record.split:
            raise RunFileError(f"{path or cls.FILENAME}: field 'split' is not a few-shot split (no 'defect_types')")
        if not isinstance(record.training, dict):
            raise RunFileError(f"{path or cls.FILENAME}: field 'training' is not an object of training settings")
        return record

    @classmethod
    def read(cls, folder: str | os.PathLike) -> "RunRecord":
        return cls.read_file(folder)

    # What readers of a run use most, from `training` (None when the record does not say).
    @property
    def rank(self) -> int | None:
        return self.training.get("rank")

    @property
    def lora_alpha(self) -> int | None:
        return self.training.get("lora_alpha")

    @property
    def train_text_encoder(self) -> bool | None:
        return self.training.get("train_text_encoder")

    @property
    def max_scale(self) -> float | None:
        """The largest random resize of training (--max_scale)."""
        return self.training.get("max_scale")

    @property
    def defect_crop_probability(self) -> float | None:
        """The share of training samples cropped around the defect (--defect_crop_probability): synthesis paints in a
        crop around its mask when it is > 0, the scale the LoRA learned the defect at."""
        return self.training.get("defect_crop_probability")

    @property
    def crop_context(self) -> float | None:
        """The context around the defect in those crops (--defect_crop_context), which synthesis's crops follow."""
        return self.training.get("defect_crop_context")


@dataclass
class SynthesisRecord(_JsonRecord):
    """The settings a synthesis folder was made with (``synthesis.json``); evaluation reads its data
    folder and split (the held-out real images are the references)."""

    FILENAME = SYNTHESIS_FILENAME
    FORMAT_VERSION = SYNTHESIS_RECORD_VERSION
    EARLIER_FORMAT_REMEDY = "paint it again with this defectfill, into a new --output_dir"

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
    # The diffusers pipeline class that painted (the base's family): "StableDiffusionInpaintPipeline", ...
    pipeline_class: str | None = None

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


