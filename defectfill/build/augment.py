"""New defect masks from a few real ones, and where on the image a defect may go.

A defect type has 5-20 real masks; a synthetic training set needs many more shapes. `augment_mask` draws a
new mask from a real one by seeded random flips, rotation, scale (0.75-1.25), mild elastic warping and a
translation (anywhere on the object, or near where the defect was with `jitter`, for position-bound
defects). `check_mask` says why a drawn mask cannot be used (empty at the model's latent size, touching the
image border, off the object, overlapping another defect of the same image); `draw_mask` draws until one
passes and counts the rejections by reason.

The object's foreground comes from a user's mask file or from `estimate_foreground`: the background
colour is the median colour of the image's border ring, and a pixel is foreground when its (lightly
blurred) colour is farther from it than Otsu's threshold over all distances. When the two classes are
barely apart, or the "foreground" covers nearly the whole image, the image is a texture and everything is
foreground (MVTec's carpet, grid, leather, tile and wood are textures by name).

Everything here is pure numpy/torch on boolean (H, W) arrays; nothing reads or writes files.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

TEXTURE_CLASSES = ("carpet", "grid", "leather", "tile", "wood")  # MVTec AD: the whole image is the object

# Reasons a drawn mask is rejected (the build summary counts them under these names).
EMPTY = "empty"
TOUCHES_BORDER = "touches_border"
EMPTY_AT_LATENT_SIZE = "empty_at_latent_size"
OFF_OBJECT = "off_object"
OVERLAPS_OTHER_DEFECT = "overlaps_other_defect"


@dataclass(frozen=True)
class AugmentSettings:
    """How far a new mask may depart from the real one it is drawn from."""

    flip: bool = True
    max_rotation: float = 180.0  # degrees, uniform in [-max, max]
    min_scale: float = 0.75
    max_scale: float = 1.25
    elastic: float = 0.04  # displacement of the elastic warp, as a fraction of the mask's size (0 = off)
    jitter: float | None = None  # None: anywhere on the object; else move at most this fraction of the image side
    border_margin: int = 1  # pixels a mask must keep from the image border


# ----------------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------------


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(top, left, bottom, right), bottom/right exclusive; None for an empty mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def elastic_field(shape: tuple[int, int], strength: float, rng: np.random.Generator, grid: int = 4) -> np.ndarray:
    """(2, H, W) smooth displacement in pixels: a coarse `grid` x `grid` random field, bicubically upsampled,
    of standard deviation `strength` x the shape's mean side."""
    coarse = rng.normal(0.0, strength * (shape[0] + shape[1]) / 2, size=(1, 2, grid, grid))
    return F.interpolate(torch.from_numpy(coarse), size=shape, mode="bicubic", align_corners=True)[0].numpy()


def warp_shape(mask: np.ndarray, rng: np.random.Generator, settings: AugmentSettings) -> np.ndarray:
    """The mask's shape (cropped to its box) flipped, rotated, scaled and elastically warped about its
    centre, on a canvas large enough that nothing is cut off; cropped to the result's box."""
    top, left, bottom, right = bounding_box(mask)
    shape = mask[top:bottom, left:right].astype(np.float32)
    if settings.flip and rng.random() < 0.5:
        shape = shape[:, ::-1]
    if settings.flip and rng.random() < 0.5:
        shape = shape[::-1, :]
    angle = math.radians(rng.uniform(-settings.max_rotation, settings.max_rotation))
    scale = rng.uniform(settings.min_scale, settings.max_scale)
    side = int(math.ceil(math.hypot(*shape.shape) * max(scale, 1.0) * (1 + 4 * settings.elastic))) + 4
    canvas = np.zeros((side, side), dtype=np.float32)
    y0, x0 = (side - shape.shape[0]) // 2, (side - shape.shape[1]) // 2
    canvas[y0 : y0 + shape.shape[0], x0 : x0 + shape.shape[1]] = shape
    # Inverse map: output pixel p samples the canvas at R(-angle) (p - c) / scale + c (+ elastic displacement).
    centre = (side - 1) / 2
    ys, xs = np.meshgrid(np.arange(side, dtype=np.float64), np.arange(side, dtype=np.float64), indexing="ij")
    cos, sin = math.cos(angle), math.sin(angle)
    dy, dx = ys - centre, xs - centre
    source_y = (cos * dy - sin * dx) / scale + centre
    source_x = (sin * dy + cos * dx) / scale + centre
    if settings.elastic > 0:
        displacement = elastic_field((side, side), settings.elastic * shape.shape[0] / side, rng)
        source_y, source_x = source_y + displacement[0], source_x + displacement[1]
    grid = torch.from_numpy(np.stack([source_x, source_y], axis=-1) * 2 / (side - 1) - 1).float()[None]
    sampled = F.grid_sample(torch.from_numpy(canvas)[None, None], grid, mode="bilinear", align_corners=True)[0, 0].numpy()
    warped = sampled >= 0.5
    box = bounding_box(warped)
    if box is None:
        return np.zeros((0, 0), dtype=bool)
    return warped[box[0] : box[2], box[1] : box[3]]


