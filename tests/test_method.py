"""defectfill_method: prompts, the loss functions against hand-computed numbers, the random-box mask."""

from __future__ import annotations

import pytest
import torch

from defectfill.masks import cover_latent_blocks, mask_to_latent
from defectfill.method import (
    DEFAULT_LOSS_WEIGHTS,
    DEFAULT_OBJECT_ALPHA,
    LossWeights,
    attention_loss,
    defect_loss,
    defect_prompt,
    object_loss,
    object_loss_weight,
    object_prompt,
    random_box_mask,
    total_loss,
)


def test_prompts_use_readable_object_names():
    assert defect_prompt() == "A photo of sks"
    assert object_prompt("metal_nut") == "A metal nut with sks"
    assert object_prompt("bottle", token="zwx") == "A bottle with zwx"


def test_paper_loss_weights():
    assert DEFAULT_LOSS_WEIGHTS == LossWeights(0.5, 0.2, 0.05)
    assert DEFAULT_OBJECT_ALPHA == 0.3


def test_defect_loss_by_hand():
    # 1 sample, 1 channel, 2x2: errors 1, 2, 3, 4; mask keeps the first and last pixel.
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    target = torch.zeros_like(pred)
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    # mean over all 4 elements of (M (eps - eps_hat))^2 = (1 + 16) / 4
    assert defect_loss(pred, target, mask).item() == pytest.approx(17 / 4)


def test_defect_loss_mask_broadcasts_over_channels():
    pred = torch.ones(2, 4, 3, 3)
    target = torch.zeros_like(pred)
    mask = torch.zeros(2, 1, 3, 3)
    mask[:, :, 0, 0] = 1
    # 2 * 4 masked elements of value 1 over 2 * 4 * 9 elements.
    assert defect_loss(pred, target, mask).item() == pytest.approx(1 / 9)


def test_object_loss_by_hand():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    target = torch.zeros_like(pred)
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    # M' = [1, .3, .3, 1]: (1^2 + (.3*2)^2 + (.3*3)^2 + 4^2) / 4
    expected = (1 + 0.36 + 0.81 + 16) / 4
    assert object_loss(pred, target, mask, alpha=0.3).item() == pytest.approx(expected)
    assert torch.equal(object_loss_weight(mask, 0.3), torch.tensor([[[[1.0, 0.3], [0.3, 1.0]]]]))


def test_attention_loss_by_hand():
    attention = torch.tensor([[[[0.5, 0.0], [0.25, 1.0]]]])
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    assert attention_loss(attention, mask).item() == pytest.approx((0.25 + 0 + 0.0625 + 0) / 4)


def test_total_loss_weights_terms():
    terms = {"defect": torch.tensor(2.0), "object": torch.tensor(10.0), "attention": torch.tensor(4.0)}
    assert total_loss(terms).item() == pytest.approx(0.5 * 2 + 0.2 * 10 + 0.05 * 4)
    assert total_loss(terms, LossWeights(1, 0, 0)).item() == pytest.approx(2.0)


def test_losses_are_differentiable():
    pred = torch.randn(2, 4, 8, 8, requires_grad=True)
    attention = torch.rand(2, 1, 8, 8, requires_grad=True)
    mask = (torch.rand(2, 1, 8, 8) > 0.5).float()
    target = torch.randn(2, 4, 8, 8)
    terms = {"defect": defect_loss(pred, target, mask), "object": object_loss(pred, target, mask),
             "attention": attention_loss(attention, mask)}
    total_loss(terms).backward()
    assert pred.grad.abs().sum() > 0 and attention.grad.abs().sum() > 0


