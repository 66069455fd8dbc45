"""An SDXL "run" folder for the synthesis tests, made without the training code: what `train_defectfill.py` leaves
in its output folder, on the tiny SDXL-inpainting model (`tests/helpers/tiny_sdxl.py`).

- `pytorch_lora_weights.safetensors`: peft LoRA adapters on the UNet and both text encoders (the recipe's targets)
  with random non-zero up (B) matrices, so the LoRA changes what the pipeline paints, written by
  `StableDiffusionXLInpaintPipeline.save_lora_weights` (keys `unet.`, `text_encoder.`, `text_encoder_2.`);
- `defectfill_run.json`: a `RunRecord` (the current format) naming the base, the class and defect type, and the
  few-shot split of the bundled synthetic data (`few_shot_split.json` beside it);
- the paper's whole-image scale (`defect_crop_probability` 0), so synthesis paints on the whole image resized.
"""

from __future__ import annotations

from pathlib import Path

from tests.conftest import SYNTHETIC_DATA


def save_random_sdxl_lora(base: Path, folder: Path, seed: int, rank: int = 4) -> Path:
    """A LoRA on the UNet and both text encoders of `base` with random non-zero B matrices (seeded), written as
    `StableDiffusionXLInpaintPipeline.save_lora_weights` writes it."""
    import torch
    from diffusers import StableDiffusionXLInpaintPipeline
    from peft import LoraConfig

    from defectfill.models import TEXT_ENCODER_LORA_TARGETS, UNET_LORA_TARGETS
    from defectfill.runs.lora import lora_layers

    pipeline = StableDiffusionXLInpaintPipeline.from_pretrained(base)
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for name, targets in (("unet", UNET_LORA_TARGETS), ("text_encoder", TEXT_ENCODER_LORA_TARGETS),
                          ("text_encoder_2", TEXT_ENCODER_LORA_TARGETS)):
        model = getattr(pipeline, name)
        model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets))
        with torch.no_grad():
            for parameter_name, parameter in model.named_parameters():
                if "lora_B" in parameter_name:  # a trained LoRA's up matrices are not zero
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
        layers[f"{name}_lora_layers"] = lora_layers(model)
    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusionXLInpaintPipeline.save_lora_weights(folder, safe_serialization=True, **layers)
    return folder


def make_sdxl_run(base: Path, folder: Path, defect_type: str = "color", object_class: str = "metal_nut", seed: int = 1,
                  base_model: str | None = None, resolution: int = 64) -> Path:
    """A run folder of `defect_type` on the SDXL `base` (its record names `base_model`, default the base's path),
    trained on the bundled synthetic data's ordered few-shot split."""
    from defectfill.data.mvtec import load_defect_dataset
    from defectfill.data.split import few_shot_split, save_split
    from defectfill.method import DEFAULT_TOKEN, defect_prompt, object_prompt
    from defectfill.runs.files import SPLIT_FILENAME
    from defectfill.runs.records import RunRecord

    save_random_sdxl_lora(base, folder, seed)
    dataset = load_defect_dataset(object_class, data_dir=str(SYNTHETIC_DATA), defect_types=[defect_type])
    split = few_shot_split(dataset)
    save_split(split, folder / SPLIT_FILENAME)
    RunRecord(base_model=base_model or str(base), token=DEFAULT_TOKEN, object_class=object_class, defect_type=defect_type,
              defect_prompt=defect_prompt(DEFAULT_TOKEN), object_prompt=object_prompt(object_class, DEFAULT_TOKEN),
              resolution=resolution, split=split, data_dir=str(SYNTHETIC_DATA),
              training={"seed": 0, "defect_crop_probability": 0.0, "rank": 4, "lora_alpha": 4, "train_text_encoder": True},
              ).write(folder)
    return folder
