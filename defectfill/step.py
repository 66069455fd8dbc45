"""One DefectFill training step: `DefectFillStep` holds the models, the prompt ids, the step's settings, the
latent cache and the [V*] attention store, and `step(batch)` gives the paper's three losses (defect, object,
attention; `defectfill.method`) inside a context that records the [V*] maps and stops recording when it
exits, so no caller resets the store by hand.

    step = DefectFillStep.build(models, object_class="metal_nut", token="sks", config=StepConfig())
    with step(batch) as output:          # records the object branch's [V*] maps
        output.losses["loss"].backward() # gradient checkpointing recomputes inside the context
    # here the store is empty and idle again

The training script, the tiny model's pre-training and measurement, and the benchmarks all call it.

On an SDXL base (`Models.text_encoder_2` set) the step conditions the UNet as `StableDiffusionXLInpaintPipeline`
does (`defectfill.sdxl`): both prompts through both tokenizers and text encoders, the pooled embeddings and time
ids as `added_cond_kwargs` of the same single UNet call of 2B rows. The time ids are the ones the pipeline paints
with by default: original size = target size = the training image's (height, width), crop corner (0, 0). The
training images are resized (and, with augmentation, cropped) from photos of other sizes; conditioning on their
true original size and crop would teach the LoRA a conditioning that synthesis never passes, so the step uses
the pipeline's defaults, and training and painting see the same micro-conditioning.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import torch

from defectfill import masks, method, sdxl
from defectfill.attention import VStarAttentionStore, install_vstar_capture, token_piece_ids, token_weights
from defectfill.models import Models

if TYPE_CHECKING:
    from defectfill.training.settings import MethodSettings

# ----------------------------------------------------------------------------------------------------
# Prompts, latents and the step's random draws
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StepConfig:
    """What a step needs besides the batch and the models (from the flags); the defaults are the paper's."""

    loss_weights: method.LossWeights = method.DEFAULT_LOSS_WEIGHTS
    object_alpha: float = method.DEFAULT_OBJECT_ALPHA
    num_boxes: int = method.DEFAULT_NUM_BOXES
    box_min_fraction: float = method.DEFAULT_BOX_MIN_FRACTION
    box_max_fraction: float = method.DEFAULT_BOX_MAX_FRACTION

    @classmethod
    def from_settings(cls, settings: MethodSettings) -> "StepConfig":
        """A training run's step (`TrainingSettings.method`: the flags' loss weights, alpha and boxes)."""
        return cls(settings.loss_weights, settings.object_alpha, settings.num_boxes, settings.box_min_fraction,
                   settings.box_max_fraction)


@dataclass
class PromptIds:
    """Token ids of P_def and P_obj (1, K each) and the [V*] weights over P_obj's positions (1, K). SDXL's second
    tokenizer's ids of the same prompts are `defect_2` / `object_2` (None for SD 1.x / 2.x)."""

    defect: torch.Tensor
    object: torch.Tensor
    vstar_weights: torch.Tensor
    defect_2: torch.Tensor | None = None
    object_2: torch.Tensor | None = None


