"""Shared fixtures: the bundled tiny SD2-inpainting model and the bundled synthetic MVTec data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Nothing in the tests may reach the Hub: the bundled model is loaded from its folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_MODEL = REPO_ROOT / "models" / "tiny-sd2-inpainting"
SYNTHETIC_DATA = REPO_ROOT / "data" / "synthetic_mvtec"


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    return TINY_MODEL


@pytest.fixture(scope="session")
def synthetic_data_dir() -> Path:
    return SYNTHETIC_DATA


@pytest.fixture(scope="session")
def tiny_pipeline():
    """The tiny pipeline loaded as users load SD2-inpainting; tests must not modify it."""
    from diffusers import StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline.from_pretrained(str(TINY_MODEL))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def copy_of_data(tmp_path, synthetic_data_dir) -> Path:
    """A writable copy of the synthetic dataset for tests that break it."""
    import shutil

    target = tmp_path / "mvtec"
    shutil.copytree(synthetic_data_dir, target)
    return target


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A short DefectFill run on the tiny model (metal_nut / color), shared by the inference tests."""
    import train_defectfill as train

    output_dir = tmp_path_factory.mktemp("tiny_run") / "metal_nut-color"
    train.main(train.parse_args([
        "--config", str(REPO_ROOT / "configs" / "tiny.yaml"), "--pretrained_model_name_or_path", str(TINY_MODEL),
        "--data_dir", str(SYNTHETIC_DATA), "--output_dir", str(output_dir), "--max_train_steps", "4",
        "--train_batch_size", "2", "--validation_steps", "0", "--checkpointing_steps", "1000", "--report_to", "none",
    ]))
    return output_dir


@pytest.fixture(scope="session")
def offline_torch_home(tmp_path_factory) -> Path:
    """A TORCH_HOME whose hub cache holds a random-init AlexNet under the file name torchvision downloads the pretrained
    weights to: `lpips.LPIPS(net="alex")` then loads offline with its real code (the scores are not the pretrained
    backbone's, which tests never need)."""
    import torch
    import torchvision
    from torchvision.models import AlexNet_Weights

    home = tmp_path_factory.mktemp("torch_home")
    checkpoints = home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        weights = torchvision.models.alexnet().state_dict()
    torch.save(weights, checkpoints / Path(AlexNet_Weights.IMAGENET1K_V1.url).name)
    return home


@pytest.fixture
def lpips_weights(offline_torch_home, monkeypatch) -> Path:
    """LPIPS's AlexNet backbone available offline for this test (`offline_torch_home` as TORCH_HOME)."""
    monkeypatch.setenv("TORCH_HOME", str(offline_torch_home))
    return offline_torch_home
