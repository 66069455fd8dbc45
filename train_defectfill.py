#!/usr/bin/env python
"""DefectFill training: LoRA fine-tuning of a Stable Diffusion inpainting model on a few images of one
defect type, with the paper's defect loss, object loss and [V*] attention loss.

    accelerate launch train_defectfill.py --config configs/sd2_inpainting.yaml \
        --data_dir /data/mvtec_ad --object_class bottle --defect_type broken_large --output_dir runs/bottle-broken_large

The shape follows diffusers' `examples/dreambooth/train_dreambooth_lora.py`: `parse_args`, `main(args)`,
accelerate state hooks that store the LoRA in diffusers format, `log_validation`, `save_model_card`.
The method itself (prompts, token, loss weights, masks and losses) lives in `defectfill_method.py`; the
[V*] attention capture in `attention_processor.py`; the data in `dataset_mvtec.py`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import math
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

import dataset_mvtec as dm
import defectfill_method as method
import run_files as rf
import synthesis
from cli_config import add_hub_arguments, add_model_arguments, parse_args_with_config, public_options
from defectfill_step import DefectFillStep, LatentCache, Models, StepConfig, add_lora_adapters, compile_models, load_models, set_memory_format
from fileio import save_image_atomic, write_text_atomic

logger = logging.getLogger("defectfill")


class TrainingError(RuntimeError):
    """A run that cannot go on; the message says why and what to change."""


# ----------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="DefectFill LoRA training (CVPR 2025).")
    model = add_model_arguments(p, "Diffusers-format SD inpainting model: Hub id (stabilityai/stable-diffusion-2-inpainting) or local folder. Required.")
    model.add_argument("--cache_dir", default=None, help="Where downloaded models and datasets are cached.")

    data = p.add_argument_group("data")
    data.add_argument("--data_dir", "--instance_data_dir", dest="data_dir", default=None,
                      help="MVTec AD root folder (official or DefectFill2 layout).")
    data.add_argument("--dataset_name", default=None,
                      help="A datasets repo (or local loadable dataset) with image/mask/object_class/defect_type columns, instead of --data_dir.")
    data.add_argument("--dataset_config_name", default=None, help="Config name of --dataset_name.")
    data.add_argument("--object_class", default=None, help="MVTec category to train on, e.g. bottle or metal_nut. Required.")
    data.add_argument("--defect_type", default=None,
                      help="Defect type to learn; 'all' trains one [V*] run per defect type (in <output_dir>/<defect_type>). "
                           "May be omitted when the class has a single defect type.")
    data.add_argument("--split_strategy", default="ordered", choices=("ordered", "random"),
                      help="Few-shot split: first images by file name (paper protocol) or a seeded random choice.")
    data.add_argument("--train_fraction", type=float, default=1 / 3, help="Fraction of each defect type's images used for training.")
    data.add_argument("--train_count", type=int, default=None, help="Exact number of training images per defect type (overrides --train_fraction).")
    data.add_argument("--split_file", default=None, help="A saved few_shot_split.json to reuse instead of computing the split.")
    data.add_argument("--resolution", type=int, default=512, help="Training resolution (square).")
    data.add_argument("--max_scale", type=float, default=1.125,
                      help="Augmentation: random resize by a factor in [1, max_scale], then random crop back to --resolution.")
    data.add_argument("--defect_crop_probability", type=float, default=0.0,
                      help="Augmentation: with this probability, first crop a square around the defect at full resolution "
                           "(the scale infer_defectfill.py --crop_to_mask generates at). 0 = the paper's whole-image resize. "
                           "Recorded in defectfill_run.json: synthesis crops around its masks when this is > 0.")
    data.add_argument("--defect_crop_context", type=float, default=0.5,
                      help="Context around the defect's box in those crops, as a fraction of its side (the same rule as "
                           "infer_defectfill.py --crop_context, which defaults to this run's value).")
    data.add_argument("--random_flip", action="store_true", help="Augmentation: random horizontal flip (off: some defects are orientation-specific).")
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes.")

    m = p.add_argument_group("method")
    m.add_argument("--token", "--instance_token", dest="token", default=method.DEFAULT_TOKEN,
                   help="The [V*] token string; a rare existing token. One split into several pieces is averaged over its pieces.")
    m.add_argument("--lambda_defect", type=float, default=method.DEFAULT_LOSS_WEIGHTS.defect, help="Weight of the defect loss.")
    m.add_argument("--lambda_object", type=float, default=method.DEFAULT_LOSS_WEIGHTS.object, help="Weight of the object loss.")
    m.add_argument("--lambda_attention", type=float, default=method.DEFAULT_LOSS_WEIGHTS.attention,
                   help="Weight of the [V*] attention loss; 0 turns the attention capture off.")
    m.add_argument("--object_alpha", type=float, default=method.DEFAULT_OBJECT_ALPHA, help="alpha in M' = M + alpha(1 - M).")
    m.add_argument("--num_boxes", type=int, default=method.DEFAULT_NUM_BOXES, help="Boxes in the object branch's random mask.")
    m.add_argument("--box_min_fraction", type=float, default=method.DEFAULT_BOX_MIN_FRACTION, help="Smallest box side, fraction of the image side.")
    m.add_argument("--box_max_fraction", type=float, default=method.DEFAULT_BOX_MAX_FRACTION, help="Largest box side, fraction of the image side.")

    t = p.add_argument_group("training")
    t.add_argument("--output_dir", default="defectfill-lora", help="Where the LoRA, run JSON, split, checkpoints and logs go.")
    t.add_argument("--seed", type=int, default=0, help="Seed for noise, timesteps, masks, augmentation and the random split.")
    t.add_argument("--train_batch_size", "--batch_size", dest="train_batch_size", type=int, default=4, help="Batch size per device.")
    t.add_argument("--max_train_steps", type=int, default=2000, help="Optimizer steps.")
    t.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per optimizer step.")
    t.add_argument("--gradient_checkpointing", action="store_true", help="Recompute UNet activations in backward to save memory.")
    t.add_argument("--learning_rate", type=float, default=2e-4, help="Learning rate of the UNet LoRA.")
    t.add_argument("--text_encoder_lr", type=float, default=4e-5, help="Learning rate of the text-encoder LoRA.")
    t.add_argument("--train_text_encoder", action=argparse.BooleanOptionalAction, default=True,
                   help="Train a LoRA on the text encoder too (how [V*] learns its meaning).")
    t.add_argument("--rank", "--lora_rank", dest="rank", type=int, default=8, help="LoRA rank.")
    t.add_argument("--lora_alpha", type=int, default=16, help="LoRA alpha (scale = alpha / rank).")
    t.add_argument("--lr_scheduler", default="constant_with_warmup",
                   choices=("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"),
                   help="Learning-rate schedule (paper: linear warmup, then constant).")
    t.add_argument("--lr_warmup_steps", type=int, default=100, help="Warmup steps of the LR schedule.")
    t.add_argument("--adam_beta1", type=float, default=0.9, help="Adam beta1.")
    t.add_argument("--adam_beta2", type=float, default=0.999, help="Adam beta2.")
    # Optimizer details the paper leaves out: diffusers' LoRA-example defaults.
    t.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay.")
    t.add_argument("--adam_epsilon", type=float, default=1e-8, help="Adam epsilon.")
    t.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
    t.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit: 8-bit optimizer state for tensors of 4096+ elements (bench/optimizer_state.py measures the saving).")
    t.add_argument("--mixed_precision", default=None, choices=("no", "fp16", "bf16"),
                   help="Mixed precision; default: accelerate config. Trainable LoRA weights stay fp32.")
    t.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs.")
    t.add_argument("--torch_compile", action="store_true",
                   help="torch.compile the UNet and the VAE encoder in place (inductor): the first steps compile (minutes on a "
                        "2-core CPU with a cold cache; a CPU needs a C++ compiler), the later ones run faster.")
    t.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=True,
                   help="Keep the UNet and VAE convolution weights channels-last (NHWC), which oneDNN and cuDNN "
                        "convolve faster; the same model, the same results up to float rounding.")
    t.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                   help="xformers attention on every non-recording layer (CUDA only; pip install -r requirements-gpu.txt).")
    t.add_argument("--cache_latents", action=argparse.BooleanOptionalAction, default=True,
                   help="Reuse the VAE posteriors of each image and its defect background across epochs when augmentation "
                        "cannot change them (--max_scale 1, no flip, no defect crop): 1 VAE encode a step instead of 3.")
    t.add_argument("--max_nonfinite_steps", type=int, default=10,
                   help="Stop with an error after this many non-finite losses in a row (each is skipped and counted).")

    s = p.add_argument_group("state and logging")
    s.add_argument("--checkpointing_steps", "--save_steps", dest="checkpointing_steps", type=int, default=500,
                   help="Save a resumable accelerate checkpoint every N steps.")
    s.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    s.add_argument("--resume_from_checkpoint", "--resume_from", dest="resume_from_checkpoint", default=None,
                   help="A checkpoint folder, or 'latest' in --output_dir.")
    s.add_argument("--report_to", default="tensorboard", help="accelerate tracker: tensorboard, wandb, all or none.")
    s.add_argument("--logging_dir", default="logs", help="TensorBoard log folder, under --output_dir.")
    s.add_argument("--logging_steps", type=int, default=10, help="Log the losses every N steps (each log syncs the device).")
    s.add_argument("--validation_steps", type=int, default=200, help="Inpaint held-out validation pairs every N steps; 0 turns it off.")
    s.add_argument("--num_validation_images", type=int, default=4, help="Validation (good image, held-out mask) pairs.")
    s.add_argument("--num_inference_steps", type=int, default=50, help="Denoising steps at validation.")
    s.add_argument("--guidance_scale", type=float, default=7.5, help="Classifier-free guidance scale at validation.")
    add_hub_arguments(p, "--hub_model_id", "the run folder (LoRA, run file, model card, logs; checkpoints excluded)")
    return p


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parse_args_with_config(parser, input_args, required=("pretrained_model_name_or_path", "object_class"))
    if (args.data_dir is None) == (args.dataset_name is None):
        parser.error("give exactly one of --data_dir or --dataset_name")
    if args.max_scale < 1.0:
        parser.error(f"--max_scale must be >= 1, got {args.max_scale}")
    if args.report_to == "wandb" and args.hub_token is not None:
        parser.error("--report_to=wandb with --hub_token risks exposing the token; use `huggingface-cli login` instead")
    return args


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------


class FewShotDefectDataset(Dataset):
    """The few-shot defect images and masks, transformed together (`PairTransform`). Indexed by
    (row, sample seed) pairs from `EpochShuffleSampler`; the seed drives the sample's augmentation here
    and its noise, timestep and random boxes in the step, so a sample's randomness depends only on the
    run's seed and its place in the schedule: not on resuming, DataLoader workers or how a global batch
    is split over processes."""

    def __init__(self, hf_dataset, transform: dm.PairTransform):
        self.rows = hf_dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: tuple[int, int]) -> dict:
        row_index, sample_seed = index
        row = self.rows[row_index]
        image, mask = self.transform(row["image"], row["mask"], random.Random(sample_seed))
        return {"pixel_values": image, "masks": mask, "row_index": torch.tensor(row_index), "sample_seed": torch.tensor(sample_seed)}


class EpochShuffleSampler(Sampler):
    """Each epoch, a permutation of the rows seeded by (seed, epoch), repeated to at least `min_length`
    so a few-shot set smaller than the batch still fills batches; each row comes with its own
    seed. Seeding by epoch makes a resumed run see the same order as an uninterrupted one."""

    def __init__(self, num_items: int, min_length: int, seed: int):
        self.num_items, self.seed, self.epoch = num_items, seed, 0
        self.length = max(num_items, min_length)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        repeats = math.ceil(self.length / self.num_items)
        order = torch.cat([torch.randperm(self.num_items, generator=generator) for _ in range(repeats)])
        sample_seeds = torch.randint(0, 2**62, (self.length,), generator=generator)
        return iter(zip(order[: self.length].tolist(), sample_seeds.tolist()))


def collate(examples: list[dict]) -> dict:
    return {key: torch.stack([e[key] for e in examples]) for key in ("pixel_values", "masks", "row_index", "sample_seed")}


def load_training_split(args, defect_type: str):
    """The training rows of `defect_type` and the split (saved next to the run)."""
    full = dm.load_defect_dataset(
        args.object_class, data_dir=args.data_dir, dataset_name=args.dataset_name, defect_types=[defect_type],
        **({"config_name": args.dataset_config_name, "cache_dir": args.cache_dir} if args.dataset_name else {}),
    )
    if args.split_file:
        split = dm.load_split(args.split_file)
        if defect_type not in split["defect_types"]:
            raise TrainingError(f"--split_file {args.split_file} has no entry for defect type {defect_type!r}")
        split = {**split, "defect_types": {defect_type: split["defect_types"][defect_type]}}
    else:
        split = dm.few_shot_split(full, args.split_strategy, args.train_fraction, args.train_count, args.seed)
    train_rows = dm.select_split(full, split, "train")
    if len(train_rows) == 0:
        raise TrainingError(f"no training image of {args.object_class}/{defect_type} in the split")
    return train_rows, split


def build_dataloader(train_rows, args, num_processes: int) -> DataLoader:
    transform = dm.PairTransform(args.resolution, (1.0, args.max_scale), args.random_flip, args.defect_crop_probability,
                                 args.defect_crop_context)
    sampler = EpochShuffleSampler(len(train_rows), args.train_batch_size * num_processes, args.seed)
    return DataLoader(
        FewShotDefectDataset(train_rows, transform), batch_size=args.train_batch_size, sampler=sampler,
        collate_fn=collate, num_workers=args.dataloader_num_workers, drop_last=True,
        # Its own generator: creating an iterator would otherwise draw from the global torch RNG, so a
        # resumed run (new iterator after the restored RNG state) would draw different noise.
        generator=torch.Generator().manual_seed(args.seed),
    )


# ----------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------


def enable_optional_features(models: Models, args) -> None:
    set_memory_format(models, args.channels_last)
    if args.torch_compile:
        compile_models(models)
    if args.enable_xformers_memory_efficient_attention:
        require_extra("xformers", "--enable_xformers_memory_efficient_attention")
        if not torch.cuda.is_available():
            raise TrainingError("--enable_xformers_memory_efficient_attention needs a CUDA GPU; xformers has no CPU kernels")
        models.unet.enable_xformers_memory_efficient_attention()
    if args.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            models.text_encoder.gradient_checkpointing_enable()
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True


def require_extra(module: str, flag: str, requirements: str = "requirements-gpu.txt"):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise TrainingError(f"{flag} needs the {module} package: pip install -r {requirements} ({error})") from error


def build_optimizer(models: Models, args):
    unet_params = [p for p in models.unet.parameters() if p.requires_grad]
    groups = [{"params": unet_params, "lr": args.learning_rate}]
    if args.train_text_encoder:
        groups.append({"params": [p for p in models.text_encoder.parameters() if p.requires_grad], "lr": args.text_encoder_lr})
    if args.use_8bit_adam:
        optimizer_class = require_extra("bitsandbytes", "--use_8bit_adam", "requirements.txt").optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(groups, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)


# ----------------------------------------------------------------------------------------------------
# Saving, loading, model card
# ----------------------------------------------------------------------------------------------------


def register_state_hooks(accelerator, models: Models) -> None:
    """accelerate checkpoints store only the LoRA, in diffusers format (the save hook pops the full weights)."""
    from diffusers.training_utils import cast_training_params

    def is_unet(model):
        return isinstance(accelerator.unwrap_model(model), type(accelerator.unwrap_model(models.unet)))

    def save_hook(to_save, weights, output_dir):
        if accelerator.is_main_process:
            unet = next(accelerator.unwrap_model(m) for m in to_save if is_unet(m))
            text_encoders = [accelerator.unwrap_model(m) for m in to_save if not is_unet(m)]
            rf.save_lora(output_dir, unet, text_encoders[0] if text_encoders else None, fold_alpha=False)
        while weights:
            weights.pop()

    def load_hook(to_load, input_dir):
        unet, text_encoder = None, None
        while to_load:
            model = to_load.pop()
            if is_unet(model):
                unet = accelerator.unwrap_model(model)
            else:
                text_encoder = accelerator.unwrap_model(model)
        rf.load_lora_into(input_dir, unet, text_encoder)
        cast_training_params([m for m in (unet, text_encoder) if m is not None], dtype=torch.float32)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def augmentation_is_static(args) -> bool:
    """True when a row's transformed pixels are the same every epoch (latents may be cached)."""
    return args.max_scale == 1.0 and not args.random_flip and args.defect_crop_probability == 0