def tokenize(tokenizer, prompt: str | list[str]) -> torch.Tensor:
    return tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def build_prompt_ids(tokenizer, object_class: str, token: str, tokenizer_2=None) -> PromptIds:
    object_ids = tokenize(tokenizer, method.object_prompt(object_class, token))
    if tokenizer_2 is None:
        weights = token_weights(object_ids, token_piece_ids(tokenizer, token))
        return PromptIds(tokenize(tokenizer, method.defect_prompt(token)), object_ids, weights)
    # SDXL: the [V*] positions are the same in both tokenizations (checked), so one row of weights reads the
    # attention over the concatenated embeddings.
    tokenizers = (tokenizer, tokenizer_2)
    defect_ids = sdxl.tokenize_prompts(tokenizers, [method.defect_prompt(token)])
    object_ids = sdxl.tokenize_prompts(tokenizers, [method.object_prompt(object_class, token)])
    weights = sdxl.vstar_weights(tokenizers, object_ids, token)
    return PromptIds(defect_ids[0], object_ids[0], weights, defect_ids[1], object_ids[1])


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

    def posterior(self, vae, images: torch.Tensor, defect_masks: torch.Tensor,
                  row_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of cat([I, (1 - M) I]) for the batch, encoding only rows not seen before."""
        rows = row_index.tolist()
        missing = [i for i, row in enumerate(rows) if row not in self.posteriors]
        if missing:
            picked = images[missing]
            mean, std = encode_posterior(vae, torch.cat([picked, picked * (1 - defect_masks[missing])]))
            for k, i in enumerate(missing):
                self.posteriors[rows[i]] = (mean[[k, k + len(missing)]], std[[k, k + len(missing)]])
        mean = torch.stack([self.posteriors[row][0] for row in rows], dim=1).flatten(0, 1)  # I rows, then (1 - M) I rows
        std = torch.stack([self.posteriors[row][1] for row in rows], dim=1).flatten(0, 1)
        return mean, std


def diffusion_target(noise_scheduler, latents, noise, timesteps) -> torch.Tensor:
    """The paper writes the losses in epsilon; for a v-prediction base model (SD 2 at 768 px, the bundled tiny
    model) the same masked losses apply to the velocity target."""
    if noise_scheduler.config.prediction_type == "epsilon":
        return noise
    if noise_scheduler.config.prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {noise_scheduler.config.prediction_type!r}")


# ----------------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------------


@dataclass
class StepOutput:
    """`losses`: {"defect", "object", "attention", "loss"}; `attention_map`: A^[V*] of the object branch at
    latent size (B, 1, h, w), None when the attention loss is off."""

    losses: dict[str, torch.Tensor]
    attention_map: torch.Tensor | None = None


@dataclass
class DefectFillStep:
    """One DefectFill step over a batch {"pixel_values", "masks"[, "sample_seed", "row_index"]}.

    Both branches share x0, one noise sample and one timestep; they run as one UNet call of batch 2B
    (defect rows first, object rows second), and the three images of each sample are VAE-encoded in one
    call (with a `latent_cache`, only the random-box background is encoded)."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    noise_scheduler: object
    prompt_ids: PromptIds
    config: StepConfig = field(default_factory=StepConfig)
    store: VStarAttentionStore | None = None
    latent_cache: LatentCache | None = None
    text_encoder_2: torch.nn.Module | None = None  # SDXL's second text encoder (None: SD 1.x / 2.x)

    @classmethod
    def build(cls, models: Models, object_class: str, token: str = method.DEFAULT_TOKEN, config: StepConfig | None = None,
              latent_cache: LatentCache | None = None, capture: bool = True) -> "DefectFillStep":
        """A step on `models`, with the [V*] capture installed on the UNet's decoder cross-attention."""
        store = None
        if capture:
            store = VStarAttentionStore()
            install_vstar_capture(models.unet, store)
        prompt_ids = build_prompt_ids(models.tokenizer, object_class, token, models.tokenizer_2)
        return cls(models.unet, models.vae, models.text_encoder, models.noise_scheduler, prompt_ids, config or StepConfig(),
                   store, latent_cache, models.text_encoder_2)

    @property
    def records_attention(self) -> bool:
        return self.store is not None and self.config.loss_weights.attention > 0

    @contextmanager
    def __call__(self, batch: dict) -> Iterator[StepOutput]:
        """The step's losses; the [V*] store records while the context is open (call backward inside it:
        gradient checkpointing recomputes the recorded layers in backward) and is reset when it closes."""
        try:
            yield self.losses(batch)
        finally:
            if self.store is not None:
                self.store.reset()

    def losses(self, batch: dict) -> StepOutput:
        images, defect_masks = batch["pixel_values"], batch["masks"]
        b, _, height, width = images.shape
        draw = RandomDraws(batch.get("sample_seed"), images.device)
        random_masks = draw.box_masks(b, height, width, self.config).to(images.dtype)
        # The inputs the UNet sees use the masks grown to whole latent blocks (thin defects survive).
        scale = masks.vae_scale_factor(self.vae)
        covered, random_covered = masks.cover_latent_blocks(defect_masks, scale), masks.cover_latent_blocks(random_masks, scale)
        latents, defect_background, object_background = self.encode(images, covered, random_covered, batch.get("row_index"), draw)
        latent_size = tuple(latents.shape[-2:])

        # In logical order (randn_like follows the strides of its input, which depend on how the latents were made).
        noise = draw.normal(latents.shape).to(latents.dtype)
        timesteps = draw.timesteps(b, self.noise_scheduler.config.num_train_timesteps).long()
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        defect_mask = masks.mask_to_latent(defect_masks, latent_size).to(latents.dtype)
        random_mask = masks.mask_to_latent(random_masks, latent_size).to(latents.dtype)

        # diffusers order: cat([noisy latents, mask, masked-image latents]); what the pretrained weights expect.
        unet_input = torch.cat([
            torch.cat([noisy, defect_mask, defect_background], dim=1),
            torch.cat([noisy, random_mask, object_background], dim=1),
        ])
        device = latents.device
        encoder_hidden_states, added = self.conditioning(b, (height, width), device)
        if self.records_attention:
            self.store.start(self.prompt_ids.vstar_weights.expand(b, -1).to(device), latent_size, rows=slice(b, 2 * b))
        prediction = self.unet(unet_input, timesteps.repeat(2), encoder_hidden_states, added_cond_kwargs=added,
                               return_dict=False)[0]
        defect_pred, object_pred = prediction.float().chunk(2)

        target = diffusion_target(self.noise_scheduler, latents, noise, timesteps).float()
        # A^[V*] is the plain mean over the captured decoder cross-attention layers (the paper's "average over
        # decoder layers"). On SDXL that is 36 layers, 30 of them in up_blocks.0 (10 transformer layers x 3
        # attentions, at 1/4 of the latent side): SDXL's map is dominated by those coarse layers. Kept as the paper
        # defines it; a per-block weighting would be a change to the method, unmeasured.
        attention_map = self.store.aggregate() if self.records_attention else None
        terms = {
            "defect": method.defect_loss(defect_pred, target, defect_mask),
            "object": method.object_loss(object_pred, target, defect_mask, self.config.object_alpha),
            "attention": method.attention_loss(attention_map, defect_mask) if attention_map is not None else torch.zeros((), device=device),
        }
        terms["loss"] = method.total_loss(terms, self.config.loss_weights)
        return StepOutput(terms, attention_map)

    def conditioning(self, b: int, size: tuple[int, int], device) -> tuple[torch.Tensor, dict | None]:
        """(encoder_hidden_states, added_cond_kwargs) of the 2B rows (P_def rows, then P_obj rows); the added
        conditioning is None for SD 1.x / 2.x. SDXL's time ids: original = target = `size`, crop (0, 0), what the
        pipeline paints with (see the module docstring)."""
        ids = self.prompt_ids
        if self.text_encoder_2 is None:
            prompt_embeds = self.text_encoder(torch.cat([ids.defect, ids.object]).to(device))[0]
            return prompt_embeds.repeat_interleave(b, dim=0), None
        input_ids = [torch.cat([ids.defect, ids.object]).to(device), torch.cat([ids.defect_2, ids.object_2]).to(device)]
        prompt_embeds, pooled = sdxl.encode_prompt_ids([self.text_encoder, self.text_encoder_2], input_ids)
        pooled = pooled.repeat_interleave(b, dim=0)
        time_ids = sdxl.time_ids([size] * 2 * b, size, dtype=pooled.dtype, device=device)
        return prompt_embeds.repeat_interleave(b, dim=0), sdxl.added_cond_kwargs(pooled, time_ids)

    def encode(self, images, defect_masks, random_masks, row_index, draw: RandomDraws):
        """(x0, b_def, b_rand) latents: the image, its defect background (1 - M) I and its random-box
        background (1 - M_rand) I (masks as the model sees them), drawn from their posteriors in one call."""
        if self.latent_cache is not None:
            cached_mean, cached_std = self.latent_cache.posterior(self.vae, images, defect_masks, row_index)
            random_mean, random_std = encode_posterior(self.vae, images * (1 - random_masks))
            mean, std = torch.cat([cached_mean, random_mean]), torch.cat([cached_std, random_std])
        else:
            mean, std = encode_posterior(self.vae, torch.cat([images, images * (1 - defect_masks), images * (1 - random_masks)]))
        return sample_latents(self.vae, mean, std, draw).chunk(3)
