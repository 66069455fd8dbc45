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
import logging
import math
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

import dataset_mvtec as dm
import defectfill_method as method
from attention_processor import VStarAttentionStore, install_vstar_capture, token_piece_ids, token_weights
from cli_config import parse_args_with_config
from fileio import save_image_atomic, write_json_atomic, write_text_atomic

logger = logging.getLogger("defectfill")

RUN_FILENAME = "defectfill_run.json"
LORA_FILENAME = "pytorch_lora_weights.safetensors"
UNET_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


class TrainingError(RuntimeError):
    """A run that cannot go on; the message says why and what to change."""


# ----------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="DefectFill LoRA training (CVPR 2025).")
    model = p.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", default=None,
                       help="Diffusers-format SD inpainting model: Hub id (stabilityai/stable-diffusion-2-inpainting) or local folder. Required.")
    model.add_argument("--revision", default=None, help="Model revision (branch, tag or commit) on the Hub.")
    model.add_argument("--variant", default=None, help="Weights variant to load, e.g. fp16.")
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
                           "(the scale infer_defectfill.py --crop_to_mask generates at). 0 = the paper's whole-image resize.")
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
    t.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit (pip install -r requirements-gpu.txt).")
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
    s.add_argument("--push_to_hub", action="store_true", help="Upload the output folder (checkpoints excluded) to the Hub.")
    s.add_argument("--hub_model_id", default=None, help="Hub repo id; default: the output folder's name.")
    s.add_argument("--hub_token", default=None, help="Hub token; prefer `huggingface-cli login`.")
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
    if env_rank := os.environ.get("LOCAL_RANK"):
        args.local_rank = int(env_rank)
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
    transform = dm.PairTransform(args.resolution, (1.0, args.max_scale), args.random_flip, args.defect_crop_probability)
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


@dataclass
class Models:
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object


def load_models(args) -> Models:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    source = dict(revision=args.revision, cache_dir=args.cache_dir)
    name = args.pretrained_model_name_or_path
    tokenizer = CLIPTokenizer.from_pretrained(name, subfolder="tokenizer", **source)
    text_encoder = CLIPTextModel.from_pretrained(name, subfolder="text_encoder", variant=args.variant, **source)
    vae = AutoencoderKL.from_pretrained(name, subfolder="vae", variant=args.variant, **source)
    unet = UNet2DConditionModel.from_pretrained(name, subfolder="unet", variant=args.variant, **source)
    if unet.config.in_channels != 9:
        raise TrainingError(
            f"{name} has a UNet with {unet.config.in_channels} input channels; DefectFill needs an inpainting model "
            "(9 channels: latents, mask, masked-image latents), e.g. stabilityai/stable-diffusion-2-inpainting"
        )
    noise_scheduler = DDPMScheduler.from_pretrained(name, subfolder="scheduler", **source)
    for model in (text_encoder, vae, unet):
        model.requires_grad_(False)
    return Models(tokenizer, text_encoder, vae, unet, noise_scheduler)


def add_lora_adapters(models: Models, args) -> None:
    from peft import LoraConfig

    models.unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, init_lora_weights="gaussian",
                                       target_modules=UNET_LORA_TARGETS))
    if args.train_text_encoder:
        models.text_encoder.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, init_lora_weights="gaussian",
                                                   target_modules=TEXT_ENCODER_LORA_TARGETS))


