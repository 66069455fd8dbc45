"""Loading the base inpainting model for training: its components (frozen), the LoRA adapters DefectFill
trains on them, and how they run (dtype, device, memory format, compilation). Synthesis loads the whole
pipeline (`defectfill.pipelines.load_pipeline`) and checks the base model the same way."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from defectfill.errors import FlagError, InpaintingModelError

UNET_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class Models:
    """The components of a diffusers-format SD inpainting model that training uses (frozen after loading)."""

    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object


def load_models(name: str, revision: str | None = None, variant: str | None = None, cache_dir: str | None = None) -> Models:
    """The frozen components of a diffusers-format SD inpainting model (Hub id or local folder)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    source = dict(revision=revision, cache_dir=cache_dir)
    tokenizer = CLIPTokenizer.from_pretrained(name, subfolder="tokenizer", **source)
    text_encoder = CLIPTextModel.from_pretrained(name, subfolder="text_encoder", variant=variant, **source)
    vae = AutoencoderKL.from_pretrained(name, subfolder="vae", variant=variant, **source)
    unet = UNet2DConditionModel.from_pretrained(name, subfolder="unet", variant=variant, **source)
    check_inpainting_unet(unet, name)
    noise_scheduler = DDPMScheduler.from_pretrained(name, subfolder="scheduler", **source)
    for model in (text_encoder, vae, unet):
        model.requires_grad_(False)
    return Models(tokenizer, text_encoder, vae, unet, noise_scheduler)


def add_lora_adapters(models: Models, rank: int, lora_alpha: int, train_text_encoder: bool = True) -> None:
    from peft import LoraConfig

    models.unet.add_adapter(LoraConfig(r=rank, lora_alpha=lora_alpha, init_lora_weights="gaussian", target_modules=UNET_LORA_TARGETS))
    if train_text_encoder:
        models.text_encoder.add_adapter(LoraConfig(r=rank, lora_alpha=lora_alpha, init_lora_weights="gaussian",
                                                   target_modules=TEXT_ENCODER_LORA_TARGETS))


def set_memory_format(models: Models, channels_last: bool) -> None:
    """NHWC convolution weights (their convolutions then run NHWC whatever the input's layout); the step's
    time both ways is in bench/RESULTS.md (bench/train_step.py: ours vs ours_contiguous)."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    models.unet.to(memory_format=memory_format)
    models.vae.to(memory_format=memory_format)


def compile_models(models: Models, backend: str = "inductor") -> None:
    """In place (`nn.Module.compile`): accelerate's hooks, the LoRA state dicts and the attention processors
    keep seeing the same modules. bench/train_step.py measures the gain (ours_compiled). `backend` is
    torch.compile's; the suite uses "aot_eager", the same graphs without inductor's code generation."""
    models.unet.compile(backend=backend)
    models.vae.encoder.compile(backend=backend)


def check_inpainting_unet(unet, name: str) -> None:
    """DefectFill needs an inpainting UNet: 9 input channels (latents, mask, masked-image latents)."""
    channels = unet.config.in_channels
    if channels != 9:
        raise InpaintingModelError(
            f"{name} has a UNet with {channels} input channels; DefectFill needs an inpainting model "
            "(9 channels: latents, mask, masked-image latents), e.g. stabilityai/stable-diffusion-2-inpainting"
        )


def precision_dtype(name: str | None) -> torch.dtype:
    """torch dtype of a mixed-precision name ("no", "fp16", "bf16")."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(name or "no", torch.float32)


def default_device(device: str | None = None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def base_vae_scale_factor(name: str, revision: str | None = None, cache_dir: str | None = None,
                          flag: str = "--pretrained_model_name_or_path") -> int:
    """Pixels per latent pixel of a base model's VAE, from its config (nothing is loaded); `flag` names where the
    model came from in the error of a model whose config cannot be read."""
    from diffusers import AutoencoderKL

    from defectfill.masks import vae_scale_factor

    try:
        config = AutoencoderKL.load_config(name, subfolder="vae", revision=revision, cache_dir=cache_dir)
    except Exception as error:  # OSError, EnvironmentError, HFValidationError: a path or id that cannot be read
        raise InpaintingModelError(f"{flag} {name}: cannot read the model's VAE config ({error})") from error
    return vae_scale_factor(config)


def check_resolution(resolution: int, scale: int, flag: str = "--resolution") -> None:
    """The one resolution rule of every tool, checked before anything is written: a side the VAE divides into whole
    latent pixels (a multiple of its scale factor: 8 for SD, 2 for the bundled tiny model)."""
    if resolution < scale or resolution % scale:
        raise FlagError(f"{flag} {resolution} is not a multiple of {scale}, the VAE's scale factor: try "
                        f"{max(scale, round(resolution / scale) * scale)}")