def test_random_box_mask_shape_values_and_seed():
    first = random_box_mask(3, 64, 48, generator=torch.Generator().manual_seed(1))
    again = random_box_mask(3, 64, 48, generator=torch.Generator().manual_seed(1))
    other = random_box_mask(3, 64, 48, generator=torch.Generator().manual_seed(2))
    assert first.shape == (3, 1, 64, 48)
    assert set(first.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert not torch.equal(first[0], first[1])  # each sample draws its own boxes


def test_random_box_mask_single_box_bounds():
    """One box: an axis-aligned rectangle inside the image with sides in [3%, 25%] of the side."""
    for seed in range(50):
        mask = random_box_mask(1, 200, 100, num_boxes=1, generator=torch.Generator().manual_seed(seed))[0, 0]
        rows = mask.any(dim=1).nonzero().flatten()
        cols = mask.any(dim=0).nonzero().flatten()
        height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert 6 <= height <= 50 and 3 <= width <= 25
        assert mask.sum() == height * width  # a full rectangle


def test_random_box_mask_coverage_range():
    """30 boxes of 3-25% sides cover a fraction of the image that stays within a plausible band."""
    coverage = random_box_mask(64, 128, 128, generator=torch.Generator().manual_seed(0)).mean(dim=(1, 2, 3))
    assert 0.1 < coverage.min() and coverage.max() < 0.75
    assert 0.25 < coverage.mean() < 0.55


def test_random_box_mask_rejects_bad_fractions():
    with pytest.raises(ValueError, match="0 < min <= max <= 1"):
        random_box_mask(1, 8, 8, min_fraction=0.5, max_fraction=0.1)


def thin_masks(size: int = 512) -> dict[str, torch.Tensor]:
    """The cases the issue measured at 512 px: a 3 px vertical scratch at an odd column, a 3 px diagonal
    scratch and a 5x5 spot placed off the 8 px grid."""
    vertical = torch.zeros(1, 1, size, size)
    vertical[..., 100:400, 201:204] = 1
    diagonal = torch.zeros(1, 1, size, size)
    for i in range(100, 400):
        diagonal[..., i, i + 1 : i + 4] = 1
    spot = torch.zeros(1, 1, size, size)
    spot[..., 301:306, 201:206] = 1
    return {"vertical": vertical, "diagonal": diagonal, "spot": spot}


def test_nearest_resize_loses_thin_defects_and_ours_keeps_them():
    """The failure the fix is for: the pipeline's nearest resize keeps one pixel per 8x8 block."""
    for name, mask in thin_masks().items():
        nearest = torch.nn.functional.interpolate(mask, size=(64, 64))
        ours = mask_to_latent(mask, (64, 64))
        covered_blocks = torch.nn.functional.max_pool2d(mask, 8).sum()
        assert ours.sum() == covered_blocks > 0, name  # every block holding a defect pixel
        assert nearest.sum() < ours.sum(), name
    assert torch.nn.functional.interpolate(thin_masks()["vertical"], size=(64, 64)).sum() == 0  # the scratch vanished


def test_cover_latent_blocks_keeps_every_pixel_and_matches_the_pipeline_resize():
    """The model's mask: whole blocks, a superset of the defect; the pipeline's nearest resize of it is exactly
    the max-pooled mask the losses weigh (training and inference see the same mask)."""
    for name, mask in thin_masks().items():
        covered = cover_latent_blocks(mask, 8)
        assert torch.all(covered >= mask), name
        assert torch.equal(torch.nn.functional.interpolate(covered, size=(64, 64)), mask_to_latent(mask, (64, 64))), name
        assert torch.equal(cover_latent_blocks(covered, 8), covered)  # block-aligned masks are unchanged
    odd = torch.zeros(1, 1, 5, 7)
    odd[..., 4, 6] = 1
    assert cover_latent_blocks(odd, 2)[0, 0, 4, 6] == 1 and cover_latent_blocks(odd, 2).shape == odd.shape


def test_thin_defects_give_a_defect_loss_and_an_attention_target():
    """L_def and the attention target of a 3 px scratch and a 5x5 spot at 512 px are non-zero."""
    prediction, target = torch.zeros(1, 4, 64, 64), torch.ones(1, 4, 64, 64)
    for name, mask in thin_masks().items():
        latent_mask = mask_to_latent(mask, (64, 64))
        assert defect_loss(prediction, target, latent_mask) > 0, name
        assert latent_mask.sum() > 0, name
        assert attention_loss(torch.zeros_like(latent_mask), latent_mask) > 0, name