def set_memory_format(models: Models, channels_last: bool) -> None:
    """NHWC convolution weights (their convolutions then run NHWC whatever the input's layout): the three VAE
    encodes of a step take 0.7-0.8x the time on CPU (bench/train_step.py), the UNet about 0.95x."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    models.unet.to(memory_format=memory_format)
    models.vae.to(memory_format=memory_format)


def compile_models(models: Models) -> None:
    """In place (`nn.Module.compile`): accelerate's hooks, the LoRA state dicts and the attention processors
    keep seeing the same modules. bench/train_step.py measures the gain (0.9x a step on 2 CPU cores)."""
    models.unet.compile()
    models.vae.encoder.compile()


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


def require_extra(module: str, flag: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise TrainingError(f"{flag} needs the {module} package: pip install -r requirements-gpu.txt ({error})") from error


def build_optimizer(models: Models, args):
    unet_params = [p for p in models.unet.parameters() if p.requires_grad]
    groups = [{"params": unet_params, "lr": args.learning_rate}]
    if args.train_text_encoder:
        groups.append({"params": [p for p in models.text_encoder.parameters() if p.requires_grad], "lr": args.text_encoder_lr})
    if args.use_8bit_adam:
        optimizer_class = require_extra("bitsandbytes", "--use_8bit_adam").optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(groups, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)


# ----------------------------------------------------------------------------------------------------
# One DefectFill step
# ----------------------------------------------------------------------------------------------------


@dataclass
class StepConfig:
    """What a step needs besides the batch and the models (from the flags)."""

    loss_weights: method.LossWeights
    object_alpha: float
    num_boxes: int
    box_min_fraction: float
    box_max_fraction: float

    @classmethod
    def from_args(cls, args) -> "StepConfig":
        weights = method.LossWeights(args.lambda_defect, args.lambda_object, args.lambda_attention)
        return cls(weights, args.object_alpha, args.num_boxes, args.box_min_fraction, args.box_max_fraction)


@dataclass
class PromptIds:
    """Token ids of P_def and P_obj (1, K each) and the [V*] weights over P_obj's positions (1, K)."""

    defect: torch.Tensor
    object: torch.Tensor
    vstar_weights: torch.Tensor


def tokenize(tokenizer, prompt: str | list[str]) -> torch.Tensor:
    return tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def build_prompt_ids(tokenizer, object_class: str, token: str) -> PromptIds:
    object_ids = tokenize(tokenizer, method.object_prompt(object_class, token))
    weights = token_weights(object_ids, token_piece_ids(tokenizer, token))
    return PromptIds(tokenize(tokenizer, method.defect_prompt(token)), object_ids, weights)


def encode_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """E(x) = vae.encode(x).latent_dist.sample() * scaling_factor, as the inpainting pipeline encodes."""
    return sample_latents(vae, *encode_posterior(vae, pixels))


