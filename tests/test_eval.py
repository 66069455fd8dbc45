"""eval_defectfill: KID and IC-LPIPS arithmetic on hand-checkable cases, and the end-to-end table."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import eval_defectfill as ev
import infer_defectfill as infer
from defectfill import evaluation
from defectfill.errors import EvaluationError
from defectfill.evaluation import kid_score, stability_warnings
from defectfill.scoring import LpipsModel


class TinyFeatures(torch.nn.Module):
    """A fixed, local feature extractor standing in for Inception (whose weights are downloaded)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 16, 5, stride=4)

    @torch.no_grad()
    def forward(self, images):
        x = self.conv(images.float() / 255)
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1).double()


def random_images(n, seed, low=0, high=255, size=32):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(low, high, (n, 3, size, size), dtype=np.uint8))


def l1_distance(a, b):
    return (a - b).abs().mean(dim=(1, 2, 3))


def test_kid_of_a_set_against_itself_is_about_zero():
    images = random_images(12, 0)
    same = kid_score(images, images.clone(), TinyFeatures(), subsets=20)
    different = kid_score(images, random_images(12, 1, low=100, high=255), TinyFeatures(), subsets=20)
    assert abs(same["kid"]) < 0.05 * different["kid"] and different["kid"] > 0
    assert (same["kid_subsets"], same["kid_subset_size"]) == (20, 12)  # min(real, generated, 1000)
    capped = kid_score(images, images.clone(), TinyFeatures(), subsets=3, max_subset_size=5)
    assert capped["kid_subset_size"] == 5


def test_kid_needs_two_images():
    with pytest.raises(EvaluationError, match="at least 2 real and 2 generated images.*1 real and 5 generated"):
        kid_score(random_images(1, 0), random_images(5, 1), TinyFeatures())


def test_ic_lpips_of_identical_images_is_zero():
    image = random_images(1, 0).float() / 127.5 - 1
    generated = image.repeat(4, 1, 1, 1)
    result = evaluation.ic_lpips(generated, image.repeat(2, 1, 1, 1), l1_distance)
    assert result["ic_lpips"] == 0 and np.isnan(result["ic_lpips_nonzero"])


def test_ic_lpips_as_dfmgan_defines_it_by_hand():
    """Three centres (the few-shot training images); generated: two near the first (L1 0.4 apart), one near
    the second (a singleton: 0), none near the third (empty: 0). DFMGAN's two figures: (0.4 + 0 + 0) / 3 over
    all centres, and 0.4 over the non-zero clusters."""
    centres = torch.stack([torch.full((3, 8, 8), v) for v in (-1.0, 1.0, 0.0)])
    generated = torch.stack([torch.full((3, 8, 8), v) for v in (-0.9, -0.5, 0.9)])
    result = evaluation.ic_lpips(generated, centres, l1_distance)
    assert result["cluster_sizes"] == [2, 1, 0]
    assert result["ic_lpips"] == pytest.approx(0.4 / 3) and result["ic_lpips_nonzero"] == pytest.approx(0.4)
    # A cluster keeps its first members only (DFMGAN caps at 200).
    assert evaluation.ic_lpips(generated, centres, l1_distance, max_cluster_size=1)["cluster_sizes"] == [1, 1, 0]


def test_ic_lpips_with_the_real_lpips_network(offline_lpips_weights):
    """With the real LPIPS network (its AlexNet weights from the offline cache) and one centre, IC-LPIPS is the
    pair's own LPIPS."""
    lpips_distance = LpipsModel("alex").distance
    a, b = random_images(2, 3, size=32).float() / 127.5 - 1
    expected = lpips_distance(a[None], b[None]).item()
    assert expected > 0
    assert evaluation.ic_lpips(torch.stack([a, b]), a[None] * 0.5, lpips_distance)["ic_lpips"] == pytest.approx(expected, rel=1e-5)


def test_too_few_images_are_flagged():
    assert len(stability_warnings(4, 4, 2)) == 2
    assert stability_warnings(1000, 120, 20) == []


def test_evaluation_of_an_inference_folder(tiny_run, tmp_path, capsys):
    out = infer.main(infer.parse_args(["--lora", str(tiny_run), "--output_dir", str(tmp_path / "color"),
                                       "--num_inference_steps", "2", "--num_candidates", "1", "--num_images", "4"]))
    results = ev.main(ev.parse_args(["--generated", str(out), "--image_size", "64", "--kid_subsets", "5",
                                     "--output_json", str(tmp_path / "eval.json")]), feature=TinyFeatures(), distance=l1_distance)
    assert results[0]["defect_type"] == "color" and results[0]["num_generated"] == 4 and results[0]["num_real"] == 4
    assert results[0]["num_clusters"] == 2 and sum(results[0]["cluster_sizes"]) == 4  # the run's 2 training images
    printed = capsys.readouterr()
    assert "| defect type | generated | real | clusters | KID x1000 | IC-LPIPS |" in printed.out and "| **mean** |" in printed.out
    assert "KID: 5 subsets of 4 images" in printed.out and "warning: color: KID from 4 generated" in printed.err
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["kid_scale"] == 1000 and saved["results"][0]["kid_x1000"] == pytest.approx(results[0]["kid"] * 1000)


def test_folder_that_is_not_an_inference_output(tmp_path):
    with pytest.raises(EvaluationError, match="has no metadata.jsonl"):
        ev.main(ev.parse_args(["--generated", str(tmp_path), "--real_dir", str(tmp_path)]), feature=TinyFeatures(),
                distance=l1_distance)