def resolved_if_local(name_or_path: str) -> str:
    """An absolute path for a local folder (so the run works from any working directory); a Hub id as it is."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else str(name_or_path)


def run_record(args, defect_type: str, split: dict) -> rf.RunRecord:
    """What synthesis needs to use the run (defectfill_run.json next to the LoRA), the training-time scale included."""
    return rf.RunRecord(
        base_model=resolved_if_local(args.pretrained_model_name_or_path), revision=args.revision, token=args.token,
        object_class=args.object_class, defect_type=defect_type, defect_prompt=method.defect_prompt(args.token),
        object_prompt=method.object_prompt(args.object_class, args.token), resolution=args.resolution, rank=args.rank,
        lora_alpha=args.lora_alpha, train_text_encoder=args.train_text_encoder,
        loss_weights={"defect": args.lambda_defect, "object": args.lambda_object, "attention": args.lambda_attention},
        max_train_steps=args.max_train_steps, seed=args.seed, data_dir=resolved_if_local(args.data_dir) if args.data_dir else None,
        dataset_name=args.dataset_name, split=split, max_scale=args.max_scale,
        defect_crop_probability=args.defect_crop_probability, crop_context=args.defect_crop_context,
    )


def training_scale_note(record: rf.RunRecord) -> str:
    """One sentence on the scale the defect was learned at, which synthesis follows."""
    if record.defect_crop_probability:
        return (f"{record.defect_crop_probability:.0%} of the training samples were square crops around the defect at full "
                f"resolution (context {record.crop_context}), the rest whole images resized to {record.resolution} px: "
                "`infer_defectfill.py` generates in a crop around each mask (`--crop_to_mask`), at the scale the LoRA learned.")
    return (f"Whole images resized to {record.resolution} px (the paper's setting): `infer_defectfill.py` generates on the "
            "whole image resized, at the scale the LoRA learned; `--crop_to_mask` would paint the defect larger than it was learned.")


def save_model_card(output_dir: Path, record: rf.RunRecord, repo_id: str | None, images: list | None = None) -> None:
    """A diffusers-style model card (README.md): YAML metadata (base_model, tags, instance_prompt, widget)
    and how to load the LoRA. Built locally: writing it needs no Hub access. Strings in the Python snippet
    are written as Python literals, so a quote in a class name or token cannot break it."""
    from huggingface_hub import ModelCard, ModelCardData

    widget = []
    for index, image in enumerate(images or []):
        save_image_atomic(image, output_dir / f"validation_{index}.png")
        widget.append({"text": record.object_prompt, "output": {"url": f"validation_{index}.png"}})
    n_train = sum(len(e["train"]) for e in record.split["defect_types"].values())
    data = ModelCardData(
        license="openrail++", base_model=record.base_model, library_name="diffusers",
        tags=["stable-diffusion", "stable-diffusion-diffusers", "diffusers", "inpainting", "lora", "defectfill",
              "anomaly-detection", "template:sd-lora"],
        instance_prompt=record.object_prompt, widget=widget or None,
    )
    lora_source = repo_id or output_dir.name
    body = f"""
