"""The DefectFill method in one place: the [V*] token, the prompts, the loss weights and the pure
tensor functions of the paper's training objective.

Training, inference and the tests all import these definitions, so a prompt or a weight is changed
in exactly one spot. Equation numbers refer to Song et al., *DefectFill*, CVPR 2025 (arXiv 2503.13985).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# A rare token that already exists in the CLIP vocabulary (DreamBooth style): its meaning is learned
# through the text-encoder LoRA, so no new embedding row is needed (a new row would not be trained by
# a LoRA-only optimizer).
DEFAULT_TOKEN = "sks"

# Defect branch prompt P_def and object branch prompt P_obj (paper, Sec. 3.2).
DEFECT_PROMPT_TEMPLATE = "A photo of {token}"
OBJECT_PROMPT_TEMPLATE = "A {object} with {token}"


@dataclass(frozen=True)
class LossWeights:
    """lambda_def, lambda_obj, lambda_attn of the total loss (paper Eq. 7; the seed notes agree)."""

    defect: float = 0.5
    object: float = 0.2
    attention: float = 0.05


DEFAULT_LOSS_WEIGHTS = LossWeights()
# alpha of the object-branch weight M' = M + alpha (1 - M) (paper Eq. 5).
DEFAULT_OBJECT_ALPHA = 0.3
# The random object-branch mask: a union of boxes whose sides are fractions of the image side.
DEFAULT_NUM_BOXES = 30
DEFAULT_BOX_MIN_FRACTION = 0.03
DEFAULT_BOX_MAX_FRACTION = 0.25


class InpaintingModelError(ValueError):
    """A base model that is not a 9-channel inpainting model."""


def check_inpainting_unet(unet, name: str) -> None:
    """DefectFill needs an inpainting UNet: 9 input channels (latents, mask, masked-image latents)."""
    channels = unet.config.in_channels
    if channels != 9:
        raise InpaintingModelError(
            f"{name} has a UNet with {channels} input channels; DefectFill needs an inpainting model "
            "(9 channels: latents, mask, masked-image latents), e.g. stabilityai/stable-diffusion-2-inpainting"
        )


def readable_object_name(object_class: str) -> str:
    """MVTec folder names are snake_case ("metal_nut"); prompts use the readable words ("metal nut")."""
    return object_class.replace("_", " ").strip()


def defect_prompt(token: str = DEFAULT_TOKEN) -> str:
    """P_def = "A photo of [V*]"."""
    return DEFECT_PROMPT_TEMPLATE.format(token=token)


def object_prompt(object_class: str, token: str = DEFAULT_TOKEN) -> str:
    """P_obj = "A {object} with [V*]"; also the inference prompt."""
    return OBJECT_PROMPT_TEMPLATE.format(object=readable_object_name(object_class), token=token)


# ----------------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------------


def random_box_mask(
    batch: int,
    height: int,
    width: int,
    num_boxes: int = DEFAULT_NUM_BOXES,
    min_fraction: float = DEFAULT_BOX_MIN_FRACTION,
    max_fraction: float = DEFAULT_BOX_MAX_FRACTION,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """M_rand of the object branch: per sample, the union of `num_boxes` axis-aligned boxes whose sides
    are uniform in [min_fraction, max_fraction] of the image side (height for rows, width for columns),
    placed uniformly so each box lies inside the image. Pixel resolution; (batch, 1, H, W) in {0, 1}.
    Ours where the paper is silent: the two sides are drawn independently, each relative to its own axis,
    and boxes are kept inside the image rather than clipped."""
    if not 0 < min_fraction <= max_fraction <= 1:
        raise ValueError(f"box side fractions must satisfy 0 < min <= max <= 1, got {min_fraction}, {max_fraction}")
    shape = (batch, num_boxes)
    fractions = torch.rand((2, *shape), generator=generator) * (max_fraction - min_fraction) + min_fraction
    box_h = (fractions[0] * height).round().clamp(1, height).long()
    box_w = (fractions[1] * width).round().clamp(1, width).long()
    top = (torch.rand(shape, generator=generator) * (height - box_h + 1)).floor().long()
    left = (torch.rand(shape, generator=generator) * (width - box_w + 1)).floor().long()
    rows = torch.arange(height).view(1, 1, height, 1)
    cols = torch.arange(width).view(1, 1, 1, width)
    inside_rows = (rows >= top[..., None, None]) & (rows < (top + box_h)[..., None, None])
    inside_cols = (cols >= left[..., None, None]) & (cols < (left + box_w)[..., None, None])
    union = (inside_rows & inside_cols).any(dim=1, keepdim=True)
    return union.float().to(device)


def vae_scale_factor(vae) -> int:
    """Pixels per latent pixel along a side: 8 for SD's VAE, 2 for the bundled tiny one."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def cover_latent_blocks(mask: torch.Tensor, scale: int) -> torch.Tensor:
    """The mask the model sees, at pixel resolution: every `scale` x `scale` block (one latent pixel) that holds
    any defect pixel, whole. Training (the masked image and the mask channel) and synthesis (the mask handed
    to the pipeline) both use it, so a defect a few pixels wide is never dropped at latent size, where a
    nearest-neighbour resize keeps one pixel in every block (ours; the pipeline's own resize is nearest).
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


def object_loss_weight(defect_mask: torch.Tensor, alpha: float = DEFAULT_OBJECT_ALPHA) -> torch.Tensor:
    """M' = M + alpha (1 - M) (paper Eq. 5): full weight on the defect, alpha on the rest of the object."""
    return defect_mask + alpha * (1.0 - defect_mask)


# ----------------------------------------------------------------------------------------------------
# Losses. Every "mean" is over all elements (batch, channels, pixels), as F.mse_loss(a * m, b * m).
# ----------------------------------------------------------------------------------------------------


def defect_loss(noise_pred: torch.Tensor, target: torch.Tensor, defect_mask: torch.Tensor) -> torch.Tensor:
    """L_def = mean((M * (eps - eps_hat))^2) (paper Eq. 3); M broadcasts over the latent channels."""
    return F.mse_loss((noise_pred * defect_mask).float(), (target * defect_mask).float())


def object_loss(
    noise_pred: torch.Tensor, target: torch.Tensor, defect_mask: torch.Tensor, alpha: float = DEFAULT_OBJECT_ALPHA
) -> torch.Tensor:
    """L_obj = mean((M' * (eps - eps_hat))^2) with M' = M + alpha (1 - M) (paper Eqs. 4-5). M is the real
    defect mask even though the object branch inpaints the random boxes."""
    weight = object_loss_weight(defect_mask, alpha)
    return F.mse_loss((noise_pred * weight).float(), (target * weight).float())


def attention_loss(attention_map: torch.Tensor, defect_mask: torch.Tensor) -> torch.Tensor:
    """L_attn = mean((A^[V*] - M)^2) (paper Eq. 6), both at latent size, (B, 1, h, w)."""
    return F.mse_loss(attention_map.float(), defect_mask.float())


def total_loss(terms: dict[str, torch.Tensor], weights: LossWeights = DEFAULT_LOSS_WEIGHTS) -> torch.Tensor:
    """L = lambda_def L_def + lambda_obj L_obj + lambda_attn L_attn (paper Eq. 7)."""
    return weights.defect * terms["defect"] + weights.object * terms["object"] + weights.attention * terms["attention"]
