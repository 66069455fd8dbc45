"""A tiny SDXL-inpainting pipeline with random weights, built offline, for the SDXL tests.

The component shapes are diffusers' SDXL test dummies (`get_dummy_components` of its SDXL inpainting tests) with a
9-channel UNet; both tokenizers are the bundled tiny model's (the text encoders are sized from it). Cross-attention
sits at one level with two transformer layers per block, as SDXL's (1, 2, 10) does at three; the VAE has SDXL's
scaling factor, so code that hard-codes SD's 0.18215 shows.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.conftest import TINY_MODEL

SLOW_TOKENIZER_FILES = ("vocab.json", "merges.txt")
SDXL_VAE_SCALING_FACTOR = 0.13025  # stable-diffusion-xl-1.0-inpainting-0.1's vae/config.json


def tiny_sdxl_unet_config() -> dict:
    """The UNet: SDXL's structure (text_time additions, cross-attention only on the deeper level) at width 32/64.
    projection_class_embeddings_input_dim = 6 time ids x addition_time_embed_dim 8 + 32 pooled text dims."""
    return dict(
        sample_size=32, in_channels=9, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80, cross_attention_dim=64,
    )


def build_tiny_sdxl_inpainting(directory: Path) -> Path:
    """Write the pipeline to `directory` (`save_pretrained`, as users' bases are laid out) and return it. The first
    text encoder's keys get CLIP's `text_model.` level, as the bundled SD model's (`scripts/tiny/model.py`):
    transformers 5 saves a CLIPTextModel without it and transformers 4 would then initialise it at random; the
    CLIPTextModelWithProjection is saved with it (`text_model.*`, `text_projection.weight`), as transformers 4 expects.
    Both tokenizer folders also get the bundled tokenizer's vocab.json and merges.txt, as the bundled model's has."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from scripts.tiny.model import save_pipeline

    tokenizer = CLIPTokenizer.from_pretrained(TINY_MODEL, subfolder="tokenizer")
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
        hidden_act="gelu", projection_dim=32, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_sdxl_unet_config())
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        sample_size=128, scaling_factor=SDXL_VAE_SCALING_FACTOR)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(text_config)
    torch.manual_seed(0)
    text_encoder_2 = CLIPTextModelWithProjection(text_config)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                       timestep_spacing="leading")
    pipeline = StableDiffusionXLInpaintPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer,
        unet=unet, scheduler=scheduler, requires_aesthetics_score=False, add_watermarker=False,
    )
    save_pipeline(pipeline, Path(directory))
    for tokenizer_folder in ("tokenizer", "tokenizer_2"):  # transformers 4's CLIPTokenizer reads these, not tokenizer.json
        for name in SLOW_TOKENIZER_FILES:
            shutil.copy(TINY_MODEL / "tokenizer" / name, Path(directory) / tokenizer_folder / name)
    return Path(directory)
