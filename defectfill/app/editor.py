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


def painted_pixels(layer: Image.Image) -> np.ndarray:
    """Where a layer is painted: not transparent and not black. The brush paints `MASK_COLOUR`; the canvas
    exports black under full transparency, and a black opaque layer (or one with no alpha) is no stroke, so an
    all-black layer is an empty mask, as a black mask file is."""
    rgba = np.asarray(layer.convert("RGBA"))
    return (rgba[..., 3] > 0) & (rgba[..., :3].max(axis=-1) > 0)


def mask_from_editor(value: dict | None, size: tuple[int, int]) -> np.ndarray:
    """The painted mask at the image's size: every pixel any layer paints (`painted_pixels`), resized nearest.
    May be empty: `painting.prepare_job` rejects that with the CLI's words."""
    painted = np.zeros((size[1], size[0]), dtype=bool)
    layers = (value or {}).get("layers") if isinstance(value, dict) else None
    for layer in layers or []:
        layer = as_pil(layer)
        if layer is None:
            continue
        stroke = painted_pixels(layer)
        if stroke.shape != painted.shape:
            stroke = np.asarray(Image.fromarray(stroke.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 0
        painted |= stroke
    return painted
