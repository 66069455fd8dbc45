"""The mask editor's values: a good image with an editable mask layer, and the mask a visitor painted."""

from __future__ import annotations

import numpy as np
from PIL import Image

from defectfill.painting import mask_at_image_size

MASK_COLOUR = (255, 40, 40)


def as_pil(value) -> Image.Image | None:
    """A PIL image of what Gradio hands over (PIL, numpy array or file path)."""
    if value is None:
        return None
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, np.ndarray):
        return Image.fromarray(value)
    return Image.open(value)


def mask_layer(mask: Image.Image | np.ndarray, size: tuple[int, int]) -> Image.Image:
    """A mask as an editor layer: the mask colour, opaque where the mask is set, transparent elsewhere."""
    binary = mask_at_image_size(mask if isinstance(mask, np.ndarray) else mask.convert("L"), size)
    layer = np.zeros((size[1], size[0], 4), dtype=np.uint8)
    layer[binary] = (*MASK_COLOUR, 255)
    return Image.fromarray(layer, "RGBA")


def editor_value(image: Image.Image, mask: Image.Image | np.ndarray | None = None) -> dict:
    """The ImageEditor value showing `image` with an optional mask layer to edit."""
    return {"background": image, "layers": [mask_layer(mask, image.size)] if mask is not None else [], "composite": None}


def mask_from_editor(value: dict | None, size: tuple[int, int]) -> np.ndarray:
    """The painted mask at the image's size: every pixel any layer paints (alpha > 0), resized nearest.
    May be empty: `painting.prepare_job` rejects that with the CLI's words."""
    painted = np.zeros((size[1], size[0]), dtype=bool)
    for layer in (value or {}).get("layers") or []:
        layer = as_pil(layer)
        if layer is None:
            continue
        alpha = np.asarray(layer.convert("RGBA"))[..., 3] > 0
        if alpha.shape != painted.shape:
            alpha = np.asarray(Image.fromarray(alpha.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 0
        painted |= alpha
    return painted
