"""Write a small, deterministic, synthetic dataset in the official MVTec AD folder layout.

    <root>/<category>/train/good/000.png
    <root>/<category>/test/good/000.png
    <root>/<category>/test/<defect>/000.png
    <root>/<category>/ground_truth/<defect>/000_mask.png

Two categories: ``wood`` (a brown grained texture) and ``metal_nut`` (a grey ring on a dark
background, so the prompt needs the readable name "metal nut"). Two defect types each, chosen so
their pixels differ clearly from the clean object: ``scratch`` (a thin dark line) and ``color``
(a saturated blue-green stain, a colour no clean image contains). The same seed writes the same bytes.

Usage: ``python scripts/make_synthetic_mvtec.py --output_dir data/synthetic_mvtec``
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

CATEGORIES = ("wood", "metal_nut")
DEFECT_TYPES = ("scratch", "color")
STAIN_RGB = np.array([40, 170, 190], dtype=np.float32)
SCRATCH_RGB = np.array([20, 15, 10], dtype=np.float32)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.meshgrid(coords, coords, indexing="xy")


def wood_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    x, y = _grid(size)
    phase, freq, wobble = rng.uniform(0, 2 * np.pi), rng.uniform(9, 13), rng.uniform(0.02, 0.05)
    rings = np.sin(2 * np.pi * freq * (y + wobble * np.sin(2 * np.pi * 3 * x + phase)) + phase)
    grain = rng.normal(0, 1, (size, size)).astype(np.float32)
    tone = 0.5 + 0.25 * rings + 0.05 * grain
    base = np.array([150, 100, 60], dtype=np.float32)
    return np.clip(base[None, None] * (0.7 + 0.6 * tone[..., None]), 0, 255)


def metal_nut(rng: np.random.Generator, size: int) -> np.ndarray:
    x, y = _grid(size)
    cx, cy = 0.5 + rng.uniform(-0.04, 0.04, size=2)
    radius = np.hypot(x - cx, y - cy)
    ring = (radius < 0.38) & (radius > 0.14)
    shade = 150 + 50 * (x - y) + rng.normal(0, 4, (size, size))
    background = 30 + rng.normal(0, 3, (size, size))
    grey = np.where(ring, shade, background).astype(np.float32)
    return np.clip(np.repeat(grey[..., None], 3, axis=2), 0, 255)


def object_support(category: str, image: np.ndarray) -> np.ndarray:
    """Where a defect may be placed: anywhere on a texture, on the ring for the nut."""
    if category == "metal_nut":
        return image[..., 0] > 90
    return np.ones(image.shape[:2], dtype=bool)


def scratch_mask(rng: np.random.Generator, size: int, support: np.ndarray) -> np.ndarray:
    x, y = _grid(size)
    ys, xs = np.nonzero(support)
    pick = rng.integers(len(ys))
    cx, cy = (xs[pick] + 0.5) / size, (ys[pick] + 0.5) / size
    angle, half_length = rng.uniform(0, np.pi), rng.uniform(0.12, 0.22)
    dx, dy = np.cos(angle), np.sin(angle)
    along = (x - cx) * dx + (y - cy) * dy
    across = -(x - cx) * dy + (y - cy) * dx
    return (np.abs(along) < half_length) & (np.abs(across) < 1.6 / size) & support


def stain_mask(rng: np.random.Generator, size: int, support: np.ndarray) -> np.ndarray:
    x, y = _grid(size)
    ys, xs = np.nonzero(support)
    pick = rng.integers(len(ys))
    cx, cy = (xs[pick] + 0.5) / size, (ys[pick] + 0.5) / size
    angle = np.arctan2(y - cy, x - cx)
    radius = rng.uniform(0.06, 0.1) * (1 + 0.25 * np.sin(3 * angle + rng.uniform(0, 2 * np.pi)))
    return (np.hypot(x - cx, y - cy) < radius) & support


def add_defect(rng: np.random.Generator, category: str, defect: str, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    support = object_support(category, image)
    if defect == "scratch":
        mask, colour = scratch_mask(rng, size, support), SCRATCH_RGB
    else:
        mask, colour = stain_mask(rng, size, support), STAIN_RGB
    texture = rng.normal(1.0, 0.06, image.shape[:2]).astype(np.float32)[..., None]
    defective = np.where(mask[..., None], np.clip(colour[None, None] * texture, 0, 255), image)
    return defective, mask


def render_clean(rng: np.random.Generator, category: str, size: int) -> np.ndarray:
    return wood_texture(rng, size) if category == "wood" else metal_nut(rng, size)


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "L" if array.ndim == 2 else "RGB"
    Image.fromarray(np.round(array).astype(np.uint8), mode=mode).save(path, optimize=True)


def write_mvtec_category(folder: Path, rng: np.random.Generator, counts: dict[str, int], render, defects: dict) -> None:
    """One category in the MVTec layout: `render(rng)` draws a clean image; `defects[name](rng, image)` paints a
    defect on one and returns (defective image, mask)."""
    for split in ("train", "test"):
        for index in range(counts[f"{split}_good"]):
            _save(np.clip(render(rng), 0, 255), folder / split / "good" / f"{index:03d}.png")
    for defect, add in defects.items():
        for index in range(counts["defect"]):
            defective, mask = add(rng, render(rng))
            _save(np.clip(defective, 0, 255), folder / "test" / defect / f"{index:03d}.png")
            _save(mask.astype(np.float32) * 255, folder / "ground_truth" / defect / f"{index:03d}_mask.png")


def replace_atomically(output_dir: str | os.PathLike, write) -> Path:
    """`write(staging)` fills a temp folder next to `output_dir`, which then replaces it in one rename."""
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir.parent) as tmp:
        staging = Path(tmp) / "data"
        staging.mkdir()
        write(staging)
        if output_dir.exists():
            os.replace(output_dir, Path(tmp) / "old")
        os.replace(staging, output_dir)
    return output_dir


def generate_dataset(
    output_dir: str | os.PathLike,
    seed: int = 0,
    size: int = 128,
    train_good: int = 6,
    test_good: int = 4,
    defects_per_type: int = 6,
) -> Path:
    """Write the dataset to `output_dir` (replaced atomically if it exists) and return its path."""
    counts = {"train_good": train_good, "test_good": test_good, "defect": defects_per_type}

    def write(staging: Path) -> None:
        for offset, category in enumerate(CATEGORIES):
            defects = {d: (lambda rng, image, d=d, c=category: add_defect(rng, c, d, image)) for d in DEFECT_TYPES}
            write_mvtec_category(staging / category, np.random.default_rng(seed + offset), counts,
                                 lambda rng, c=category: render_clean(rng, c, size), defects)

    return replace_atomically(output_dir, write)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="data/synthetic_mvtec", help="Dataset root to write.")
    parser.add_argument("--seed", type=int, default=0, help="Random seed; the same seed writes the same files.")
    parser.add_argument("--size", type=int, default=128, help="Image side in pixels.")
    parser.add_argument("--train_good", type=int, default=6, help="Defect-free training images per category.")
    parser.add_argument("--test_good", type=int, default=4, help="Defect-free test images per category.")
    parser.add_argument("--defects_per_type", type=int, default=6, help="Defective test images per defect type.")
    args = parser.parse_args(argv)
    path = generate_dataset(
        args.output_dir, args.seed, args.size, args.train_good, args.test_good, args.defects_per_type
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
