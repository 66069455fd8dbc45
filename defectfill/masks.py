"""The mask contract between training and synthesis, in one place.

A defect mask is an exact label at full resolution. Before the model sees it, it goes through the same
steps in training and in synthesis, so a LoRA is applied to masks shaped like the ones it learned on:

1. binarized: a pixel is a defect when its 8-bit value is >= `MASK_THRESHOLD` (128, half of the range: MVTec's
   masks are 0/255 and resampled masks are rarely exactly either);
2. cropped around the defect at full resolution (`mask_crop_box`) when the run learned defects in crops,
   and resized to the model's resolution so that every pixel touching the label is kept (`coverage_resize`:
   a 3 px scratch never vanishes at half the resolution);
3. grown to whole latent blocks (`cover_latent_blocks`; `model_mask` for a PIL mask), the mask the inpainting
   pipeline and the training step both hand the UNet, whose nearest resize then keeps every defect pixel;
4. at latent size, a latent pixel is masked when any pixel of its block is (`mask_to_latent`, max pooling):
   the masks the losses weigh; `latent_mask` is the same for a region mask, as the builder checks it.

The VAE's scale factor (pixels per latent pixel) comes from its config (`vae_scale_factor`): 8 for SD's VAE,
2 for the bundled tiny one. Pure numpy / torch / PIL; nothing of ours is imported here.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

MASK_THRESHOLD = 128
# Context around a defect's box in a crop, as a fraction of its side: the default of training's defect crops and of
# synthesis's crop around a mask (a run records the value it trained with, and synthesis follows it).
DEFAULT_CROP_CONTEXT = 0.5


def binarize_mask(mask: Image.Image) -> np.ndarray:
    """Boolean defect mask: value >= MASK_THRESHOLD in the mask's luminance."""
    return np.asarray(mask.convert("L")) >= MASK_THRESHOLD


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A boolean mask at (width, height), nearest; may come out empty (a tiny mask on a smaller image)."""
    if mask.shape[::-1] == tuple(size):
        return mask
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) >= MASK_THRESHOLD


def vae_scale_factor(vae_or_config) -> int:
    """Pixels per latent pixel along a side, from a VAE or its config (a dict or a diffusers config):
    2 ** (levels - 1), 8 for SD's VAE, 2 for the bundled tiny one."""
    config = getattr(vae_or_config, "config", vae_or_config)
    channels = config["block_out_channels"] if isinstance(config, dict) else config.block_out_channels
    return 2 ** (len(channels) - 1)


def mask_crop_box(mask: np.ndarray, min_size: int, context: float = DEFAULT_CROP_CONTEXT) -> tuple[int, int, int, int] | None:
    """A square (left, top, right, bottom) box around the mask's bounding box, `context` times larger,
    at least `min_size` pixels, moved to lie inside the image. None when no square fits the mask (its
    box is wider or taller than the image's short side) or the mask is empty: use the whole image then.
    Training crops around defects with it and synthesis around its masks: both see a defect at one scale."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    height, width = mask.shape
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    side = max(int(math.ceil(max(bottom - top, right - left) * (1 + context))), min_size)
    side = min(side, height, width)
    if side < max(bottom - top, right - left):
        return None
    center_y, center_x = (top + bottom) / 2, (left + right) / 2
    box_top = int(min(max(round(center_y - side / 2), 0), height - side))
    box_left = int(min(max(round(center_x - side / 2), 0), width - side))
    return box_left, box_top, box_left + side, box_top + side


def coverage_resize(mask: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """A boolean mask resized so that every output pixel that overlaps a masked input pixel is masked (box
    filter, any coverage): a 3 px scratch stays visible at half the resolution."""
    coverage = np.asarray(Image.fromarray(mask.astype(np.float32)).resize(size, Image.BOX))
    return Image.fromarray(((coverage > 1e-6) * 255).astype(np.uint8))


def cover_latent_blocks(mask: torch.Tensor, scale: int) -> torch.Tensor:
    """The mask the model sees, at pixel resolution: every `scale` x `scale` block (one latent pixel) that holds
    any defect pixel, whole. Training (the masked image and the mask channel) and synthesis (the mask handed
    to the pipeline) both use it, so a defect a few pixels wide is never dropped at latent size, where a
    nearest-neighbour resize keeps one pixel in every block (the pipeline's own resize is nearest).
    (B, 1, H, W) in {0, 1} -> same shape; a block-aligned mask is returned unchanged."""
    height, width = mask.shape[-2:]
    blocks = F.max_pool2d(mask.float(), kernel_size=scale, stride=scale, ceil_mode=True)
    covered = blocks.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)[..., :height, :width]
    return covered.to(mask.dtype)


def mask_to_latent(mask: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """The mask at latent size, a latent pixel masked when any pixel of its block is (max pooling): the
    masks the losses weigh (L_def, M', the attention target) cover every defect pixel. For a block-aligned
    mask (`cover_latent_blocks`) this equals the nearest-neighbour resize of the inpainting pipeline's
    `prepare_mask_latents`, so training and inference see masks alike."""
    return F.adaptive_max_pool2d(mask.float(), tuple(latent_size)).to(mask.dtype)


def model_mask(region_mask: Image.Image, scale: int) -> Image.Image:
    """The mask handed to the pipeline: the region mask grown to whole latent blocks (`cover_latent_blocks`,
    as the training step grows its masks), so the pipeline's nearest resize keeps every defect pixel."""
    tensor = torch.from_numpy(np.asarray(region_mask) > 0).float()[None, None]
    covered = cover_latent_blocks(tensor, scale)[0, 0].numpy()
    return Image.fromarray((covered * 255).astype(np.uint8))


def latent_mask(region_mask: Image.Image | np.ndarray, scale: int) -> np.ndarray:
    """The mask the UNet gets at latent size for a region mask (a PIL mask or a boolean / 0-1 / 0-255 array):
    `model_mask`'s blocks at latent size, i.e. every latent pixel whose block touches the mask."""
    array = np.asarray(region_mask, dtype=np.float32)
    array = array / 255.0 if array.max() > 1 else array
    tensor = torch.from_numpy((array >= 0.5).astype(np.float32))[None, None]
    size = (tensor.shape[2] // scale, tensor.shape[3] // scale)
    return mask_to_latent(tensor, size)[0, 0].numpy() > 0
