"""Procedural defect families that neither the tiny model's pre-training nor its config ever saw.

Each family is a few-shot defect dataset in the MVTec AD layout, written by `write_families`: a clean object
class that is not a pre-training class, with one defect type whose colour, texture and shape the pre-training
never shows (its captions name no colour in the families' hue bands, its clean classes have no such colour or
texture; only its VAE saw random colours and patterns):

| family | object | defect | what is new |
|---|---|---|---|
| thin | hazelnut (a brown speckled nut on black) | crack: a 2-3 px mint (hue 160) polyline | colour, shape |
| blob | capsule (a plain cream surface) | stain: a mottled chartreuse (hue 85) blob | colour |
| texture | zipper (a matte violet-grey surface) | rough: a blob where the surface turns into a high-contrast cross-hatch of its own colour | texture |

`scripts/check_generalisation.py` trains a DefectFill LoRA on each with the project's CLI and measures, on
the held-out images, how far what the model paints is from the real defect. The same seed writes the same bytes.

    python scripts/defect_families.py --output_dir outputs/defect_families
"""  # noqa: E501 (a markdown table)

from __future__ import annotations

import argparse
import colorsys
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from .synthetic_data import _grid, replace_atomically, write_mvtec_category

SIZE = 128


def hsv_rgb(hue_degrees: float, saturation: float, value: float) -> np.ndarray:
    """An RGB colour (0-255) from hue in degrees, saturation and value in [0, 1]."""
    return np.asarray(colorsys.hsv_to_rgb(hue_degrees / 360, saturation, value), dtype=np.float32) * 255


# Hue bands (degrees) no pre-training caption names and no clean pre-training class holds: only the VAE saw them
# (tests/test_generalisation.py checks the pre-training colours against them).
UNSEEN_HUE_BANDS = ((66.0, 104.0), (150.0, 215.0))
CRACK_RGB = hsv_rgb(160, 0.75, 0.85)  # mint
STAIN_RGB = hsv_rgb(85, 0.85, 0.8)  # chartreuse


# ----------------------------------------------------------------------------------------------------
# Clean objects, float arrays in [0, 255] of shape (size, size, 3)
# ----------------------------------------------------------------------------------------------------


def hazelnut(rng: np.random.Generator, size: int) -> np.ndarray:
    x, y = _grid(size)
    cx, cy = 0.5 + rng.uniform(-0.04, 0.04, size=2)
    radius = np.hypot(x - cx, y - cy)
    angle = np.arctan2(y - cy, x - cx)
    shell = radius < 0.36 * (1 + 0.05 * np.sin(2 * angle + rng.uniform(0, 6.3)))
    streaks = np.sin(angle * rng.integers(14, 22) + 8 * radius)
    tone = 1 + 0.12 * streaks - 0.5 * radius + rng.normal(0, 0.05, (size, size))
    brown = np.array([150, 95, 50], dtype=np.float32)
    background = 18 + rng.normal(0, 2, (size, size, 1))
    return np.where(shell[..., None], brown[None, None] * tone[..., None], background)


def capsule(rng: np.random.Generator, size: int) -> np.ndarray:
    x, y = _grid(size)
    cream = np.array([228, 214, 188], dtype=np.float32) * rng.uniform(0.92, 1.02)
    shade = 1 - 0.08 * (y - 0.5) + rng.normal(0, 0.015, (size, size))
    return cream[None, None] * shade[..., None]


def zipper(rng: np.random.Generator, size: int) -> np.ndarray:
    x, y = _grid(size)
    slate = np.array([122, 106, 134], dtype=np.float32) * rng.uniform(0.95, 1.05)
    shade = 1 + 0.05 * np.sin(2 * np.pi * (x + y) * rng.uniform(0.5, 1.0)) + rng.normal(0, 0.01, (size, size))
    return slate[None, None] * shade[..., None]


# ----------------------------------------------------------------------------------------------------
# Defects: (mask, painted image)
# ----------------------------------------------------------------------------------------------------


def _centre_on(rng: np.random.Generator, support: np.ndarray, size: int) -> tuple[float, float]:
    ys, xs = np.nonzero(support)
    pick = rng.integers(len(ys))
    return (xs[pick] + 0.5) / size, (ys[pick] + 0.5) / size


