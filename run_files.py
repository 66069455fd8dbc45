"""The files a DefectFill run and a synthesis folder are made of: every file name, the typed records
(`RunRecord` in ``defectfill_run.json``, `SynthesisRecord` in ``synthesis.json``), the metadata rows of
a synthesis folder, checkpoint folder names, the LoRA file in diffusers format, and the Hub upload.

Training writes these files, synthesis, evaluation and the downstream tools read them: each name and
field is defined here once. Records carry a `version`; files written before it existed (version 1)
still load.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Iterator

from fileio import write_json_atomic, write_text_atomic

RUN_FILENAME = "defectfill_run.json"
LORA_FILENAME = "pytorch_lora_weights.safetensors"
SPLIT_FILENAME = "few_shot_split.json"
MODEL_CARD_FILENAME = "README.md"
METADATA_FILENAME = "metadata.jsonl"
SYNTHESIS_FILENAME = "synthesis.json"
PREVIEW_FILENAME = "preview.png"
CHECKPOINT_PREFIX = "checkpoint-"

RUN_RECORD_VERSION = 2
SYNTHESIS_RECORD_VERSION = 2


class RunFileError(ValueError):
    """A run or synthesis file that cannot be used; the message names the file and the field."""


# ----------------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------------


def _from_dict(cls, payload: dict, path: str | os.PathLike, required: Iterable[str]):
    if not isinstance(payload, dict):
        raise RunFileError(f"{path}: expected a JSON object, got {type(payload).__name__}")
    version = payload.get("version", 1)
    if not isinstance(version, int) or version > getattr(cls, "LATEST_VERSION"):
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
    version: int = SYNTHESIS_RECORD_VERSION

    REQUIRED = ("pretrained_model_name_or_path", "prompt", "resolution")

    @classmethod
    def read(cls, folder: str | os.PathLike) -> "SynthesisRecord | None":
        """The folder's record, or None when it has none (a folder made by another tool)."""
        return cls.read_file(folder) if (Path(folder) / cls.FILENAME).is_file() else None


# ----------------------------------------------------------------------------------------------------
# Metadata rows of a synthesis folder (imagefolder layout: images/, masks/, metadata.jsonl)
# ----------------------------------------------------------------------------------------------------


def output_names(index: int) -> tuple[str, str]:
    """(image, mask) file names of output number `index`, relative to the folder."""
    return f"images/{index:05d}.png", f"masks/{index:05d}_mask.png"


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


def write_metadata(folder: str | os.PathLike, rows: dict[str, dict]) -> Path:
    return write_text_atomic(Path(folder) / METADATA_FILENAME, "".join(json.dumps(rows[name]) + "\n" for name in sorted(rows)))


@contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[None]:
    """An exclusive lock on a synthesis folder's metadata (a hidden lock file, `flock`), so several processes
    that add rows to one folder merge them instead of overwriting each other's."""
    import fcntl

    path = Path(folder) / ".metadata.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def add_metadata_rows(folder: str | os.PathLike, new_rows: Iterable[dict]) -> dict[str, dict]:
    """Merge rows into the folder's metadata.jsonl under the folder lock (read, merge, atomic write); returns
    every row. Rows whose files another writer already removed are dropped as in `read_metadata`."""
    with folder_lock(folder):
        rows = read_metadata(folder)
        rows.update({row["file_name"]: row for row in new_rows})
        write_metadata(folder, rows)
        return rows


def next_free_index(folder: str | os.PathLike) -> int:
    """The first output number after every image already in the folder (listed or not)."""
    taken = [int(p.stem) for p in (Path(folder) / "images").glob("*.png") if p.stem.isdigit()]
    return max(taken, default=-1) + 1


