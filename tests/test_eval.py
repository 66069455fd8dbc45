"""eval_defectfill: KID and IC-LPIPS arithmetic on hand-checkable cases, and the end-to-end table."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import eval_defectfill as ev
import infer_defectfill as infer
from synthesis import LpipsModel


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
    same, _ = ev.kid_score(images, images.clone(), TinyFeatures(), subsets=20)
    different, _ = ev.kid_score(images, random_images(12, 1, low=100, high=255), TinyFeatures(), subsets=20)
    assert abs(same) < 0.05 * different and different > 0  # measured: 0.0019 vs 0.082 (unbiased estimator noise)


def test_kid_needs_two_images():
    with pytest.raises(ev.EvaluationError, match="at least 2"):
        ev.kid_score(random_images(1, 0), random_images(5, 1), TinyFeatures())


def test_ic_lpips_of_identical_images_is_zero():
    image = random_images(1, 0).float() / 127.5 - 1
    generated = image.repeat(4, 1, 1, 1)
    assert ev.ic_lpips(generated, image.repeat(2, 1, 1, 1), l1_distance) == 0


def test_ic_lpips_of_a_known_pair_is_its_distance():
    real = torch.stack([torch.full((3, 8, 8), -1.0), torch.full((3, 8, 8), 1.0)])
    # Two generated images near the first real one, one near the second (a cluster of one: skipped).
    generated = torch.stack([torch.full((3, 8, 8), -0.9), torch.full((3, 8, 8), -0.5), torch.full((3, 8, 8), 0.9)])
    assert ev.ic_lpips(generated, real, l1_distance) == pytest.approx(0.4)
    # And with the real LPIPS network (random backbone, offline): one real image, so both generated
    # images share its cluster and IC-LPIPS is the pair's own LPIPS.
    lpips_distance = LpipsModel("alex", pretrained_backbone=False).distance
    a, b = random_images(2, 3, size=32).float() / 127.5 - 1
    expected = lpips_distance(a[None], b[None]).item()
    assert expected > 0
    assert ev.ic_lpips(torch.stack([a, b]), a[None] * 0.5, lpips_distance) == pytest.approx(expected, rel=1e-5)


def test_ic_lpips_without_a_cluster_of_two_is_nan():
    real = torch.stack([torch.full((3, 4, 4), -1.0), torch.full((3, 4, 4), 1.0)])
    generated = torch.stack([torch.full((3, 4, 4), -0.9), torch.full((3, 4, 4), 0.9)])
    assert np.isnan(ev.ic_lpips(generated, real, l1_distance))


def test_evaluation_of_an_inference_folder(tiny_run, tmp_path, capsys):
    out = infer.main(infer.parse_args(["--lora", str(tiny_run), "--output_dir", str(tmp_path / "color"),
                                       "--num_inference_steps", "2", "--num_candidates", "1", "--num_images", "4"]))
    results = ev.main(ev.parse_args(["--generated", str(out), "--image_size", "64", "--kid_subsets", "5",
                                     "--output_json", str(tmp_path / "eval.json")]), feature=TinyFeatures(), distance=l1_distance)
    assert results[0]["defect_type"] == "color" and results[0]["num_generated"] == 4 and results[0]["num_real"] == 4
    table = capsys.readouterr().out
    assert "| defect type | generated | real | KID x1000 | IC-LPIPS |" in table and "| **mean** |" in table
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["kid_scale"] == 1000 and saved["results"][0]["kid_x1000"] == pytest.approx(results[0]["kid"] * 1000)


def test_folder_that_is_not_an_inference_output(tmp_path):
    with pytest.raises(ev.EvaluationError, match="has no metadata.jsonl"):
        ev.main(ev.parse_args(["--generated", str(tmp_path), "--real_dir", str(tmp_path)]), feature=TinyFeatures(),
                distance=l1_distance)