def encode_posterior(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE posterior of `pixels`; frozen VAE, no gradient."""
    with torch.no_grad():
        posterior = vae.encode(pixels.to(dtype=vae.dtype)).latent_dist
    return posterior.mean, posterior.std


def sample_latents(vae, mean: torch.Tensor, std: torch.Tensor, draw: "RandomDraws | None" = None) -> torch.Tensor:
    """latent_dist.sample() * scaling_factor, drawn in one call so cached and fresh posteriors consume the
    random stream identically."""
    noise = draw.normal(mean.shape) if draw else torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)
    return (mean + std * noise.to(mean.dtype)) * vae.config.scaling_factor


class RandomDraws:
    """A step's random numbers drawn per sample from that sample's seed: sample b of every batched draw
    comes from generator b, so a sample gets the same boxes, noise and timestep in any batch, on any
    process. Without seeds (benchmarks, previews) it draws from the global generator."""

    def __init__(self, sample_seeds: torch.Tensor | None, device: torch.device):
        self.device = device
        self.generators = None if sample_seeds is None else [
            torch.Generator(device=device).manual_seed(int(seed)) for seed in sample_seeds.tolist()
        ]

    def _per_sample(self, shape, draw):
        """`shape[0]` is a multiple of the batch: rows k * B + b belong to sample b."""
        if self.generators is None:
            return draw(shape, None)
        b = len(self.generators)
        rows = [draw((1, *shape[1:]), self.generators[i % b]) for i in range(shape[0])]
        return torch.cat(rows)

    def normal(self, shape) -> torch.Tensor:
        return self._per_sample(tuple(shape), lambda s, g: torch.randn(s, generator=g, device=self.device))

    def timesteps(self, batch: int, num_train_timesteps: int) -> torch.Tensor:
        return self._per_sample((batch,), lambda s, g: torch.randint(0, num_train_timesteps, s, generator=g, device=self.device))

    def box_masks(self, batch: int, height: int, width: int, config: "StepConfig") -> torch.Tensor:
        def draw(shape, generator):
            if generator is not None:  # box sampling runs on the CPU; one CPU generator per sample, seeded from the device one
                generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator, device=self.device)))
            return method.random_box_mask(shape[0], height, width, config.num_boxes, config.box_min_fraction,
                                          config.box_max_fraction, generator=generator)
        return self._per_sample((batch,), draw).to(self.device)


class LatentCache:
    """The VAE posteriors (mean, std) of each training row's image I and defect background (1 - M) I.

    Valid only when augmentation never changes a row's pixels (`--max_scale 1`, no flip, no defect crop):
    then two of a step's three VAE encodes are the same every epoch. A fresh sample is still drawn from
    the posterior each step."""

    def __init__(self) -> None:
        self.posteriors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def posterior(self, vae, images: torch.Tensor, masks: torch.Tensor, row_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of cat([I, (1 - M) I]) for the batch, encoding only rows not seen before."""
        rows = row_index.tolist()
        missing = [i for i, row in enumerate(rows) if row not in self.posteriors]
        if missing:
            picked = images[missing]
            mean, std = encode_posterior(vae, torch.cat([picked, picked * (1 - masks[missing])]))
            for k, i in enumerate(missing):
                self.posteriors[rows[i]] = (mean[[k, k + len(missing)]], std[[k, k + len(missing)]])
        mean = torch.stack([self.posteriors[row][0] for row in rows], dim=1).flatten(0, 1)  # I rows, then (1 - M) I rows
        std = torch.stack([self.posteriors[row][1] for row in rows], dim=1).flatten(0, 1)
        return mean, std


def augmentation_is_static(args) -> bool:
    """True when a row's transformed pixels are the same every epoch (latents may be cached)."""
    return args.max_scale == 1.0 and not args.random_flip and args.defect_crop_probability == 0


def diffusion_target(noise_scheduler, latents, noise, timesteps) -> torch.Tensor:
    """The paper writes the losses in epsilon; for a v-prediction base model (ours, for generality) the same
    masked losses apply to the velocity target."""
    if noise_scheduler.config.prediction_type == "epsilon":
        return noise
    if noise_scheduler.config.prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise TrainingError(f"unsupported prediction_type {noise_scheduler.config.prediction_type!r}")


def compute_defectfill_losses(
    batch: dict, unet, vae, text_encoder, noise_scheduler, prompt_ids: PromptIds, store: VStarAttentionStore | None,
    config: StepConfig, latent_cache: LatentCache | None = None,
) -> dict[str, torch.Tensor]:
    """One DefectFill step's losses: {"defect", "object", "attention", "loss"} (SPEC "One training step").

    Both branches share x0, one noise sample and one timestep; they run as one UNet call of batch 2B
    (defect rows first, object rows second) and the three images of each sample are VAE-encoded in
    one call (or, with a `latent_cache`, only the random-box background is encoded). While the store
    records (object rows only), it stays recording after this returns: call backward, then `store.reset()` (gradient checkpointing recomputes the recorded layers in backward).
    """
    images, masks = batch["pixel_values"], batch["masks"]
    b, _, height, width = images.shape
    draw = RandomDraws(batch.get("sample_seed"), images.device)
    random_masks = draw.box_masks(b, height, width, config).to(images.dtype)
    if latent_cache is not None:
        cached_mean, cached_std = latent_cache.posterior(vae, images, masks, batch["row_index"])
        random_mean, random_std = encode_posterior(vae, images * (1 - random_masks))
        mean, std = torch.cat([cached_mean, random_mean]), torch.cat([cached_std, random_std])
    else:
        mean, std = encode_posterior(vae, torch.cat([images, images * (1 - masks), images * (1 - random_masks)]))
    latents, defect_background, object_background = sample_latents(vae, mean, std, draw).chunk(3)
    latent_size = tuple(latents.shape[-2:])

    # In logical order (randn_like follows the strides of its input, which depend on how the latents were made).
    noise = draw.normal(latents.shape).to(latents.dtype)
    timesteps = draw.timesteps(b, noise_scheduler.config.num_train_timesteps).long()
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    defect_mask = method.mask_to_latent(masks, latent_size).to(latents.dtype)
    random_mask = method.mask_to_latent(random_masks, latent_size).to(latents.dtype)

    # diffusers order: cat([noisy latents, mask, masked-image latents]); what the pretrained weights expect.
    unet_input = torch.cat([
        torch.cat([noisy, defect_mask, defect_background], dim=1),
        torch.cat([noisy, random_mask, object_background], dim=1),
    ])
    device = latents.device
    prompt_embeds = text_encoder(torch.cat([prompt_ids.defect, prompt_ids.object]).to(device))[0]
    encoder_hidden_states = prompt_embeds.repeat_interleave(b, dim=0)
    record = store is not None and config.loss_weights.attention > 0
    if record:
        store.start(prompt_ids.vstar_weights.expand(b, -1).to(device), latent_size, rows=slice(b, 2 * b))
    prediction = unet(unet_input, timesteps.repeat(2), encoder_hidden_states, return_dict=False)[0]
    defect_pred, object_pred = prediction.float().chunk(2)

    target = diffusion_target(noise_scheduler, latents, noise, timesteps).float()
    terms = {
        "defect": method.defect_loss(defect_pred, target, defect_mask),
        "object": method.object_loss(object_pred, target, defect_mask, config.object_alpha),
        "attention": method.attention_loss(store.aggregate(), defect_mask) if record else torch.zeros((), device=device),
    }
    terms["loss"] = method.total_loss(terms, config.loss_weights)
    return terms


# ----------------------------------------------------------------------------------------------------
# Saving, loading, model card
# ----------------------------------------------------------------------------------------------------


def lora_layers(model, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    # save_embedding_layers=False: no embedding is adapted, and 'auto' looks the base model up on the Hub.
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False))