# DefectFill LoRA: {record.object_class} / {record.defect_type}

LoRA adapters for `{record.base_model}` trained with
defectfill (DefectFill, CVPR 2025, arXiv 2503.13985) on {n_train} image(s) of the `{record.defect_type}`
defect of `{record.object_class}`. The token `{record.token}` ([V*]) stands for the defect.

Inference prompt: `{record.object_prompt}`; the mask marks where the defect is painted.

```python
from diffusers import StableDiffusionInpaintPipeline

pipe = StableDiffusionInpaintPipeline.from_pretrained({record.base_model!r})
pipe.load_lora_weights({lora_source!r})
image = pipe({record.object_prompt!r}, image=clean_image, mask_image=defect_mask).images[0]
```

Or with Low-Fidelity Selection and an exact background: `python infer_defectfill.py --lora {lora_source} ...`.

## Training

| setting | value |
|---|---|
| steps | {record.max_train_steps} |
| resolution | {record.resolution} |
| defect scale | {record.defect_crop_probability or 0:.0%} defect crops (context {record.crop_context}), max resize {record.max_scale} |
| LoRA rank / alpha | {record.rank} / {record.lora_alpha} |
| text-encoder LoRA | {record.train_text_encoder} |
| loss weights (defect, object, attention) | {record.loss_weights['defect']}, {record.loss_weights['object']}, {record.loss_weights['attention']} |
| seed | {record.seed} |

