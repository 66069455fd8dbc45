"""SDXL conditioning as pure functions: what an SDXL-inpainting UNet takes besides the noisy latents, computed the
way `StableDiffusionXLInpaintPipeline` computes it, so that a training step and the pipeline that later paints
with the LoRA condition the UNet alike.

- Text: each prompt goes through both tokenizers (padded to their length) and both text encoders; the
  encoder hidden states are the penultimate hidden states of each encoder, concatenated on the feature axis
  (B, K, d1 + d2); the pooled embedding is the projected output of the second encoder (B, d_proj)
  (`encode_prompt` of the pipeline with `clip_skip=None`).
- Micro-conditioning: six time ids per row, original size (h, w) + crop top-left (top, left) + target size (h, w)
  (`_get_add_time_ids` with `requires_aesthetics_score=False`; diffusers' `train_dreambooth_lora_sdxl.py`
  computes the same `compute_time_ids`).
- The UNet takes both as `added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}`.

Rows are independent, so one UNet call can hold a batch of defect rows and a batch of object rows, each with
its own prompt and sizes (concatenate the rows' embeddings, pooled embeddings and time ids alike).
"""

from __future__ import annotations

from typing import Sequence

import torch

from defectfill.attention import token_piece_ids, token_weights
from defectfill.errors import InpaintingModelError

TIME_IDS_PER_ROW = 6  # original (h, w), crop top-left (top, left), target (h, w)


def tokenize_prompts(tokenizers: Sequence, prompts: Sequence[str]) -> list[torch.Tensor]:
    """(B, K) input ids per tokenizer, as the pipeline tokenizes: padded to the tokenizer's length, truncated."""
    return [tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                      return_tensors="pt").input_ids for tokenizer in tokenizers]


def encode_prompt_ids(text_encoders: Sequence[torch.nn.Module], input_ids: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt embeddings (B, K, sum of the encoders' widths), pooled embeddings (B, d_proj)). Gradients flow
    (the text encoders' LoRA trains through them). The pooled embedding is the first 2-D first output among
    the encoders, as the pipeline takes it: the projected text embedding of `CLIPTextModelWithProjection`."""
    if len(text_encoders) != len(input_ids):
        raise ValueError(f"{len(text_encoders)} text encoders but {len(input_ids)} tokenizations")
    hidden, pooled = [], None
    for encoder, ids in zip(text_encoders, input_ids):
        # The device of the encoder's weights (a DDP-wrapped encoder has no `.device`).
        output = encoder(ids.to(next(encoder.parameters()).device), output_hidden_states=True)
        if pooled is None and output[0].ndim == 2:
            pooled = output[0]
        hidden.append(output.hidden_states[-2])
    if pooled is None:
        raise InpaintingModelError("no text encoder gives a pooled (projected) embedding: an SDXL base needs "
                                   "text_encoder_2 to be a CLIPTextModelWithProjection")
    return torch.cat(hidden, dim=-1), pooled


def time_ids(original_sizes: Sequence[tuple[int, int]], target_size: tuple[int, int],
             crop_top_lefts: Sequence[tuple[int, int]] | None = None, dtype: torch.dtype = torch.float32,
             device: torch.device | str | None = None) -> torch.Tensor:
    """(B, 6) SDXL micro-conditioning, one row per image: original (h, w) + crop top-left (top, left) + target (h, w).
    The pipeline paints with original = target = (height, width) and crop (0, 0) unless told otherwise."""
    crop_top_lefts = crop_top_lefts if crop_top_lefts is not None else [(0, 0)] * len(original_sizes)
    if len(crop_top_lefts) != len(original_sizes):
        raise ValueError(f"{len(original_sizes)} original sizes but {len(crop_top_lefts)} crop corners")
    rows = [[*original, *corner, *target_size] for original, corner in zip(original_sizes, crop_top_lefts)]
    return torch.tensor(rows, dtype=dtype, device=device)


def check_added_conditioning(unet, pooled_dim: int) -> None:
    """The UNet's additional embedding takes 6 time ids and the pooled embedding (what `time_ids` and
    `encode_prompt_ids` give); a UNet that wants an aesthetic score instead (the SDXL refiner) or none is an error."""
    if getattr(unet.config, "addition_embed_type", None) != "text_time":
        raise InpaintingModelError(f"the UNet's addition_embed_type is {unet.config.addition_embed_type!r}, not 'text_time': "
                                   "not an SDXL UNet")
    passed = unet.config.addition_time_embed_dim * TIME_IDS_PER_ROW + pooled_dim
    expected = unet.add_embedding.linear_1.in_features
    if passed != expected:
        raise InpaintingModelError(
            f"the UNet's added embedding takes {expected} values, but {TIME_IDS_PER_ROW} time ids and a {pooled_dim}-wide pooled "
            f"text embedding give {passed}: DefectFill supports SDXL inpainting without aesthetic-score conditioning")


def added_cond_kwargs(pooled: torch.Tensor, time_ids_: torch.Tensor) -> dict[str, torch.Tensor]:
    """The UNet's `added_cond_kwargs`: the pooled text embeddings and the time ids, one row each per image."""
    if pooled.shape[0] != time_ids_.shape[0]:
        raise ValueError(f"{pooled.shape[0]} pooled embeddings but {time_ids_.shape[0]} rows of time ids")
    return {"text_embeds": pooled, "time_ids": time_ids_.to(device=pooled.device, dtype=pooled.dtype)}


def conditioning(text_encoders: Sequence[torch.nn.Module], input_ids: Sequence[torch.Tensor],
                 original_sizes: Sequence[tuple[int, int]], target_size: tuple[int, int],
                 crop_top_lefts: Sequence[tuple[int, int]] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(encoder_hidden_states, added_cond_kwargs) of one UNet call of SDXL: the rows' prompts (tokenized by
    `tokenize_prompts`) and sizes."""
    prompt_embeds, pooled = encode_prompt_ids(text_encoders, input_ids)
    ids = time_ids(original_sizes, target_size, crop_top_lefts, dtype=prompt_embeds.dtype)
    return prompt_embeds, added_cond_kwargs(pooled, ids)


def vstar_weights(tokenizers: Sequence, input_ids: Sequence[torch.Tensor], token: str) -> torch.Tensor:
    """(B, K) `token_weights` of the [V*] token, the same for both tokenizations (SDXL's two CLIP tokenizers share
    one vocabulary, so the token's pieces sit at the same positions of both); the attention maps of the
    concatenated embeddings are read at those positions. Tokenizers that disagree are an error."""
    weights = [token_weights(ids, token_piece_ids(tokenizer, token)) for tokenizer, ids in zip(tokenizers, input_ids)]
    if any(not torch.equal(weights[0], other) for other in weights[1:]):
        raise InpaintingModelError(f"the two tokenizers place the [V*] token {token!r} at different prompt positions; "
                                   "its attention map would mix two tokens")
    return weights[0]