def save_lora(directory: str | Path, unet, text_encoder=None) -> None:
    """`pytorch_lora_weights.safetensors` in diffusers format (keys `unet.` / `text_encoder.`), with the
    adapter configs as metadata so `load_lora_weights` restores alpha as well as rank."""
    from diffusers import StableDiffusionInpaintPipeline

    kwargs = {"unet_lora_layers": lora_layers(unet), "unet_lora_adapter_metadata": unet.peft_config["default"].to_dict()}
    if text_encoder is not None and getattr(text_encoder, "peft_config", None):
        kwargs["text_encoder_lora_layers"] = lora_layers(text_encoder)
        kwargs["text_encoder_lora_adapter_metadata"] = text_encoder.peft_config["default"].to_dict()
    StableDiffusionInpaintPipeline.save_lora_weights(directory, safe_serialization=True, **kwargs)


def load_lora_into(directory: str | Path, unet, text_encoder=None) -> None:
    """Inverse of `save_lora` for models that already carry the adapters (resuming)."""
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers.training_utils import _set_state_dict_into_text_encoder
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    state_dict, _ = StableDiffusionInpaintPipeline.lora_state_dict(directory)
    unet_state = convert_unet_state_dict_to_peft({k[len("unet."):]: v for k, v in state_dict.items() if k.startswith("unet.")})
    result = set_peft_model_state_dict(unet, unet_state, adapter_name="default")
    if getattr(result, "unexpected_keys", None):
        raise TrainingError(f"{directory}: unexpected UNet LoRA keys {result.unexpected_keys[:5]}")
    if text_encoder is not None and getattr(text_encoder, "peft_config", None):
        _set_state_dict_into_text_encoder(state_dict, prefix="text_encoder.", text_encoder=text_encoder)