Scale: {training_scale_note(record)}

The few-shot split (training and held-out images) is in `few_shot_split.json`; everything inference
needs is in `defectfill_run.json`.
"""
    write_text_atomic(output_dir / rf.MODEL_CARD_FILENAME, str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")))


def save_final_outputs(accelerator, models: Models, args, output_dir: Path, record: rf.RunRecord, images=None) -> None:
    """LoRA, run JSON, split and model card, each written to a temp name then moved into place."""
    unet = accelerator.unwrap_model(models.unet)
    text_encoder = accelerator.unwrap_model(models.text_encoder) if args.train_text_encoder else None
    with tempfile.TemporaryDirectory(dir=output_dir) as tmp:
        rf.save_lora(tmp, unet, text_encoder)
        os.replace(Path(tmp) / rf.LORA_FILENAME, output_dir / rf.LORA_FILENAME)
    record.write(output_dir)
    dm.save_split(record.split, output_dir / rf.SPLIT_FILENAME)
    save_model_card(output_dir, record, args.hub_model_id, images)


def push_to_hub(output_dir: Path, args) -> str:
    """Upload the run folder (LoRA, run JSON, split, model card, validation images, TensorBoard logs);
    checkpoints stay local."""
    try:
        return rf.upload_folder_to_hub(output_dir, args.hub_model_id, args.hub_token, commit_message="DefectFill LoRA",
                                       ignore_patterns=[f"{rf.CHECKPOINT_PREFIX}*/**", f"{rf.CHECKPOINT_PREFIX}*"])
    except Exception as error:  # offline, bad token, no write access: the run itself is safe on disk
        raise TrainingError(f"the run is saved in {output_dir}, but pushing it to the Hub failed: {error}") from error


def save_checkpoint(accelerator, output_dir: Path, step: int, limit: int | None) -> Path:
    """A resumable checkpoint that appears complete or not at all: written under a hidden temporary name
    and renamed to ``checkpoint-N`` once every process has written its part; older ones are pruned to
    `limit` only after the new one exists."""
    final = output_dir / rf.checkpoint_name(step)
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


CHECKPOINT_FILES = (rf.LORA_FILENAME, "optimizer.bin", "random_states_0.pkl")


def is_complete_checkpoint(path: Path) -> bool:
    return all((path / name).is_file() for name in CHECKPOINT_FILES)


def prune_checkpoints(output_dir: Path, limit: int | None) -> None:
    """Keep the newest `limit` complete checkpoints (called after a new one is saved)."""
    if limit is None:
        return
    complete = [p for p in rf.list_checkpoints(output_dir) if is_complete_checkpoint(p)]
    for old in complete[: max(0, len(complete) - limit)]:
        logger.info("removing checkpoint %s (checkpoints_total_limit=%d)", old, limit)
        shutil.rmtree(old)


def resolve_resume_path(args, output_dir: Path) -> Path | None:
    """The checkpoint to resume from: the one named, or with 'latest' the newest complete one in the run
    folder (incomplete ones, e.g. from a run killed while saving, are skipped and named in the log)."""
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint != "latest":
        return Path(args.resume_from_checkpoint)
    checkpoints = rf.list_checkpoints(output_dir)
    for path in reversed(checkpoints):
        if is_complete_checkpoint(path):
            return path
        logger.warning("--resume_from_checkpoint latest: skipping %s, an incomplete checkpoint (no %s)", path,
                       ", ".join(name for name in CHECKPOINT_FILES if not (path / name).is_file()))
    logger.warning("--resume_from_checkpoint latest: no complete checkpoint in %s, starting a new run", output_dir)
    return None


def check_flags_before_loading(args, output_dirs: list[Path]) -> None:
    """What can be checked without loading a model or a dataset: a bad output folder, a missing checkpoint,
    a resolution the model cannot divide. Nothing is written before these pass."""
    for output_dir in output_dirs:
        for folder in (output_dir, *output_dir.parents):
            if folder.exists() and not folder.is_dir():
                raise TrainingError(f"--output_dir {args.output_dir}: {folder} exists and is not a folder")
    if args.resume_from_checkpoint and args.resume_from_checkpoint != "latest":
        path = Path(args.resume_from_checkpoint)
        if not path.is_dir() or rf.checkpoint_step(path) is None:
            raise TrainingError(f"--resume_from_checkpoint {path} is not a checkpoint folder (checkpoint-N)")
        if not is_complete_checkpoint(path):
            raise TrainingError(f"--resume_from_checkpoint {path} is incomplete (it lacks "
                                f"{', '.join(n for n in CHECKPOINT_FILES if not (path / n).is_file())})")
    check_resolution(args)


def check_resolution(args) -> None:
    """--resolution must divide into the VAE's latents (SD2: a multiple of 8; the tiny model: of 2)."""
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.load_config(args.pretrained_model_name_or_path, subfolder="vae", revision=args.revision,
                                        cache_dir=args.cache_dir)
    except Exception as error:  # OSError, EnvironmentError, HFValidationError: a path or id that cannot be read
        raise TrainingError(f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path}: cannot read the "
                            f"model's VAE config ({error})") from error
    scale = 2 ** (len(vae["block_out_channels"]) - 1)
    if args.resolution % scale:
        raise TrainingError(f"--resolution {args.resolution} is not a multiple of {scale}, the VAE's scale factor: try "
                            f"{max(scale, round(args.resolution / scale) * scale)}")


