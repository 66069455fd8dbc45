"""Inside the inpainting pipeline's denoising loop: the UNet passes it makes, the clean image a step predicts,
and dropping candidates part of the way through (early Low-Fidelity Selection).

The pipeline stays diffusers' own `StableDiffusionInpaintPipeline.__call__`; these pieces attach to it through
its documented hooks: a forward hook on the UNet (to count passes and keep the last call's input and output) and
`callback_on_step_end`, which may replace the loop's latents, prompt embeddings, mask and masked-image latents.
Dropping a candidate is then indexing those tensors, the scheduler's per-sample state and the generator list by
the rows kept: each kept candidate goes on exactly as it would have alone (its own seed, its own history).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from defectfill.errors import SynthesisError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def selection_call(total_calls: int, select_at: float) -> int | None:
    """After how many UNet calls the candidates are scored: round(select_at x total), at least 1; None when that is
    the last call (select_at 1: the candidates are scored finished, as the paper does)."""
    if not 0 < select_at <= 1:
        raise SynthesisError(f"--select_at must be in (0, 1], got {select_at}")
    calls = max(1, round(select_at * total_calls))
    return None if calls >= total_calls else calls


def can_predict_clean(scheduler) -> bool:
    """Whether the scheduler's model can be turned into a clean-image prediction at any step: a variance-preserving
    noise schedule (`alphas_cumprod`) and a prediction type of epsilon, v or the sample itself."""
    return getattr(scheduler, "alphas_cumprod", None) is not None and scheduler.config.get("prediction_type") in PREDICTION_TYPES


def alpha_bar(scheduler, timestep) -> torch.Tensor:
    """ᾱ_t of the scheduler's training schedule at `timestep` (interpolated between integer timesteps, for the
    schedulers that step at fractional ones)."""
    alphas = scheduler.alphas_cumprod.to(torch.float64)
    t = float(timestep)
    low = min(max(int(math.floor(t)), 0), len(alphas) - 1)
    high = min(low + 1, len(alphas) - 1)
    weight = t - low
    return (1 - weight) * alphas[low] + weight * alphas[high]


def predicted_clean_latents(scheduler, sample: torch.Tensor, model_output: torch.Tensor, timestep) -> torch.Tensor:
    """x0 predicted from the model's output at one step: `sample` is the UNet's input latents x_t (after the
    scheduler's `scale_model_input`, i.e. in the variance-preserving space every SD scheduler feeds the UNet),
    `model_output` its (guided) prediction. epsilon: x0 = (x_t - sqrt(1 - ᾱ) ε) / sqrt(ᾱ); v: x0 = sqrt(ᾱ) x_t - sqrt(1 - ᾱ) v."""
    kind = scheduler.config.get("prediction_type")
    alpha = alpha_bar(scheduler, timestep)
    a, s = float(alpha.sqrt()), float((1 - alpha).sqrt())
    sample, model_output = sample.float(), model_output.float()
    if kind == "epsilon":
        return (sample - s * model_output) / a
    if kind == "v_prediction":
        return a * sample - s * model_output
    if kind == "sample":
        return model_output
    raise SynthesisError(f"the scheduler predicts {kind!r}; a clean-image prediction needs one of {PREDICTION_TYPES}")


def is_per_sample(value, batch: int) -> bool:
    """A tensor shaped like the batch's latents (samples first, then channels and pixels): per-sample state. A 1-D
    tensor is per-timestep (timesteps, sigmas), even when it happens to be as long as the batch."""
    return torch.is_tensor(value) and value.ndim >= 2 and value.shape[0] == batch


def keep_rows(value, index: torch.Tensor, batch: int):
    """`value` with only the rows `index` of its batch dimension, for per-sample state (or a list or tuple of it, as
    schedulers keep their past outputs); anything else unchanged."""
    if is_per_sample(value, batch):
        return value[index.to(value.device)]
    if isinstance(value, (list, tuple)) and any(is_per_sample(v, batch) for v in value):
        return type(value)(keep_rows(v, index, batch) for v in value)
    return value


def keep_scheduler_rows(scheduler, index: torch.Tensor, batch: int) -> None:
    """Drop the rows not in `index` from the scheduler's per-sample state (multistep solvers keep past model
    outputs, PNDM its `ets`, UniPC its last sample): the kept samples go on with their own history."""
    for name, value in list(vars(scheduler).items()):
        kept = keep_rows(value, index, batch)
        if kept is not value:
            setattr(scheduler, name, kept)


@dataclass
class UNetCalls:
    """What the UNet saw during one pipeline call: how many passes (rows per call, a guided pair counted once),
    and the last call's input latents, timestep and output (for the clean-image prediction)."""

    guided: bool
    calls: int = 0
    passes: int = 0
    last_input: torch.Tensor | None = None
    last_timestep: torch.Tensor | None = None
    last_output: torch.Tensor | None = None
    rows_per_call: list[int] = field(default_factory=list)

    def record(self, module, args, kwargs, output) -> None:
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        rows = sample.shape[0] // (2 if self.guided else 1)
        self.calls += 1
        self.passes += rows
        self.rows_per_call.append(rows)
        self.last_input, self.last_timestep = sample[:, :4].detach(), timestep
        self.last_output = (output[0] if isinstance(output, tuple) else output.sample).detach()

    def guided_prediction(self, guidance_scale: float) -> torch.Tensor:
        """The last call's prediction as the sampler uses it: unconditional + scale x (conditional - unconditional)."""
        if not self.guided:
            return self.last_output
        uncond, cond = self.last_output.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    def input_latents(self) -> torch.Tensor:
        return self.last_input.chunk(2)[0] if self.guided else self.last_input


