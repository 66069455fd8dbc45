"""The DefectFill method in one place: the [V*] token, the prompts, the loss weights and the pure
tensor functions of the paper's training objective.

Training, inference and the tests all import these definitions, so a prompt or a weight is changed
in exactly one spot. Equation numbers refer to Song et al., *DefectFill*, CVPR 2025 (arXiv 2503.13985).
How masks reach latent size is the mask contract of `defectfill.masks`. Nothing of ours is imported here.
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
# The object branch's random mask and loss weight
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