def validation_pairs(args, split: dict, defect_type: str) -> list[tuple[Path, Path]]:
    """(held-out good image, held-out mask) pairs, round-robin; empty when the data is not a local folder."""
    if args.data_dir is None or args.validation_steps <= 0 or args.num_validation_images <= 0:
        return []
    goods = dm.list_good_images(args.data_dir, args.object_class, splits=("test",)) or dm.list_good_images(args.data_dir, args.object_class)
    masks = dm.list_heldout_masks(args.data_dir, split, defect_type)
    if not goods or not masks:
        return []
    return synthesis.round_robin(goods, masks, args.num_validation_images)


def validation_settings(args) -> synthesis.SynthesisSettings:
    """Synthesis as infer_defectfill.py runs it on this run (its prompt, resolution and training scale),
    one candidate per pair (no LPIPS model inside the training loop)."""
    crop_to_mask, crop_context = synthesis.crop_at_training_scale(args.defect_crop_probability, args.defect_crop_context)
    return synthesis.SynthesisSettings(
        prompt=method.object_prompt(args.object_class, args.token), resolution=args.resolution, num_candidates=1,
        num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale, seed=args.seed,
        crop_to_mask=crop_to_mask, crop_context=crop_context,
    )


def log_validation(accelerator, models: Models, args, pairs, step: int, defectfill_step: DefectFillStep | None) -> list:
    """Inpaint the validation pairs with the current LoRA through the synthesis core and log the generated
    regions (what synthesis pastes back) and the [V*] map. Runs on a fork of the random state: validating
    never changes what training draws next, so a resumed run matches an uninterrupted one."""
    if not pairs:
        return []
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    python_state = random.getstate()
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(args.seed)
            images = validation_images(accelerator, models, args, pairs)
            log_images(accelerator, "validation", images, step)
            if defectfill_step is not None and defectfill_step.records_attention:
                log_attention_preview(accelerator, args, pairs[0], step, defectfill_step)
            return images
    finally:
        random.setstate(python_state)