def save_synthesis_result(folder: str | os.PathLike, index: int, image, mask, row: dict, candidates: list | None = None) -> dict:
    """Write one synthetic image and its label mask (bool array or PIL image) as output number `index`,
    the image last (its presence marks the output done), and return its metadata row: `row` plus the file
    names. Rejected candidates go to candidates/ when given."""
    import numpy as np
    from PIL import Image

    from fileio import save_image_atomic

    folder = Path(folder)
    image_name, mask_name = output_names(index)
    if isinstance(mask, np.ndarray):
        mask = Image.fromarray(mask.astype(np.uint8) * 255)
    save_image_atomic(mask, folder / mask_name)
    for c, candidate in enumerate(candidates or []):
        save_image_atomic(candidate, folder / "candidates" / f"{index:05d}_{c}.png")
    save_image_atomic(image, folder / image_name)
    return {"file_name": image_name, "mask_file_name": mask_name, **row}


def save_preview(folder: str | os.PathLike, rows: dict[str, dict], max_rows: int = 8, tile: int = 192) -> Path | None:
    """A grid, one row per output: clean source | mask | generated."""
    from PIL import Image

    from fileio import save_image_atomic

    folder = Path(folder)
    chosen = [rows[name] for name in sorted(rows)[:max_rows]]
    if not chosen:
        return None
    grid = Image.new("RGB", (3 * tile, tile * len(chosen)), (255, 255, 255))
    for row_index, row in enumerate(chosen):
        panels = [Image.open(row["source_image"]), Image.open(folder / row["mask_file_name"]), Image.open(folder / row["file_name"])]
        for column, panel in enumerate(panels):
            grid.paste(panel.convert("RGB").resize((tile, tile), Image.BICUBIC), (column * tile, row_index * tile))
    return save_image_atomic(grid, folder / PREVIEW_FILENAME)


# ----------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------
# The LoRA file (diffusers format)
# ----------------------------------------------------------------------------------------------------


TEXT_MODEL_PREFIX = "text_model."


def lora_layers(model, adapter_name: str = "default", fold_alpha: bool = False) -> dict:
    """The adapter's weights in diffusers format. With `fold_alpha`, the LoRA scale alpha / rank is multiplied
    into the B (up) matrices, so the file means the same to a loader that reads the alpha from the file's
    metadata and to one that ignores it (and applies alpha = rank)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    # save_embedding_layers=False: no embedding is adapted, and 'auto' looks the base model up on the Hub.
    state = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
    if fold_alpha:
        config = model.peft_config[adapter_name]
        scale = config.lora_alpha / config.r
        state = {key: value * scale if ".lora_B." in key else value for key, value in state.items()}
    return convert_state_dict_to_diffusers(state)


def _adapter_metadata(model, fold_alpha: bool) -> dict:
    metadata = model.peft_config["default"].to_dict()
    if fold_alpha:
        metadata["lora_alpha"] = metadata["r"]
    return metadata


def save_lora(directory: str | os.PathLike, unet, text_encoder=None, fold_alpha: bool = True) -> None:
    """`pytorch_lora_weights.safetensors` in diffusers format (keys `unet.` / `text_encoder.text_model.`), with
    the adapter configs as metadata, readable by the usual file mode.

    Made for every loader users have: the text-encoder keys keep CLIP's ``text_model.`` level (transformers 5
    saves them without it, which older stacks silently drop: the learned [V*] is then gone), and with
    `fold_alpha` (the final LoRA) the scale is inside the weights. Checkpoints keep the raw adapter weights
    (`fold_alpha=False`) so that resuming is exact."""
    from diffusers import StableDiffusionInpaintPipeline

    kwargs = {"unet_lora_layers": lora_layers(unet, fold_alpha=fold_alpha),
              "unet_lora_adapter_metadata": _adapter_metadata(unet, fold_alpha)}
    if text_encoder is not None and getattr(text_encoder, "peft_config", None):
        layers = lora_layers(text_encoder, fold_alpha=fold_alpha)
        kwargs["text_encoder_lora_layers"] = {
            key if key.startswith(TEXT_MODEL_PREFIX) else TEXT_MODEL_PREFIX + key: value for key, value in layers.items()
        }
        kwargs["text_encoder_lora_adapter_metadata"] = _adapter_metadata(text_encoder, fold_alpha)
    StableDiffusionInpaintPipeline.save_lora_weights(directory, safe_serialization=True, **kwargs)
    path = Path(directory) / LORA_FILENAME
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)  # safetensors writes 0600; others on a shared machine must be able to read it


def _file_lora_scales(path: Path) -> dict[str, float]:
    """{"unet": alpha / r, "text_encoder": ...} as the file's metadata records them (1.0 where it records none,
    as loaders then take alpha = r)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata() or {}
    adapters = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    scales = {}
    for component in ("unet", "text_encoder"):
        alpha, rank = adapters.get(f"{component}.lora_alpha"), adapters.get(f"{component}.r")
        scales[component] = alpha / rank if alpha and rank else 1.0
    return scales