def place_shape(shape: np.ndarray, size: tuple[int, int], top: int, left: int) -> np.ndarray:
    """An (H, W) mask with `shape` at (top, left); parts outside the image are cut off."""
    height, width = size
    mask = np.zeros((height, width), dtype=bool)
    first_row, first_col = max(top, 0), max(left, 0)
    end_row, end_col = min(top + shape.shape[0], height), min(left + shape.shape[1], width)
    if end_row > first_row and end_col > first_col:
        mask[first_row:end_row, first_col:end_col] = shape[first_row - top : end_row - top, first_col - left : end_col - left]
    return mask


def augment_mask(mask: np.ndarray, rng: np.random.Generator, settings: AugmentSettings,
                 foreground: np.ndarray | None = None) -> np.ndarray:
    """A new mask of the same size drawn from `mask`. Placement: with `settings.jitter`, the warped shape's
    centre moves at most jitter x the image side from the real mask's centre; otherwise the centre is a
    random foreground pixel (any pixel without a foreground). May come out empty, cut by the border or off
    the object: `check_mask` says so."""
    height, width = mask.shape
    box = bounding_box(mask)
    if box is None:
        return np.zeros_like(mask, dtype=bool)
    shape = warp_shape(mask, rng, settings)
    if settings.jitter is not None:
        centre_y = (box[0] + box[2]) / 2 + rng.uniform(-settings.jitter, settings.jitter) * height
        centre_x = (box[1] + box[3]) / 2 + rng.uniform(-settings.jitter, settings.jitter) * width
    else:
        allowed = foreground if foreground is not None and foreground.any() else np.ones((height, width), dtype=bool)
        ys, xs = np.nonzero(allowed)
        pick = int(rng.integers(len(ys)))
        centre_y, centre_x = ys[pick] + 0.5, xs[pick] + 0.5
    top, left = int(round(centre_y - shape.shape[0] / 2)), int(round(centre_x - shape.shape[1] / 2))
    return place_shape(shape, (height, width), top, left)


# ----------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------


def touches_border(mask: np.ndarray, margin: int = 1) -> bool:
    """True when a mask pixel lies within `margin` pixels of the image border (or was cut by it)."""
    if margin <= 0:
        return False
    inner = np.zeros_like(mask, dtype=bool)
    inner[margin:-margin, margin:-margin] = True
    return bool((mask & ~inner).any())


def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Binary dilation by a (2 pixels + 1) square."""
    if pixels <= 0:
        return mask.astype(bool)
    tensor = torch.from_numpy(mask.astype(np.float32))[None, None]
    return F.max_pool2d(tensor, 2 * pixels + 1, stride=1, padding=pixels)[0, 0].numpy() > 0


def on_object_fraction(mask: np.ndarray, foreground: np.ndarray) -> float:
    """Fraction of the mask's pixels that lie on the foreground."""
    total = int(mask.sum())
    return float((mask & foreground).sum()) / total if total else 0.0