def validation_images(accelerator, models: Models, args, pairs) -> list:
    from diffusers import StableDiffusionInpaintPipeline
    from PIL import Image

    pipeline = StableDiffusionInpaintPipeline.from_pretrained(
        args.pretrained_model_name_or_path, unet=accelerator.unwrap_model(models.unet),
        text_encoder=accelerator.unwrap_model(models.text_encoder), vae=models.vae, tokenizer=models.tokenizer,
        revision=args.revision, variant=args.variant, torch_dtype=models.vae.dtype, safety_checker=None,
        requires_safety_checker=False, cache_dir=args.cache_dir,
    )
    pipeline.set_progress_bar_config(disable=True)
    settings = validation_settings(args)
    jobs = []
    for index, (image_path, mask_path) in enumerate(pairs):
        with Image.open(image_path) as image, Image.open(mask_path) as mask:
            jobs.append(synthesis.prepare_job(image, mask, index, settings, mask_name=f"mask {mask_path}"))
    with torch.autocast(accelerator.device.type, enabled=accelerator.mixed_precision != "no"):
        results = synthesis.synthesize(pipeline, jobs, settings)
    del pipeline
    return [result.region for result in results]


def final_validation(accelerator, models: Models, args, pairs, step: int, defectfill_step: DefectFillStep) -> list:
    """The last validation, after the run is saved: a failure is logged, and the run stays whole."""
    if not pairs:
        return []
    try:
        return log_validation(accelerator, models, args, pairs, step, defectfill_step)
    except Exception as error:  # the LoRA and run file are already on disk; validation is a view of them
        logger.error("the final validation failed (the trained LoRA is saved): %s: %s", type(error).__name__, error)
        return []


def log_images(accelerator, name: str, images: list, step: int) -> None:
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(name, np.stack([np.asarray(i) for i in images]), step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({name: [wandb.Image(i) for i in images]}, step=step)


def log_attention_preview(accelerator, args, pair, step: int, defectfill_step: DefectFillStep) -> None:
    """The [V*] map of the object branch on a validation pair (a seeded random timestep), next to its mask."""
    from PIL import Image

    image, mask = dm.PairTransform(args.resolution)(Image.open(pair[0]), Image.open(pair[1]))
    dtype = defectfill_step.vae.dtype
    batch = {"pixel_values": image[None].to(accelerator.device, dtype), "masks": mask[None].to(accelerator.device, dtype)}
    preview = dataclasses.replace(defectfill_step, unet=accelerator.unwrap_model(defectfill_step.unet),
                                  text_encoder=accelerator.unwrap_model(defectfill_step.text_encoder), latent_cache=None)
    with torch.no_grad(), preview(batch) as output:
        attention = F.interpolate(output.attention_map.float(), size=mask.shape[-2:], mode="bilinear")[0, 0]
    attention = (attention / attention.max().clamp_min(1e-8)).cpu().numpy()
    panel = np.concatenate([mask[0].numpy(), attention], axis=1)
    log_images(accelerator, "vstar_attention", [Image.fromarray((panel * 255).astype(np.uint8)).convert("RGB")], step)


# ----------------------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------------------


def create_accelerator(args, output_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    report_to = None if args.report_to in (None, "none") else args.report_to
    if report_to in ("tensorboard", "all"):
        require_extra("tensorboard", "--report_to tensorboard")
    project = ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir))
    return Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
                       log_with=report_to, project_config=project)