def register_state_hooks(accelerator, models: Models) -> None:
    """accelerate checkpoints store only the LoRA, in diffusers format (the save hook pops the full weights)."""
    from diffusers.training_utils import cast_training_params

    def is_unet(model):
        return isinstance(accelerator.unwrap_model(model), type(accelerator.unwrap_model(models.unet)))

    def save_hook(to_save, weights, output_dir):
        if accelerator.is_main_process:
            unet = next(accelerator.unwrap_model(m) for m in to_save if is_unet(m))
            text_encoders = [accelerator.unwrap_model(m) for m in to_save if not is_unet(m)]
            save_lora(output_dir, unet, text_encoders[0] if text_encoders else None)
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
        load_lora_into(input_dir, unet, text_encoder)
        cast_training_params([m for m in (unet, text_encoder) if m is not None], dtype=torch.float32)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def run_record(args, defect_type: str, split: dict) -> dict:
    """What inference needs to use the run: written as defectfill_run.json next to the LoRA."""
    return {
        "base_model": args.pretrained_model_name_or_path,
        "revision": args.revision,
        "token": args.token,
        "object_class": args.object_class,
        "defect_type": defect_type,
        "defect_prompt": method.defect_prompt(args.token),
        "object_prompt": method.object_prompt(args.object_class, args.token),
        "resolution": args.resolution,
        "rank": args.rank,
        "lora_alpha": args.lora_alpha,
        "train_text_encoder": args.train_text_encoder,
        "loss_weights": {"defect": args.lambda_defect, "object": args.lambda_object, "attention": args.lambda_attention},
        "max_train_steps": args.max_train_steps,
        "seed": args.seed,
        "data_dir": str(args.data_dir) if args.data_dir else None,
        "dataset_name": args.dataset_name,
        "split": split,
    }