def _set_lora_state(model, peft_state: dict, file_scale: float, where: str) -> None:
    """Put PEFT-format LoRA weights into a model's "default" adapter, rescaling B from the file's scale to the
    adapter's; any key the model does not have is an error (a LoRA for another architecture)."""
    from peft.utils import set_peft_model_state_dict

    config = model.peft_config["default"]
    factor = file_scale / (config.lora_alpha / config.r)
    if factor != 1.0:
        peft_state = {key: value * factor if ".lora_B." in key else value for key, value in peft_state.items()}
    result = set_peft_model_state_dict(model, peft_state, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RunFileError(f"{where}: LoRA keys the model does not have, e.g. {unexpected[:3]}: is it a LoRA of another base model?")


def load_lora_into(directory: str | os.PathLike, unet, text_encoder=None) -> None:
    """Inverse of `save_lora` for models that already carry the adapters (resuming, measuring). UNet and
    text-encoder keys are checked alike."""
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft

    path = Path(directory) / LORA_FILENAME
    state_dict, _ = StableDiffusionInpaintPipeline.lora_state_dict(str(directory))
    scales = _file_lora_scales(path)
    unet_state = {k[len("unet."):]: v for k, v in state_dict.items() if k.startswith("unet.")}
    _set_lora_state(unet, convert_unet_state_dict_to_peft(unet_state), scales["unet"], f"{path} (UNet)")
    if text_encoder is not None and getattr(text_encoder, "peft_config", None):
        from peft.utils import get_peft_model_state_dict

        model_has_level = any(k.startswith(TEXT_MODEL_PREFIX) for k in get_peft_model_state_dict(text_encoder))
        text_state = {}
        for key, value in state_dict.items():
            if key.startswith("text_encoder."):
                key = key[len("text_encoder."):]
                if not model_has_level and key.startswith(TEXT_MODEL_PREFIX):
                    key = key[len(TEXT_MODEL_PREFIX):]
                text_state[key] = value
        from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft

        _set_lora_state(text_encoder, convert_state_dict_to_peft(convert_state_dict_to_diffusers(text_state)),
                        scales["text_encoder"], f"{path} (text encoder)")


# ----------------------------------------------------------------------------------------------------
# Reading a run (local folder or Hub repo) and uploading a folder
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
        raise RunFileError(f"--lora {lora} is not a local folder, and its {RUN_FILENAME} could not be fetched from the Hub ({error})") from error
    return RunRecord.from_dict(_read_json(downloaded), f"{lora}/{RUN_FILENAME}")


def upload_folder_to_hub(folder: Path, repo_id: str | None, token: str | None, repo_type: str = "model",
                         ignore_patterns: list[str] | None = None, commit_message: str = "DefectFill") -> str:
    """Create (or reuse) a Hub repo and upload `folder`; temporary files and hidden files never go up.
    Returns the repo id. Errors propagate: the caller says what is safe on disk."""
    from huggingface_hub import create_repo, upload_folder

    repo_id = create_repo(repo_id or folder.name, repo_type=repo_type, exist_ok=True, token=token).repo_id
    upload_folder(repo_id=repo_id, repo_type=repo_type, folder_path=str(folder), token=token, commit_message=commit_message,
                  ignore_patterns=["*.tmp", ".*", *(ignore_patterns or [])])
    return repo_id
