"""What the [V*] token looks at while synthesis paints (the app shows it): its decoder cross-attention recorded during
the denoising (`synthesize_with_attention`), the share of it inside the mask, and the map coloured over the result."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from PIL import Image

from defectfill import sdxl
from defectfill.attention import StepAveragingStore, install_vstar_capture, remove_vstar_capture, token_piece_ids, token_weights
from defectfill.errors import InpaintingModelError, SynthesisError
from defectfill.painting import Job, Scorer, SynthesisResult, SynthesisSettings, synthesize


def vstar_prompt_weights(tokenizer, prompt: str, token: str, rows: int, tokenizer_2=None) -> torch.Tensor:
    """(rows, K) `token_weights` of `prompt` tokenized as the pipeline encodes it (padded to the
    tokenizer's length); with SDXL's second tokenizer, the weights of both tokenizations (`sdxl.vstar_weights`: the
    token at the same positions of both); a prompt without the token is an error."""
    tokenizers = (tokenizer,) if tokenizer_2 is None else (tokenizer, tokenizer_2)
    input_ids = sdxl.tokenize_prompts(tokenizers, [prompt] * rows)
    try:
        if tokenizer_2 is not None:
            return sdxl.vstar_weights(tokenizers, input_ids, token)
        return token_weights(input_ids[0], token_piece_ids(tokenizer, token))
    except InpaintingModelError as error:  # SDXL's two tokenizers place the token apart
        raise SynthesisError(str(error)) from error
    except ValueError as error:
        raise SynthesisError(f"the prompt {prompt!r} does not contain the [V*] token {token!r}: "
                             "there is no attention map to show") from error


def synthesize_with_attention(pipeline, jobs: list[Job], settings: SynthesisSettings, token: str,
                              scorer: Scorer | None = None, on_step: Callable[[int, int], None] | None = None,
                              ) -> tuple[list[SynthesisResult], list[torch.Tensor]]:
    """`synthesize`, recording the [V*] token's decoder cross-attention (`attention_processor`) during the
    denoising: per job, the map of its chosen candidate, (h, w) at the latent size of the job's region,
    averaged over the steps and the decoder layers. With classifier-free guidance the UNet sees the batch
    twice, unconditional rows first (diffusers' order); only the conditional rows, whose prompt holds the
    token, are recorded. The images are those `synthesize` gives (recording computes the same attention).
    `on_step(done, total)` is called after each UNet call (one per denoising step; some schedulers, such as
    PNDM, take one more call than `num_inference_steps`: `total` is the scheduler's count). On SDXL the token's
    positions come from both tokenizers, and the capture reads every transformer layer of the decoder's blocks."""
    batch = len(jobs) * settings.num_candidates
    weights = vstar_prompt_weights(pipeline.tokenizer, settings.prompt, token, batch, getattr(pipeline, "tokenizer_2", None))
    guided = settings.guidance_scale > 1 and pipeline.unet.config.time_cond_proj_dim is None
    rows = slice(batch, 2 * batch) if guided else slice(0, batch)
    latent = settings.resolution // pipeline.vae_scale_factor
    store = StepAveragingStore()
    calls = [0]

    def count_call(module, inputs, output):
        calls[0] += 1
        if on_step is not None:
            on_step(calls[0], max(calls[0], len(pipeline.scheduler.timesteps)))

    install_vstar_capture(pipeline.unet, store)
    hook = pipeline.unet.register_forward_hook(count_call)
    try:
        with store.recording(weights, (latent, latent), rows):
            results = synthesize(pipeline, jobs, settings, scorer)
            maps = store.aggregate()[:, 0].cpu()
    finally:
        hook.remove()
        remove_vstar_capture(pipeline.unet)
    n = settings.num_candidates  # the store's rows: every candidate, job after job
    return results, [maps[i * n + result.chosen] for i, result in enumerate(results)]


def attention_in_mask(attention: torch.Tensor, region_mask: Image.Image | np.ndarray) -> float:
    """The share of the [V*] map's mass inside the mask (the map resized, bilinear, to the mask's size):
    1 when the token looks only where the defect goes."""
    mask = torch.from_numpy(np.asarray(region_mask) > 0).float()
    resized = torch.nn.functional.interpolate(attention[None, None].float(), size=tuple(mask.shape), mode="bilinear",
                                              align_corners=False)[0, 0].clamp_min(0)
    return float((resized * mask).sum() / resized.sum().clamp_min(1e-12))


def attention_overlay(result: SynthesisResult, attention: torch.Tensor, opacity: float = 0.6) -> Image.Image:
    """The [V*] map over the full-resolution result: normalised by its maximum, resized (bilinear) to the
    job's region box, coloured black-red-yellow-white ("hot") and blended over the image; outside the region
    (the whole image unless the job was cropped) the map is 0."""
    left, top, right, bottom = result.job.box
    values = attention.float().clamp_min(0)
    values = values / values.max().clamp_min(1e-12)
    resized = torch.nn.functional.interpolate(values[None, None], size=(bottom - top, right - left), mode="bilinear",
                                              align_corners=False)[0, 0].clamp(0, 1).numpy()
    heat = np.zeros((result.image.height, result.image.width), dtype=np.float32)
    heat[top:bottom, left:right] = resized
    colour = np.stack([np.clip(3 * heat, 0, 1), np.clip(3 * heat - 1, 0, 1), np.clip(3 * heat - 2, 0, 1)], axis=-1)
    image = np.asarray(result.image.convert("RGB"), dtype=np.float32) / 255
    return Image.fromarray(np.round(255 * ((1 - opacity) * image + opacity * colour)).astype(np.uint8))
