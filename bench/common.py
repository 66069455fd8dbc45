"""Shared pieces of the benchmarks: SD2-inpainting-shaped models with random weights at two sizes, device
sync and a machine description. The scripts time their variants interleaved and report medians (these
machines are noisy; always compare ratios measured in the same run)."""

from __future__ import annotations

import json
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = REPO_ROOT / "models" / "tiny-sd2-inpainting"


@dataclass(frozen=True)
class Preset:
    name: str
    resolution: int
    batch: int
    dtype: torch.dtype
    unet: dict
    vae: dict
    text_hidden: int
    text_layers: int
    text_heads: int


# sd2-community/stable-diffusion-2-inpainting's UNet and VAE configs, trimmed to the fields that shape them.
SD2_UNET = dict(
    sample_size=64, in_channels=9, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
)
SD2_VAE = dict(
    block_out_channels=(128, 256, 512, 512), latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, sample_size=512,
)
# The same structure at width 64 (a fifth of SD2's 320), for 2 CPU cores.
CPU_UNET = {**SD2_UNET, "sample_size": 32, "block_out_channels": (64, 128, 256, 256), "attention_head_dim": (1, 2, 4, 4),
            "cross_attention_dim": 256, "norm_num_groups": 32}
CPU_VAE = {**SD2_VAE, "block_out_channels": (32, 64, 128, 128), "layers_per_block": 1, "sample_size": 256}

def tiny_config(component: str) -> dict:
    """The bundled tiny model's config of a component, without diffusers' bookkeeping keys."""
    config = json.loads((TINY_MODEL / component / "config.json").read_text())
    return {key: value for key, value in config.items() if not key.startswith("_")}


PRESETS = {
    "cpu": Preset("cpu", 256, 1, torch.float32, CPU_UNET, CPU_VAE, 256, 4, 4),
    "sd2": Preset("sd2", 512, 4, torch.bfloat16, SD2_UNET, SD2_VAE, 1024, 23, 16),
    # The bundled tiny model's shape (its text encoder: width 32, 3 layers, 4 heads): smoke runs of the GPU check.
    "tiny": Preset("tiny", 64, 2, torch.float32, tiny_config("unet"), tiny_config("vae"), 32, 3, 4),
}


def build_components(preset: Preset, device: torch.device):
    """tokenizer, text encoder, VAE, UNet and DDPM scheduler with random weights in the preset's shape.
    The tokenizer is the bundled tiny one (its vocabulary sizes the text encoder)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(TINY_MODEL, subfolder="tokenizer")
    text_config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=preset.text_hidden, intermediate_size=preset.text_hidden * 4,
                                 num_attention_heads=preset.text_heads, num_hidden_layers=preset.text_layers, hidden_act="gelu",
                                 projection_dim=preset.text_hidden, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    text_encoder = CLIPTextModel(text_config)
    vae = AutoencoderKL(**preset.vae)
    unet = UNet2DConditionModel(**preset.unet)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
    for model in (text_encoder, vae, unet):
        model.requires_grad_(False)
        model.to(device, dtype=preset.dtype)
    return tokenizer, text_encoder, vae, unet, scheduler


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        model = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next((line.split(":", 1)[1].strip() for line in model.splitlines() if line.startswith("Model name")), platform.processor())
    except OSError:
        name = platform.processor()
    return f"{name}, {torch.get_num_threads()} threads"