@contextmanager
def watch_unet(unet, guided: bool) -> Iterator[UNetCalls]:
    """Count the UNet's passes (and keep its last call) while the context is open."""
    calls = UNetCalls(guided)
    handle = unet.register_forward_hook(calls.record, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


# What the inpainting pipeline's loop lets a step-end callback replace, and how each is laid out under guidance.
LOOP_TENSORS = ("latents", "prompt_embeds", "mask", "masked_image_latents")
GUIDED_TENSORS = ("prompt_embeds", "mask", "masked_image_latents")  # unconditional rows first, then conditional


def drop_candidates(pipeline, tensors: dict, kept_rows: list[int], batch: int, generators: list) -> dict:
    """The loop's tensors with only the kept candidates' rows (both halves of the guided ones), the scheduler's
    per-sample state and the generator list (in place: the pipeline's step keyword arguments hold that list) cut
    the same way."""
    index = torch.tensor(kept_rows, dtype=torch.long)
    guided = pipeline.do_classifier_free_guidance
    out = {}
    for name, value in tensors.items():
        if guided and name in GUIDED_TENSORS:
            out[name] = torch.cat([half[index.to(half.device)] for half in value.chunk(2)])
        else:
            out[name] = value[index.to(value.device)]
    keep_scheduler_rows(pipeline.scheduler, index, batch)
    generators[:] = [generators[row] for row in kept_rows]
    return out


def decode_previews(pipeline, latents: torch.Tensor) -> list:
    """Clean-latent predictions decoded to RGB images (PIL), as the pipeline decodes its final latents."""
    vae = pipeline.vae
    with torch.no_grad():
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return pipeline.image_processor.postprocess(images, output_type="pil", do_denormalize=[True] * images.shape[0])


def selection_callback(after_calls: int, choose: Callable[[list], list[int]], calls: UNetCalls, guidance_scale: float,
                       generators: list, on_drop: Callable[[torch.Tensor], None] | None = None):
    """A `callback_on_step_end` that, after `after_calls` UNet calls, predicts every row's clean image, decodes it,
    keeps the rows `choose(previews)` returns (`previews`: one RGB image per row, in row order) and drops the others
    from the loop; `on_drop` hears the rows kept (the [V*] attention store drops the others too)."""

    def callback(pipeline, step: int, timestep, tensors: dict) -> dict:
        if calls.calls != after_calls:
            return tensors
        batch = tensors["latents"].shape[0]
        clean = predicted_clean_latents(pipeline.scheduler, calls.input_latents(), calls.guided_prediction(guidance_scale),
                                        calls.last_timestep)
        kept = choose(decode_previews(pipeline, clean))
        if on_drop is not None:
            on_drop(torch.tensor(kept, dtype=torch.long))
        return drop_candidates(pipeline, tensors, kept, batch, generators)

    return callback
