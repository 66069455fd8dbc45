"""mask_augment: seeded new masks from few, the checks that keep or reject them, and the foreground
estimate on the bundled classes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from defectfill.build.augment import (
    EMPTY,
    EMPTY_AT_LATENT_SIZE,
    OFF_OBJECT,
    OVERLAPS_OTHER_DEFECT,
    TOUCHES_BORDER,
    AugmentSettings,
    augment_mask,
    bounding_box,
    check_mask,
    draw_mask,
    estimate_foreground,
    is_texture_class,
    on_object_fraction,
    otsu_threshold,
    pick_mask,
    place_shape,
    touches_border,
)
from defectfill.masks import latent_mask, model_mask
from tests.conftest import SYNTHETIC_DATA


def square(size=64, top=20, left=24, side=10):
    mask = np.zeros((size, size), dtype=bool)
    mask[top : top + side, left : left + side] = True
    return mask


def real_mask(defect="scratch", number=0, cls="metal_nut"):
    return np.asarray(Image.open(SYNTHETIC_DATA / cls / "ground_truth" / defect / f"{number:03d}_mask.png")) >= 128


def test_bounding_box_and_place_shape_by_hand():
    mask = square(16, 3, 5, 4)
    assert bounding_box(mask) == (3, 5, 7, 9)
    assert bounding_box(np.zeros((4, 4), bool)) is None
    placed = place_shape(np.ones((2, 3), bool), (6, 6), top=4, left=4)  # cut by the border
    assert placed.sum() == 4 and placed[4:6, 4:6].all()


def test_identity_augmentation_keeps_the_shape():
    settings = AugmentSettings(flip=False, max_rotation=0, min_scale=1, max_scale=1, elastic=0, jitter=0)
    out = augment_mask(square(), np.random.default_rng(0), settings)
    assert np.array_equal(out, square())


def test_scale_range_bounds_the_area():
    settings = AugmentSettings(flip=False, max_rotation=0, min_scale=0.75, max_scale=1.25, elastic=0)
    areas = [augment_mask(square(side=16), np.random.default_rng(s), settings).sum() for s in range(20)]
    assert min(areas) >= (16 * 0.75 - 1) ** 2 and max(areas) <= (16 * 1.25 + 1) ** 2
    assert max(areas) - min(areas) > 100  # the scale does vary


def test_augmentation_is_seeded_and_varied():
    mask, settings = real_mask(), AugmentSettings()
    a = augment_mask(mask, np.random.default_rng(3), settings)
    assert np.array_equal(a, augment_mask(mask, np.random.default_rng(3), settings))
    others = [augment_mask(mask, np.random.default_rng(s), settings) for s in range(4, 8)]
    assert all(not np.array_equal(a, o) for o in others)
    assert all(0.3 * mask.sum() < o.sum() < 2.5 * mask.sum() for o in others if not touches_border(o))


def test_jitter_keeps_the_mask_near_its_place():
    mask = square(128, 60, 60, 8)
    settings = AugmentSettings(jitter=0.05, elastic=0)
    for seed in range(10):
        top, left, bottom, right = bounding_box(augment_mask(mask, np.random.default_rng(seed), settings))
        assert abs((top + bottom) / 2 - 64) <= 0.05 * 128 + 2 and abs((left + right) / 2 - 64) <= 0.05 * 128 + 2


def test_placement_centres_on_the_foreground():
    foreground = np.zeros((64, 64), bool)
    foreground[40:60, 4:30] = True
    settings = AugmentSettings(elastic=0, max_rotation=0, flip=False, min_scale=1, max_scale=1)
    for seed in range(10):
        top, left, bottom, right = bounding_box(augment_mask(square(side=4), np.random.default_rng(seed), settings, foreground))
        assert foreground[(top + bottom) // 2, (left + right) // 2]


def test_checks_name_the_reason():
    assert check_mask(np.zeros((8, 8), bool)) == EMPTY
    edge = np.zeros((8, 8), bool)
    edge[0, 3] = True
    assert check_mask(edge) == TOUCHES_BORDER
    dot = np.zeros((16, 16), bool)
    dot[5, 5] = True  # a single pixel at an odd position: a nearest resize to latent size 8 would drop it
    assert check_mask(dot, visible_at_latent=lambda m: latent_mask(m.astype(np.uint8) * 255, 2).any()) is None
    assert check_mask(dot, visible_at_latent=lambda m: False) == EMPTY_AT_LATENT_SIZE
    dot[4, 4] = True
    foreground = np.zeros((16, 16), bool)
    foreground[:, :5] = True  # the mask's (4,4) pixel on the object, (5,5) not: 50 %
    assert check_mask(dot, foreground=foreground, min_on_object=0.9) == OFF_OBJECT
    assert check_mask(dot, foreground=foreground, min_on_object=0.5) is None
    other = np.zeros((16, 16), bool)
    other[6, 6] = True  # diagonal neighbour: touches after a 1-pixel dilation
    assert check_mask(dot, avoid=other) == OVERLAPS_OTHER_DEFECT
    assert check_mask(dot, avoid=other, gap=0) is None


def test_latent_mask_matches_the_pipeline(tiny_pipeline):
    """The same latent mask as diffusers' own mask preprocessing + interpolation of the mask synthesis hands
    the pipeline (grown to whole latent blocks; tiny VAE: factor 2)."""
    import torch

    rng = np.random.default_rng(0)
    mask = (rng.random((64, 64)) > 0.7).astype(np.uint8) * 255
    factor = 2 ** (len(tiny_pipeline.vae.config.block_out_channels) - 1)
    handed = model_mask(Image.fromarray(mask), factor)
    processed = tiny_pipeline.mask_processor.preprocess(handed, height=64, width=64)
    theirs = torch.nn.functional.interpolate(processed, size=(64 // factor, 64 // factor))[0, 0].numpy() > 0
    assert np.array_equal(latent_mask(mask, factor), theirs)


def test_draw_mask_counts_rejections_and_gives_up():
    tiny = np.zeros((32, 32), bool)
    tiny[10:12, 10:12] = True
    never = lambda m: False  # noqa: E731
    mask, source, rejected = draw_mask([tiny], np.random.default_rng(0), AugmentSettings(), 5, visible_at_latent=never)
    assert mask is None and source is None and sum(rejected.values()) == 5
    mask, source, rejected = draw_mask([tiny], np.random.default_rng(0), AugmentSettings(), 20)
    assert mask is not None and source == 0 and check_mask(mask) is None


def test_pick_mask_tries_the_next_ones():
    a, b = square(32, 0, 0, 4), square(32, 10, 10, 4)  # a touches the border: only the foreground check matters here
    foreground = np.zeros((32, 32), bool)
    foreground[8:20, 8:20] = True
    mask, index, rejected = pick_mask([a, b], 0, foreground=foreground)
    assert index == 1 and rejected == {OFF_OBJECT: 1}


def test_otsu_separates_two_values():
    values = np.array([10.0] * 50 + [200.0] * 50)
    threshold, separation = otsu_threshold(values)
    assert 10 <= threshold < 200 and separation == pytest.approx(1.0, abs=0.01)


def test_foreground_of_the_bundled_metal_nut():
    """The nut's ring is the object; the dark background and the hole are not; the real colour-stain masks
    lie on the estimated object of their own images."""
    for path in sorted((SYNTHETIC_DATA / "metal_nut" / "train" / "good").glob("*.png")):
        foreground = estimate_foreground(Image.open(path))
        assert 0.3 < foreground.mean() < 0.5
        assert not foreground[0, 0] and not foreground[64, 64]  # corner, hole
        assert foreground[64, 30] and foreground[64, 100]  # on the ring
    for number in range(6):
        image = Image.open(SYNTHETIC_DATA / "metal_nut" / "test" / "color" / f"{number:03d}.png")
        assert on_object_fraction(real_mask("color", number), estimate_foreground(image)) >= 0.98


def test_foreground_of_the_bundled_wood_is_the_whole_image():
    for path in sorted((SYNTHETIC_DATA / "wood" / "train" / "good").glob("*.png")):
        assert estimate_foreground(Image.open(path)).all()
    assert is_texture_class("wood") and not is_texture_class("metal_nut")


def test_augmented_masks_on_metal_nut_mostly_fit():
    """Drawn against the estimated foreground, most attempts give a usable mask."""
    foreground = estimate_foreground(Image.open(SYNTHETIC_DATA / "metal_nut" / "train" / "good" / "000.png"))
    sources = [real_mask("color", n) for n in range(2, 6)]
    rng = np.random.default_rng(0)
    kept = 0
    for _ in range(10):
        mask, _, _ = draw_mask(sources, rng, AugmentSettings(), 50, foreground=foreground, min_on_object=0.9)
        kept += mask is not None and on_object_fraction(mask, foreground) >= 0.9
    assert kept == 10