def save_model_card(output_dir: Path, record: dict, repo_id: str | None, images: list | None = None) -> None:
    """A diffusers-style model card (README.md): YAML metadata (base_model, tags, instance_prompt, widget)
    and how to load the LoRA. Built locally: writing it needs no Hub access."""
    from huggingface_hub import ModelCard, ModelCardData

    widget = []
    for index, image in enumerate(images or []):
        save_image_atomic(image, output_dir / f"validation_{index}.png")
        widget.append({"text": record["object_prompt"], "output": {"url": f"validation_{index}.png"}})
    n_train = sum(len(e["train"]) for e in record["split"]["defect_types"].values())
    data = ModelCardData(
        license="openrail++", base_model=record["base_model"], library_name="diffusers",
        tags=["stable-diffusion", "stable-diffusion-diffusers", "diffusers", "inpainting", "lora", "defectfill",
              "anomaly-detection", "template:sd-lora"],
        instance_prompt=record["object_prompt"], widget=widget or None,
    )
    body = f"""
# DefectFill LoRA: {record['object_class']} / {record['defect_type']}

LoRA adapters for `{record['base_model']}` trained with
defectfill (DefectFill, CVPR 2025, arXiv 2503.13985) on {n_train} image(s) of the `{record['defect_type']}`
defect of `{record['object_class']}`. The token `{record['token']}` ([V*]) stands for the defect.

Inference prompt: `{record['object_prompt']}`; the mask marks where the defect is painted.

```python
from diffusers import StableDiffusionInpaintPipeline

pipe = StableDiffusionInpaintPipeline.from_pretrained("{record['base_model']}")
pipe.load_lora_weights("{repo_id or output_dir.name}")
image = pipe("{record['object_prompt']}", image=clean_image, mask_image=defect_mask).images[0]
```

Or with Low-Fidelity Selection and an exact background: `python infer_defectfill.py --lora {repo_id or output_dir.name} ...`.

## Training

| setting | value |
|---|---|
| steps | {record['max_train_steps']} |
| resolution | {record['resolution']} |
| LoRA rank / alpha | {record['rank']} / {record['lora_alpha']} |
| text-encoder LoRA | {record['train_text_encoder']} |
| loss weights (defect, object, attention) | {record['loss_weights']['defect']}, {record['loss_weights']['object']}, {record['loss_weights']['attention']} |
| seed | {record['seed']} |

The few-shot split (training and held-out images) is in `few_shot_split.json`; everything inference
needs is in `defectfill_run.json`.
"""
    write_text_atomic(output_dir / "README.md", str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")))


def save_final_outputs(accelerator, models: Models, args, output_dir: Path, record: dict, images) -> None:
    """LoRA, run JSON, split and model card, each written to a temp name then moved into place."""
    unet = accelerator.unwrap_model(models.unet)
    text_encoder = accelerator.unwrap_model(models.text_encoder) if args.train_text_encoder else None
    with tempfile.TemporaryDirectory(dir=output_dir) as tmp:
        save_lora(tmp, unet, text_encoder)
        os.replace(Path(tmp) / LORA_FILENAME, output_dir / LORA_FILENAME)
    write_json_atomic(output_dir / RUN_FILENAME, record)
    dm.save_split(record["split"], output_dir / dm.SPLIT_FILENAME)
    save_model_card(output_dir, record, args.hub_model_id, images)


def push_to_hub(output_dir: Path, args) -> str:
    """Upload the run folder (LoRA, run JSON, split, model card, validation images, TensorBoard logs);
    checkpoints stay local."""
    from huggingface_hub import create_repo, upload_folder

    try:
        repo_id = create_repo(args.hub_model_id or output_dir.name, exist_ok=True, token=args.hub_token).repo_id
        upload_folder(repo_id=repo_id, folder_path=str(output_dir), commit_message="DefectFill LoRA", token=args.hub_token,
                      ignore_patterns=["checkpoint-*/**", "checkpoint-*", "*.tmp"])
    except Exception as error:  # offline, bad token, no write access: the run itself is safe on disk
        raise TrainingError(f"the run is saved in {output_dir}, but pushing it to the Hub failed: {error}") from error
    return repo_id


def prune_checkpoints(output_dir: Path, limit: int | None) -> None:
    """Keep room for one more checkpoint under `limit` (called before saving a new one)."""
    if limit is None:
        return
    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for old in checkpoints[: max(0, len(checkpoints) - limit + 1)]:
        logger.info("removing checkpoint %s (checkpoints_total_limit=%d)", old, limit)
        shutil.rmtree(old)


def resolve_resume_path(args, output_dir: Path) -> Path | None:
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint == "latest":
        checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        if not checkpoints:
            logger.warning("--resume_from_checkpoint latest: no checkpoint in %s, starting a new run", output_dir)
            return None
        return checkpoints[-1]
    path = Path(args.resume_from_checkpoint)
    if not path.is_dir():
        raise TrainingError(f"--resume_from_checkpoint {path} is not a checkpoint folder")
    return path


# ----------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------


def validation_pairs(args, split: dict, defect_type: str) -> list[tuple[Path, Path]]:
    """(held-out good image, held-out mask) pairs, round-robin; empty when the data is not a local folder."""
    if args.data_dir is None or args.validation_steps <= 0 or args.num_validation_images <= 0:
        return []
    goods = dm.list_good_images(args.data_dir, args.object_class, splits=("test",)) or dm.list_good_images(args.data_dir, args.object_class)
    masks = dm.list_heldout_masks(args.data_dir, split, defect_type)
    if not goods or not masks:
        return []
    return [(goods[i % len(goods)], masks[i % len(masks)]) for i in range(args.num_validation_images)]


def log_validation(accelerator, models: Models, args, pairs, step: int, store: VStarAttentionStore | None) -> list:
    """Inpaint the validation pairs with the current LoRA and log them (and the [V*] map) to the trackers.
    Runs on a fork of the random state: validating never changes what training draws next, so a run
    resumed from a checkpoint matches an uninterrupted one whatever --validation_steps is."""
    if not pairs:
        return []
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    python_state = random.getstate()
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(args.seed)
            return _log_validation(accelerator, models, args, pairs, step, store)
    finally:
        random.setstate(python_state)


def _log_validation(accelerator, models: Models, args, pairs, step: int, store: VStarAttentionStore | None) -> list:
    from diffusers import StableDiffusionInpaintPipeline
    from PIL import Image

    pipeline = StableDiffusionInpaintPipeline.from_pretrained(
        args.pretrained_model_name_or_path, unet=accelerator.unwrap_model(models.unet),
        text_encoder=accelerator.unwrap_model(models.text_encoder), vae=models.vae, tokenizer=models.tokenizer,
        revision=args.revision, variant=args.variant, torch_dtype=models.vae.dtype, safety_checker=None,
        requires_safety_checker=False, cache_dir=args.cache_dir,
    )
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device=accelerator.device).manual_seed(args.seed)
    prompt = method.object_prompt(args.object_class, args.token)
    images = []
    for image_path, mask_path in pairs:
        image = Image.open(image_path).convert("RGB").resize((args.resolution, args.resolution), Image.BICUBIC)
        mask = Image.open(mask_path).convert("L").resize((args.resolution, args.resolution), Image.NEAREST)
        with torch.autocast(accelerator.device.type, enabled=accelerator.mixed_precision != "no"):
            images.append(pipeline(prompt, image=image, mask_image=mask, height=args.resolution, width=args.resolution,
                                   num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                                   generator=generator).images[0])
    log_images(accelerator, "validation", images, step)
    if store is not None and args.lambda_attention > 0:
        log_attention_preview(accelerator, models, args, pairs[0], step, store)
    del pipeline
    return images