def crack(rng: np.random.Generator, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(defective image, mask): a mint polyline of 2-4 segments, 2-3 px wide, on the nut."""
    size = image.shape[0]
    x, y = _grid(size)
    support = image[..., 0] > 60
    inner = support & (np.hypot(x - 0.5, y - 0.5) < 0.25)
    px, py = _centre_on(rng, inner, size)
    angle, width = rng.uniform(0, np.pi), rng.uniform(1.0, 1.5) / size
    mask = np.zeros((size, size), dtype=bool)
    for _ in range(int(rng.integers(2, 5))):
        length = rng.uniform(0.06, 0.12)
        qx, qy = px + length * np.cos(angle), py + length * np.sin(angle)
        t = np.clip(((x - px) * (qx - px) + (y - py) * (qy - py)) / length**2, 0, 1)
        mask |= np.hypot(x - (px + t * (qx - px)), y - (py + t * (qy - py))) < width
        px, py, angle = qx, qy, angle + rng.uniform(-0.8, 0.8)
    mask &= support
    shade = rng.normal(1.0, 0.05, (size, size, 1))
    return np.where(mask[..., None], CRACK_RGB[None, None] * shade, image), mask


def _blob_mask(rng: np.random.Generator, size: int, radius_range: tuple[float, float]) -> np.ndarray:
    x, y = _grid(size)
    cx, cy = rng.uniform(0.25, 0.75, size=2)
    angle = np.arctan2(y - cy, x - cx)
    radius = rng.uniform(*radius_range) * (1 + 0.25 * np.sin(3 * angle + rng.uniform(0, 6.3)))
    return np.hypot(x - cx, y - cy) < radius


def stain(rng: np.random.Generator, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A small saturated chartreuse blob, mottled."""
    size = image.shape[0]
    mask = _blob_mask(rng, size, (0.05, 0.09))
    mottle = np.kron(rng.normal(1.0, 0.1, (size // 4, size // 4)), np.ones((4, 4)))[..., None]
    return np.where(mask[..., None], STAIN_RGB[None, None] * mottle, image), mask


HATCH_PERIOD = 6  # pixels at 128 px: 3 px at the tiny model's 64 px, still resolved


def rough(rng: np.random.Generator, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A blob where the surface becomes a cross-hatch of its own colour: dark and light diagonal lines."""
    size = image.shape[0]
    mask = _blob_mask(rng, size, (0.08, 0.12))
    rows, cols = np.mgrid[0:size, 0:size]
    offset = rng.integers(0, HATCH_PERIOD)
    lines = (((rows + cols + offset) % HATCH_PERIOD) < 2) | (((rows - cols + offset) % HATCH_PERIOD) < 2)
    hatch = image * np.where(lines, 0.35, 1.35)[..., None]
    return np.where(mask[..., None], hatch, image), mask


# ----------------------------------------------------------------------------------------------------
# Statistics of a defect region (scripts/check_generalisation.py, scripts/measure_tiny_model.py)
# ----------------------------------------------------------------------------------------------------


def luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., :3] @ np.array([0.299, 0.587, 0.114])


def local_contrast(rgb: np.ndarray) -> np.ndarray:
    """|luminance - its 3x3 mean| per pixel (edges replicated), 0-255 units: zero on a flat or linearly shaded
    surface, high on a fine texture."""
    grey = luminance(rgb.astype(np.float64))
    padded = np.pad(grey, 1, mode="edge")
    rows, cols = grey.shape
    box = sum(padded[dy : dy + rows, dx : dx + cols] for dy in range(3) for dx in range(3)) / 9
    return np.abs(grey - box)


@dataclass(frozen=True)
class RegionStatistics:
    colour: np.ndarray  # mean RGB inside the mask, 0-255
    texture: float  # mean local contrast inside the mask, 0-255

    @classmethod
    def of(cls, image: Image.Image, mask: np.ndarray) -> "RegionStatistics":
        rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
        return cls(rgb[mask].mean(0), float(local_contrast(rgb)[mask].mean()))

    @classmethod
    def mean(cls, statistics: list["RegionStatistics"]) -> "RegionStatistics":
        return cls(np.mean([s.colour for s in statistics], axis=0), float(np.mean([s.texture for s in statistics])))


@dataclass(frozen=True)
class Family:
    name: str
    object_class: str
    defect_type: str
    render: Callable[[np.random.Generator, int], np.ndarray]
    add_defect: Callable[[np.random.Generator, np.ndarray], tuple[np.ndarray, np.ndarray]]  # -> (defective, mask)
    headline: str  # the statistic the family is about: "colour" or "texture"
    description: str


FAMILIES = (
    Family("thin", "hazelnut", "crack", hazelnut, crack, "colour", "2-3 px mint (hue 160) crack on a brown nut"),
    Family("blob", "capsule", "stain", capsule, stain, "colour", "small mottled chartreuse (hue 85) blob on cream"),
    Family("texture", "zipper", "rough", zipper, rough, "texture", "cross-hatched patch of the surface's own colour"),
)


def write_families(output_dir: str | os.PathLike, seed: int = 0, train_good: int = 6, test_good: int = 6,
                   defects: int = 9) -> Path:
    """Every family under `output_dir` (replaced atomically); the few-shot split trains on the first third
    of each defect type's images (3 of 9) and holds out the rest."""
    counts = {"train_good": train_good, "test_good": test_good, "defect": defects}

    def write(staging: Path) -> None:
        for offset, family in enumerate(FAMILIES):
            write_mvtec_category(staging / family.object_class, np.random.default_rng(seed + 100 + offset), counts,
                                 lambda rng, f=family: f.render(rng, SIZE), {family.defect_type: family.add_defect})

    return replace_atomically(output_dir, write)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/defect_families", help="Dataset root to write.")
    parser.add_argument("--seed", type=int, default=0, help="Random seed; the same seed writes the same files.")
    args = parser.parse_args(argv)
    print(f"wrote {write_families(args.output_dir, args.seed)}")


if __name__ == "__main__":
    main()
