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

# The 15 MVTec AD categories; used to build the tiny tokenizer's vocabulary and in the docs.
MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)


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