def log_images(accelerator, name: str, images: list, step: int) -> None:
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(name, np.stack([np.asarray(i) for i in images]), step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({name: [wandb.Image(i) for i in images]}, step=step)


def log_attention_preview(accelerator, models: Models, args, pair, step: int, store: VStarAttentionStore) -> None:
    """The [V*] map of the object branch on a validation pair (a seeded random timestep), next to its mask."""
    from PIL import Image

    transform = dm.PairTransform(args.resolution)
    image, mask = transform(Image.open(pair[0]), Image.open(pair[1]))
    batch = {"pixel_values": image[None].to(accelerator.device, models.vae.dtype), "masks": mask[None].to(accelerator.device, models.vae.dtype)}
    prompt_ids = build_prompt_ids(models.tokenizer, args.object_class, args.token)
    config = StepConfig.from_args(args)
    with torch.no_grad():
        compute_defectfill_losses(batch, accelerator.unwrap_model(models.unet), models.vae,
                                  accelerator.unwrap_model(models.text_encoder), models.noise_scheduler, prompt_ids, store, config)
        attention = store.aggregate()
    store.reset()
    attention = F.interpolate(attention.float(), size=mask.shape[-2:], mode="bilinear")[0, 0]
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


def weight_dtype_of(accelerator) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def prepare_models(accelerator, args) -> Models:
    from diffusers.training_utils import cast_training_params

    models = load_models(args)
    dtype = weight_dtype_of(accelerator)
    # Frozen weights in the compute dtype; the LoRA weights added next are cast back to fp32, so the
    # optimizer never sees fp16 parameters ("Attempting to unscale FP16 gradients").
    models.vae.to(accelerator.device, dtype=dtype)
    models.unet.to(accelerator.device, dtype=dtype)
    models.text_encoder.to(accelerator.device, dtype=dtype)
    add_lora_adapters(models, args)
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
    store = VStarAttentionStore()
    install_vstar_capture(models.unet, store)
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

    record = run_record(args, defect_type, split)
    if accelerator.is_main_process:
        dm.save_split(split, output_dir / dm.SPLIT_FILENAME)
        tracker_config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("defectfill", config=tracker_config)
    logger.info("training %s/%s on %d images for %d steps", args.object_class, defect_type, len(train_rows), args.max_train_steps)

    loop = TrainingLoop(accelerator, models, args, store, optimizer, dataloader, lr_scheduler, output_dir)
    try:  # trackers are closed (logs flushed) whether the run ends well or not
        loop.resume(resolve_resume_path(args, output_dir))
        pairs = validation_pairs(args, split, defect_type)
        with tqdm(total=args.max_train_steps, initial=loop.global_step, disable=not accelerator.is_local_main_process, desc="steps") as bar:
            loop.run(bar, pairs)

        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            images = log_validation(accelerator, models, args, pairs, loop.global_step, store) if pairs else []
            record["training_summary"] = loop.summary()
            save_final_outputs(accelerator, models, args, output_dir, record, images)
            if args.push_to_hub:
                logger.info("pushed to https://huggingface.co/%s", push_to_hub(output_dir, args))
    finally:
        accelerator.end_training()
    return output_dir


class TrainingLoop:
    """The optimisation loop: steps, skips, logging, checkpoints and validation."""

    def __init__(self, accelerator, models: Models, args, store, optimizer, dataloader, lr_scheduler, output_dir: Path):
        self.accelerator, self.models, self.args, self.store = accelerator, models, args, store
        self.optimizer, self.dataloader, self.lr_scheduler, self.output_dir = optimizer, dataloader, lr_scheduler, output_dir
        self.global_step, self.first_epoch, self.skip_batches = 0, 0, 0
        self.guard = NonFiniteGuard(args.max_nonfinite_steps)
        self.prompt_ids = build_prompt_ids(models.tokenizer, args.object_class, args.token)
        self.config = StepConfig.from_args(args)
        self.latent_cache = LatentCache() if args.cache_latents and augmentation_is_static(args) else None
        self.steps_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
        self.history: list[dict[str, float]] = []

    def resume(self, path: Path | None) -> None:
        if path is None:
            return
        self.accelerator.print(f"resuming from {path}")
        self.accelerator.load_state(str(path))
        self.global_step = int(path.name.split("-")[1])
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
            terms = compute_defectfill_losses(batch, models.unet, models.vae, models.text_encoder, models.noise_scheduler,
                                              self.prompt_ids, self.store, self.config, self.latent_cache)
            if not self.guard.check(accelerator, terms["loss"]):
                self.store.reset()
                self.optimizer.zero_grad(set_to_none=True)
                return False
            accelerator.backward(terms["loss"])
            self.store.reset()
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(self.trainable_parameters(), self.args.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:
            return False
        self.global_step += 1
        if self.global_step % self.args.logging_steps == 0 or self.global_step == self.args.max_train_steps:
            self.log(terms)
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
            if accelerator.is_main_process:
                prune_checkpoints(self.output_dir, args.checkpoints_total_limit)
            accelerator.wait_for_everyone()
            accelerator.save_state(str(self.output_dir / f"checkpoint-{self.global_step}"))
        if args.validation_steps and self.global_step % args.validation_steps == 0 and self.global_step < args.max_train_steps:
            if accelerator.is_main_process:
                log_validation(accelerator, self.models, args, pairs, self.global_step, self.store)


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
    runs = []
    for defect_type in defect_types:
        # One [V*] run per defect type: with 'all', each gets its own folder and a fresh copy of the args.
        output_dir = output_root / defect_type if len(defect_types) > 1 or args.defect_type == "all" else output_root
        run_args = copy.copy(args)
        if len(defect_types) > 1 and args.hub_model_id:
            run_args.hub_model_id = f"{args.hub_model_id}-{defect_type}"
        runs.append(train_one_defect(run_args, defect_type, output_dir))
    return runs


if __name__ == "__main__":
    try:
        main(parse_args())
    except (TrainingError, dm.DatasetError) as error:
        raise SystemExit(f"error: {error}") from None
