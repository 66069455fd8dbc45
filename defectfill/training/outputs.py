"""What a finished training run leaves: the LoRA (diffusers format), the run record synthesis reads, the
few-shot split, a diffusers-style model card, and (on request) the upload of the folder to the Hub."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from defectfill.bases import FAMILY_PIPELINES, SD_FAMILY, SDXL_FAMILY, BaseFamily
from defectfill.data.split import save_split
from defectfill.errors import TrainingError
from defectfill.fileio import save_image_atomic, write_text_atomic
from defectfill.method import defect_prompt, object_prompt
from defectfill.models import Models
from defectfill.runs.files import CHECKPOINT_PREFIX, LORA_FILENAME, MODEL_CARD_FILENAME, SPLIT_FILENAME
from defectfill.runs.hub import upload_folder_to_hub
from defectfill.runs.lora import save_lora
from defectfill.runs.records import RunRecord
from defectfill.training.settings import TrainingSettings, recorded_training

FAMILY_NAMES = {SD_FAMILY: "Stable Diffusion 1.x/2.x inpainting", SDXL_FAMILY: "SDXL inpainting"}


def resolved_if_local(name_or_path: str) -> str:
    """An absolute path for a local folder (so the run works from any working directory); a Hub id as it is."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else str(name_or_path)


def run_record(settings: TrainingSettings, defect_type: str, split: dict, base: BaseFamily | None = None) -> RunRecord:
    """What synthesis needs to use the run (defectfill_run.json next to the LoRA), and the training settings that
    decide the LoRA (`recorded_training`), the training-time scale included. `base`: the base's family as loaded
    (`Models.base`); None leaves the family unrecorded."""
    model, data, token = settings.model, settings.data, settings.method.token
    return RunRecord(
        base_family=base.family if base else None, pipeline_class=base.pipeline_class if base else None,
        base_model=resolved_if_local(model.pretrained_model_name_or_path), revision=model.revision, token=token,
        object_class=data.object_class, defect_type=defect_type, defect_prompt=defect_prompt(token),
        object_prompt=object_prompt(data.object_class, token), resolution=settings.augmentation.resolution, split=split,
        data_dir=resolved_if_local(data.data_dir) if data.data_dir else None, dataset_name=data.dataset_name,
        training=recorded_training(settings),
    )


def training_scale_note(record: RunRecord) -> str:
    """One sentence on the scale the defect was learned at, which synthesis follows."""
    if record.defect_crop_probability:
        return (f"{record.defect_crop_probability:.0%} of the training samples were square crops around the defect at full "
                f"resolution (context {record.crop_context}), the rest whole images resized to {record.resolution} px: "
                "`infer_defectfill.py` generates in a crop around each mask (`--crop_to_mask`), at the scale the LoRA learned.")
    return (f"Whole images resized to {record.resolution} px (the paper's setting): `infer_defectfill.py` generates on the "
            "whole image resized, at the scale the LoRA learned; `--crop_to_mask` would paint the defect larger than it was learned.")