def check_mask(mask: np.ndarray, *, visible_at_latent: Callable[[np.ndarray], bool] | None = None,
               foreground: np.ndarray | None = None, min_on_object: float = 0.9, avoid: np.ndarray | None = None,
               border_margin: int = 1, gap: int = 1) -> str | None:
    """Why the mask cannot be used (one of the reason names above), or None when it can. `avoid` is the
    union of the image's other defect masks (kept `gap` pixels apart); no `foreground` skips the object test."""
    if not mask.any():
        return EMPTY
    if touches_border(mask, border_margin):
        return TOUCHES_BORDER
    if visible_at_latent is not None and not visible_at_latent(mask):
        return EMPTY_AT_LATENT_SIZE
    if foreground is not None and on_object_fraction(mask, foreground) < min_on_object:
        return OFF_OBJECT
    if avoid is not None and (mask & dilate(avoid, gap)).any():
        return OVERLAPS_OTHER_DEFECT
    return None


def draw_mask(sources: list[np.ndarray], rng: np.random.Generator, settings: AugmentSettings, max_attempts: int,
              **checks) -> tuple[np.ndarray | None, int | None, Counter]:
    """Augmented masks drawn (each from a random source mask) until one passes `check_mask(**checks)`:
    (mask, source index, rejections by reason); (None, None, rejections) after `max_attempts`."""
    rejected: Counter = Counter()
    for _ in range(max_attempts):
        source = int(rng.integers(len(sources)))
        mask = augment_mask(sources[source], rng, settings, checks.get("foreground"))
        reason = check_mask(mask, border_margin=settings.border_margin, **checks)
        if reason is None:
            return mask, source, rejected
        rejected[reason] += 1
    return None, None, rejected


def pick_mask(sources: list[np.ndarray], start: int, **checks) -> tuple[np.ndarray | None, int | None, Counter]:
    """For given masks (held-out or user-drawn, used as they are): the first that passes `check_mask`, trying
    them in order from `start` (cycling); rejections by reason."""
    rejected: Counter = Counter()
    for offset in range(len(sources)):
        index = (start + offset) % len(sources)
        reason = check_mask(sources[index], border_margin=0, **checks)
        if reason is None:
            return sources[index], index, rejected
        rejected[reason] += 1
    return None, None, rejected


# ----------------------------------------------------------------------------------------------------
# Foreground
# ----------------------------------------------------------------------------------------------------


def otsu_threshold(values: np.ndarray, bins: int = 256) -> tuple[float, float]:
    """(threshold, separation): Otsu's threshold of a 1-D sample and the between-class variance it reaches
    divided by the total variance (0: one class, 1: two perfectly separated values)."""
    values = values.ravel().astype(np.float64)
    total_variance = values.var()
    if total_variance == 0:
        return float(values[0]), 0.0
    counts, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(counts) / counts.sum()
    mean = np.cumsum(counts * centres) / counts.sum()
    between = (mean[-1] * weight - mean) ** 2 / np.clip(weight * (1 - weight), 1e-12, None)
    between[(weight <= 0) | (weight >= 1)] = 0
    best = int(np.argmax(between))
    return float(edges[best + 1]), float(between[best] / total_variance)


def estimate_foreground(image: Image.Image, border: float = 0.04, min_separation: float = 0.6,
                        max_coverage: float = 0.9, min_contrast: float = 20.0) -> np.ndarray:
    """Boolean foreground of a good image: pixels whose blurred colour is farther from the border ring's
    median colour than Otsu's threshold. The whole image when the split is weak (separation below
    `min_separation`, class means closer than `min_contrast` grey levels) or covers more than `max_coverage`
    (a texture: the object fills the frame)."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    height, width = array.shape[:2]
    blurred = F.avg_pool2d(torch.from_numpy(array).permute(2, 0, 1)[None], 5, stride=1, padding=2,
                           count_include_pad=False)[0].permute(1, 2, 0).numpy()
    ring = max(1, int(round(border * min(height, width))))
    edge = np.ones((height, width), dtype=bool)
    edge[ring:-ring, ring:-ring] = False
    background = np.median(blurred[edge], axis=0)
    distance = np.linalg.norm(blurred - background, axis=-1)
    threshold, separation = otsu_threshold(distance)
    foreground = distance > threshold
    everything = np.ones((height, width), dtype=bool)
    if not foreground.any() or foreground.all() or separation < min_separation:
        return everything
    contrast = distance[foreground].mean() - distance[~foreground].mean()
    if contrast < min_contrast or foreground.mean() > max_coverage:
        return everything
    return foreground


def is_texture_class(object_class: str | None) -> bool:
    return object_class in TEXTURE_CLASSES