def prepare_models(accelerator, args) -> Models:
    from diffusers.training_utils import cast_training_params

    models = load_models(args.pretrained_model_name_or_path, args.revision, args.variant, args.cache_dir)
    dtype = synthesis.precision_dtype(accelerator.mixed_precision)
    # Frozen weights in the compute dtype; the LoRA weights added next are cast back to fp32, so the
    # optimizer never sees fp16 parameters ("Attempting to unscale FP16 gradients").
    models.vae.to(accelerator.device, dtype=dtype)
    models.unet.to(accelerator.device, dtype=dtype)
    models.text_encoder.to(accelerator.device, dtype=dtype)
    add_lora_adapters(models, args.rank, args.lora_alpha, args.train_text_encoder)
    cast_training_params([models.unet, models.text_encoder] if args.train_text_encoder else [models.unet], dtype=torch.float32)
    enable_optional_features(models, args)
    return models


class NonFiniteGuard:
    """Counts skipped non-finite steps and stops the run after `limit` in a row."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row, self.total = limit, 0, 0

    def check(self, accelerator, loss: torch.Tensor) -> bool:
        """True when this step's loss is finite on every process (a collective under DDP)."""
        bad = (~torch.isfinite(loss.detach())).float().reshape(1)
        if accelerator.num_processes > 1:
            bad = accelerator.reduce(bad, reduction="sum")
        if bad.item() == 0:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.total += 1
        logger.warning("non-finite loss: update skipped (%d in a row, %d in all)", self.in_a_row, self.total)
        if self.in_a_row >= self.limit:
            raise TrainingError(f"{self.in_a_row} non-finite losses in a row (--max_nonfinite_steps {self.limit}); "
                                "lower the learning rate or use bf16 instead of fp16")
        return False


def train_one_defect(args, defect_type: str, output_dir: Path) -> Path:
    """Train one [V*] LoRA for one defect type into `output_dir`; returns the folder."""
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    output_dir.mkdir(parents=True, exist_ok=True)
    accelerator = create_accelerator(args, output_dir)
    set_seed(args.seed)
    train_rows, split = load_training_split(args, defect_type)
    models = prepare_models(accelerator, args)
    latent_cache = LatentCache() if args.cache_latents and augmentation_is_static(args) else None
    defectfill_step = DefectFillStep.build(models, args.object_class, args.token, StepConfig.from_args(args), latent_cache)
    register_state_hooks(accelerator, models)
    optimizer = build_optimizer(models, args)
    dataloader = build_dataloader(train_rows, args, accelerator.num_processes)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)
    if args.train_text_encoder:
        models.unet, models.text_encoder, optimizer, dataloader, lr_scheduler = accelerator.prepare(
            models.unet, models.text_encoder, optimizer, dataloader, lr_scheduler)
    else:
        models.unet, optimizer, dataloader, lr_scheduler = accelerator.prepare(models.unet, optimizer, dataloader, lr_scheduler)
    # The step calls the prepared (possibly DDP-wrapped) modules.
    defectfill_step.unet, defectfill_step.text_encoder = models.unet, models.text_encoder

    record = run_record(args, defect_type, split)
    if accelerator.is_main_process:
        dm.save_split(split, output_dir / rf.SPLIT_FILENAME)
        accelerator.init_trackers("defectfill", config=public_options(args))  # never the Hub token
    logger.info("training %s/%s on %d images for %d steps", args.object_class, defect_type, len(train_rows), args.max_train_steps)

    loop = TrainingLoop(accelerator, models, args, defectfill_step, optimizer, dataloader, lr_scheduler, output_dir)
    try:  # trackers are closed (logs flushed) whether the run ends well or not
        loop.resume(resolve_resume_path(args, output_dir))
        pairs = validation_pairs(args, split, defect_type)
        with tqdm(total=args.max_train_steps, initial=loop.global_step, disable=not accelerator.is_local_main_process, desc="steps") as bar:
            loop.run(bar, pairs)

        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            record.training_summary = loop.summary()
            save_final_outputs(accelerator, models, args, output_dir, record)  # first: nothing after it can lose the run
            images = final_validation(accelerator, models, args, pairs, loop.global_step, defectfill_step)
            if images:
                save_model_card(output_dir, record, args.hub_model_id, images)
            if args.push_to_hub:
                logger.info("pushed to https://huggingface.co/%s", push_to_hub(output_dir, args))
    finally:
        accelerator.end_training()
    return output_dir