def save_model_card(output_dir: Path, record: RunRecord, repo_id: str | None, images: list | None = None) -> None:
    """A diffusers-style model card (README.md): YAML metadata (base_model, tags, instance_prompt, widget)
    and how to load the LoRA. Built locally: writing it needs no Hub access. Strings in the Python snippet
    are written as Python literals, so a quote in a class name or token cannot break it."""
    from huggingface_hub import ModelCard, ModelCardData

    widget = []
    for index, image in enumerate(images or []):
        save_image_atomic(image, output_dir / f"validation_{index}.png")
        widget.append({"text": record.object_prompt, "output": {"url": f"validation_{index}.png"}})
    n_train = sum(len(e["train"]) for e in record.split["defect_types"].values())
    training = record.training
    # Records without the family were all trained on SD 1.x / 2.x; the snippet's class is the family's own.
    family = record.base_family if record.base_family in FAMILY_PIPELINES else SD_FAMILY
    pipeline_class = FAMILY_PIPELINES[family]
    family_tags = ["stable-diffusion-xl", "stable-diffusion-xl-diffusers"] if family == SDXL_FAMILY else \
        ["stable-diffusion", "stable-diffusion-diffusers"]
    data = ModelCardData(
        license="openrail++", base_model=record.base_model, library_name="diffusers",
        tags=[*family_tags, "diffusers", "inpainting", "lora", "defectfill", "anomaly-detection", "template:sd-lora"],
        instance_prompt=record.object_prompt, widget=widget or None,
    )
    lora_source = repo_id or output_dir.name
    body = f"""
# DefectFill LoRA: {record.object_class} / {record.defect_type}

LoRA adapters for `{record.base_model}` ({FAMILY_NAMES[family]}, `{pipeline_class}`) trained with
defectfill (DefectFill, CVPR 2025, arXiv 2503.13985) on {n_train} image(s) of the `{record.defect_type}`
defect of `{record.object_class}`. The token `{record.token}` ([V*]) stands for the defect.

Inference prompt: `{record.object_prompt}`; the mask marks where the defect is painted.

```python
from diffusers import {pipeline_class}

pipe = {pipeline_class}.from_pretrained({record.base_model!r})
pipe.load_lora_weights({lora_source!r}, weight_name={LORA_FILENAME!r})
image = pipe({record.object_prompt!r}, image=clean_image, mask_image=defect_mask).images[0]
```

`weight_name` lets older diffusers (0.35) load the folder offline too; the file loads in the versions the
defectfill README lists under "Compatibility".

Or with Low-Fidelity Selection and an exact background: `python infer_defectfill.py --lora {lora_source} ...`.

## Training

| setting | value |
|---|---|
| base model | `{record.base_model}` ({FAMILY_NAMES[family]}) |
| steps | {training["max_train_steps"]} |
| resolution | {record.resolution} |
| defect scale | {record.defect_crop_probability or 0:.0%} defect crops (context {record.crop_context}), max resize {record.max_scale} |
| LoRA rank / alpha | {record.rank} / {record.lora_alpha} |
| text-encoder LoRA | {record.train_text_encoder} |
| loss weights (defect, object, attention) | {training["lambda_defect"]}, {training["lambda_object"]}, {training["lambda_attention"]} |
| seed | {training["seed"]} |

Scale: {training_scale_note(record)}

The few-shot split (training and held-out images) is in `few_shot_split.json`; everything inference
needs is in `defectfill_run.json`.
"""
    write_text_atomic(output_dir / MODEL_CARD_FILENAME, str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")))


def save_final_outputs(accelerator, models: Models, output_dir: Path, record: RunRecord, hub_model_id: str | None,
                       images=None) -> None:
    """LoRA, run JSON, split and model card, each written to a temp name then moved into place."""
    unet = accelerator.unwrap_model(models.unet)
    text_encoder = accelerator.unwrap_model(models.text_encoder) if record.train_text_encoder else None
    # SDXL: the second text encoder's LoRA too (`text_encoder_2.` keys, as the SDXL pipeline saves them).
    extra = {"text_encoder_2": accelerator.unwrap_model(models.text_encoder_2)} \
        if record.train_text_encoder and models.text_encoder_2 is not None else {}
    with tempfile.TemporaryDirectory(dir=output_dir) as tmp:
        save_lora(tmp, unet, text_encoder, **extra)
        os.replace(Path(tmp) / LORA_FILENAME, output_dir / LORA_FILENAME)
    record.write(output_dir)
    save_split(record.split, output_dir / SPLIT_FILENAME)
    save_model_card(output_dir, record, hub_model_id, images)


def push_to_hub(output_dir: Path, hub_model_id: str | None, token: str | None = None) -> str:
    """Upload the run folder (LoRA, run JSON, split, model card, validation images, TensorBoard logs) to
    `hub_model_id` (None: the folder's name) with the Hub `token` (None: the login's); checkpoints stay local."""
    try:
        return upload_folder_to_hub(output_dir, hub_model_id, token, commit_message="DefectFill LoRA",
                                       ignore_patterns=[f"{CHECKPOINT_PREFIX}*/**", f"{CHECKPOINT_PREFIX}*"])
    except Exception as error:  # offline, bad token, no write access: the run itself is safe on disk
        raise TrainingError(f"the run is saved in {output_dir}, but pushing it to the Hub failed: {error}") from error