class TrainingLoop:
    """The optimisation loop: steps, skips, logging, checkpoints and validation."""

    def __init__(self, accelerator, models: Models, args, defectfill_step: DefectFillStep, optimizer, dataloader, lr_scheduler,
                 output_dir: Path):
        self.accelerator, self.models, self.args, self.step = accelerator, models, args, defectfill_step
        self.optimizer, self.dataloader, self.lr_scheduler, self.output_dir = optimizer, dataloader, lr_scheduler, output_dir
        self.global_step, self.first_epoch, self.skip_batches = 0, 0, 0
        self.guard = NonFiniteGuard(args.max_nonfinite_steps)
        self.steps_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
        self.history: list[dict[str, float]] = []

    def resume(self, path: Path | None) -> None:
        if path is None:
            return
        self.accelerator.print(f"resuming from {path}")
        self.accelerator.load_state(str(path))
        self.global_step = rf.checkpoint_step(path)
        self.first_epoch = self.global_step // self.steps_per_epoch
        self.skip_batches = (self.global_step % self.steps_per_epoch) * self.args.gradient_accumulation_steps

    def trainable_parameters(self):
        models = [self.models.unet] + ([self.models.text_encoder] if self.args.train_text_encoder else [])
        return [p for m in models for p in m.parameters() if p.requires_grad]

    def run(self, bar, pairs) -> None:
        epoch = self.first_epoch
        while self.global_step < self.args.max_train_steps:
            self.dataloader.set_epoch(epoch)
            batches = self.dataloader
            if epoch == self.first_epoch and self.skip_batches:
                batches = self.accelerator.skip_first_batches(self.dataloader, self.skip_batches)
            for batch in batches:
                if self.train_step(batch):
                    bar.update(1)
                    self.after_optimizer_step(pairs)
                if self.global_step >= self.args.max_train_steps:
                    return
            epoch += 1

    def train_step(self, batch) -> bool:
        """One micro-batch; True when it completed an optimizer step."""
        models, accelerator = self.models, self.accelerator
        models.unet.train()
        if self.args.train_text_encoder:
            models.text_encoder.train()
        with accelerator.accumulate(models.unet, models.text_encoder):
            with self.step(batch) as output:  # backward inside: the [V*] capture records until it is done
                losses = output.losses
                if not self.guard.check(accelerator, losses["loss"]):
                    self.optimizer.zero_grad(set_to_none=True)
                    return False
                accelerator.backward(losses["loss"])
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(self.trainable_parameters(), self.args.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:
            return False
        self.global_step += 1
        if self.global_step % self.args.logging_steps == 0 or self.global_step == self.args.max_train_steps:
            self.log(losses)
        return True

    def log(self, terms: dict[str, torch.Tensor]) -> None:
        values = {f"loss/{k}": v.detach().item() for k, v in terms.items()}
        values["lr/unet"] = self.lr_scheduler.get_last_lr()[0]
        if self.args.train_text_encoder:
            values["lr/text_encoder"] = self.lr_scheduler.get_last_lr()[1]
        values["skipped_nonfinite_steps"] = self.guard.total
        self.history.append({"step": self.global_step, **values})
        self.accelerator.log(values, step=self.global_step)

    def summary(self) -> dict:
        return {"global_step": self.global_step, "skipped_nonfinite_steps": self.guard.total,
                "last_logged": self.history[-1] if self.history else None}

    def after_optimizer_step(self, pairs) -> None:
        args, accelerator = self.args, self.accelerator
        if args.checkpointing_steps and self.global_step % args.checkpointing_steps == 0:
            save_checkpoint(accelerator, self.output_dir, self.global_step, args.checkpoints_total_limit)
        if args.validation_steps and self.global_step % args.validation_steps == 0 and self.global_step < args.max_train_steps:
            if accelerator.is_main_process:
                log_validation(accelerator, self.models, args, pairs, self.global_step, self.step)


def defect_types_to_train(args) -> list[str]:
    if args.dataset_name:
        if args.defect_type in (None, "all"):
            raise TrainingError("with --dataset_name, give --defect_type")
        return [args.defect_type]
    available = dm.list_defect_types(args.data_dir, args.object_class)
    if args.defect_type == "all":
        return available
    if args.defect_type is None:
        if len(available) != 1:
            raise TrainingError(f"{args.object_class} has defect types {', '.join(available)}: choose one with --defect_type (or 'all')")
        return available
    dm.check_defect_types([args.defect_type], available, f"{args.data_dir}/{args.object_class}")
    return [args.defect_type]


def main(args: argparse.Namespace) -> list[Path]:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    defect_types = defect_types_to_train(args)
    output_root = Path(args.output_dir)
    # One [V*] run per defect type: with 'all', each gets its own folder and a fresh copy of the args.
    output_dirs = [output_root / d if len(defect_types) > 1 or args.defect_type == "all" else output_root for d in defect_types]
    check_flags_before_loading(args, output_dirs)
    runs = []
    for defect_type, output_dir in zip(defect_types, output_dirs):
        run_args = copy.copy(args)
        if len(defect_types) > 1 and args.hub_model_id:
            run_args.hub_model_id = f"{args.hub_model_id}-{defect_type}"
        runs.append(train_one_defect(run_args, defect_type, output_dir))
    return runs


if __name__ == "__main__":
    try:
        main(parse_args())
    except (TrainingError, dm.DatasetError, method.InpaintingModelError, rf.RunFileError) as error:
        raise SystemExit(f"error: {error}") from None
